//! Shard output on its way from the agents to the users (`JobService.JobLogs`).
//!
//! Agents send their attempts' stdout and stderr to the leader, which keeps the last
//! [`KEEP_BYTES`] of each stream in memory (never in the Raft log) and streams them to
//! readers, following new output as it arrives. A new leader starts with what the agents send
//! it on reconnect: the tail of each running attempt's output.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use tessera_core::model::JobId;
use tokio::sync::broadcast;

/// Output kept per attempt stream.
pub const KEEP_BYTES: usize = 1024 * 1024;
/// Output kept in all, bytes: past it, the oldest attempts' output goes first.
pub const KEEP_TOTAL_BYTES: usize = 256 * 1024 * 1024;

/// Where an attempt belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Job.
    pub job: JobId,
    /// Shard index.
    pub shard: u32,
    /// Attempt number of the shard.
    pub attempt: u32,
}

/// A piece of output.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// Attempt id.
    pub attempt_id: u64,
    /// Whose.
    pub owner: Owner,
    /// 1 stdout, 2 stderr (the API's LogStream).
    pub stream: i32,
    /// Offset of `data` in the stream.
    pub offset: u64,
    /// Bytes.
    pub data: Vec<u8>,
}

#[derive(Default)]
struct Buf {
    start: u64,
    data: VecDeque<u8>,
}

impl Buf {
    fn end(&self) -> u64 {
        self.start + self.data.len() as u64
    }
}

struct AttemptLog {
    owner: Owner,
    streams: [Buf; 2],
}

/// The leader's in-memory log buffers.
pub struct LogStore {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Arc<Chunk>>,
}

#[derive(Default)]
struct Inner {
    attempts: BTreeMap<u64, AttemptLog>,
    /// Bytes held in all buffers.
    total: usize,
}

impl Default for LogStore {
    fn default() -> Self {
        // Followers of JobLogs lag at most this many chunks (each at most 256 KiB from an
        // agent's heartbeat) before they skip ahead.
        LogStore { inner: Mutex::new(Inner::default()), tx: broadcast::channel(256).0 }
    }
}

fn held(a: &AttemptLog) -> usize {
    a.streams.iter().map(|b| b.data.len()).sum()
}

impl LogStore {
    /// The owner of an attempt already seen.
    pub fn owner(&self, attempt_id: u64) -> Option<Owner> {
        self.inner.lock().ok()?.attempts.get(&attempt_id).map(|a| a.owner)
    }

    /// Add output. Bytes already held are skipped (agents resend after reconnects); a gap
    /// restarts the buffer at the new offset. A stream other than stdout (1) or stderr (2) is
    /// ignored: the values come from the agent's `LogChunk.stream`, any `i32`.
    pub fn append(&self, attempt_id: u64, owner: Owner, stream: i32, offset: u64, data: &[u8]) {
        let i = match stream {
            1 => 0,
            2 => 1,
            _ => return,
        };
        let Ok(mut inner) = self.inner.lock() else { return };
        let Inner { attempts, total } = &mut *inner;
        let log = attempts.entry(attempt_id).or_insert_with(|| AttemptLog { owner, streams: Default::default() });
        let buf = &mut log.streams[i];
        let (offset, data) = if offset > buf.end() {
            buf.start = offset;
            buf.data.clear();
            (offset, data)
        } else {
            let skip = (buf.end() - offset) as usize;
            if skip >= data.len() {
                return;
            }
            (buf.end(), &data[skip..])
        };
        buf.data.extend(data);
        *total += data.len();
        if buf.data.len() > KEEP_BYTES {
            let drop = buf.data.len() - KEEP_BYTES;
            buf.data.drain(..drop);
            buf.start += drop as u64;
            *total -= drop;
        }
        let chunk = Chunk { attempt_id, owner, stream, offset, data: data.to_vec() };
        while *total > KEEP_TOTAL_BYTES && attempts.len() > 1 {
            if let Some((_, old)) = attempts.pop_first() {
                *total -= held(&old);
            }
        }
        let _ = self.tx.send(Arc::new(chunk));
    }

