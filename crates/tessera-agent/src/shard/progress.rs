//! The progress protocol: the training process appends JSON lines to `TESSERA_PROGRESS_FILE`,
//! the agent tails the file.
//!
//! [`ProgressParser`] is the pure part (bytes in, state and checkpoint reports out, time passed
//! in); [`tail`] is the task that polls the file and feeds it.

use std::collections::{BTreeMap, HashSet};
use std::io::SeekFrom;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{mpsc, oneshot, watch};

/// Lines longer than this (without the newline) are counted as malformed and skipped.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// How often the tailer looks at the progress file.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// A checkpoint the training process reported, once per distinct URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointReport {
    /// The step of the line that first named this checkpoint.
    pub step: u64,
    pub uri: String,
}

/// The latest state of a shard's progress, as reported by its training process.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Progress {
    /// The step of the latest valid line (0 before any).
    pub step: u64,
    /// The latest total_steps any valid line gave (lines without it keep the previous value).
    pub total_steps: Option<u64>,
    /// The metrics of the latest valid line that had any.
    pub metrics: BTreeMap<String, f64>,
    /// The latest new checkpoint.
    pub last_checkpoint: Option<CheckpointReport>,
    pub valid_lines: u64,
    /// Lines that were not a JSON object with a non-negative integer `step` and well-typed
    /// optional fields, were not UTF-8, or were longer than [`MAX_LINE_BYTES`].
    pub malformed_lines: u64,
    /// Wall-clock time of the latest valid line; `None` before any.
    pub updated_at: Option<SystemTime>,
}

#[derive(Deserialize)]
struct Line {
    step: u64,
    #[serde(default)]
    total_steps: Option<u64>,
    #[serde(default)]
    checkpoint: Option<String>,
    #[serde(default)]
    metrics: Option<BTreeMap<String, f64>>,
}

/// Turns the bytes of a progress file into [`Progress`] and new [`CheckpointReport`]s.
/// Handles lines split across reads, overlong lines and truncation (via [`Self::reset`]).
#[derive(Debug, Default)]
pub struct ProgressParser {
    partial: Vec<u8>,
    /// Inside an overlong line (already counted): skip bytes up to the next newline.
    discarding: bool,
    seen: HashSet<String>,
    progress: Progress,
}

impl ProgressParser {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Feeds bytes appended to the file; returns the checkpoints first seen in them.
    pub fn feed(&mut self, mut bytes: &[u8], now: SystemTime) -> Vec<CheckpointReport> {
        let mut reports = Vec::new();
        while !bytes.is_empty() {
            match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let head = &bytes[..i];
                    bytes = &bytes[i + 1..];
                    if self.discarding {
                        self.discarding = false;
                    } else if self.partial.len() + head.len() > MAX_LINE_BYTES {
                        self.partial.clear();
                        self.progress.malformed_lines += 1;
                    } else if self.partial.is_empty() {
                        reports.extend(self.line(head, now));
                    } else {
                        self.partial.extend_from_slice(head);
                        let line = std::mem::take(&mut self.partial);
                        reports.extend(self.line(&line, now));
                    }
                }
                None => {
                    if !self.discarding {
                        if self.partial.len() + bytes.len() > MAX_LINE_BYTES {
                            self.partial.clear();
                            self.discarding = true;
                            self.progress.malformed_lines += 1;
                        } else {
                            self.partial.extend_from_slice(bytes);
                        }
                    }
                    bytes = &[];
                }
            }
        }
        reports
    }

    /// The writer is gone: a last line without its newline counts as a line.
    pub fn finish(&mut self, now: SystemTime) -> Vec<CheckpointReport> {
        self.discarding = false;
        let line = std::mem::take(&mut self.partial);
        if line.is_empty() { Vec::new() } else { self.line(&line, now).into_iter().collect() }
    }

    /// The file was truncated or replaced: forget the unfinished line (counts and seen
    /// checkpoints are kept, so a checkpoint is still reported once).
    pub fn reset(&mut self) {
        self.partial.clear();
        self.discarding = false;
    }

    fn line(&mut self, raw: &[u8], now: SystemTime) -> Option<CheckpointReport> {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        let Some(line) = parse_line(raw) else {
            self.progress.malformed_lines += 1;
            return None;
        };
        let p = &mut self.progress;
        p.valid_lines += 1;
        p.step = line.step;
        p.updated_at = Some(now);
        if line.total_steps.is_some() {
            p.total_steps = line.total_steps;
        }
        if let Some(metrics) = line.metrics {
            p.metrics = metrics;
        }
        let uri = line.checkpoint?;
        if !self.seen.insert(uri.clone()) {
            return None;
        }
        let report = CheckpointReport { step: line.step, uri };
        p.last_checkpoint = Some(report.clone());
        Some(report)
    }
}

