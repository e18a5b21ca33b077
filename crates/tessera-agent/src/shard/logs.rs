//! An attempt's output on the agent's disk, capped by rotation: each stream (`stdout.log`,
//! `stderr.log`) is written in segments of half the cap. When the current segment is full it is
//! renamed to `<name>.1` (replacing the one before) and a new one begins, so a stream never takes
//! more than its cap on disk and always keeps its latest output, which is where a training run's
//! error is. Offsets are the stream's own, from 0, across segments: `<name>.start` holds where
//! the current segment begins (absent: 0).
//!
//! The child's pipe is drained whatever happens to the files, so it never blocks on a full pipe.
//! [`StreamFiles::read`] serves any kept range to the servers (`job logs` of finished attempts).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// What one stream wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogStats {
    /// Bytes of the child's output written (rotated-away segments included).
    pub written: u64,
    /// Bytes read from the child and not written (after a write error).
    pub dropped: u64,
}

/// The files of one stream of one attempt.
#[derive(Debug, Clone)]
pub struct StreamFiles {
    /// The current segment, like `.../attempt-7/stdout.log`.
    path: PathBuf,
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

impl StreamFiles {
    /// The stream whose current segment is `path`.
    pub fn new(path: PathBuf) -> StreamFiles {
        StreamFiles { path }
    }

    /// The current segment.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn previous(&self) -> PathBuf {
        with_suffix(&self.path, ".1")
    }

    fn start_file(&self) -> PathBuf {
        with_suffix(&self.path, ".start")
    }

    /// Where the current segment begins in the stream.
    fn start(&self) -> u64 {
        std::fs::read_to_string(self.start_file()).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
    }

    fn len(path: &Path) -> u64 {
        std::fs::metadata(path).map_or(0, |m| m.len())
    }

    /// The stream offsets kept on disk: `[first, end)`.
    pub fn kept(&self) -> (u64, u64) {
        let _rotating = rotation_lock();
        let start = self.start();
        let (prev, cur) = (Self::len(&self.previous()), Self::len(&self.path));
        (start.saturating_sub(prev), start.saturating_add(cur))
    }

    /// Up to `max` bytes from stream offset `offset`, moved up to the first byte kept: the
    /// offset of the first byte returned, and the bytes (empty at the end).
    pub fn read(&self, offset: u64, max: u64) -> (u64, Vec<u8>) {
        // No rotation while the segments and their start are read together.
        let _rotating = rotation_lock();
        let start = self.start();
        let prev_len = Self::len(&self.previous());
        let first = start.saturating_sub(prev_len);
        let from = offset.max(first);
        let mut data = Vec::new();
        if from < start {
            read_at(&self.previous(), from - first, max, &mut data);
            // On into the current segment.
            read_at(&self.path, 0, max.saturating_sub(data.len() as u64), &mut data);
        } else {
            read_at(&self.path, from - start, max, &mut data);
        }
        (from, data)
    }
}

/// Held by a rotation (renaming the segment and writing the new start) and by every reader, so a
/// reader never pairs one segment with another's start. Rotations are rare and reads short.
fn rotation_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Appends up to `max` bytes of `path` from `at` to `data`.
fn read_at(path: &Path, at: u64, max: u64, data: &mut Vec<u8>) {
    if max == 0 {
        return;
    }
    if let Ok(mut f) = std::fs::File::open(path)
        && f.seek(SeekFrom::Start(at)).is_ok()
    {
        let _ = f.take(max).read_to_end(data);
    }
}

/// Copies `src` into the stream's segments until EOF, rotating so that at most `cap` bytes stay
/// on disk (two segments of `cap / 2`). `file` is the first segment, already created.
pub(crate) async fn copy_rotating<R: AsyncRead + Unpin>(
    mut src: R,
    file: std::fs::File,
    files: StreamFiles,
    stream: &'static str,
    cap: u64,
) -> LogStats {
    let segment = (cap / 2).max(1);
    let mut file = Some(tokio::fs::File::from_std(file));
    let mut stats = LogStats::default();
    let mut in_segment = 0u64;
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
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let Some(f) = file.as_mut() else {
                stats.dropped += rest.len() as u64;
                break;
            };
            if in_segment == segment {
                match rotate(f, &files, stats.written).await {
                    Ok(next) => {
                        *f = next;
                        in_segment = 0;
                    }
                    Err(e) => {
                        tracing::warn!(stream, path = %files.path.display(), error = %e, "rotating shard log failed; discarding the rest");
                        file = None;
                        continue;
                    }
                }
            }
            let take = (rest.len() as u64).min(segment - in_segment) as usize;
            if let Err(e) = f.write_all(&rest[..take]).await {
                tracing::warn!(stream, path = %files.path.display(), error = %e, "writing shard log failed; discarding the rest");
                file = None;
                continue;
            }
            in_segment += take as u64;
            stats.written += take as u64;
            rest = &rest[take..];
        }
    }
    if let Some(mut f) = file
        && let Err(e) = f.flush().await
    {
        tracing::warn!(stream, path = %files.path.display(), error = %e, "flushing shard log failed");
    }
    stats
}

/// The current segment is full: it becomes the previous one, and a new one begins at `offset`.
/// The renames and the small write happen under the rotation lock, synchronously (a few
/// milliseconds, twice per cap's worth of output).
async fn rotate(f: &mut tokio::fs::File, files: &StreamFiles, offset: u64) -> std::io::Result<tokio::fs::File> {
    f.flush().await?;
    let _rotating = rotation_lock();
    std::fs::rename(&files.path, files.previous())?;
    let tmp = with_suffix(&files.path, ".start.tmp");
    std::fs::write(&tmp, offset.to_string())?;
    std::fs::rename(&tmp, files.start_file())?;
    Ok(tokio::fs::File::from_std(std::fs::File::create(&files.path)?))
}

