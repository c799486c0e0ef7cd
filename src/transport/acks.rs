//! Acknowledgements, coalesced. A worker settles hundreds of messages a second on one channel,
//! mostly in the order they came; one `basic.ack` with `multiple` set acknowledges every
//! settled message up to the oldest still in hand, where one frame each (and, for a quorum
//! queue, one settle command each in its log) would do the same work a hundred times over.
//!
//! A message is acknowledged only once settled, as before: `multiple` covers a tag only when
//! every tag below it is settled too, or was handed back (nacked) before. A settled message
//! behind one that is taking long is acknowledged on its own after [`LINGER`], so a slow run
//! never holds the others' acknowledgements, and the prefetch window, for longer than that.
//! Each acknowledgement goes through the delivery's own [`Acker`], which refuses it once its
//! channel has failed: a recovered channel's new tags are never acknowledged by an old one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lapin::Acker;
use lapin::options::BasicAckOptions;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::observe::errors::report;

/// How long a settled message waits for the ones before it to be settled too, so that one
/// acknowledgement covers them all, before it is acknowledged alone.
pub const LINGER: Duration = Duration::from_millis(20);

/// How long the acknowledger gathers settled messages after the first one wakes it, so that
/// one acknowledgement serves those settled close together even when few are in flight.
const GATHER: Duration = Duration::from_millis(1);

/// The acknowledgements of one consumer's channel.
#[derive(Default)]
pub struct Acks {
    state: Mutex<State<Acker>>,
    settled_one: Notify,
}

/// The tags of one channel, each with what acknowledges it (`A`: the delivery's acker).
struct State<A> {
    /// Delivered and neither settled nor handed back.
    in_hand: BTreeSet<u64>,
    /// Settled, to acknowledge, and when each was settled.
    settled: BTreeMap<u64, (A, Instant)>,
    /// The acker of the last delivery: once it refuses, the channel has failed, and every
    /// tag here is of its old life.
    last: Option<A>,
}

impl<A> Default for State<A> {
    fn default() -> Self {
        State {
            in_hand: BTreeSet::new(),
            settled: BTreeMap::new(),
            last: None,
        }
    }
}

/// What one flush sends.
#[derive(Debug, PartialEq)]
struct Flush<A> {
    /// Acknowledges its tag and every one below it.
    multiple: Option<A>,
    /// Acknowledged one by one: settled behind a message still in hand for [`LINGER`].
    alone: Vec<A>,
    /// When the next of those still lingering is due.
    next: Option<Instant>,
}

impl<A> State<A> {
    /// Takes what may be acknowledged at `now`: every settled tag below the oldest still in
    /// hand, in one; the others settled at least [`LINGER`] before `now`, each alone.
    fn take(&mut self, now: Instant) -> Flush<A> {
        let oldest_in_hand = self.in_hand.first().copied().unwrap_or(u64::MAX);
        let behind = self.settled.split_off(&oldest_in_hand);
        let multiple = std::mem::take(&mut self.settled)
            .into_values()
            .next_back()
            .map(|(acker, _)| acker);
        let mut alone = Vec::new();
        let mut next: Option<Instant> = None;
        for (tag, (acker, at)) in behind {
            let due = at + LINGER;
            if due <= now {
                alone.push(acker);
            } else {
                next = Some(next.map_or(due, |n| n.min(due)));
                self.settled.insert(tag, (acker, at));
            }
        }
        Flush {
            multiple,
            alone,
            next,
        }
    }
}

impl Acks {
    pub fn new() -> Arc<Acks> {
        Arc::new(Acks::default())
    }

    fn state(&self) -> MutexGuard<'_, State<Acker>> {
        // A panic while holding the lock leaves plain sets behind, still consistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A delivery taken from the consumer, in the order the channel delivered them.
    ///
    /// A channel that failed and was recovered numbers its deliveries from 1 again. Its old
    /// ackers refuse from the moment it fails (lapin poisons them before recovering), so the
    /// first delivery after a recovery finds the last one's acker refusing, and every tag
    /// of the old life is forgotten: those messages come again, with new tags.
    pub fn received(&self, tag: u64, acker: &Acker) {
        let mut state = self.state();
        if state.last.as_ref().is_some_and(Acker::poisoned) {
            state.in_hand.clear();
            state.settled.clear();
        }
        state.last = Some(acker.clone());
        state.in_hand.insert(tag);
    }

