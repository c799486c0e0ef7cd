//! The retry-or-give-up decision, in one place.
//!
//! A run first gets a few quick tries in process (exponential backoff with full jitter,
//! `Retry-After` honoured when short). What still fails transiently goes to a broker retry
//! queue whose TTL returns it to the work queue later, so no worker holds a message for
//! minutes; after the last scheduled delay, or at once on a permanent error, the run is
//! dead-lettered.

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};

use crate::config::RetrySettings;
use crate::core::failure::{Failure, FailureKind};
use crate::transport::dead_letter::ReasonCode;
use crate::transport::topology;

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Tries in process, the first included, before the broker's schedule takes over.
    pub in_process_tries: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
    pub max_in_process_wait: Duration,
    pub schedule: Vec<Duration>,
    pub rate_limited_min_delay: Duration,
}

/// What happens to a run once its in-process tries are over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Through the retry queue with this delay (one of the schedule's delays).
    Retry {
        delay: Duration,
    },
    DeadLetter(DeadReason),
}

/// Why a run is given up and dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// The error is permanent: trying again cannot help.
    Permanent,
    /// Every scheduled retry was used.
    Exhausted,
    /// Workers kept vanishing mid-run (crashed, killed, lost their connection): the run is
    /// not tried again, so it cannot take down every worker in turn.
    Poison,
}

impl DeadReason {
    /// How a dead letter's reason line starts.
    pub fn describe(self) -> &'static str {
        match self {
            DeadReason::Permanent => "permanent error",
            DeadReason::Exhausted => "retries exhausted",
            DeadReason::Poison => "poison",
        }
    }

    /// The dead letter's reason code.
    pub fn code(self) -> ReasonCode {
        match self {
            DeadReason::Permanent => ReasonCode::Permanent,
            DeadReason::Exhausted => ReasonCode::Exhausted,
            DeadReason::Poison => ReasonCode::Poison,
        }
    }
}

impl From<&RetrySettings> for RetryPolicy {
    fn from(settings: &RetrySettings) -> Self {
        RetryPolicy {
            in_process_tries: settings.in_process_tries,
            min_delay: settings.min_delay,
            max_delay: settings.max_delay,
            max_in_process_wait: settings.max_in_process_wait,
            schedule: settings.schedule.clone(),
            rate_limited_min_delay: settings.rate_limited_min_delay,
        }
    }
}

impl RetryPolicy {
    /// Runs `try_once` with the in-process tries. Returns its last result and the number of
    /// tries made.
    pub async fn run_in_process<T, F, Fut>(&self, mut try_once: F) -> (Result<T, Failure>, u32)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut tries = 0u32;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.in_process_tries.saturating_sub(1));
        let result = (|| {
            tries += 1;
            try_once()
        })
        .retry(backoff)
        .sleep(tokio::time::sleep)
        .adjust(|failure: &Failure, proposed| {
            proposed.and_then(|exponential| self.in_process_delay(failure, exponential))
        })
        .await;
        (result, tries)
    }

    /// The wait before the next in-process try, or `None` to stop trying in process.
    /// `exponential` is the backoff's current ceiling; full jitter picks uniformly below it.
    pub fn in_process_delay(&self, failure: &Failure, exponential: Duration) -> Option<Duration> {
        if failure.throttled_delay().is_some() {
            // Throttled by appevents itself: the run goes to the held queue, not round again.
            return None;
        }
        match failure.kind {
            FailureKind::Transient => match failure.retry_after {
                Some(wait) if wait > self.max_in_process_wait => None,
                Some(wait) => Some(wait),
                None => Some(full_jitter(exponential)),
            },
            FailureKind::RateLimited => failure
                .retry_after
                .filter(|wait| *wait <= self.max_in_process_wait),
            FailureKind::ExpiredCredentials
            | FailureKind::RevokedCredentials
            | FailureKind::Permanent => None,
        }
    }

    /// After the in-process tries, with `retries_done` broker-level retries behind (0 on the
    /// first delivery).
    pub fn next(&self, failure: &Failure, retries_done: u32) -> Next {
        let retryable = matches!(
            failure.kind,
            FailureKind::Transient | FailureKind::RateLimited
        );
        if !retryable {
            return Next::DeadLetter(DeadReason::Permanent);
        }
        let Some(scheduled) = self.schedule.get(retries_done as usize).copied() else {
            return Next::DeadLetter(DeadReason::Exhausted);
        };
        let wanted = match failure.kind {
            FailureKind::RateLimited => {
                scheduled.max(failure.retry_after.unwrap_or(self.rate_limited_min_delay))
            }
            _ => scheduled.max(failure.retry_after.unwrap_or_default()),
        };
        // The schedule is not empty here, so there is a queue; `scheduled` is one anyway.
        Next::Retry {
            delay: self.queue_delay_for(wanted).unwrap_or(scheduled),
        }
    }

    /// The retry queues are one per distinct delay of the schedule; a wanted delay maps to
    /// the shortest queue at least as long, or the longest there is. `None` when the
    /// schedule is empty: there is no retry queue.
    pub fn queue_delay_for(&self, wanted: Duration) -> Option<Duration> {
        let delays = topology::retry_delays(&self.schedule);
        delays
            .iter()
            .copied()
            .find(|delay| *delay >= wanted)
            .or_else(|| delays.last().copied())
    }
}

