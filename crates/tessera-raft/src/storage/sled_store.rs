//! The durable [`LogStore`] of a scheduler server, over sled 0.34.
//!
//! Layout, in one sled database per server:
//! - tree `raft_entries`: key = the entry's index as 8 big-endian bytes (so key order is index
//!   order), value = the `Entry` in raft-rs's protobuf encoding. It holds exactly the indexes
//!   `snapshot_index + 1 ..= last_index`, with no gap.
//! - tree `raft_meta`: `hard_state`, `conf_state` (protobuf), `snapshot_meta` (a
//!   `SnapshotMetadata`: index, term, conf state) with `snapshot_data` (the state machine's
//!   bytes), and `format` (a version byte).
//!
//! Each write is atomic when sled recovers after a crash: `append` is one sled batch (the new
//! entries and the removal of the overwritten suffix together), `save_snapshot` and
//! `apply_snapshot` one transaction over both trees. sled recovers a prefix of the writes, so
//! after a crash the store holds everything up to the last `flush` and possibly some later
//! writes, each whole.
//!
//! Durability: [`LogStore::flush`] is the only fsync this store asks for; sled's periodic
//! background flush is turned off. (sled also flushes when the database is dropped.) On Linux,
//! sled 0.34's flush ends in `sync_file_range`, not in an fsync: what it wrote survives a
//! kill -9 (the page cache does), but neither the file's metadata (its growing length) nor
//! the disk's write cache is flushed, so a power cut can lose entries acknowledged since the
//! last fsync (sled fsyncs when it truncates a segment or closes). docs/performance.md, "Log
//! store: sled against raft-engine", measures the cost of adding the fdatasync.
//!
//! Reads: the first and last index, the term of every entry (as runs of equal terms), the hard
//! state, the conf state and the latest snapshot are kept in memory; `entries` reads the tree.
//! Opening the store reads and checks the whole log once: anything that does not decode, or a
//! gap, is a [`StoreError::Corrupt`] naming the record, never a panic.

use std::fmt;
use std::path::Path;

use protobuf::Message;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use super::mem::{
    SizeBudget, TermRuns, check_append, check_apply_snapshot, check_entries_range, check_save_snapshot,
    check_term_range, new_snapshot, raft_err, snapshot_for_request, snapshot_index_term,
};
use super::{LogStore, SnapshotWriter, StoreError};

const ENTRIES_TREE: &str = "raft_entries";
const META_TREE: &str = "raft_meta";
const KEY_FORMAT: &str = "format";
const KEY_HARD_STATE: &str = "hard_state";
const KEY_CONF_STATE: &str = "conf_state";
const KEY_SNAPSHOT_META: &str = "snapshot_meta";
const KEY_SNAPSHOT_DATA: &str = "snapshot_data";
/// The layout described in the module docs.
const FORMAT: u8 = 1;

/// The Raft log, hard state, conf state and latest snapshot of one server, in a sled database.
pub struct SledStore {
    db: sled::Db,
    entries: sled::Tree,
    meta: sled::Tree,
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Option<Snapshot>,
    last_index: u64,
    terms: TermRuns,
}

impl fmt::Debug for SledStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (snapshot_index, snapshot_term) = snapshot_index_term(self.snapshot.as_ref());
        f.debug_struct("SledStore")
            .field("snapshot_index", &snapshot_index)
            .field("snapshot_term", &snapshot_term)
            .field("last_index", &self.last_index)
            .field("hard_state", &self.hard_state)
            .field("conf_state", &self.conf_state)
            .finish_non_exhaustive()
    }
}

fn engine(e: impl fmt::Display) -> StoreError {
    StoreError::Engine(e.to_string())
}

fn tx_err(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => engine(e),
    }
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn encode(what: &str, m: &impl Message) -> Result<Vec<u8>, StoreError> {
    m.write_to_bytes().map_err(|e| StoreError::Invalid(format!("cannot encode {what}: {e}")))
}