    /// New output as it arrives.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Chunk>> {
        self.tx.subscribe()
    }

    /// What is kept of a job's output: per selected attempt and stream, the last `tail` bytes
    /// (or all that is kept). `attempt` None means each shard's latest attempt.
    pub fn read(
        &self,
        job: JobId,
        shard: Option<u32>,
        attempt: Option<u32>,
        streams: &[i32],
        tail: Option<u64>,
    ) -> Vec<Chunk> {
        let Ok(inner) = self.inner.lock() else { return Vec::new() };
        let mine: Vec<(&u64, &AttemptLog)> = inner
            .attempts
            .iter()
            .filter(|(_, a)| a.owner.job == job && shard.is_none_or(|s| a.owner.shard == s))
            .collect();
        let mut latest: BTreeMap<u32, u32> = BTreeMap::new();
        for (_, a) in &mine {
            let l = latest.entry(a.owner.shard).or_default();
            *l = (*l).max(a.owner.attempt);
        }
        let mut out = Vec::new();
        for (id, a) in mine {
            let wanted = match attempt {
                Some(n) => a.owner.attempt == n,
                None => latest.get(&a.owner.shard) == Some(&a.owner.attempt),
            };
            if !wanted {
                continue;
            }
            for (i, buf) in a.streams.iter().enumerate() {
                let stream = i as i32 + 1;
                if !streams.contains(&stream) || buf.data.is_empty() {
                    continue;
                }
                let skip = tail.map_or(0, |t| buf.data.len().saturating_sub(t as usize));
                let data: Vec<u8> = buf.data.iter().skip(skip).copied().collect();
                out.push(Chunk { attempt_id: *id, owner: a.owner, stream, offset: buf.start + skip as u64, data });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(attempt: u32) -> Owner {
        Owner { job: JobId(1), shard: 0, attempt }
    }

    #[test]
    fn resent_bytes_are_skipped_and_gaps_restart_the_buffer() {
        let s = LogStore::default();
        s.append(7, owner(1), 1, 0, b"hello ");
        s.append(7, owner(1), 1, 0, b"hello world");
        let r = s.read(JobId(1), None, None, &[1, 2], None);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].data, b"hello world");
        s.append(7, owner(1), 1, 100, b"later");
        let r = s.read(JobId(1), None, None, &[1], None);
        assert_eq!((r[0].offset, r[0].data.as_slice()), (100, &b"later"[..]));
        assert!(s.read(JobId(1), None, None, &[2], None).is_empty());
        assert!(s.read(JobId(2), None, None, &[1], None).is_empty());
    }

    #[test]
    fn latest_attempt_by_default_tail_and_cap() {
        let s = LogStore::default();
        s.append(1, owner(1), 1, 0, b"first attempt");
        s.append(2, owner(2), 1, 0, b"second attempt");
        let r = s.read(JobId(1), Some(0), None, &[1], Some(7));
        assert_eq!(r[0].data, b"attempt");
        assert_eq!(r[0].owner.attempt, 2);
        assert_eq!(s.read(JobId(1), Some(0), Some(1), &[1], None)[0].data, b"first attempt");
        let big = vec![b'x'; KEEP_BYTES + 10];
        s.append(3, owner(3), 2, 0, &big);
        let r = s.read(JobId(1), None, Some(3), &[2], None);
        assert_eq!((r[0].offset, r[0].data.len()), (10, KEEP_BYTES));
        assert!(s.append_is_bounded_for_bad_streams());
    }

    /// Found by the grpc_requests fuzz target: a `LogChunk` with stream i32::MIN made
    /// `stream - 1` overflow (a panic in debug builds).
    #[test]
    fn any_stream_number_from_the_wire_is_ignored_or_kept() {
        let s = LogStore::default();
        for stream in [i32::MIN, -1, 0, 3, i32::MAX] {
            s.append(9, owner(9), stream, 0, b"ignored");
        }
        assert!(s.owner(9).is_none());
        s.append(9, owner(9), 2, 0, b"kept");
        assert_eq!(s.read(JobId(1), None, Some(9), &[1, 2], None)[0].data, b"kept");
    }

    impl LogStore {
        fn append_is_bounded_for_bad_streams(&self) -> bool {
            self.append(9, owner(9), 7, 0, b"ignored");
            self.owner(9).is_none()
        }
    }
}
