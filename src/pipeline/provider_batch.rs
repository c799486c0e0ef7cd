//! Batching runs into the providers' batch endpoints. Runs of one batchable action on one
//! connection that are ready within `batching.window` share one call, up to the provider's
//! most records per call (`integrations::batch_api`); each record's answer goes to its own
//! run, which then decides and settles as if it had made the call alone.
//!
//! The first run of a batch leads it ([`Wait`]). Runs are counted per connection and action
//! from their admission ([`Batches::expect`]), so the leader knows what is on its way. A lone
//! run of a quiet key goes at once, not delayed; runs of a backlog wait until every one on
//! its way has joined; right after a batch (a stream) the next waits for company, until full.
//! None waits longer than the window since it arrived. Then the leader takes one call of the
//! account's budget, sends, and hands each run its answer. The others wait for theirs. A
//! run whose batch's answer says nothing of it is not taken as a success: it fails
//! transiently and runs again, alone (`Attempt::earlier`), through the single call's lookup
//! of what an earlier attempt made.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use tokio::sync::{Notify, oneshot};
use uuid::Uuid;

use crate::config::BatchingSettings;
use crate::core::failure::{Failure, FailureKind};
use crate::integrations::batch_api::{BatchKind, BatchRecord, RecordAnswer};

/// What a run gets back from its batch.
pub enum Ridden {
    Answer(RecordAnswer),
    /// The whole batch failed as one call would (a 429, a 5xx, expired credentials).
    Failed(Failure),
}

pub(super) type Key = (Uuid, BatchKind);

pub(super) struct Rider {
    pub(super) record: BatchRecord,
    pub(super) answer: oneshot::Sender<Ridden>,
}

/// A batch still taking runs.
struct Open {
    id: u64,
    riders: Arc<Mutex<Vec<Rider>>>,
    full: Arc<Notify>,
    /// The ids of its records that name one (an update's, an upsert's): the providers refuse
    /// a batch naming a record twice.
    named: HashSet<String>,
    wait: Wait,
}

/// What a batch's leader waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wait {
    /// Nothing: no other run is on its way, and the key is quiet.
    Nothing,
    /// The runs admitted and on their way, the window at most (a backlog arriving).
    Coming,
    /// The window, or a full batch: the key sent a batch within the window (a stream), so
    /// more are likely, though none is admitted yet.
    Window,
}

#[derive(Default)]
struct State {
    open: HashMap<Key, Open>,
    /// When each key last sent a batch; what is older than the window is pruned.
    sent: HashMap<Key, Instant>,
    /// Runs admitted per connection and action that have not joined a batch yet: what an
    /// open batch waits for, the window at most.
    coming: HashMap<Key, usize>,
}

/// The batches being gathered, per connection and action.
pub struct Batches {
    settings: BatchingSettings,
    state: Mutex<State>,
    next_id: AtomicU64,
}

/// A run on its way to a batch, counted from its admission: its batch waits for it. Dropped
/// without joining (the run ended first), it is no longer waited for.
pub struct Coming {
    batches: Arc<Batches>,
    key: Option<Key>,
}

impl Coming {
    /// Whether the run rides in a batch.
    pub fn rides(&self) -> bool {
        self.key.is_some()
    }
}

impl Drop for Coming {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let mut state = lock(&self.batches.state);
        if state.arrived(&key) == 0
            && let Some(open) = state.open.get(&key)
            && open.wait == Wait::Coming
        {
            open.full.notify_one();
        }
    }
}

impl State {
    /// One run of `key` is no longer coming; returns how many still are.
    fn arrived(&mut self, key: &Key) -> usize {
        let Some(left) = self.coming.get_mut(key) else {
            return 0;
        };
        *left = left.saturating_sub(1);
        let left = *left;
        if left == 0 {
            self.coming.remove(key);
        }
        left
    }
}

pub(super) enum Seat {
    Leader {
        id: u64,
        riders: Arc<Mutex<Vec<Rider>>>,
        full: Arc<Notify>,
        wait: Wait,
    },
    Follower,
    /// The open batch names the same record already: this run's goes alone.
    Alone,
}

impl Batches {
    pub fn new(settings: &BatchingSettings) -> Batches {
        Batches {
            settings: settings.clone(),
            state: Mutex::new(State::default()),
            next_id: AtomicU64::new(0),
        }
    }

    /// Whether runs of `kind` are batched.
    pub fn batches(&self, kind: &BatchKind) -> bool {
        self.settings.batches(kind.name())
    }

    /// Counts a run admitted for a batch of `key` (`None`: a run that does not ride).
    pub fn expect(self: &Arc<Self>, key: Option<Key>) -> Coming {
        if let Some(key) = &key {
            *lock(&self.state).coming.entry(key.clone()).or_default() += 1;
        }
        Coming {
            batches: self.clone(),
            key,
        }
    }

