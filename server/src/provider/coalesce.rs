//! Coalescing of concurrent single calls into batch calls, and splitting of large batches.
//!
//! A [`Coalescer`] owns a small dispatcher task. Callers send one item each and wait on a
//! oneshot. The dispatcher takes the first waiting item, drains whatever else is queued (up
//! to [`BatchLimits::max_items`] items and [`BatchLimits::max_bytes`] of encoded request) and
//! sends it as one batch, with at most `max_inflight` batches in flight. An item that does not
//! fit waits for the next batch. While the batches in flight occupy every slot, new items
//! queue up and leave together in the next batch: an idle server pays one round trip per
//! item, a busy one a round trip per batch. Results fan back out in order; a failed batch
//! fails each of its callers with the same error.
//!
//! [`split`] cuts an explicit batch (a page of messages) the same way.

use std::fmt;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{BoxFuture, ItemOutcome, ProviderError};

/// Sends one batch; returns one outcome per item, in order.
pub type BatchFn<Req, Resp> = Arc<
    dyn Fn(Vec<Req>) -> BoxFuture<'static, Result<Vec<ItemOutcome<Resp>>, ProviderError>>
        + Send
        + Sync,
>;

/// The encoded size of one item in a batch request body (an upper bound).
pub type WeighFn<Req> = fn(&Req) -> usize;

/// How big one batch may get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_items: usize,
    /// Sum of the items' [`WeighFn`] sizes; a single item larger than this goes alone.
    pub max_bytes: usize,
}