fn parse_line(raw: &[u8]) -> Option<Line> {
    let text = std::str::from_utf8(raw).ok()?;
    // Parse as a map first: a derived struct would also accept a JSON array.
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text).ok()?;
    let line = Line::deserialize(serde_json::Value::Object(map)).ok()?;
    match &line.checkpoint {
        Some(uri) if uri.trim().is_empty() => None,
        _ => Some(line),
    }
}

/// Tails the progress file at `path` every [`POLL_INTERVAL`] until `finish` fires (or its sender
/// is dropped), then reads what is left, treats an unterminated last line as a line, and returns,
/// closing `checkpoints`.
pub(crate) async fn tail(
    path: PathBuf,
    progress: watch::Sender<Progress>,
    checkpoints: mpsc::UnboundedSender<CheckpointReport>,
    mut finish: oneshot::Receiver<()>,
) {
    let mut tailer = Tailer { path, parser: ProgressParser::new(), file_id: None, pos: 0 };
    loop {
        tailer.poll(&progress, &checkpoints).await;
        tokio::select! {
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = &mut finish => break,
        }
    }
    tailer.poll(&progress, &checkpoints).await;
    let reports = tailer.parser.finish(SystemTime::now());
    publish(&tailer.parser, reports, &progress, &checkpoints);
}

struct Tailer {
    path: PathBuf,
    parser: ProgressParser,
    /// (device, inode) of the file last read, to notice a replaced file.
    file_id: Option<(u64, u64)>,
    pos: u64,
}

impl Tailer {
    async fn poll(
        &mut self,
        progress: &watch::Sender<Progress>,
        checkpoints: &mpsc::UnboundedSender<CheckpointReport>,
    ) {
        let before = self.parser.progress().clone();
        let mut reports = Vec::new();
        if let Err(e) = self.read_new(&mut reports).await {
            tracing::debug!(path = %self.path.display(), error = %e, "progress file not readable");
        }
        if !reports.is_empty() || *self.parser.progress() != before {
            publish(&self.parser, reports, progress, checkpoints);
        }
    }

    async fn read_new(&mut self, reports: &mut Vec<CheckpointReport>) -> std::io::Result<()> {
        let mut file = tokio::fs::File::open(&self.path).await?;
        let meta = file.metadata().await?;
        let id = (meta.dev(), meta.ino());
        if self.file_id != Some(id) || meta.len() < self.pos {
            if self.file_id.is_some() {
                tracing::debug!(path = %self.path.display(), "progress file truncated or replaced; reading from the start");
            }
            self.file_id = Some(id);
            self.pos = 0;
            self.parser.reset();
        }
        if meta.len() == self.pos {
            return Ok(());
        }
        file.seek(SeekFrom::Start(self.pos)).await?;
        let mut buf = vec![0u8; MAX_LINE_BYTES];
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            self.pos += n as u64;
            reports.extend(self.parser.feed(&buf[..n], SystemTime::now()));
        }
    }
}