    /// The message is settled: acknowledge it (soon, and with others when it can).
    pub fn settled(&self, tag: u64, acker: Acker) {
        {
            let mut state = self.state();
            // Delivered before its channel failed: the broker delivers it again, and its tag
            // may now be another message's. Checked under the lock, where `received` forgets.
            if acker.poisoned() {
                return;
            }
            state.in_hand.remove(&tag);
            state.settled.insert(tag, (acker, Instant::now()));
        }
        self.settled_one.notify_one();
    }

    /// The message was handed back (its nack already sent): it is no longer in hand, and
    /// nothing acknowledges it. A message left to go back when the channel closes is not
    /// released: it stays in hand, and nothing covers it.
    pub fn released(&self, tag: u64, acker: &Acker) {
        {
            let mut state = self.state();
            if acker.poisoned() {
                return;
            }
            state.in_hand.remove(&tag);
        }
        // Its tag may have been all that held the others back.
        self.settled_one.notify_one();
    }

    /// Sends what is settled now; returns when the next lingering acknowledgement is due.
    async fn flush(&self) -> Option<Instant> {
        let flush = self.state().take(Instant::now());
        let next = flush.next;
        self.send(flush).await;
        next
    }

    async fn send(&self, flush: Flush<Acker>) {
        if let Some(acker) = flush.multiple {
            ack(&acker, BasicAckOptions { multiple: true }).await;
        }
        for acker in flush.alone {
            ack(&acker, BasicAckOptions::default()).await;
        }
    }

    /// Acknowledges as messages are settled, until `stop`; then once more, for what was
    /// settled last. Run it beside the consumer, and stop it before the channel closes.
    pub async fn run(&self, stop: CancellationToken) {
        let mut due: Option<Instant> = None;
        loop {
            let wait = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.settled_one.notified() => {
                    tokio::time::sleep(GATHER).await;
                }
                _ = wait => {}
            }
            due = self.flush().await;
        }
        // What is still lingering goes now; a message still in hand stays unacknowledged,
        // and goes back to the queue when the channel closes.
        let flush = self.state().take(Instant::now() + LINGER);
        self.send(flush).await;
    }
}

async fn ack(acker: &Acker, options: BasicAckOptions) {
    match acker.ack(options).await {
        Ok(true) => {}
        Ok(false) => tracing::debug!(
            "channel was recovered since delivery; the broker redelivers and the run records absorb it"
        ),
        Err(err) => {
            tracing::warn!(error = %report(&err), "acknowledgement failed; the broker redelivers and the run records absorb it")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(in_hand: &[u64], settled: &[(u64, Instant)]) -> State<u64> {
        State {
            in_hand: in_hand.iter().copied().collect(),
            settled: settled.iter().map(|&(tag, at)| (tag, (tag, at))).collect(),
            last: None,
        }
    }

    #[test]
    fn settled_messages_with_none_in_hand_go_in_one_acknowledgement_of_the_last() {
        let now = Instant::now();
        let mut state = state(&[], &[(1, now), (2, now), (3, now)]);
        let flush = state.take(now);
        assert_eq!(
            flush,
            Flush {
                multiple: Some(3),
                alone: vec![],
                next: None
            }
        );
        assert!(state.settled.is_empty());
    }

    #[test]
    fn a_message_in_hand_is_never_covered_and_the_ones_after_it_linger_then_go_alone() {
        let now = Instant::now();
        let mut state = state(&[3], &[(1, now), (2, now), (4, now), (5, now)]);
        let flush = state.take(now);
        assert_eq!(flush.multiple, Some(2));
        assert!(flush.alone.is_empty());
        assert_eq!(flush.next, Some(now + LINGER));
        // Still lingering just before their time; each alone at it, and 3 never.
        assert!(state.take(now + LINGER / 2).alone.is_empty());
        let flush = state.take(now + LINGER);
        assert_eq!((flush.multiple, flush.alone), (None, vec![4, 5]));
        assert_eq!(state.in_hand.iter().copied().collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn the_message_in_hand_settling_lets_everything_after_it_go_in_one() {
        let now = Instant::now();
        let mut state = state(&[3], &[(1, now), (4, now), (5, now)]);
        assert_eq!(state.take(now).multiple, Some(1));
        state.in_hand.remove(&3);
        state.settled.insert(3, (3, now));
        let flush = state.take(now);
        assert_eq!((flush.multiple, flush.alone), (Some(5), vec![]));
    }
}
