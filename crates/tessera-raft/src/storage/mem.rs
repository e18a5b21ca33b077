//! An in-memory [`LogStore`] for tests.
//!
//! [`MemStore`] keeps everything in memory and its `flush` does nothing: a "crashed" node in a
//! test keeps its `MemStore` value and restarts over it, as if every write had been flushed.
//! It follows the same rules as [`super::sled_store::SledStore`] and
//! [`super::engine_store::EngineStore`] (the conformance suite at the end of this file runs
//! against each), so a test written over it holds for the real stores.
//!
//! The checks the stores share (what `append` accepts, how `entries` limits its size, how the
//! errors map to raft-rs's, the terms of the log kept as runs) live here too, as `pub(super)`
//! helpers.

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use super::{LogStore, StoreError};

/// An in-memory [`LogStore`]: cheap to build, nothing durable, `flush` is a no-op.
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    hard_state: HardState,
    conf_state: ConfState,
    /// `entries[i].index == snapshot_index + 1 + i`.
    entries: Vec<Entry>,
    /// The latest snapshot saved or installed; the log starts right after it.
    snapshot: Option<Snapshot>,
}

impl MemStore {
    /// An empty store whose conf state has `voters`: the first start of a new cluster whose
    /// members all begin with the same configuration (like raft-rs's
    /// `MemStorage::new_with_conf_state`). `MemStore::default()` is an empty store with no
    /// configuration (a server that will join an existing cluster).
    pub fn new(voters: &[u64]) -> MemStore {
        let mut store = MemStore::default();
        store.conf_state.voters = voters.to_vec();
        store
    }

    fn snapshot_index_term(&self) -> (u64, u64) {
        snapshot_index_term(self.snapshot.as_ref())
    }

    fn first(&self) -> u64 {
        self.snapshot_index_term().0 + 1
    }

    fn last(&self) -> u64 {
        self.snapshot_index_term().0 + self.entries.len() as u64
    }

    /// The term of `idx`, which must lie in `[first - 1, last]`.
    fn term_in_range(&self, idx: u64) -> u64 {
        let (snap_index, snap_term) = self.snapshot_index_term();
        if idx == snap_index { snap_term } else { self.entries[(idx - snap_index - 1) as usize].term }
    }
}

impl Storage for MemStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        check_entries_range(low, high, self.first(), self.last())?;
        let offset = self.first();
        let mut budget = SizeBudget::new(max_size.into());
        let mut out = Vec::new();
        for e in &self.entries[(low - offset) as usize..(high - offset) as usize] {
            if !budget.admit(e) {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        check_term_range(idx, self.snapshot_index_term().0, self.last())?;
        Ok(self.term_in_range(idx))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        snapshot_for_request(self.snapshot.as_ref(), request_index)
    }
}

