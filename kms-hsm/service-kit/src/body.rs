//! Request bodies that may carry plaintext: read into zeroizing memory, within a size limit
//! (enforced by `tower_http::limit::RequestBodyLimitLayer` upstream) and a whole-body
//! deadline. Both services read every JSON body through [`read_zeroizing`].

use std::fmt;
use std::time::Duration;

use http_body_util::{BodyExt as _, LengthLimitError};
use zeroize::Zeroizing;

/// A byte buffer that is zeroized when dropped and, unlike a `Vec`, never leaves a copy of
/// its content behind in freed memory when it grows: it moves to a larger zeroizing buffer by
/// hand and wipes the old one. Bodies that carry plaintext are built and read with it.
#[derive(Default)]
pub struct ZeroizingBuf(Zeroizing<Vec<u8>>);

impl ZeroizingBuf {
    pub fn with_capacity(n: usize) -> Self {
        Self(Zeroizing::new(Vec::with_capacity(n)))
    }

    /// Appends `data`, growing without leaving an unwiped copy.
    pub fn push(&mut self, data: &[u8]) {
        let buf = &mut self.0;
        if buf.capacity() - buf.len() < data.len() {
            let want = (buf.len() + data.len()).max(buf.capacity() * 2);
            let mut bigger = Zeroizing::new(Vec::with_capacity(want));
            bigger.extend_from_slice(buf);
            // The old buffer is zeroized when it is dropped here.
            *buf = bigger;
        }
        buf.extend_from_slice(data);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    pub fn into_inner(self) -> Zeroizing<Vec<u8>> {
        self.0
    }

    /// The content as [`bytes::Bytes`] that zeroize their memory when the last clone is
    /// dropped (for HTTP bodies).
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self.0)
    }

    /// Wipes the content, keeping nothing.
    pub fn clear(&mut self) {
        use zeroize::Zeroize as _;
        self.0.zeroize();
    }
}

impl std::io::Write for ZeroizingBuf {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.push(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl fmt::Debug for ZeroizingBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ZeroizingBuf(<{} bytes redacted>)", self.0.len())
    }
}

/// Whether `resp` is the body-limit layer's own 413 (plain text, sent before any handler ran
/// because `Content-Length` was already too large): each service replaces it by its JSON error.
pub fn is_limit_layer_refusal<B>(resp: &http::Response<B>) -> bool {
    resp.status() == http::StatusCode::PAYLOAD_TOO_LARGE
        && !resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"))
}

/// Why a body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// Over the body-limit layer's limit.
    TooLarge,
    /// Not complete within the deadline.
    Timeout,
    /// The connection failed mid-body.
    Broken,
}

/// The most [`read_zeroizing`] allocates before the body's bytes arrive.
pub const PREALLOC_MAX: usize = 256 * 1024;

/// Reads the whole of `body` within `deadline` into a [`ZeroizingBuf`].
///
/// # Errors
/// [`BodyError`]: over the limit (a `LengthLimitError` anywhere in the error's chain), past
/// the deadline, or a broken connection.
pub async fn read_zeroizing<B>(body: B, deadline: Duration) -> Result<ZeroizingBuf, BodyError>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Sized from `Content-Length` when there is one, so a large body is not copied (and its
    // copies zeroized) at each doubling; at most PREALLOC_MAX up front, so a request that
    // announces a large body and then sends nothing costs little.
    let hint = body.size_hint();
    let first = usize::try_from(hint.exact().unwrap_or(hint.lower()))
        .unwrap_or(PREALLOC_MAX)
        .clamp(1024, PREALLOC_MAX);
    let read = async {
        let mut body = std::pin::pin!(body);
        let mut buf = ZeroizingBuf::with_capacity(first);
        while let Some(frame) = body.as_mut().frame().await {
            let frame = frame.map_err(|e| classify(&*e.into()))?;
            if let Ok(data) = frame.into_data() {
                buf.push(bytes::Buf::chunk(&data));
            }
        }
        Ok(buf)
    };
    tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| BodyError::Timeout)?
}

fn classify(e: &(dyn std::error::Error + 'static)) -> BodyError {
    let mut source = Some(e);
    while let Some(err) = source {
        if err.is::<LengthLimitError>() {
            return BodyError::TooLarge;
        }
        source = err.source();
    }
    BodyError::Broken
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::{Full, Limited};

    /// A body whose client never sends anything.
    struct Silent;

    impl http_body::Body for Silent {
        type Data = bytes::Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>>
        {
            std::task::Poll::Pending
        }
    }

    #[tokio::test]
    async fn reads_refuses_and_times_out() {
        let ok = read_zeroizing(
            Full::new(bytes::Bytes::from_static(b"hello")),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert_eq!(ok.as_slice(), b"hello");
        let big = Limited::new(Full::new(bytes::Bytes::from(vec![0u8; 100])), 10);
        assert_eq!(
            read_zeroizing(big, Duration::from_secs(1))
                .await
                .unwrap_err(),
            BodyError::TooLarge
        );
        assert_eq!(
            read_zeroizing(Silent, Duration::from_millis(50))
                .await
                .unwrap_err(),
            BodyError::Timeout
        );
    }
}