fn decode<M: Message>(what: impl fmt::Display, bytes: &[u8]) -> Result<M, StoreError> {
    M::parse_from_bytes(bytes).map_err(|e| StoreError::Corrupt { what: what.to_string(), detail: e.to_string() })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compacted entries are removed in the background this many at a time (one sled batch each),
/// with this pause between batches (see `adopt_snapshot`).
const REMOVE_CHUNK: u64 = 1_000;
const REMOVE_PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

/// sled's page cache (its default is 1 GiB). The log is read back mostly at its tail, to
/// replicate what was just appended: a small cache serves that.
const CACHE_BYTES: u64 = 128 << 20;

impl SledStore {
    /// Open the store in `dir`, creating an empty one (no configuration, empty log) if there is
    /// none. A server that joins an existing cluster starts like this and learns the
    /// configuration from the leader. Fails with [`StoreError::Corrupt`] if what is there does
    /// not decode or the log has a gap, and with [`StoreError::Engine`] if sled cannot open it
    /// (e.g. another process holds it).
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        // sled releases its file lock from a background thread after the last handle drops, so
        // a store reopened at once (a restart in the same process) may still find it held.
        let mut attempts = 0;
        let db = loop {
            match sled::Config::new().path(dir).flush_every_ms(None).cache_capacity(CACHE_BYTES).open() {
                Ok(db) => break db,
                Err(e) if attempts < 50 && e.to_string().contains("could not acquire lock") => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(engine(e)),
            }
        };
        let entries = db.open_tree(ENTRIES_TREE).map_err(engine)?;
        let meta = db.open_tree(META_TREE).map_err(engine)?;

        match meta.get(KEY_FORMAT).map_err(engine)? {
            None => {
                meta.insert(KEY_FORMAT, &[FORMAT][..]).map_err(engine)?;
            }
            Some(v) if *v == [FORMAT] => {}
            Some(v) => {
                return Err(StoreError::Corrupt {
                    what: format!("{META_TREE}/{KEY_FORMAT}"),
                    detail: format!("unknown store format {}", hex(&v)),
                });
            }
        }
        let load = |k: &str| meta.get(k).map_err(engine);
        let hard_state: HardState = match load(KEY_HARD_STATE)? {
            Some(v) => decode(format!("{META_TREE}/{KEY_HARD_STATE}"), &v)?,
            None => HardState::default(),
        };
        let conf_state: ConfState = match load(KEY_CONF_STATE)? {
            Some(v) => decode(format!("{META_TREE}/{KEY_CONF_STATE}"), &v)?,
            None => ConfState::default(),
        };
        let snapshot = match (load(KEY_SNAPSHOT_META)?, load(KEY_SNAPSHOT_DATA)?) {
            (None, None) => None,
            (Some(m), Some(data)) => {
                let meta: SnapshotMetadata = decode(format!("{META_TREE}/{KEY_SNAPSHOT_META}"), &m)?;
                let mut snap = Snapshot::default();
                snap.set_metadata(meta);
                snap.data = data.to_vec().into();
                Some(snap)
            }
            (m, _) => {
                return Err(StoreError::Corrupt {
                    what: format!("{META_TREE}/{KEY_SNAPSHOT_META}"),
                    detail: format!(
                        "snapshot metadata {} without data {}",
                        if m.is_some() { "present" } else { "missing" },
                        if m.is_some() { "missing" } else { "present" },
                    ),
                });
            }
        };

        let mut store = SledStore {
            db,
            entries,
            meta,
            hard_state,
            conf_state,
            snapshot,
            last_index: 0,
            terms: TermRuns::default(),
        };
        store.load_log()?;
        tracing::debug!(
            dir = %dir.display(),
            first_index = store.first(),
            last_index = store.last_index,
            term = store.hard_state.term,
            commit = store.hard_state.commit,
            "raft log store opened"
        );
        Ok(store)
    }

    /// Open the store in `dir` and, if it is empty, give it `voters` as its conf state (made
    /// durable before this returns); a store that already holds anything keeps its state. For
    /// tests of the store: a founding member of a real cluster uses
    /// [`crate::storage::bootstrap_cluster`], whose initial snapshot later members need.
    /// With no voters this is [`SledStore::open`].
    pub fn open_with_voters(dir: &Path, voters: &[u64]) -> Result<SledStore, StoreError> {
        let mut store = SledStore::open(dir)?;
        if store.is_empty() && !voters.is_empty() {
            store.set_conf_state(&ConfState { voters: voters.to_vec(), ..Default::default() })?;
            store.flush()?;
            tracing::info!(dir = %dir.display(), ?voters, "new raft log store bootstrapped");
        }
        Ok(store)
    }

    /// Whether the store holds nothing: no hard state, no conf state, no entry, no snapshot.
    pub fn is_empty(&self) -> bool {
        self.hard_state == HardState::default()
            && self.conf_state == ConfState::default()
            && self.snapshot.is_none()
            && self.last_index == 0
    }

    fn snapshot_index(&self) -> u64 {
        snapshot_index_term(self.snapshot.as_ref()).0
    }

    fn first(&self) -> u64 {
        self.snapshot_index() + 1
    }

    /// The term of `idx`, which must lie in `[first - 1, last]`.
    fn term_in_range(&self, idx: u64) -> u64 {
        let (snap_index, snap_term) = snapshot_index_term(self.snapshot.as_ref());
        if idx == snap_index { snap_term } else { self.terms.term_of(idx) }
    }

    /// Read and check the whole log: keys and indexes agree, no gap, terms never decrease.
    /// Entries at or below the snapshot's index (which an atomic compaction never leaves) are
    /// removed.
    fn load_log(&mut self) -> Result<(), StoreError> {
        let (snap_index, snap_term) = snapshot_index_term(self.snapshot.as_ref());
        let mut stale = Vec::new();
        let mut last = snap_index;
        let mut last_term = snap_term;
        let mut terms = TermRuns::default();
        for item in self.entries.iter() {
            let (k, v) = item.map_err(engine)?;
            let what = || format!("{ENTRIES_TREE}/{}", hex(&k));
            let Ok(bytes) = <[u8; 8]>::try_from(k.as_ref()) else {
                return Err(StoreError::Corrupt { what: what(), detail: "key is not 8 bytes".into() });
            };
            let index = u64::from_be_bytes(bytes);
            if index <= snap_index {
                stale.push(k);
                continue;
            }
            let e: Entry = decode(what(), &v)?;
            if e.index != index {
                return Err(StoreError::Corrupt {
                    what: what(),
                    detail: format!("entry under key {index} has index {}", e.index),
                });
            }
            if index != last + 1 {
                return Err(StoreError::Corrupt {
                    what: what(),
                    detail: format!("gap in the log: entry {index} follows {last}"),
                });
            }
            if e.term < last_term {
                return Err(StoreError::Corrupt {
                    what: what(),
                    detail: format!("entry {index} has term {} below the previous {last_term}", e.term),
                });
            }
            terms.push(index, e.term);
            last = index;
            last_term = e.term;
        }
        if !stale.is_empty() {
            tracing::warn!(count = stale.len(), snap_index, "removing log entries left below the snapshot");
            let mut batch = sled::Batch::default();
            for k in stale {
                batch.remove(k);
            }
            self.entries.apply_batch(batch).map_err(engine)?;
        }
        self.last_index = last;
        self.terms = terms;
        Ok(())
    }

    fn read_entries(&self, low: u64, high: u64, max_size: Option<u64>) -> Result<Vec<Entry>, StoreError> {
        let mut budget = SizeBudget::new(max_size);
        let mut out = Vec::with_capacity((high - low).min(1024) as usize);
        let mut expect = low;
        for item in self.entries.range(key(low)..key(high)) {
            let (k, v) = item.map_err(engine)?;
            let what = || format!("{ENTRIES_TREE}/{}", hex(&k));
            let e: Entry = decode(what(), &v)?;
            if e.index != expect {
                return Err(StoreError::Corrupt {
                    what: what(),
                    detail: format!("expected entry {expect}, found {}", e.index),
                });
            }
            if !budget.admit(&e) {
                return Ok(out);
            }
            out.push(e);
            expect += 1;
        }
        if expect != high {
            return Err(StoreError::Corrupt {
                what: format!("{ENTRIES_TREE}/{}", hex(&key(expect))),
                detail: format!("entry {expect} missing from the log"),
            });
        }
        Ok(out)
    }
}