impl LogStore for MemStore {
    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        check_append(self.first(), self.last(), |i| self.term_in_range(i), entries)?;
        let keep = (entries[0].index - self.first()) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(entries);
        Ok(())
    }

    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StoreError> {
        self.hard_state = hs.clone();
        Ok(())
    }

    fn set_conf_state(&mut self, cs: &ConfState) -> Result<(), StoreError> {
        self.conf_state = cs.clone();
        Ok(())
    }

    fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<(), StoreError> {
        check_apply_snapshot(snap, self.snapshot_index_term().0)?;
        let meta = snap.get_metadata();
        self.entries.clear();
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.hard_state.commit = meta.index;
        self.conf_state = meta.get_conf_state().clone();
        self.snapshot = Some(snap.clone());
        Ok(())
    }

    fn save_snapshot(&mut self, data: Vec<u8>, index: u64, conf: &ConfState) -> Result<(), StoreError> {
        let (snap_index, _) = self.snapshot_index_term();
        check_save_snapshot(index, snap_index, self.last(), self.hard_state.commit)?;
        let snap = new_snapshot(data, index, self.term_in_range(index), conf);
        self.entries.drain(..(index - snap_index) as usize);
        self.snapshot = Some(snap);
        Ok(())
    }

    fn latest_snapshot(&self) -> Option<Snapshot> {
        self.snapshot.clone()
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

// ---- Rules shared with the sled store ----

/// Wrap a store failure for raft-rs (which treats it as fatal).
pub(super) fn raft_err(e: StoreError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

/// `(index, term)` of the snapshot the log starts after; `(0, 0)` without one.
pub(super) fn snapshot_index_term(snap: Option<&Snapshot>) -> (u64, u64) {
    snap.map_or((0, 0), |s| (s.get_metadata().index, s.get_metadata().term))
}

/// A snapshot built by `save_snapshot`.
pub(crate) fn new_snapshot(data: Vec<u8>, index: u64, term: u64, conf: &ConfState) -> Snapshot {
    let mut snap = Snapshot { data: data.into(), ..Default::default() };
    let meta = snap.mut_metadata();
    meta.index = index;
    meta.term = term;
    meta.set_conf_state(conf.clone());
    snap
}

/// `entries(low, high)`: below the first index is `Compacted`; past `last + 1` (or `low >
/// high`) is `Unavailable` (raft-rs's `MemStorage` panics there; raft-rs never asks).
pub(super) fn check_entries_range(low: u64, high: u64, first: u64, last: u64) -> raft::Result<()> {
    if low < first {
        return Err(raft::Error::Store(StorageError::Compacted));
    }
    if high > last + 1 || low > high {
        return Err(raft::Error::Store(StorageError::Unavailable));
    }
    Ok(())
}

/// `term(idx)`: defined on `[snapshot_index, last]`; below is `Compacted`, above `Unavailable`.
pub(super) fn check_term_range(idx: u64, snap_index: u64, last: u64) -> raft::Result<()> {
    if idx < snap_index {
        return Err(raft::Error::Store(StorageError::Compacted));
    }
    if idx > last {
        return Err(raft::Error::Store(StorageError::Unavailable));
    }
    Ok(())
}

/// `snapshot(request_index)`: the latest snapshot, or `SnapshotTemporarilyUnavailable` when
/// there is none or it is older than `request_index` (the driver will save a newer one; raft-rs
/// asks again later).
pub(super) fn snapshot_for_request(snap: Option<&Snapshot>, request_index: u64) -> raft::Result<Snapshot> {
    match snap {
        Some(s) if s.get_metadata().index >= request_index => Ok(s.clone()),
        _ => Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable)),
    }
}

/// What `append` accepts: a non-empty batch of consecutive indexes starting in `[first, last +
/// 1]`, with terms that never decrease (from the entry before the batch on). `term_at` gives
/// the stored term of an index in `[first - 1, last]`.
pub(super) fn check_append(
    first: u64,
    last: u64,
    term_at: impl FnOnce(u64) -> u64,
    entries: &[Entry],
) -> Result<(), StoreError> {
    let Some(head) = entries.first() else { return Ok(()) };
    if head.index < first {
        return Err(StoreError::Invalid(format!(
            "append at {} overwrites the compacted log (first index {first})",
            head.index
        )));
    }
    if head.index > last + 1 {
        return Err(StoreError::Invalid(format!("append at {} leaves a gap after last index {last}", head.index)));
    }
    let prev_term = term_at(head.index - 1);
    if head.term < prev_term {
        return Err(StoreError::Invalid(format!(
            "entry {} has term {} below the previous entry's {prev_term}",
            head.index, head.term
        )));
    }
    for pair in entries.windows(2) {
        if pair[1].index != pair[0].index + 1 {
            return Err(StoreError::Invalid(format!(
                "entries not consecutive: {} then {}",
                pair[0].index, pair[1].index
            )));
        }
        if pair[1].term < pair[0].term {
            return Err(StoreError::Invalid(format!(
                "entry {} has term {} below the previous entry's {}",
                pair[1].index, pair[1].term, pair[0].term
            )));
        }
    }
    Ok(())
}

/// What `apply_snapshot` accepts: a snapshot past the current one.
pub(super) fn check_apply_snapshot(snap: &Snapshot, snap_index: u64) -> Result<(), StoreError> {
    let index = snap.get_metadata().index;
    if index == 0 {
        return Err(StoreError::Invalid("snapshot at index 0".into()));
    }
    if index <= snap_index {
        return Err(StoreError::Invalid(format!(
            "snapshot at {index} is not newer than the stored one at {snap_index}"
        )));
    }
    Ok(())
}

/// What `save_snapshot` accepts: an index in the log (or the current snapshot's, to replace
/// its data), not past the stored commit index.
pub(super) fn check_save_snapshot(index: u64, snap_index: u64, last: u64, commit: u64) -> Result<(), StoreError> {
    if index == 0 {
        return Err(StoreError::Invalid("snapshot at index 0".into()));
    }
    if index < snap_index {
        return Err(StoreError::Invalid(format!("snapshot at {index} is older than the stored one at {snap_index}")));
    }
    if index > last {
        return Err(StoreError::Invalid(format!("snapshot at {index} is past the last index {last}")));
    }
    if index > commit {
        return Err(StoreError::Invalid(format!(
            "snapshot at {index} is past the stored commit index {commit} (store the hard state first)"
        )));
    }
    Ok(())
}

