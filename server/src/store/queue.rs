//! A backend's writer: one thread that takes queued writes from a bounded channel and commits
//! them in groups. Dropping the queue closes the channel; the thread commits what is queued
//! and ends, and the drop waits for it.

use std::sync::Mutex;

use tokio::sync::mpsc;

use super::StoreError;

pub(crate) struct WriteQueue<T> {
    tx: Mutex<Option<mpsc::Sender<T>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    name: &'static str,
}

impl<T: Send + 'static> WriteQueue<T> {
    /// Starts the thread `name` running `run` over the receiving end of a channel of
    /// `capacity` writes.
    ///
    /// # Errors
    /// One line when the thread cannot be started.
    pub(crate) fn start(
        name: &'static str,
        capacity: usize,
        run: impl FnOnce(mpsc::Receiver<T>) + Send + 'static,
    ) -> Result<Self, String> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(rx))
            .map_err(|e| format!("cannot start the writer thread: {e}"))?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            name,
        })
    }

    /// Queues `w` (waiting while the queue is full).
    ///
    /// # Errors
    /// [`StoreError::Closed`] once the writer has stopped.
    pub(crate) async fn send(&self, w: T) -> Result<(), StoreError> {
        let tx = {
            let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
            guard.clone().ok_or(StoreError::Closed)?
        };
        tx.send(w).await.map_err(|_| StoreError::Closed)
    }

    /// Whether the writer thread still runs.
    pub(crate) fn alive(&self) -> bool {
        self.thread
            .lock()
            .map(|h| h.as_ref().is_some_and(|h| !h.is_finished()))
            .unwrap_or(false)
    }
}

impl<T> Drop for WriteQueue<T> {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what is queued and exit.
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let handle = self.thread.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!(thread = self.name, "store writer thread panicked");
            }
        }
    }
}
