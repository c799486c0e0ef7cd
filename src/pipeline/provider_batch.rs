//! Batching runs into the providers' batch endpoints. Runs of one batchable action on one
//! connection that are ready within `batching.window` share one call, up to the provider's
//! most records per call (`integrations::batch_api`); each record's answer goes to its own
//! run, which then decides and settles as if it had made the call alone.
//!
//! The first run of a batch leads it: it waits until the batch is full or the window has
//! passed since it arrived (so a lone run waits the window at most), takes one call of the
//! account's budget, sends, and hands each run its answer. The others wait for theirs. A
//! run whose batch's answer says nothing of it is not taken as a success: it fails
//! transiently and runs again, alone (`Attempt::earlier`), through the single call's lookup
//! of what an earlier attempt made.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
}

/// The batches being gathered, per connection and action.
pub struct Batches {
    settings: BatchingSettings,
    open: Mutex<HashMap<Key, Open>>,
    next_id: AtomicU64,
}

pub(super) enum Seat {
    Leader {
        id: u64,
        riders: Arc<Mutex<Vec<Rider>>>,
        full: Arc<Notify>,
    },
    Follower,
    /// The open batch names the same record already: this run's goes alone.
    Alone,
}

impl Batches {
    pub fn new(settings: &BatchingSettings) -> Batches {
        Batches {
            settings: settings.clone(),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        }
    }

    /// Whether runs of `kind` are batched.
    pub fn batches(&self, kind: &BatchKind) -> bool {
        self.settings.batches(kind.name())
    }

    /// Joins the open batch of the connection and action, or opens one. A run that fills
    /// the batch closes it, so the next run opens another.
    pub(super) fn join(
        &self,
        key: Key,
        record: BatchRecord,
        answer: oneshot::Sender<Ridden>,
    ) -> Seat {
        let max = key.1.max_records();
        let mut open = lock(&self.open);
        match open.entry(key) {
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
                }
                Seat::Follower
            }
            Entry::Vacant(entry) => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let named = record.id.iter().cloned().collect();
                let riders = Arc::new(Mutex::new(vec![Rider { record, answer }]));
                let full = Arc::new(Notify::new());
                entry.insert(Open {
                    id,
                    riders: riders.clone(),
                    full: full.clone(),
                    named,
                });
                Seat::Leader { id, riders, full }
            }
        }
    }

    /// The leader's batch, once full or at the end of the window: closed (if a full one has
    /// not closed it already) and emptied.
    pub(super) async fn gather(
        &self,
        key: &Key,
        id: u64,
        riders: &Mutex<Vec<Rider>>,
        full: &Notify,
    ) -> Vec<Rider> {
        tokio::select! {
            _ = tokio::time::sleep(self.settings.window) => {}
            _ = full.notified() => {}
        }
        let mut open = lock(&self.open);
        if open.get(key).is_some_and(|batch| batch.id == id) {
            open.remove(key);
        }
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

    fn batches(window_ms: u64) -> Batches {
        Batches::new(&BatchingSettings {
            enabled: true,
            window: Duration::from_millis(window_ms),
            off: Vec::new(),
        })
    }

    fn record(n: usize) -> BatchRecord {
        BatchRecord {
            fields: serde_json::json!({ "email": format!("{n}@example.com") }),
            id: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_run_waits_the_window_and_no_longer() {
        let batches = batches(50);
        let key = (Uuid::new_v4(), BatchKind::HubspotCreate);
        let (answer, _answered) = oneshot::channel();
        let Seat::Leader { id, riders, full } = batches.join(key.clone(), record(0), answer) else {
            panic!("the first run leads");
        };
        let started = tokio::time::Instant::now();

        let gathered = batches.gather(&key, id, &riders, &full).await;

        assert_eq!(gathered.len(), 1);
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        assert!(lock(&batches.open).is_empty(), "the batch is closed");
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
        let (first, _a) = oneshot::channel();
        let (second, _b) = oneshot::channel();
        let (again, _c) = oneshot::channel();

        assert!(matches!(
            batches.join(key.clone(), named("a@example.com"), first),
            Seat::Leader { .. }
        ));
        assert!(matches!(
            batches.join(key.clone(), named("b@example.com"), second),
            Seat::Follower
        ));
        assert!(matches!(
            batches.join(key, named("a@example.com"), again),
            Seat::Alone
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_goes_at_once_and_the_next_run_opens_another() {
        let batches = batches(50);
        let key = (Uuid::new_v4(), BatchKind::HubspotCreate);
        let mut receivers = Vec::new();
        let (answer, answered) = oneshot::channel();
        receivers.push(answered);
        let Seat::Leader { id, riders, full } = batches.join(key.clone(), record(0), answer) else {
            panic!("the first run leads");
        };
        for n in 1..crate::integrations::batch_api::HUBSPOT_MAX {
            let (answer, answered) = oneshot::channel();
            receivers.push(answered);
            assert!(matches!(
                batches.join(key.clone(), record(n), answer),
                Seat::Follower
            ));
        }
        let started = tokio::time::Instant::now();

        let gathered = batches.gather(&key, id, &riders, &full).await;

        assert_eq!(gathered.len(), 100);
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "no wait for a full batch"
        );
        let (answer, _answered) = oneshot::channel();
        assert!(
            matches!(
                batches.join(key.clone(), record(100), answer),
                Seat::Leader { .. }
            ),
            "the 101st run leads a new batch"
        );
        let other = (Uuid::new_v4(), BatchKind::HubspotCreate);
        let (answer, _answered) = oneshot::channel();
        assert!(
            matches!(batches.join(other, record(0), answer), Seat::Leader { .. }),
            "another connection's runs are a batch of their own"
        );
    }
}
