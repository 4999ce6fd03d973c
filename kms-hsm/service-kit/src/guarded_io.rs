//! The I/O of every served connection: a bound on a peer that stops reading, and a lingering
//! close so that a peer always receives the answer it was sent.
//!
//! **Write stalls.** A client that sends a request and never reads its answer would keep the
//! connection (its slot, and the answer's buffer) forever once the socket's send buffer is
//! full: hyper has no write timeout. [`GuardedIo`] fails a write, flush or shutdown that makes
//! no progress for its `write_timeout` with `TimedOut`, which ends the connection. Progress
//! of any size resets the clock, so a slow reader is served; only one that stops is cut.
//!
//! **Lingering close.**
//! When a service answers before it has read the whole request (a 403, 404 or 413 sent
//! without reading the body, or a request that arrived in two writes) and then closes the
//! connection while the rest of the request sits unread in the kernel's receive buffer, the
//! kernel resets the connection (TCP sends RST; a Unix socket marks its peer
//! `ECONNRESET`), and the peer's next read fails instead of returning the answer. Both
//! services therefore close like an HTTP server should (RFC 9112 §9.6): shut down the
//! writing side first, then read and discard what the peer still sends until it closes its
//! side, for at most [`LINGER_FOR`] and [`LINGER_BYTES`], whatever the peer does.
//!
//! [`GuardedIo`]'s `poll_shutdown` (which hyper calls when it closes a connection it has
//! finished with) does exactly that; [`drain`] is the same for code that writes its own
//! answer.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The longest a closed connection is drained.
pub const LINGER_FOR: Duration = Duration::from_millis(500);

/// The most bytes read from a closed connection before it is dropped anyway.
pub const LINGER_BYTES: usize = 64 * 1024;

/// I/O whose writes cannot stall forever and whose shutdown lingers (see the module docs).
#[derive(Debug)]
pub struct GuardedIo<I> {
    inner: I,
    state: State,
    write_timeout: Duration,
    /// Running while the inner I/O cannot take what is written.
    stalled: Option<Pin<Box<Sleep>>>,
}

#[derive(Debug)]
enum State {
    Open,
    /// The writing side is being shut down.
    Closing,
    /// Written side shut; draining until the peer closes, the budget is spent or time is up.
    Draining {
        deadline: Pin<Box<Sleep>>,
        read: usize,
    },
    Done,
}

impl<I> GuardedIo<I> {
    /// Wraps `inner`; a write that makes no progress for `write_timeout` fails.
    pub fn new(inner: I, write_timeout: Duration) -> Self {
        Self {
            inner,
            state: State::Open,
            write_timeout,
            stalled: None,
        }
    }

    /// The wrapped I/O.
    pub fn get_ref(&self) -> &I {
        &self.inner
    }