/// The size limit of `entries`, applied while reading: the same rule as
/// `raft::util::limit_size` (the first entry always, then entries while the running total of
/// their encoded sizes stays within `max`).
pub(super) struct SizeBudget {
    max: u64,
    used: u64,
    taken: usize,
}

impl SizeBudget {
    pub(super) fn new(max: Option<u64>) -> SizeBudget {
        SizeBudget { max: max.unwrap_or(raft::util::NO_LIMIT), used: 0, taken: 0 }
    }

    /// The bytes still allowed (None: no limit). A reader that cuts early by this bound cuts
    /// where `admit` would.
    pub(super) fn remaining(&self) -> Option<u64> {
        (self.max != raft::util::NO_LIMIT).then(|| self.max.saturating_sub(self.used))
    }

    /// Whether `e` goes into the answer; once false, stop.
    pub(super) fn admit(&mut self, e: &Entry) -> bool {
        if self.max == raft::util::NO_LIMIT {
            return true;
        }
        self.used = self.used.saturating_add(u64::from(e.compute_size()));
        if self.taken > 0 && self.used > self.max {
            return false;
        }
        self.taken += 1;
        true
    }
}

/// The terms of the entries in the log, as runs: `(first index of the run, term)`, by index.
/// The last run extends to the last index. Callers keep the indexes they ask about in the log.
/// The durable stores keep it in memory so that `term()` never reads the disk.
#[derive(Debug, Default)]
pub(super) struct TermRuns {
    runs: Vec<(u64, u64)>,
}

impl TermRuns {
    /// The term of `idx` (an index in the log).
    pub(super) fn term_of(&self, idx: u64) -> u64 {
        let i = self.runs.partition_point(|&(start, _)| start <= idx);
        i.checked_sub(1).map_or(0, |i| self.runs[i].1)
    }

    /// Record entry `idx` (the next index) with `term`.
    pub(super) fn push(&mut self, idx: u64, term: u64) {
        match self.runs.last() {
            Some(&(_, t)) if t == term => {}
            _ => self.runs.push((idx, term)),
        }
    }

    /// Forget the entries from `idx` on.
    pub(super) fn truncate_from(&mut self, idx: u64) {
        let keep = self.runs.partition_point(|&(start, _)| start < idx);
        self.runs.truncate(keep);
    }

    /// Forget the entries up to `idx` included.
    pub(super) fn compact_to(&mut self, idx: u64) {
        let i = self.runs.partition_point(|&(start, _)| start <= idx);
        if i == 0 {
            return;
        }
        self.runs.drain(..i - 1);
        self.runs[0].0 = idx + 1;
    }
}

#[cfg(test)]
pub(crate) mod conformance {
    //! The behaviour every [`LogStore`] must have, run against each store by its own tests.

    use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
    use raft::{GetEntriesContext, StorageError};

    use crate::storage::{LogStore, StoreError};

    /// A fresh, empty store whose conf state has the given voters.
    pub(crate) trait Factory<S> {
        fn make(&mut self, voters: &[u64]) -> S;
    }

    impl<S, F: FnMut(&[u64]) -> S> Factory<S> for F {
        fn make(&mut self, voters: &[u64]) -> S {
            self(voters)
        }
    }

    pub(crate) fn entry(index: u64, term: u64) -> Entry {
        // Sizes vary so that max_size limits cut at different places.
        let data = format!("entry {index} term {term} {}", "x".repeat((index % 7) as usize * 10));
        Entry { index, term, data: data.into_bytes().into(), ..Default::default() }
    }