impl Storage for SledStore {
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
        check_entries_range(low, high, self.first(), self.last_index)?;
        self.read_entries(low, high, max_size.into()).map_err(raft_err)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        check_term_range(idx, self.snapshot_index(), self.last_index)?;
        Ok(self.term_in_range(idx))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        snapshot_for_request(self.snapshot.as_ref(), request_index)
    }
}

impl LogStore for SledStore {
    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        let (Some(head), Some(tail)) = (entries.first(), entries.last()) else { return Ok(()) };
        check_append(self.first(), self.last_index, |i| self.term_in_range(i), entries)?;
        let mut batch = sled::Batch::default();
        for i in tail.index + 1..=self.last_index {
            batch.remove(&key(i)[..]);
        }
        for e in entries {
            batch.insert(&key(e.index)[..], encode("entry", e)?);
        }
        self.entries.apply_batch(batch).map_err(engine)?;
        self.terms.truncate_from(head.index);
        for e in entries {
            self.terms.push(e.index, e.term);
        }
        self.last_index = tail.index;
        Ok(())
    }

    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StoreError> {
        self.meta.insert(KEY_HARD_STATE, encode("hard state", hs)?).map_err(engine)?;
        self.hard_state = hs.clone();
        Ok(())
    }

    fn set_conf_state(&mut self, cs: &ConfState) -> Result<(), StoreError> {
        self.meta.insert(KEY_CONF_STATE, encode("conf state", cs)?).map_err(engine)?;
        self.conf_state = cs.clone();
        Ok(())
    }

    fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<(), StoreError> {
        check_apply_snapshot(snap, self.snapshot_index())?;
        let meta = snap.get_metadata();
        let mut hs = self.hard_state.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = meta.index;
        let cs = meta.get_conf_state().clone();
        let meta_bytes = sled::IVec::from(encode("snapshot metadata", meta)?);
        let data = sled::IVec::from(snap.get_data());
        let hs_bytes = sled::IVec::from(encode("hard state", &hs)?);
        let cs_bytes = sled::IVec::from(encode("conf state", &cs)?);
        let (first, last) = (self.first(), self.last_index);
        (&self.entries, &self.meta)
            .transaction(|(te, tm)| {
                for i in first..=last {
                    te.remove(&key(i)[..])?;
                }
                tm.insert(KEY_SNAPSHOT_META, meta_bytes.clone())?;
                tm.insert(KEY_SNAPSHOT_DATA, data.clone())?;
                tm.insert(KEY_HARD_STATE, hs_bytes.clone())?;
                tm.insert(KEY_CONF_STATE, cs_bytes.clone())?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(tx_err)?;
        self.terms = TermRuns::default();
        self.last_index = meta.index;
        self.hard_state = hs;
        self.conf_state = cs;
        self.snapshot = Some(snap.clone());
        Ok(())
    }

    fn save_snapshot(&mut self, data: Vec<u8>, index: u64, conf: &ConfState) -> Result<(), StoreError> {
        let snap_index = self.snapshot_index();
        check_save_snapshot(index, snap_index, self.last_index, self.hard_state.commit)?;
        let snap = new_snapshot(data, index, self.term_in_range(index), conf);
        let meta_bytes = sled::IVec::from(encode("snapshot metadata", snap.get_metadata())?);
        let data = sled::IVec::from(snap.get_data());
        (&self.entries, &self.meta)
            .transaction(|(te, tm)| {
                for i in snap_index + 1..=index {
                    te.remove(&key(i)[..])?;
                }
                tm.insert(KEY_SNAPSHOT_META, meta_bytes.clone())?;
                tm.insert(KEY_SNAPSHOT_DATA, data.clone())?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(tx_err)?;
        self.terms.compact_to(index);
        self.snapshot = Some(snap);
        Ok(())
    }

    fn latest_snapshot(&self) -> Option<Snapshot> {
        self.snapshot.clone()
    }

    fn snapshot_writer(&self) -> Option<SnapshotWriter> {
        let (db, meta) = (self.db.clone(), self.meta.clone());
        Some(Box::new(move |snap: &Snapshot| {
            let index = snap.get_metadata().index;
            let meta_bytes = sled::IVec::from(encode("snapshot metadata", snap.get_metadata())?);
            let data = sled::IVec::from(snap.get_data());
            let written = meta
                .transaction(|tm| {
                    let stored = match tm.get(KEY_SNAPSHOT_META)? {
                        Some(m) => {
                            decode::<SnapshotMetadata>("stored snapshot metadata", &m)
                                .map_err(ConflictableTransactionError::Abort)?
                                .index
                        }
                        None => 0,
                    };
                    if stored >= index {
                        return Ok(false);
                    }
                    tm.insert(KEY_SNAPSHOT_META, meta_bytes.clone())?;
                    tm.insert(KEY_SNAPSHOT_DATA, data.clone())?;
                    Ok::<_, ConflictableTransactionError<StoreError>>(true)
                })
                .map_err(tx_err)?;
            // Everything written before it (the hard state's commit included) is made durable
            // with it.
            db.flush().map_err(engine)?;
            Ok(written)
        }))
    }

    fn adopt_snapshot(&mut self, snap: Snapshot) -> Result<bool, StoreError> {
        let index = snap.get_metadata().index;
        if index <= self.snapshot_index() {
            return Ok(false);
        }
        if index > self.last_index {
            return Err(StoreError::Invalid(format!("snapshot at {index} is past the last index {}", self.last_index)));
        }
        let first = self.first();
        self.terms.compact_to(index);
        self.snapshot = Some(snap);
        // The entries it covers are never read again (the log now starts after it) and a
        // restart drops any that are left: remove them without holding up the Raft thread.
        // A sled batch holds sled's global write lock while it applies, which stops every
        // other write (the Raft thread's appends): one batch of the 100,000 entries between
        // two snapshots held it for hundreds of ms. Small batches, with a pause between them,
        // let the Raft thread in.
        let entries = self.entries.clone();
        let remove = move || {
            let mut from = first;
            while from <= index {
                let to = index.min(from + REMOVE_CHUNK - 1);
                let mut batch = sled::Batch::default();
                for i in from..=to {
                    batch.remove(&key(i)[..]);
                }
                if let Err(e) = entries.apply_batch(batch) {
                    tracing::warn!(error = %e, "removing compacted log entries failed; the next start removes them");
                    return;
                }
                from = to + 1;
                std::thread::sleep(REMOVE_PAUSE);
            }
        };
        if std::thread::Builder::new().name("compact".into()).spawn(remove).is_err() {
            tracing::warn!("could not start a thread to remove compacted log entries; the next start removes them");
        }
        Ok(true)
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let bytes = self.db.flush().map_err(engine)?;
        let took = started.elapsed();
        if took >= std::time::Duration::from_millis(100) {
            tracing::warn!(bytes, ms = took.as_millis() as u64, "slow fsync of the Raft log");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use raft::Storage;
    use raft::eraftpb::ConfState;

    use super::*;
    use crate::storage::durable_suite::{self, Durable, all, hs};
    use crate::storage::mem::conformance;

    impl Durable for SledStore {
        fn open(dir: &Path) -> Result<Self, StoreError> {
            SledStore::open(dir)
        }
        fn open_with_voters(dir: &Path, voters: &[u64]) -> Result<Self, StoreError> {
            SledStore::open_with_voters(dir, voters)
        }
        fn is_empty(&self) -> bool {
            SledStore::is_empty(self)
        }
    }

    #[test]
    fn conformance() {
        durable_suite::conformance::<SledStore>();
    }

    #[test]
    fn a_snapshot_written_in_the_background_is_adopted_and_survives_a_restart() {
        durable_suite::a_snapshot_written_in_the_background_is_adopted_and_survives_a_restart::<SledStore>();
    }

    #[test]
    fn reopen_keeps_what_was_flushed() {
        durable_suite::reopen_keeps_what_was_flushed::<SledStore>();
    }

    #[test]
    fn open_empty_and_bootstrap() {
        durable_suite::open_empty_and_bootstrap::<SledStore>();
    }

    /// Write raw bytes into the store's trees, as a damaged disk would.
    fn tamper(dir: &Path, tree: &str, k: &[u8], v: &[u8]) {
        // The store just dropped may still hold sled's file lock for a moment (see `open`).
        let mut tries = 0;
        let db = loop {
            match sled::Config::new().path(dir).open() {
                Ok(db) => break db,
                Err(e) if tries < 100 && e.to_string().contains("could not acquire lock") => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        };
        db.open_tree(tree).unwrap().insert(k, v).unwrap();
        db.flush().unwrap();
    }

    fn corrupt_what(r: Result<SledStore, StoreError>) -> String {
        match r {
            Err(StoreError::Corrupt { what, .. }) => what,
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn damaged_records_are_errors_naming_the_key() {
        let fresh = || {
            let d = tempfile::tempdir().unwrap();
            let mut s = SledStore::open_with_voters(d.path(), &[1]).unwrap();
            s.append(&conformance::entries(1..=5, 1)).unwrap();
            s.flush().unwrap();
            d
        };

        let d = fresh();
        tamper(d.path(), ENTRIES_TREE, &key(3), &[0xff, 0xff, 0xff]);
        assert_eq!(corrupt_what(SledStore::open(d.path())), format!("{ENTRIES_TREE}/0000000000000003"));

        let d = fresh();
        tamper(d.path(), ENTRIES_TREE, &key(3), &conformance::entry(4, 1).write_to_bytes().unwrap());
        assert_eq!(corrupt_what(SledStore::open(d.path())), format!("{ENTRIES_TREE}/0000000000000003"));

        let d = fresh();
        tamper(d.path(), ENTRIES_TREE, &key(7), &conformance::entry(7, 1).write_to_bytes().unwrap());
        assert_eq!(corrupt_what(SledStore::open(d.path())), format!("{ENTRIES_TREE}/0000000000000007"));

        let d = fresh();
        tamper(d.path(), ENTRIES_TREE, b"abc", b"");
        assert_eq!(corrupt_what(SledStore::open(d.path())), format!("{ENTRIES_TREE}/616263"));

        let d = fresh();
        tamper(d.path(), META_TREE, KEY_HARD_STATE.as_bytes(), &[0x0a]);
        assert_eq!(corrupt_what(SledStore::open(d.path())), format!("{META_TREE}/{KEY_HARD_STATE}"));

        let d = fresh();
        tamper(d.path(), META_TREE, KEY_SNAPSHOT_DATA.as_bytes(), b"x");
        assert_eq!(corrupt_what(SledStore::open(d.path())), format!("{META_TREE}/{KEY_SNAPSHOT_META}"));
    }

    #[test]
    fn entries_left_below_the_snapshot_are_removed() {
        let d = tempfile::tempdir().unwrap();
        {
            let mut s = SledStore::open_with_voters(d.path(), &[1]).unwrap();
            s.append(&conformance::entries(1..=5, 1)).unwrap();
            s.set_hard_state(&hs(1, 1, 5)).unwrap();
            s.save_snapshot(b"s".to_vec(), 3, &ConfState::default()).unwrap();
            s.flush().unwrap();
        }
        tamper(d.path(), ENTRIES_TREE, &key(2), &conformance::entry(2, 1).write_to_bytes().unwrap());
        let s = SledStore::open(d.path()).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (4, 5));
        assert_eq!(s.entries.get(key(2)).unwrap(), None);
        assert_eq!(all(&s), conformance::entries(4..=5, 1));
    }

    // ---- kill -9 ----

    /// Run by [`kill9_loop`] in a child process, which it kills.
    #[test]
    #[ignore = "child process of kill9_loop"]
    fn kill9_child() {
        durable_suite::kill9_child::<SledStore>();
    }

    #[test]
    fn kill9_loop() {
        // module_path!() starts with the crate's name, test names do not.
        durable_suite::kill9_loop::<SledStore>(&format!("{}::kill9_child", module_path!().split_once("::").unwrap().1));
    }
}