/// Whether a file in an attempt's directory is part of its output (`stdout.log`, its rotated
/// segment and start, the same for stderr).
fn is_output(name: &str) -> bool {
    name.starts_with("stdout.log") || name.starts_with("stderr.log")
}

/// Remove the output files of attempts under `work_root` (`job-*/shard-*/attempt-<id>/`) that
/// are not in `keep` and were last written before `before`. Checkpoints, progress and other
/// files stay. Returns how many files were removed.
pub fn sweep_output(work_root: &Path, keep: &dyn Fn(u64) -> bool, before: std::time::SystemTime) -> usize {
    let dirs = |p: &Path, prefix: &'static str| -> Vec<(PathBuf, String)> {
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let rest = name.strip_prefix(prefix)?.to_string();
                e.file_type().ok()?.is_dir().then(|| (e.path(), rest))
            })
            .collect()
    };
    let mut removed = 0;
    for (job, _) in dirs(work_root, "job-") {
        for (shard, _) in dirs(&job, "shard-") {
            for (attempt, id) in dirs(&shard, "attempt-") {
                if id.parse::<u64>().map_or(true, keep) {
                    continue;
                }
                for e in std::fs::read_dir(&attempt).into_iter().flatten().flatten() {
                    let name = e.file_name();
                    let old = e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t < before);
                    if name.to_str().is_some_and(is_output) && old && std::fs::remove_file(e.path()).is_ok() {
                        removed += 1;
                    }
                }
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_removes_old_output_of_attempts_that_no_longer_run_and_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        let day = std::time::Duration::from_secs(86_400);
        let now = std::time::SystemTime::now();
        let mk = |attempt: u64, age_days: u32| {
            let d = root.path().join("job-1/shard-0").join(format!("attempt-{attempt}"));
            std::fs::create_dir_all(d.join("checkpoints")).unwrap();
            for f in ["stdout.log", "stdout.log.1", "stdout.log.start", "stderr.log", "progress.jsonl"] {
                let file = std::fs::File::create(d.join(f)).unwrap();
                file.set_modified(now - day * age_days).unwrap();
            }
            d
        };
        let old = mk(1, 10);
        let running = mk(2, 10);
        let recent = mk(3, 1);
        let removed = sweep_output(root.path(), &|a| a == 2, now - day * 7);
        assert_eq!(removed, 4);
        assert!(!old.join("stdout.log").exists() && !old.join("stdout.log.1").exists());
        assert!(!old.join("stderr.log").exists());
        assert!(old.join("progress.jsonl").exists() && old.join("checkpoints").is_dir(), "only output goes");
        assert!(running.join("stdout.log").exists(), "a running attempt keeps its output");
        assert!(recent.join("stdout.log").exists(), "recent output stays");
        // Once it no longer runs, its old output goes too; then there is nothing left to remove.
        assert_eq!(sweep_output(root.path(), &|_| false, now - day * 7), 4);
        assert_eq!(sweep_output(root.path(), &|_| false, now - day * 7), 0);
        assert_eq!(sweep_output(&root.path().join("absent"), &|_| false, now), 0);
    }

    #[tokio::test]
    async fn a_stream_rotates_keeping_its_latest_output_and_reads_by_stream_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        let file = std::fs::File::create(&path).unwrap();
        let files = StreamFiles::new(path.clone());
        // 2,500 bytes through a cap of 1,000: segments of 500, the last two kept.
        let text: Vec<u8> = (0..2500u32).map(|i| b'a' + (i / 100 % 26) as u8).collect();
        let stats = copy_rotating(&text[..], file, files.clone(), "stdout", 1000).await;
        assert_eq!(stats, LogStats { written: 2500, dropped: 0 });
        assert_eq!(files.kept(), (1500, 2500));
        assert!(std::fs::metadata(&path).unwrap().len() + std::fs::metadata(files.previous()).unwrap().len() <= 1000);
        // Reads by stream offset, across the two segments, from before what is kept, and at the end.
        assert_eq!(files.read(1500, 1000), (1500, text[1500..2500].to_vec()));
        assert_eq!(files.read(1900, 200), (1900, text[1900..2100].to_vec()));
        assert_eq!(files.read(0, 10), (1500, text[1500..1510].to_vec()));
        assert_eq!(files.read(2500, 10), (2500, Vec::new()));
        assert_eq!(files.read(2400, 1000), (2400, text[2400..].to_vec()));
    }

    #[tokio::test]
    async fn a_short_stream_is_one_segment_and_a_missing_one_reads_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stderr.log");
        let file = std::fs::File::create(&path).unwrap();
        let files = StreamFiles::new(path);
        copy_rotating(&b"hello"[..], file, files.clone(), "stderr", 1000).await;
        assert_eq!(files.kept(), (0, 5));
        assert_eq!(files.read(0, 100), (0, b"hello".to_vec()));
        // The job can write its own directory: a start file it wrote is no reason to panic.
        for start in ["18446744073709551615", "0", "garbage", "3"] {
            std::fs::write(with_suffix(files.path(), ".start"), start).unwrap();
            std::fs::write(files.previous(), "0123456789").unwrap();
            let (first, end) = files.kept();
            assert!(first <= end, "{start}: {first}..{end}");
            let _ = files.read(0, 100);
            let _ = files.read(u64::MAX, 100);
        }
        let none = StreamFiles::new(dir.path().join("absent.log"));
        assert_eq!(none.kept(), (0, 0));
        assert_eq!(none.read(0, 10), (0, Vec::new()));
    }
}