    pub(crate) fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        range.map(|i| entry(i, term)).collect()
    }

    fn ctx() -> GetEntriesContext {
        GetEntriesContext::empty(false)
    }

    fn is_store_err(r: raft::Result<impl std::fmt::Debug>, want: StorageError) -> bool {
        matches!(r, Err(raft::Error::Store(e)) if e == want)
    }

    fn all<S: LogStore>(s: &S) -> Vec<Entry> {
        s.entries(s.first_index().unwrap(), s.last_index().unwrap() + 1, None, ctx()).unwrap()
    }

    fn hs(term: u64, vote: u64, commit: u64) -> HardState {
        HardState { term, vote, commit, ..Default::default() }
    }

    fn conf(voters: &[u64], learners: &[u64]) -> ConfState {
        ConfState { voters: voters.to_vec(), learners: learners.to_vec(), ..Default::default() }
    }

    /// Every case, each on a fresh store.
    pub(crate) fn run_all<S: LogStore>(mut f: impl Factory<S>) {
        fresh(f.make(&[1, 2, 3]));
        fresh_without_voters(f.make(&[]));
        append_rules(f.make(&[1]));
        reads(f.make(&[1]));
        hard_and_conf_state(f.make(&[1]));
        save_snapshot(f.make(&[1, 2, 3]));
        apply_snapshot(f.make(&[1]));
        apply_snapshot_over_longer_log(f.make(&[1]));
    }

    fn fresh<S: LogStore>(s: S) {
        let st = s.initial_state().unwrap();
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(st.hard_state, HardState::default());
        assert_eq!(s.first_index().unwrap(), 1);
        assert_eq!(s.last_index().unwrap(), 0);
        assert_eq!(s.term(0).unwrap(), 0);
        assert!(is_store_err(s.term(1), StorageError::Unavailable));
        assert!(s.entries(1, 1, None, ctx()).unwrap().is_empty());
        assert!(is_store_err(s.entries(1, 2, None, ctx()), StorageError::Unavailable));
        assert!(is_store_err(s.snapshot(0, 2), StorageError::SnapshotTemporarilyUnavailable));
        assert!(s.latest_snapshot().is_none());
    }

    fn fresh_without_voters<S: LogStore>(s: S) {
        let st = s.initial_state().unwrap();
        assert!(!st.initialized());
        assert_eq!(s.last_index().unwrap(), 0);
    }

    fn append_rules<S: LogStore>(mut s: S) {
        s.append(&[]).unwrap();
        assert_eq!(s.last_index().unwrap(), 0);
        s.append(&entries(1..=5, 1)).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 5));
        assert_eq!(all(&s), entries(1..=5, 1));

        // A gap after the last index, a batch with a hole, terms going down: refused, no change.
        assert!(matches!(s.append(&[entry(7, 1)]), Err(StoreError::Invalid(_))));
        assert!(matches!(s.append(&[entry(6, 1), entry(8, 1)]), Err(StoreError::Invalid(_))));
        assert!(matches!(s.append(&[entry(6, 2), entry(7, 1)]), Err(StoreError::Invalid(_))));
        assert!(matches!(s.append(&[entry(0, 1)]), Err(StoreError::Invalid(_))));
        assert_eq!(all(&s), entries(1..=5, 1));

        // A new leader overwrites the suffix from 3: 4 and 5 are gone, not just replaced.
        s.append(&[entry(3, 2)]).unwrap();
        assert_eq!(s.last_index().unwrap(), 3);
        assert_eq!(s.term(3).unwrap(), 2);
        assert!(is_store_err(s.term(4), StorageError::Unavailable));
        let mut want = entries(1..=2, 1);
        want.push(entry(3, 2));
        assert_eq!(all(&s), want);

        // A term below the entry before the batch is refused.
        assert!(matches!(s.append(&[entry(4, 1)]), Err(StoreError::Invalid(_))));

        // Overwrite in the middle with a longer batch, then extend at last + 1.
        s.append(&entries(2..=6, 3)).unwrap();
        s.append(&entries(7..=8, 3)).unwrap();
        let mut want = vec![entry(1, 1)];
        want.extend(entries(2..=8, 3));
        assert_eq!(all(&s), want);
        // Re-appending identical entries is harmless.
        s.append(&entries(7..=8, 3)).unwrap();
        assert_eq!(all(&s), want);
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 8));
    }

    fn reads<S: LogStore>(mut s: S) {
        let mut log = entries(1..=3, 1);
        log.extend(entries(4..=7, 2));
        log.extend(entries(8..=10, 4));
        s.append(&log).unwrap();

        assert_eq!(s.entries(3, 7, None, ctx()).unwrap(), log[2..6].to_vec());
        assert_eq!(s.entries(1, 11, None, ctx()).unwrap(), log);
        assert!(s.entries(4, 4, None, ctx()).unwrap().is_empty());
        assert!(is_store_err(s.entries(1, 12, None, ctx()), StorageError::Unavailable));
        assert!(is_store_err(s.entries(0, 3, None, ctx()), StorageError::Compacted));
        for (i, want) in [(0, 0), (1, 1), (3, 1), (4, 2), (7, 2), (8, 4), (10, 4)] {
            assert_eq!(s.term(i).unwrap(), want, "term({i})");
        }
        assert!(is_store_err(s.term(11), StorageError::Unavailable));

        // max_size: the same cut as raft::util::limit_size, at least one entry.
        let size = |e: &Entry| u64::from(protobuf::Message::compute_size(e));
        let one = size(&log[0]);
        let two = one + size(&log[1]);
        for max in [0, 1, one, one + 1, two - 1, two, two + 1, 300, 1000, u64::MAX] {
            let mut want = log.clone();
            raft::util::limit_size(&mut want, Some(max));
            assert_eq!(s.entries(1, 11, max, ctx()).unwrap(), want, "max_size {max}");
            let mut want = log[4..].to_vec();
            raft::util::limit_size(&mut want, Some(max));
            assert_eq!(s.entries(5, 11, Some(max), ctx()).unwrap(), want, "max_size {max} from 5");
        }
        assert_eq!(s.entries(1, 11, Some(0), ctx()).unwrap().len(), 1);

        // After compaction at 4: 4 keeps its term, below is compacted.
        s.set_hard_state(&hs(4, 1, 10)).unwrap();
        s.save_snapshot(b"snap".to_vec(), 4, &conf(&[1], &[])).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (5, 10));
        assert_eq!(s.term(4).unwrap(), 2);
        assert_eq!(s.term(5).unwrap(), 2);
        assert!(is_store_err(s.term(3), StorageError::Compacted));
        assert!(is_store_err(s.term(0), StorageError::Compacted));
        assert!(is_store_err(s.entries(4, 6, None, ctx()), StorageError::Compacted));
        assert!(is_store_err(s.entries(3, 6, None, ctx()), StorageError::Compacted));
        assert_eq!(s.entries(5, 11, None, ctx()).unwrap(), log[4..].to_vec());
    }

    fn hard_and_conf_state<S: LogStore>(mut s: S) {
        s.set_hard_state(&hs(3, 2, 0)).unwrap();
        s.set_conf_state(&conf(&[1, 2], &[4])).unwrap();
        let st = s.initial_state().unwrap();
        assert_eq!(st.hard_state, hs(3, 2, 0));
        assert_eq!(st.conf_state, conf(&[1, 2], &[4]));
        s.append(&entries(1..=2, 3)).unwrap();
        s.set_hard_state(&hs(4, 0, 2)).unwrap();
        assert_eq!(s.initial_state().unwrap().hard_state, hs(4, 0, 2));
    }

    fn save_snapshot<S: LogStore>(mut s: S) {
        let mut log = entries(1..=4, 1);
        log.extend(entries(5..=10, 2));
        s.append(&log).unwrap();
        let cs = conf(&[1, 2, 3], &[]);

        s.set_hard_state(&hs(2, 1, 5)).unwrap();
        // Past the commit index, past the last index, at 0: refused.
        assert!(matches!(s.save_snapshot(b"a".to_vec(), 6, &cs), Err(StoreError::Invalid(_))));
        s.set_hard_state(&hs(2, 1, 10)).unwrap();
        assert!(matches!(s.save_snapshot(b"a".to_vec(), 11, &cs), Err(StoreError::Invalid(_))));
        assert!(matches!(s.save_snapshot(b"a".to_vec(), 0, &cs), Err(StoreError::Invalid(_))));
        assert_eq!(s.first_index().unwrap(), 1);

        s.save_snapshot(b"state at 6".to_vec(), 6, &cs).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (7, 10));
        assert_eq!(s.term(6).unwrap(), 2);
        let snap = s.snapshot(0, 2).unwrap();
        assert_eq!(snap.get_data(), b"state at 6");
        assert_eq!(snap.get_metadata().index, 6);
        assert_eq!(snap.get_metadata().term, 2);
        assert_eq!(snap.get_metadata().get_conf_state(), &cs);
        assert_eq!(s.snapshot(6, 2).unwrap(), snap);
        assert!(is_store_err(s.snapshot(7, 2), StorageError::SnapshotTemporarilyUnavailable));
        assert_eq!(s.latest_snapshot(), Some(snap.clone()));
        assert_eq!(all(&s), log[6..].to_vec());
        // The hard and conf state are not the snapshot's business.
        assert_eq!(s.initial_state().unwrap().hard_state, hs(2, 1, 10));

        // Older than the stored one: refused. The same index again: replaces the data.
        assert!(matches!(s.save_snapshot(b"old".to_vec(), 5, &cs), Err(StoreError::Invalid(_))));
        s.save_snapshot(b"again at 6".to_vec(), 6, &cs).unwrap();
        assert_eq!(s.latest_snapshot().unwrap().get_data(), b"again at 6");
        assert_eq!(s.first_index().unwrap(), 7);

        // Up to the last index: the log is empty, its last term survives, appends go on.
        s.save_snapshot(b"state at 10".to_vec(), 10, &cs).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (11, 10));
        assert_eq!(s.term(10).unwrap(), 2);
        assert!(s.entries(11, 11, None, ctx()).unwrap().is_empty());
        assert!(matches!(s.append(&[entry(11, 1)]), Err(StoreError::Invalid(_))));
        assert!(matches!(s.append(&[entry(10, 2)]), Err(StoreError::Invalid(_))));
        s.append(&entries(11..=12, 3)).unwrap();
        assert_eq!(all(&s), entries(11..=12, 3));
    }

    pub(crate) fn snapshot(index: u64, term: u64, voters: &[u64], data: &[u8]) -> Snapshot {
        let mut snap = Snapshot { data: data.to_vec().into(), ..Default::default() };
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(conf(voters, &[]));
        snap
    }

    fn apply_snapshot<S: LogStore>(mut s: S) {
        s.append(&entries(1..=5, 1)).unwrap();
        s.set_hard_state(&hs(1, 1, 3)).unwrap();
        let snap = snapshot(8, 3, &[1, 2, 3, 4], b"leader state");
        s.apply_snapshot(&snap).unwrap();

        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (9, 8));
        assert_eq!(s.term(8).unwrap(), 3);
        assert!(is_store_err(s.term(5), StorageError::Compacted));
        assert!(is_store_err(s.entries(5, 6, None, ctx()), StorageError::Compacted));
        assert!(s.entries(9, 9, None, ctx()).unwrap().is_empty());
        let st = s.initial_state().unwrap();
        assert_eq!(st.hard_state, hs(3, 1, 8));
        assert_eq!(st.conf_state, conf(&[1, 2, 3, 4], &[]));
        assert_eq!(s.latest_snapshot(), Some(snap.clone()));
        assert_eq!(s.snapshot(8, 1).unwrap(), snap);

        // Not newer than the stored one: refused.
        assert!(matches!(s.apply_snapshot(&snap), Err(StoreError::Invalid(_))));
        assert!(matches!(s.apply_snapshot(&snapshot(7, 3, &[1], b"")), Err(StoreError::Invalid(_))));
        assert!(matches!(s.append(&[entry(8, 3)]), Err(StoreError::Invalid(_))));
        s.append(&entries(9..=10, 3)).unwrap();
        assert_eq!(all(&s), entries(9..=10, 3));
    }

    fn apply_snapshot_over_longer_log<S: LogStore>(mut s: S) {
        s.append(&entries(1..=10, 1)).unwrap();
        s.set_hard_state(&hs(2, 0, 10)).unwrap();
        s.apply_snapshot(&snapshot(6, 2, &[1], b"s")).unwrap();
        // The whole log goes, entries after the snapshot's index too.
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (7, 6));
        assert_eq!(s.term(6).unwrap(), 2);
        assert_eq!(s.initial_state().unwrap().hard_state, hs(2, 0, 6));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance() {
        conformance::run_all(MemStore::new);
    }

    #[test]
    fn term_runs() {
        let mut t = TermRuns::default();
        for (i, term) in [(1, 1), (2, 1), (3, 2), (4, 2), (5, 2), (6, 5)] {
            t.push(i, term);
        }
        assert_eq!(t.runs, vec![(1, 1), (3, 2), (6, 5)]);
        assert_eq!([1, 2, 3, 5, 6].map(|i| t.term_of(i)), [1, 1, 2, 2, 5]);
        t.compact_to(3);
        assert_eq!(t.runs, vec![(4, 2), (6, 5)]);
        t.compact_to(4);
        assert_eq!(t.runs, vec![(5, 2), (6, 5)]);
        t.truncate_from(6);
        assert_eq!(t.runs, vec![(5, 2)]);
        t.truncate_from(5);
        assert!(t.runs.is_empty());
    }

    #[test]
    fn default_is_empty_and_uninitialized() {
        let s = MemStore::default();
        assert!(!s.initial_state().unwrap().initialized());
        assert_eq!(s.first_index().unwrap(), 1);
        assert_eq!(s.last_index().unwrap(), 0);
    }
}