fn full_jitter(ceiling: Duration) -> Duration {
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(fastrand::u64(0..=millis))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::time::Instant;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            in_process_tries: 3,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(2),
            max_in_process_wait: Duration::from_secs(5),
            schedule: vec![
                Duration::from_secs(10),
                Duration::from_secs(60),
                Duration::from_secs(300),
            ],
            rate_limited_min_delay: Duration::from_secs(300),
        }
    }

    fn failure(kind: FailureKind) -> Failure {
        Failure::new(kind, "x")
    }

    #[test]
    fn permanent_kinds_go_straight_to_the_dead_letters() {
        for kind in [
            FailureKind::Permanent,
            FailureKind::RevokedCredentials,
            FailureKind::ExpiredCredentials,
        ] {
            assert_eq!(
                policy().next(&failure(kind), 0),
                Next::DeadLetter(DeadReason::Permanent)
            );
            assert_eq!(
                policy().in_process_delay(&failure(kind), Duration::from_secs(1)),
                None
            );
        }
    }

    #[test]
    fn transient_failures_follow_the_schedule_then_give_up() {
        let p = policy();
        let f = failure(FailureKind::Transient);
        assert_eq!(
            p.next(&f, 0),
            Next::Retry {
                delay: Duration::from_secs(10)
            }
        );
        assert_eq!(
            p.next(&f, 1),
            Next::Retry {
                delay: Duration::from_secs(60)
            }
        );
        assert_eq!(
            p.next(&f, 2),
            Next::Retry {
                delay: Duration::from_secs(300)
            }
        );
        assert_eq!(p.next(&f, 3), Next::DeadLetter(DeadReason::Exhausted));
    }

    #[test]
    fn rate_limits_wait_at_least_what_the_provider_asks() {
        let p = policy();
        let mut limited = failure(FailureKind::RateLimited);
        assert_eq!(
            p.next(&limited, 0),
            Next::Retry {
                delay: Duration::from_secs(300)
            },
            "no Retry-After: the long rate-limit delay"
        );
        limited.retry_after = Some(Duration::from_secs(30));
        assert_eq!(
            p.next(&limited, 0),
            Next::Retry {
                delay: Duration::from_secs(60)
            }
        );
        limited.retry_after = Some(Duration::from_secs(3));
        assert_eq!(
            p.in_process_delay(&limited, Duration::from_millis(200)),
            Some(Duration::from_secs(3))
        );
        limited.retry_after = Some(Duration::from_secs(30));
        assert_eq!(
            p.in_process_delay(&limited, Duration::from_millis(200)),
            None
        );
        limited.retry_after = Some(Duration::from_secs(3600));
        assert_eq!(
            p.next(&limited, 0),
            Next::Retry {
                delay: Duration::from_secs(300)
            }
        );
    }

    #[test]
    fn full_jitter_stays_below_the_ceiling() {
        for _ in 0..1000 {
            assert!(full_jitter(Duration::from_millis(400)) <= Duration::from_millis(400));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn in_process_tries_back_off_exponentially_and_stop_at_the_limit() {
        let p = policy();
        let seen = Mutex::new(Vec::new());
        let start = Instant::now();
        let (result, tries) = p
            .run_in_process(|| {
                seen.lock().expect("lock").push(start.elapsed());
                async { Err::<(), _>(failure(FailureKind::Transient)) }
            })
            .await;
        assert!(result.is_err());
        assert_eq!(tries, 3);
        let seen = seen.into_inner().expect("lock");
        assert_eq!(seen.len(), 3);
        // Full jitter: each wait is at most the exponential ceiling (200ms, then 400ms).
        assert!(seen[1] - seen[0] <= Duration::from_millis(200), "{seen:?}");
        assert!(seen[2] - seen[1] <= Duration::from_millis(400), "{seen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_retry_after_is_waited_in_process() {
        let p = policy();
        let start = Instant::now();
        let mut calls = 0;
        let (result, tries) = p
            .run_in_process(|| {
                calls += 1;
                let outcome = if calls == 1 {
                    let mut f = failure(FailureKind::RateLimited);
                    f.retry_after = Some(Duration::from_secs(2));
                    Err(f)
                } else {
                    Ok(calls)
                };
                async move { outcome }
            })
            .await;
        assert_eq!(result.expect("second try succeeds"), 2);
        assert_eq!(tries, 2);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_failure_is_tried_once() {
        let (result, tries) = policy()
            .run_in_process(|| async { Err::<(), _>(failure(FailureKind::Permanent)) })
            .await;
        assert!(result.is_err());
        assert_eq!(tries, 1);
    }
}