    /// Joins the open batch of the connection and action, or opens one; `coming` is the run's
    /// count from its admission, which joining ends. A run that fills the batch, or the last
    /// one on its way, lets the batch go; the next run opens another.
    pub(super) fn join(
        &self,
        key: Key,
        record: BatchRecord,
        answer: oneshot::Sender<Ridden>,
        coming: Option<Coming>,
    ) -> Seat {
        let max = key.1.max_records();
        let mut state = lock(&self.state);
        let mut still_coming = state.coming.get(&key).copied().unwrap_or(0);
        if let Some(mut coming) = coming
            && let Some(counted) = coming.key.take()
        {
            let left = state.arrived(&counted);
            if counted == key {
                still_coming = left;
            }
        }
        let recent = state
            .sent
            .get(&key)
            .is_some_and(|at| at.elapsed() < self.settings.window);
        match state.open.entry(key) {
            Entry::Occupied(mut entry) => {
                if let Some(id) = &record.id
                    && !entry.get_mut().named.insert(id.clone())
                {
                    return Seat::Alone;
                }
                let full = {
                    let mut riders = lock(&entry.get().riders);
                    riders.push(Rider { record, answer });
                    riders.len() >= max
                };
                if full {
                    entry.remove().full.notify_one();
                } else if still_coming == 0 && entry.get().wait == Wait::Coming {
                    entry.get().full.notify_one();
                }
                Seat::Follower
            }
            Entry::Vacant(entry) => {
                let wait = if recent {
                    Wait::Window
                } else if still_coming > 0 {
                    Wait::Coming
                } else {
                    Wait::Nothing
                };
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let named = record.id.iter().cloned().collect();
                let riders = Arc::new(Mutex::new(vec![Rider { record, answer }]));
                let full = Arc::new(Notify::new());
                entry.insert(Open {
                    id,
                    riders: riders.clone(),
                    full: full.clone(),
                    named,
                    wait,
                });
                Seat::Leader {
                    id,
                    riders,
                    full,
                    wait,
                }
            }
        }
    }