fn publish(
    parser: &ProgressParser,
    reports: Vec<CheckpointReport>,
    progress: &watch::Sender<Progress>,
    checkpoints: &mpsc::UnboundedSender<CheckpointReport>,
) {
    progress.send_replace(parser.progress().clone());
    for report in reports {
        tracing::info!(step = report.step, uri = %report.uri, "checkpoint reported");
        // Nobody listening is fine: the latest checkpoint is also in `Progress`.
        let _ = checkpoints.send(report);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(parser: &mut ProgressParser, chunks: &[&[u8]]) -> Vec<CheckpointReport> {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        chunks.iter().flat_map(|c| parser.feed(c, now)).collect()
    }

    #[test]
    fn valid_lines_update_progress() {
        let mut p = ProgressParser::new();
        let reports = feed_all(
            &mut p,
            &[b"{\"step\": 1, \"total_steps\": 10, \"metrics\": {\"loss\": 2.5, \"lr\": 1}}\n", b"{\"step\": 2}\n"],
        );
        assert!(reports.is_empty());
        let pr = p.progress();
        assert_eq!(pr.step, 2);
        assert_eq!(pr.total_steps, Some(10));
        assert_eq!(pr.metrics, BTreeMap::from([("loss".to_string(), 2.5), ("lr".to_string(), 1.0)]));
        assert_eq!((pr.valid_lines, pr.malformed_lines), (2, 0));
        assert_eq!(pr.updated_at, Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1000)));
    }

    #[test]
    fn partial_lines_are_joined() {
        let mut p = ProgressParser::new();
        feed_all(&mut p, &[b"{\"st", b"ep\": 7", b", \"total_steps\": 9}", b"\n{\"step\": 8}"]);
        assert_eq!(p.progress().step, 7);
        assert_eq!(p.progress().valid_lines, 1);
        // The unterminated last line counts once the writer is gone.
        p.finish(SystemTime::now());
        assert_eq!(p.progress().step, 8);
        assert_eq!(p.progress().malformed_lines, 0);
    }

    #[test]
    fn malformed_lines_are_counted_not_fatal() {
        let mut p = ProgressParser::new();
        let bad: &[&[u8]] = &[
            b"not json\n",
            b"{\"total_steps\": 3}\n",
            b"{\"step\": -1}\n",
            b"{\"step\": 1.5}\n",
            b"{\"step\": \"3\"}\n",
            b"{\"step\": 3, \"total_steps\": \"x\"}\n",
            b"{\"step\": 3, \"checkpoint\": 5}\n",
            b"{\"step\": 3, \"checkpoint\": \"\"}\n",
            b"{\"step\": 3, \"metrics\": {\"loss\": \"low\"}}\n",
            b"{\"step\": 3, \"metrics\": [1]}\n",
            b"[3]\n",
            b"3\n",
            b"{\"step\": 3\xff}\n",
        ];
        feed_all(&mut p, bad);
        feed_all(&mut p, &[b"\n", b"   \r\n", b"{\"step\": 4, \"extra\": true}\r\n"]);
        assert_eq!(p.progress().malformed_lines, bad.len() as u64);
        assert_eq!(p.progress().valid_lines, 1);
        assert_eq!(p.progress().step, 4);
    }

    #[test]
    fn overlong_lines_are_skipped_once() {
        let mut p = ProgressParser::new();
        let mut long = b"{\"step\": 99, \"pad\": \"".to_vec();
        long.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES));
        long.extend_from_slice(b"\"}\n{\"step\": 5}\n");
        // In one piece and in small pieces.
        feed_all(&mut p, &[&long]);
        for chunk in long.chunks(1000) {
            p.feed(chunk, SystemTime::now());
        }
        assert_eq!(p.progress().malformed_lines, 2);
        assert_eq!(p.progress().valid_lines, 2);
        assert_eq!(p.progress().step, 5);

        // Exactly the limit is fine.
        let mut p = ProgressParser::new();
        let mut line = b"{\"step\": 6, \"pad\": \"".to_vec();
        line.extend(std::iter::repeat_n(b'y', MAX_LINE_BYTES - line.len() - 2));
        line.extend_from_slice(b"\"}");
        assert_eq!(line.len(), MAX_LINE_BYTES);
        line.push(b'\n');
        for chunk in line.chunks(4096) {
            p.feed(chunk, SystemTime::now());
        }
        assert_eq!((p.progress().step, p.progress().malformed_lines), (6, 0));
    }

    #[test]
    fn checkpoints_are_reported_once() {
        let mut p = ProgressParser::new();
        let reports = feed_all(
            &mut p,
            &[
                b"{\"step\": 10, \"checkpoint\": \"file:///c/10\"}\n",
                b"{\"step\": 11, \"checkpoint\": \"file:///c/10\"}\n",
                b"{\"step\": 20, \"checkpoint\": \"file:///c/20\"}\n",
            ],
        );
        p.reset();
        let again = feed_all(&mut p, &[b"{\"step\": 20, \"checkpoint\": \"file:///c/20\"}\n"]);
        assert_eq!(
            reports,
            vec![
                CheckpointReport { step: 10, uri: "file:///c/10".into() },
                CheckpointReport { step: 20, uri: "file:///c/20".into() }
            ]
        );
        assert!(again.is_empty());
        assert_eq!(p.progress().last_checkpoint, Some(CheckpointReport { step: 20, uri: "file:///c/20".into() }));
    }

    #[test]
    fn reset_drops_the_partial_line() {
        let mut p = ProgressParser::new();
        feed_all(&mut p, &[b"{\"step\": 1}\n{\"step\": 2"]);
        p.reset();
        feed_all(&mut p, &[b"{\"step\": 3}\n"]);
        assert_eq!(p.progress().step, 3);
        assert_eq!(p.progress().malformed_lines, 0);
    }
}
