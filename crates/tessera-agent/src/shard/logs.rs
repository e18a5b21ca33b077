//! Size-capped log files: copy a child's pipe into a file up to a cap, then keep draining the pipe
//! (so the child never blocks on a full pipe) without writing.

use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// What one stream wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogStats {
    /// Bytes of the child's output written to the file (at most the cap).
    pub written: u64,
    /// Bytes read from the child and not written (over the cap, or after a write error).
    pub dropped: u64,
}

/// The line written once when a stream reaches its cap.
pub(crate) fn truncation_note(stream: &str, cap: u64) -> String {
    format!("\n[tessera: {stream} truncated at {cap} bytes; further output discarded]\n")
}

/// Copies `src` into `file` until EOF, writing at most `cap` bytes of it.
pub(crate) async fn copy_capped<R: AsyncRead + Unpin>(
    mut src: R,
    file: std::fs::File,
    path: PathBuf,
    stream: &'static str,
    cap: u64,
) -> LogStats {
    let mut file = Some(tokio::fs::File::from_std(file));
    let mut stats = LogStats::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match src.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(stream, error = %e, "reading shard output failed");
                break;
            }
        };
        let Some(f) = file.as_mut() else {
            stats.dropped += n as u64;
            continue;
        };
        let room = cap.saturating_sub(stats.written);
        let take = (n as u64).min(room) as usize;
        let mut result = f.write_all(&buf[..take]).await;
        stats.written += take as u64;
        stats.dropped += (n - take) as u64;
        if result.is_ok() && take < n {
            tracing::warn!(stream, cap, path = %path.display(), "shard log reached its cap; discarding the rest");
            result = f.write_all(truncation_note(stream, cap).as_bytes()).await;
            if result.is_ok() {
                result = f.flush().await;
            }
            file = None;
        }
        if let Err(e) = result {
            tracing::warn!(stream, path = %path.display(), error = %e, "writing shard log failed; discarding the rest");
            file = None;
        }
    }
    if let Some(mut f) = file
        && let Err(e) = f.flush().await
    {
        tracing::warn!(stream, path = %path.display(), error = %e, "flushing shard log failed");
    }
    stats
}