/// Cuts `items` into batches within `limits`, in order. Every batch has at least one item.
pub fn split<T>(items: Vec<T>, limits: BatchLimits, weigh: WeighFn<T>) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut cur: Vec<T> = Vec::new();
    let mut bytes = 0usize;
    for item in items {
        let w = weigh(&item);
        let full = cur.len() >= limits.max_items.max(1)
            || (!cur.is_empty() && bytes.saturating_add(w) > limits.max_bytes);
        if full {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes = bytes.saturating_add(w);
        cur.push(item);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

struct Job<Req, Resp> {
    item: Req,
    reply: oneshot::Sender<ItemOutcome<Resp>>,
}

/// Handle to a dispatcher task. Dropping every handle stops the task once the queue is empty.
pub struct Coalescer<Req, Resp> {
    tx: mpsc::Sender<Job<Req, Resp>>,
    name: &'static str,
}

impl<Req, Resp> fmt::Debug for Coalescer<Req, Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coalescer")
            .field("name", &self.name)
            .finish()
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> Coalescer<Req, Resp> {
    /// Starts the dispatcher on the current tokio runtime.
    pub fn spawn(
        name: &'static str,
        send: BatchFn<Req, Resp>,
        limits: BatchLimits,
        weigh: WeighFn<Req>,
        max_inflight: usize,
    ) -> Self {
        let limits = BatchLimits {
            max_items: limits.max_items.max(1),
            max_bytes: limits.max_bytes.max(1),
        };
        let max_inflight = max_inflight.max(1);
        let (tx, rx) = mpsc::channel(limits.max_items.saturating_mul(max_inflight).max(64));
        tokio::spawn(dispatch(rx, send, limits, weigh, max_inflight));
        Self { tx, name }
    }

    /// Sends `item` with whatever else is waiting and returns its own outcome.
    ///
    /// # Errors
    /// The item's or the batch's [`ProviderError`].
    pub async fn call(&self, item: Req) -> ItemOutcome<Resp> {
        let (reply, rx) = oneshot::channel();
        let stopped = || ProviderError::Internal(format!("{} dispatcher stopped", self.name));
        self.tx
            .send(Job { item, reply })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

async fn dispatch<Req: Send + 'static, Resp: Send + 'static>(
    mut rx: mpsc::Receiver<Job<Req, Resp>>,
    send: BatchFn<Req, Resp>,
    limits: BatchLimits,
    weigh: WeighFn<Req>,
    max_inflight: usize,
) {
    let slots = Arc::new(Semaphore::new(max_inflight));
    // An item taken from the queue that did not fit in the previous batch.
    let mut carry: Option<Job<Req, Resp>> = None;
    loop {
        // Wait for a free slot first: while every slot is busy, items accumulate in `rx`.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = match carry.take() {
            Some(j) => j,
            None => match rx.recv().await {
                Some(j) => j,
                None => return,
            },
        };
        let mut bytes = weigh(&first.item);
        let mut jobs = vec![first];
        while jobs.len() < limits.max_items {
            match rx.try_recv() {
                Ok(j) => {
                    let w = weigh(&j.item);
                    if bytes.saturating_add(w) > limits.max_bytes {
                        carry = Some(j);
                        break;
                    }
                    bytes = bytes.saturating_add(w);
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        // Callers that went away (client disconnected) need no work.
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        let send = send.clone();
        tracing::trace!(
            items = jobs.len(),
            bytes,
            "coalesced batch sent to the key provider"
        );
        tokio::spawn(async move {
            let _slot = slot;
            let (items, replies): (Vec<Req>, Vec<_>) =
                jobs.into_iter().map(|j| (j.item, j.reply)).unzip();
            let n = replies.len();
            match send(items).await {
                Ok(results) if results.len() == n => {
                    for (r, reply) in results.into_iter().zip(replies) {
                        let _ = reply.send(r);
                    }
                }
                Ok(results) => {
                    let e = ProviderError::Internal(format!(
                        "batch of {n} answered with {} results",
                        results.len()
                    ));
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    fn limits(max_items: usize) -> BatchLimits {
        BatchLimits {
            max_items,
            max_bytes: usize::MAX,
        }
    }

    #[test]
    fn split_respects_items_and_bytes() {
        let l = BatchLimits {
            max_items: 3,
            max_bytes: 10,
        };
        let w: WeighFn<usize> = |n| *n;
        assert_eq!(split(vec![1, 1, 1, 1], l, w), vec![vec![1, 1, 1], vec![1]]);
        assert_eq!(split(vec![6, 4, 1, 9], l, w), vec![vec![6, 4], vec![1, 9]]);
        // An item over the byte limit travels alone.
        assert_eq!(
            split(vec![2, 50, 2], l, w),
            vec![vec![2], vec![50], vec![2]]
        );
        assert!(split(Vec::<usize>::new(), l, w).is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn coalesced_batches_stay_under_the_byte_limit() {
        let seen = Arc::new(Mutex::new(Vec::<usize>::new()));
        let s2 = seen.clone();
        let send: BatchFn<usize, usize> = Arc::new(move |items: Vec<usize>| {
            let s = s2.clone();
            Box::pin(async move {
                s.lock().unwrap().push(items.iter().sum());
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok(items.into_iter().map(Ok).collect())
            })
        });
        let l = BatchLimits {
            max_items: 100,
            max_bytes: 1000,
        };
        let c = Arc::new(Coalescer::spawn("test", send, l, |n| *n, 1));
        let tasks: Vec<_> = (0..60usize)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move { (i, c.call(100 + i).await) })
            })
            .collect();
        for t in tasks {
            let (i, r) = t.await.unwrap();
            assert_eq!(r, Ok(100 + i));
        }
        let seen = seen.lock().unwrap();
        assert!(seen.iter().all(|&b| b <= 1000), "{seen:?}");
        assert_eq!(seen.iter().sum::<usize>(), (100..160).sum::<usize>());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn coalesces_concurrent_calls_and_keeps_order() {
        let batches = Arc::new(Mutex::new(Vec::<usize>::new()));
        let b2 = batches.clone();
        let send: BatchFn<u32, u32> = Arc::new(move |items: Vec<u32>| {
            let b = b2.clone();
            Box::pin(async move {
                b.lock().unwrap().push(items.len());
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(items
                    .into_iter()
                    .map(|i| {
                        if i == 13 {
                            Err(ProviderError::DecryptionFailed)
                        } else {
                            Ok(i * 2)
                        }
                    })
                    .collect())
            })
        });
        let c = Arc::new(Coalescer::spawn("test", send, limits(64), |_| 1, 1));
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move { (i, c.call(i).await) }));
        }
        for t in tasks {
            let (i, r) = t.await.unwrap();
            if i == 13 {
                assert_eq!(r, Err(ProviderError::DecryptionFailed));
            } else {
                assert_eq!(r, Ok(i * 2));
            }
        }
        let b = batches.lock().unwrap();
        assert_eq!(b.iter().sum::<usize>(), 200);
        assert!(
            b.len() < 20,
            "200 concurrent calls took {} batches",
            b.len()
        );
        assert!(b.iter().all(|&n| n <= 64));
    }

    #[tokio::test]
    async fn batch_failure_reaches_every_caller() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c2 = calls.clone();
        let send: BatchFn<u32, u32> = Arc::new(move |_items: Vec<u32>| {
            c2.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Err(ProviderError::Unavailable("down".into())) })
        });
        let c = Coalescer::spawn("test", send, limits(8), |_| 1, 2);
        let (a, b) = tokio::join!(c.call(1), c.call(2));
        assert!(matches!(a, Err(ProviderError::Unavailable(_))));
        assert!(matches!(b, Err(ProviderError::Unavailable(_))));
        assert!(calls.load(Ordering::SeqCst) >= 1);
    }
}