    /// What a write that returned `Pending` becomes: still pending, or `TimedOut` once it
    /// has made no progress for the write timeout (the timer is registered with `cx`).
    fn stall<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let timeout = self.write_timeout;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// The outcome of one inner write call: progress stops the stall clock.
    fn guard<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => self.stall(cx),
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for GuardedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for GuardedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.guard(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.guard(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.guard(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Open => this.state = State::Closing,
                State::Closing => {
                    let r = Pin::new(&mut this.inner).poll_shutdown(cx);
                    let shut = ready!(this.guard(cx, r));
                    if shut.is_err() {
                        this.state = State::Done;
                        return Poll::Ready(shut);
                    }
                    this.state = State::Draining {
                        deadline: Box::pin(tokio::time::sleep(LINGER_FOR)),
                        read: 0,
                    };
                }
                State::Draining { deadline, read } => {
                    if deadline.as_mut().poll(cx).is_ready() || *read >= LINGER_BYTES {
                        this.state = State::Done;
                        continue;
                    }
                    let mut sink = [0u8; 4096];
                    let mut buf = ReadBuf::new(&mut sink);
                    match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                        // The deadline is registered with `cx`, so pending ends in time.
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                            *read += buf.filled().len();
                        }
                        // The peer closed (or broke) its side: nothing is left to lose.
                        Poll::Ready(_) => this.state = State::Done,
                    }
                }
                State::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// Reads and discards what the peer of an already shut-down `io` still sends, until it
/// closes its side, for at most [`LINGER_FOR`] and [`LINGER_BYTES`].
pub async fn drain<I: AsyncRead + Unpin>(io: &mut I) {
    let _ = tokio::time::timeout(LINGER_FOR, async {
        let mut sink = [0u8; 4096];
        let mut seen = 0usize;
        while seen < LINGER_BYTES {
            match io.read(&mut sink).await? {
                0 => break,
                n => seen += n,
            }
        }
        Ok::<(), io::Error>(())
    })
    .await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::AsyncWriteExt as _;

    /// The answer to a request whose body was never read still reaches the peer, which is
    /// sending that body after the answer was written.
    #[tokio::test]
    async fn a_late_body_does_not_reset_the_answer() {
        for _ in 0..50 {
            let (server, mut client) = tokio::net::UnixStream::pair().unwrap();
            let mut server = GuardedIo::new(server, Duration::from_secs(5));
            let srv = tokio::spawn(async move {
                let mut head = [0u8; 16];
                server.read_exact(&mut head).await.unwrap();
                server.write_all(b"answer").await.unwrap();
                server.shutdown().await.unwrap();
            });
            client.write_all(b"0123456789abcdef").await.unwrap();
            tokio::task::yield_now().await;
            client.write_all(&[7u8; 8192]).await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"answer");
            drop(client);
            srv.await.unwrap();
        }
    }

    /// A peer that stops reading fails the write after the write timeout (and not before);
    /// one that reads slowly is served to the end.
    #[tokio::test]
    async fn a_peer_that_stops_reading_is_cut_and_a_slow_one_is_not() {
        let (server, client) = tokio::net::UnixStream::pair().unwrap();
        let mut server = GuardedIo::new(server, Duration::from_millis(300));
        let start = Instant::now();
        let chunk = vec![1u8; 64 * 1024];
        let err = loop {
            if let Err(e) = server.write_all(&chunk).await {
                break e;
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(
            start.elapsed() >= Duration::from_millis(300),
            "{:?}",
            start.elapsed()
        );
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        drop(client);

        // A reader that takes a chunk every 20 ms makes progress far inside the write
        // timeout, even on a loaded machine (a 300 ms timeout here failed once in a busy CI).
        let (server, mut client) = tokio::net::UnixStream::pair().unwrap();
        let mut server = GuardedIo::new(server, Duration::from_secs(3));
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt as _;
            let mut buf = vec![0u8; 16 * 1024];
            let mut total = 0usize;
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                match client.read(&mut buf).await.unwrap() {
                    0 => return total,
                    n => total += n,
                }
            }
        });
        let body = vec![2u8; 2 * 1024 * 1024];
        server.write_all(&body).await.unwrap();
        server.shutdown().await.unwrap();
        drop(server);
        assert_eq!(reader.await.unwrap(), body.len());
    }

    /// A peer that never closes holds the closing side for [`LINGER_FOR`] at most, and one
    /// that floods it for [`LINGER_BYTES`] at most.
    #[tokio::test]
    async fn lingering_is_bounded_in_time_and_bytes() {
        let (server, client) = tokio::net::UnixStream::pair().unwrap();
        let mut server = GuardedIo::new(server, Duration::from_secs(5));
        let start = Instant::now();
        server.shutdown().await.unwrap();
        let took = start.elapsed();
        assert!(took >= LINGER_FOR - Duration::from_millis(20), "{took:?}");
        assert!(took < LINGER_FOR * 4, "{took:?}");
        drop(client);

        let (server, mut client) = tokio::net::UnixStream::pair().unwrap();
        let flood = tokio::spawn(async move {
            let chunk = [1u8; 4096];
            while client.write_all(&chunk).await.is_ok() {}
        });
        let mut server = GuardedIo::new(server, Duration::from_secs(5));
        let start = Instant::now();
        server.shutdown().await.unwrap();
        assert!(start.elapsed() < LINGER_FOR, "{:?}", start.elapsed());
        drop(server);
        flood.await.unwrap();
    }
}