    /// The leader's batch, closed (if a full one has not closed it already) and emptied, as
    /// its [`Wait`] says: at once; once every run on its way has joined; or once full, at the
    /// end of the window at most.
    pub(super) async fn gather(
        &self,
        key: &Key,
        id: u64,
        riders: &Mutex<Vec<Rider>>,
        full: &Notify,
        wait: Wait,
    ) -> Vec<Rider> {
        if wait != Wait::Nothing {
            tokio::select! {
                _ = tokio::time::sleep(self.settings.window) => {}
                _ = full.notified() => {}
            }
        }
        let mut state = lock(&self.state);
        if state.open.get(key).is_some_and(|batch| batch.id == id) {
            state.open.remove(key);
        }
        let now = Instant::now();
        if state.sent.len() >= 1024 {
            let window = self.settings.window;
            state.sent.retain(|_, at| now.duration_since(*at) < window);
        }
        state.sent.insert(key.clone(), now);
        drop(state);
        std::mem::take(&mut *lock(riders))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A record a batch did not answer for: transient, so it runs again, alone.
pub fn unanswered() -> Failure {
    Failure::new(
        FailureKind::Transient,
        "the batch's answer did not include this record; it is tried again",
    )
    .with_code("BATCH_UNANSWERED")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn batches(window_ms: u64) -> Arc<Batches> {
        Arc::new(Batches::new(&BatchingSettings {
            enabled: true,
            window: Duration::from_millis(window_ms),
            off: Vec::new(),
        }))
    }

    fn record(n: usize) -> BatchRecord {
        BatchRecord {
            fields: serde_json::json!({ "email": format!("{n}@example.com") }),
            id: None,
        }
    }

    fn key() -> Key {
        (Uuid::new_v4(), BatchKind::HubspotCreate)
    }

    /// Joins as a run counted from its admission would.
    fn join(batches: &Arc<Batches>, key: &Key, coming: Coming, n: usize) -> Seat {
        let (answer, _answered) = oneshot::channel();
        batches.join(key.clone(), record(n), answer, Some(coming))
    }

    /// The seat's batch, when it leads one; `what` says why it should.
    fn leads(seat: Seat, what: &str) -> (u64, Arc<Mutex<Vec<Rider>>>, Arc<Notify>, Wait) {
        match seat {
            Seat::Leader {
                id,
                riders,
                full,
                wait,
            } => (id, riders, full, wait),
            _ => panic!("{what}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_run_goes_at_once() {
        let batches = batches(50);
        let key = key();
        let coming = batches.expect(Some(key.clone()));
        let (id, riders, full, wait) =
            leads(join(&batches, &key, coming, 0), "the first run leads");
        let started = tokio::time::Instant::now();

        let gathered = batches.gather(&key, id, &riders, &full, wait).await;

        assert_eq!(gathered.len(), 1);
        assert_eq!(started.elapsed(), Duration::ZERO, "not delayed");
        assert!(lock(&batches.state).open.is_empty(), "the batch is closed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_waits_for_the_runs_on_their_way_and_the_window_at_most() {
        let batches = batches(50);
        let key = key();
        let first = batches.expect(Some(key.clone()));
        let second = batches.expect(Some(key.clone()));
        let third = batches.expect(Some(key.clone()));
        let (id, riders, full, wait) = leads(join(&batches, &key, first, 0), "the first run leads");
        assert_eq!(wait, Wait::Coming, "two more are on their way");

        // The second joins after 10 ms; the third ends before riding (say its claim found
        // it done): the batch goes then, with the two.
        let late = batches.clone();
        let key2 = key.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert!(matches!(join(&late, &key2, second, 1), Seat::Follower));
            tokio::time::sleep(Duration::from_millis(5)).await;
            drop(third);
        });
        let started = tokio::time::Instant::now();
        let gathered = batches.gather(&key, id, &riders, &full, wait).await;

        assert_eq!(gathered.len(), 2);
        assert_eq!(started.elapsed(), Duration::from_millis(15));

        // Right after a batch, a run waits for company, though none is admitted yet (a
        // stream): the window, no longer.
        let next = batches.expect(Some(key.clone()));
        let (id, riders, full, wait) =
            leads(join(&batches, &key, next, 2), "it leads the next batch");
        assert_eq!(wait, Wait::Window);
        let started = tokio::time::Instant::now();
        let gathered = batches.gather(&key, id, &riders, &full, wait).await;
        assert_eq!(gathered.len(), 1);
        assert_eq!(started.elapsed(), Duration::from_millis(50));

        // A quiet window later, a lone run goes at once again.
        tokio::time::sleep(Duration::from_millis(51)).await;
        let lone = batches.expect(Some(key.clone()));
        assert!(matches!(
            join(&batches, &key, lone, 3),
            Seat::Leader {
                wait: Wait::Nothing,
                ..
            }
        ));
    }

    #[test]
    fn a_record_the_open_batch_names_already_goes_alone() {
        let batches = batches(50);
        let key = (
            Uuid::new_v4(),
            BatchKind::HubspotUpsert {
                id_property: "email".into(),
            },
        );
        let named = |id: &str| BatchRecord {
            fields: serde_json::json!({ "email": id }),
            id: Some(id.into()),
        };
        let comings: Vec<Coming> = (0..3).map(|_| batches.expect(Some(key.clone()))).collect();
        let mut seats = Vec::new();
        for (coming, email) in comings.into_iter().zip(["a@x.com", "b@x.com", "a@x.com"]) {
            let (answer, _answered) = oneshot::channel();
            seats.push(batches.join(key.clone(), named(email), answer, Some(coming)));
        }

        assert!(matches!(seats[0], Seat::Leader { .. }));
        assert!(matches!(seats[1], Seat::Follower));
        assert!(matches!(seats[2], Seat::Alone));
        assert!(lock(&batches.state).coming.is_empty(), "all arrived");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_goes_at_once_and_the_next_run_opens_another() {
        let batches = batches(50);
        let key = key();
        let max = crate::integrations::batch_api::HUBSPOT_MAX;
        let comings: Vec<Coming> = (0..=max)
            .map(|_| batches.expect(Some(key.clone())))
            .collect();
        let mut comings = comings.into_iter();
        let Some(first) = comings.next() else {
            panic!("runs");
        };
        let (id, riders, full, wait) = leads(join(&batches, &key, first, 0), "the first run leads");
        for n in 1..max {
            let Some(coming) = comings.next() else {
                panic!("runs");
            };
            assert!(matches!(join(&batches, &key, coming, n), Seat::Follower));
        }
        let started = tokio::time::Instant::now();

        let gathered = batches.gather(&key, id, &riders, &full, wait).await;

        assert_eq!(gathered.len(), 100);
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "no wait for a full batch"
        );
        let Some(last) = comings.next() else {
            panic!("the 101st run");
        };
        assert!(
            matches!(join(&batches, &key, last, 100), Seat::Leader { .. }),
            "the 101st run leads a new batch"
        );
        let other = (Uuid::new_v4(), BatchKind::HubspotCreate);
        let coming = batches.expect(Some(other.clone()));
        assert!(
            matches!(
                join(&batches, &other, coming, 0),
                Seat::Leader {
                    wait: Wait::Nothing,
                    ..
                }
            ),
            "another connection's runs are a batch of their own"
        );
    }
}
