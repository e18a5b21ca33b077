//! Tests every durable [`LogStore`] must pass, run by each store's own tests: what was flushed
//! survives a reopen, a snapshot written in the background is adopted and survives a restart,
//! and the kill -9 loop (a child process appends and flushes, is killed at random moments, and
//! every entry it acknowledged must be there after the restart).
//!
//! The conformance suite in `mem.rs` covers the rules of the trait on one open store; this one
//! covers what reaches the disk.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use raft::eraftpb::{ConfState, Entry, HardState};
use raft::{GetEntriesContext, Storage};

use super::mem::{conformance, new_snapshot};
use super::{LogStore, StoreError};

/// A store kept in a directory, opened the way a server opens it.
pub(crate) trait Durable: LogStore + Sized {
    /// Open the store in `dir`, creating an empty one.
    fn open(dir: &Path) -> Result<Self, StoreError>;
    /// Open it and give an empty one `voters` as its conf state.
    fn open_with_voters(dir: &Path, voters: &[u64]) -> Result<Self, StoreError>;
    /// Whether it holds nothing.
    fn is_empty(&self) -> bool;
}

pub(crate) fn all<S: Storage>(s: &S) -> Vec<Entry> {
    s.entries(s.first_index().unwrap(), s.last_index().unwrap() + 1, None, GetEntriesContext::empty(false)).unwrap()
}

pub(crate) fn hs(term: u64, vote: u64, commit: u64) -> HardState {
    HardState { term, vote, commit, ..Default::default() }
}

/// Fresh stores in numbered directories under one temporary directory, for the conformance
/// suite.
pub(crate) fn conformance<S: Durable>() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    conformance::run_all(|voters: &[u64]| {
        n += 1;
        S::open_with_voters(&dir.path().join(n.to_string()), voters).unwrap()
    });
}

pub(crate) fn a_snapshot_written_in_the_background_is_adopted_and_survives_a_restart<S: Durable>() {
    let dir = tempfile::tempdir().unwrap();
    let log = conformance::entries(1..=30, 1);
    let cs = ConfState { voters: vec![1, 2, 3], ..Default::default() };
    {
        let mut s = S::open_with_voters(dir.path(), &[1, 2, 3]).unwrap();
        s.append(&log).unwrap();
        s.set_hard_state(&hs(1, 1, 25)).unwrap();
        s.flush().unwrap();
        let snap = new_snapshot(b"state at 20".to_vec(), 20, 1, &cs);
        // Written on another thread while the log is still whole.
        let write = s.snapshot_writer().unwrap();
        let written = std::thread::spawn(move || write(&snap).map(|w| (w, snap))).join().unwrap().unwrap();
        assert!(written.0, "the writer keeps a newer snapshot");
        assert_eq!(s.first_index().unwrap(), 1, "nothing is compacted before it is adopted");
        assert!(s.adopt_snapshot(written.1.clone()).unwrap());
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (21, 30));
        assert_eq!(all(&s), log[20..].to_vec());
        assert!(!s.adopt_snapshot(written.1).unwrap(), "an older or equal one is not adopted");
        // A writer never replaces a newer stored snapshot with an older one.
        let older = new_snapshot(b"state at 10".to_vec(), 10, 1, &cs);
        assert!(!s.snapshot_writer().unwrap()(&older).unwrap());
        s.flush().unwrap();
    }
    // Whether or not the background removal of compacted entries finished, a restart
    // finds the snapshot and the log after it.
    let s = S::open(dir.path()).unwrap();
    assert_eq!(s.latest_snapshot().unwrap().get_data(), b"state at 20");
    assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (21, 30));
    assert_eq!(all(&s), log[20..].to_vec());
}

