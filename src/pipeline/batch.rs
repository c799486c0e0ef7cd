//! Coalescing concurrent database writes. Many events claim and record runs at the same
//! time; gathering what is waiting into one statement makes one round trip and one commit
//! (one WAL flush) serve all of them, instead of one each.
//!
//! A batch starts as soon as an execution slot is free, with whatever is waiting: when the
//! database is idle a request goes alone at once, under load batches grow by themselves.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::Instrument;

/// Why a batched request failed. A failed statement's error is shared by the whole batch,
/// typed, so a caller can still tell an outage from a refusal.
#[derive(Debug, thiserror::Error)]
pub enum BatchError<E> {
    #[error(transparent)]
    Failed(Arc<E>),
    #[error("the batch answered {answered} of {expected} requests")]
    Mismatch { answered: usize, expected: usize },
    #[error("the batcher has stopped")]
    Stopped,
}

impl<E> Clone for BatchError<E> {
    fn clone(&self) -> Self {
        match self {
            BatchError::Failed(err) => BatchError::Failed(err.clone()),
            BatchError::Mismatch { answered, expected } => BatchError::Mismatch {
                answered: *answered,
                expected: *expected,
            },
            BatchError::Stopped => BatchError::Stopped,
        }
    }
}

struct Item<Req, Resp, E> {
    request: Req,
    reply: oneshot::Sender<Result<Resp, BatchError<E>>>,
}

pub struct Batcher<Req, Resp, E> {
    sender: mpsc::Sender<Item<Req, Resp, E>>,
}

impl<Req, Resp, E> Batcher<Req, Resp, E>
where
    Req: Send + 'static,
    Resp: Send + 'static,
    E: Send + Sync + 'static,
{
    /// Runs `execute` on batches of up to `max_batch` requests, at most `parallel` batches at
    /// once. `execute` answers in the order of its input.
    pub fn spawn<F, Fut>(max_batch: usize, parallel: usize, execute: F) -> Batcher<Req, Resp, E>
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Resp>, E>> + Send + 'static,
    {
        let (sender, mut receiver) =
            mpsc::channel::<Item<Req, Resp, E>>(max_batch * parallel.max(1));
        let execute = Arc::new(execute);
        let slots = Arc::new(Semaphore::new(parallel.max(1)));
        // A batch serves many events: it runs in a span of its own, a root, never in the span
        // of whichever caller happened to start it.
        let batch_span =
            || tracing::info_span!(parent: None, "batch", size = tracing::field::Empty);
        tokio::spawn(async move {
            while let Some(first) = receiver.recv().await {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                // What arrived while waiting for a slot joins this batch.
                let mut batch = vec![first];
                while batch.len() < max_batch {
                    match receiver.try_recv() {
                        Ok(item) => batch.push(item),
                        Err(_) => break,
                    }
                }
                let execute = execute.clone();
                let span = batch_span();
                span.record("size", batch.len());
                tokio::spawn(
                    async move {
                        let (requests, replies): (Vec<Req>, Vec<_>) = batch
                            .into_iter()
                            .map(|item| (item.request, item.reply))
                            .unzip();
                        let expected = replies.len();
                        match execute(requests).await {
                            Ok(responses) if responses.len() == expected => {
                                for (reply, response) in replies.into_iter().zip(responses) {
                                    let _ = reply.send(Ok(response));
                                }
                            }
                            Ok(responses) => {
                                let error = BatchError::Mismatch {
                                    answered: responses.len(),
                                    expected,
                                };
                                for reply in replies {
                                    let _ = reply.send(Err(error.clone()));
                                }
                            }
                            Err(err) => {
                                let error = BatchError::Failed(Arc::new(err));
                                for reply in replies {
                                    let _ = reply.send(Err(error.clone()));
                                }
                            }
                        }
                        drop(slot);
                    }
                    .instrument(span),
                );
            }
        });
        Batcher { sender }
    }

    pub async fn call(&self, request: Req) -> Result<Resp, BatchError<E>> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Item { request, reply })
            .await
            .map_err(|_| BatchError::Stopped)?;
        // A batch is dropped only if its task died: the batcher is no longer answering.
        answer.await.map_err(|_| BatchError::Stopped)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_calls_share_batches_and_get_their_own_answers() {
        let batches = Arc::new(AtomicUsize::new(0));
        let counted = batches.clone();
        let batcher = Arc::new(Batcher::spawn(64, 1, move |requests: Vec<u32>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                Ok::<_, String>(requests.into_iter().map(|r| r * 10).collect())
            }
        }));
        let calls = (0..200u32).map(|n| {
            let batcher = batcher.clone();
            async move { batcher.call(n).await }
        });
        let answers = futures::future::join_all(calls).await;
        for (n, answer) in answers.into_iter().enumerate() {
            assert_eq!(answer.expect("answer"), n as u32 * 10);
        }
        assert!(
            batches.load(Ordering::SeqCst) < 200,
            "requests were coalesced"
        );
    }

    #[derive(Debug, PartialEq, thiserror::Error)]
    enum Refused {
        #[error("constraint violated")]
        Constraint,
    }

    #[tokio::test]
    async fn a_failed_batch_fails_each_of_its_calls_with_the_typed_error() {
        let batcher = Arc::new(Batcher::spawn(8, 2, |_requests: Vec<u32>| async {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            Err::<Vec<u32>, _>(Refused::Constraint)
        }));
        let calls = (0..4u32).map(|n| {
            let batcher = batcher.clone();
            async move { batcher.call(n).await }
        });

        let answers = futures::future::join_all(calls).await;

        for answer in answers {
            let err = answer.expect_err("fails");
            assert_eq!(err.to_string(), "constraint violated");
            assert!(
                matches!(&err, BatchError::Failed(e) if **e == Refused::Constraint),
                "the caller gets the error itself, not its text: {err:?}"
            );
        }
    }
}