pub(crate) fn reopen_keeps_what_was_flushed<S: Durable>() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = conformance::entries(1..=20, 1);
    log.extend(conformance::entries(21..=30, 2));
    let cs = ConfState { voters: vec![1, 2, 3], learners: vec![7], ..Default::default() };
    {
        let mut s = S::open_with_voters(dir.path(), &[1, 2, 3]).unwrap();
        s.append(&log).unwrap();
        s.set_hard_state(&hs(2, 3, 25)).unwrap();
        s.set_conf_state(&cs).unwrap();
        s.save_snapshot(b"state at 12".to_vec(), 12, &cs).unwrap();
        s.flush().unwrap();
    }
    let snap = {
        let s = S::open_with_voters(dir.path(), &[9]).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (13, 30));
        assert_eq!(all(&s), log[12..].to_vec());
        assert_eq!(s.term(12).unwrap(), 1);
        assert_eq!(s.term(21).unwrap(), 2);
        let st = s.initial_state().unwrap();
        assert_eq!(st.hard_state, hs(2, 3, 25));
        assert_eq!(st.conf_state, cs, "bootstrap keeps the stored conf state");
        let snap = s.latest_snapshot().unwrap();
        assert_eq!(snap.get_data(), b"state at 12");
        assert_eq!((snap.get_metadata().index, snap.get_metadata().term), (12, 1));
        assert_eq!(snap.get_metadata().get_conf_state(), &cs);
        assert_eq!(s.snapshot(0, 2).unwrap(), snap);
        snap
    };
    // An installed snapshot, then an overwritten suffix, survive too.
    let leader = conformance::snapshot(40, 3, &[1, 2], b"leader state");
    {
        let mut s = S::open(dir.path()).unwrap();
        s.apply_snapshot(&leader).unwrap();
        s.append(&conformance::entries(41..=45, 3)).unwrap();
        s.append(&conformance::entries(43..=44, 4)).unwrap();
        s.flush().unwrap();
    }
    let s = S::open(dir.path()).unwrap();
    assert_ne!(s.latest_snapshot().unwrap(), snap);
    assert_eq!(s.latest_snapshot().unwrap(), leader);
    assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (41, 44));
    let mut want = conformance::entries(41..=42, 3);
    want.extend(conformance::entries(43..=44, 4));
    assert_eq!(all(&s), want);
    assert_eq!([40, 41, 43, 44].map(|i| s.term(i).unwrap()), [3, 3, 4, 4]);
    let st = s.initial_state().unwrap();
    assert_eq!(st.hard_state, hs(3, 3, 40));
    assert_eq!(st.conf_state.voters, vec![1, 2]);
}

pub(crate) fn open_empty_and_bootstrap<S: Durable>() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = S::open(&dir.path().join("joiner")).unwrap();
        assert!(s.is_empty());
        assert!(!s.initial_state().unwrap().initialized());
    }
    {
        let s = S::open_with_voters(&dir.path().join("new"), &[1, 2, 3]).unwrap();
        assert!(!s.is_empty());
        assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
    }
    let s = S::open(&dir.path().join("new")).unwrap();
    assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
}

// ---- kill -9 ----

const KILL9_DIR: &str = "TESSERA_RAFT_KILL9_DIR";

/// The payload of entry `index` at `term`: deterministic, so the parent can check it.
fn payload(index: u64, term: u64) -> Vec<u8> {
    let len = (index * 7919 % 600) as usize;
    let mut v = format!("{index}:{term}:").into_bytes();
    v.extend((0..len).map(|i| (i as u64 ^ index) as u8));
    v
}

fn snapshot_payload(index: u64) -> Vec<u8> {
    format!("snapshot at {index}").into_bytes().repeat(50)
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// How many entries below `last` the child's commit index lags; it overwrites at most the
/// last 2, so it never overwrites a committed entry and snapshots stay in the log.
const COMMIT_LAG: u64 = 4;

/// The body of each store's `kill9_child` test, run by [`kill9_loop`] in a child process,
/// which it kills: append batches, sometimes overwrite the tail with a new term, compact
/// (with `save_snapshot`, or with the background writer and `adopt_snapshot`), flush, then
/// print `acked <last_index>`. Does nothing unless started by the loop.
pub(crate) fn kill9_child<S: Durable>() {
    let Some(dir) = std::env::var_os(KILL9_DIR) else { return };
    let mut s = S::open_with_voters(Path::new(&dir), &[1]).unwrap();
    let mut term = s.initial_state().unwrap().hard_state.term.max(s.term(s.last_index().unwrap()).unwrap()).max(1);
    let mut rng = u64::from(std::process::id()) | 1;
    let started = Instant::now();
    // Bounded, in case the parent died without killing it.
    for round in 0u64.. {
        if started.elapsed() > Duration::from_secs(20) {
            return;
        }
        let last = s.last_index().unwrap();
        let r = xorshift(&mut rng);
        let (from, n) = if round % 5 == 4 && last >= s.first_index().unwrap() + 2 {
            // A new leader rewrites the last entry or two.
            term += 1;
            (last - (r % 2), 2 + r % 8)
        } else {
            (last + 1, 1 + r % 40)
        };
        let batch: Vec<Entry> = (from..from + n)
            .map(|i| Entry { index: i, term, data: payload(i, term).into(), ..Default::default() })
            .collect();
        s.append(&batch).unwrap();
        let new_last = s.last_index().unwrap();
        let commit = new_last.saturating_sub(COMMIT_LAG).max(s.initial_state().unwrap().hard_state.commit);
        s.set_hard_state(&hs(term, 1, commit)).unwrap();
        if round % 7 == 6 && commit > s.first_index().unwrap() {
            let at = commit - r % 3;
            let cs = s.initial_state().unwrap().conf_state;
            match s.snapshot_writer() {
                // Every other snapshot through the background writer, where there is one.
                Some(write) if round % 14 == 13 => {
                    let snap = new_snapshot(snapshot_payload(at), at, s.term(at).unwrap(), &cs);
                    if write(&snap).unwrap() {
                        s.adopt_snapshot(snap).unwrap();
                    }
                }
                _ => s.save_snapshot(snapshot_payload(at), at, &cs).unwrap(),
            }
        }
        s.flush().unwrap();
        println!("acked {new_last}");
    }
}

/// Kills and waits for the child however the test ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Check the store in `dir` after a kill: it opens, the log is contiguous with matching
/// payloads and non-decreasing terms, and everything acked is there.
fn check_after_kill<S: Durable>(dir: &Path, acked: u64) -> u64 {
    let s = S::open(dir).unwrap_or_else(|e| panic!("store does not open after kill -9: {e}"));
    let (first, last) = (s.first_index().unwrap(), s.last_index().unwrap());
    assert!(last >= acked, "acked {acked} but the log ends at {last}");
    let entries = all(&s);
    assert_eq!(entries.len() as u64, last + 1 - first, "log is contiguous");
    let mut prev_term = s.term(first - 1).unwrap();
    for (e, i) in entries.iter().zip(first..) {
        assert_eq!(e.index, i);
        assert!(e.term >= prev_term, "term goes down at {i}");
        assert_eq!(e.data.as_ref(), payload(i, e.term).as_slice(), "payload of {i}");
        assert_eq!(s.term(i).unwrap(), e.term);
        prev_term = e.term;
    }
    let hs = s.initial_state().unwrap().hard_state;
    assert!(hs.commit <= last, "commit {} past the last index {last}", hs.commit);
    assert!(hs.commit + COMMIT_LAG >= acked, "commit {} lost: acked {acked}", hs.commit);
    if let Some(snap) = s.latest_snapshot() {
        let index = snap.get_metadata().index;
        assert_eq!(first, index + 1);
        assert!(index <= hs.commit);
        assert_eq!(snap.get_data(), snapshot_payload(index).as_slice());
    } else {
        assert_eq!(first, 1);
    }
    last
}

/// The body of each store's `kill9_loop` test: start `child_test` (the store's test that
/// calls [`kill9_child`], by its path in the test binary) 12 times, kill it with SIGKILL at
/// varied moments, and check the store after each kill.
pub(crate) fn kill9_loop<S: Durable>(child_test: &str) {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();
    let mut last = 0;
    let mut total_acks = 0;
    for round in 0..12u64 {
        let mut child = KillOnDrop(
            Command::new(&exe)
                .args(["--exact", child_test, "--ignored", "--nocapture", "--test-threads=1"])
                .env(KILL9_DIR, dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        let stdout = child.0.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut acked = None;
            let mut lines = 0;
            let mut r = BufReader::new(stdout);
            let mut line = Vec::new();
            // Only whole lines: a line cut by the kill is not an ack.
            while r.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                if line.ends_with(b"\n")
                    && let Some(n) = std::str::from_utf8(&line).ok().and_then(|l| l.trim_end().strip_prefix("acked "))
                {
                    acked = Some(n.parse::<u64>().unwrap());
                    lines += 1;
                }
                line.clear();
            }
            (acked, lines)
        });
        // Vary where the kill lands: early (maybe during open) to a few hundred ms in.
        std::thread::sleep(Duration::from_millis(40 + round * 97 % 400));
        assert!(child.0.try_wait().unwrap().is_none(), "child exited before the kill; see its output above");
        drop(child);
        let (acked, lines) = reader.join().unwrap();
        total_acks += lines;
        // No ack this round: what the last check saw must still be there.
        let acked = acked.unwrap_or(last);
        last = check_after_kill::<S>(dir.path(), acked);
        eprintln!("kill9 {child_test} round {round}: {lines} acks, last acked {acked}, log ends at {last}");
    }
    assert!(total_acks > 50, "the child acked only {total_acks} batches in all");
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
}
