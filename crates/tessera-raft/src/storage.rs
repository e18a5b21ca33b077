//! Durable storage of the Raft log, hard state, conf state and snapshots.
//!
//! [`LogStore`] extends raft-rs's read-only `Storage` with the writes the driver performs.
//! Writes may be buffered; [`LogStore::flush`] is the durability point. The driver calls it
//! once per `Ready`, before it sends messages that acknowledge the entries or applies them.
//!
//! Three stores: [`sled_store::SledStore`] for servers, [`engine_store::EngineStore`] over TiKV's
//! raft-engine (measured against sled in docs/performance.md, "Log store: sled against
//! raft-engine"; a server could switch by opening it instead), and [`mem::MemStore`] for tests.
//! All follow the rules below (one conformance suite runs against each, and the durable ones
//! also pass `durable_suite`: reopen, background snapshot, kill -9). Their `raft::Storage` reads
//! follow raft-rs's `MemStorage`: the log holds `first_index()..=last_index()`, and
//! `first_index() - 1` is the latest snapshot's index (0 without one), whose term `term()`
//! still answers; below it `term`/`entries` fail with `StorageError::Compacted`, past
//! `last_index()` with `StorageError::Unavailable` (where `MemStorage` panics on an `entries`
//! range past the end, these stores return `Unavailable`); `entries` honours `max_size` like
//! `raft::util::limit_size` (at least one entry); `snapshot()` returns the latest snapshot, or
//! `SnapshotTemporarilyUnavailable` when there is none or it is older than the requested index.
//! An engine failure in a read reaches raft-rs as `StorageError::Other(StoreError)`.

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};

/// A storage failure. The server stops rather than continue on a store it cannot trust.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The underlying engine failed (IO, corruption).
    #[error("storage engine: {0}")]
    Engine(String),
    /// Stored bytes did not decode.
    #[error("corrupt record {what}: {detail}")]
    Corrupt {
        /// Which record.
        what: String,
        /// What was wrong.
        detail: String,
    },
    /// A write did not fit the log (a gap, or below the snapshot).
    #[error("invalid write: {0}")]
    Invalid(String),
}

/// Writes a snapshot durably from another thread; see [`LogStore::snapshot_writer`].
pub type SnapshotWriter = Box<dyn FnOnce(&Snapshot) -> Result<bool, StoreError> + Send>;

/// The writes the Raft driver makes, on top of raft-rs's reads.
pub trait LogStore: raft::Storage + Send + 'static {
    /// Append entries. Entries already stored at or after the first new index are replaced,
    /// and the stored ones past the last new index removed (a new leader overwrote an
    /// uncommitted suffix). The entries must have consecutive indexes starting in
    /// `first_index()..=last_index() + 1`, and terms that never decrease (from the stored entry
    /// before them on); anything else is [`StoreError::Invalid`] and changes nothing. An empty
    /// slice does nothing. Atomic: after a crash the store holds all of it or none.
    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError>;
    /// Store the hard state (term, vote, commit).
    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StoreError>;
    /// Store the conf state (voters, learners) after a membership change is applied.
    fn set_conf_state(&mut self, cs: &ConfState) -> Result<(), StoreError>;
    /// Install a snapshot received from the leader: the whole log is dropped (later entries
    /// too: raft-rs hands over a snapshot only when the log does not hold its index and term,
    /// and expects an empty log after it), the snapshot (data included) becomes the latest,
    /// its conf state becomes current, and the hard state gets `commit = index` and `term =
    /// max(term, snapshot term)`. A snapshot not newer than the stored one is
    /// [`StoreError::Invalid`]. Atomic.
    fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<(), StoreError>;
    /// Keep a snapshot of the local state machine taken at `index` (which must be applied and
    /// in the log), then drop the entries up to it (log compaction). The snapshot's term is
    /// the log's term at `index`. [`StoreError::Invalid`] when `index` is 0, past
    /// `last_index()`, past the stored hard state's commit (store the commit index first), or
    /// below the latest snapshot's index (the same index replaces the data). Atomic.
    fn save_snapshot(&mut self, data: Vec<u8>, index: u64, conf: &ConfState) -> Result<(), StoreError>;
    /// The latest snapshot stored (installed or saved), if any. Stores keep it in memory,
    /// since this cannot fail.
    fn latest_snapshot(&self) -> Option<Snapshot>;
    /// Something that writes a snapshot of the local state machine on another thread and makes
    /// it durable (the snapshot of a large state takes long to write, and the Raft thread must
    /// keep ticking meanwhile), or None where snapshots are saved only by `save_snapshot`.
    /// The writer keeps a stored snapshot that is as new or newer (it returns false then).
    /// The log is not compacted until the Raft thread hands the snapshot to `adopt_snapshot`.
    fn snapshot_writer(&self) -> Option<SnapshotWriter> {
        None
    }
    /// Take a snapshot that a [`SnapshotWriter`] made durable as the latest, and drop the
    /// entries up to it. False, changing nothing, if the store holds one as new or newer (one
    /// was installed from the leader meanwhile).
    fn adopt_snapshot(&mut self, _snap: Snapshot) -> Result<bool, StoreError> {
        Err(StoreError::Invalid("this store writes no snapshot in the background".into()))
    }
    /// Make every write so far durable (fsync). The only durability point: a crash loses
    /// what was written after the last flush (each write whole or not at all), never before.
    fn flush(&mut self) -> Result<(), StoreError>;
}

/// Log index and term of the snapshot every member of a new cluster starts from. It carries
/// the founding voters, and no entry exists at or below it, so a server that joins later must
/// catch up through a snapshot and so learns the membership (raft-rs keeps membership only in
/// snapshots and conf-change entries; TiKV bootstraps the same way).
pub const INITIAL_INDEX: u64 = 1;

/// The snapshot a new cluster's stores start from: index and term [`INITIAL_INDEX`], the
/// founding voters, and empty data (the state machine's initial state).
pub fn initial_snapshot(voters: &[u64]) -> Snapshot {
    let mut snap = Snapshot::default();
    let meta = snap.mut_metadata();
    meta.index = INITIAL_INDEX;
    meta.term = INITIAL_INDEX;
    meta.mut_conf_state().voters = voters.to_vec();
    snap
}

/// Prepare the store of a founding member of a new cluster: an empty store gets the initial
/// snapshot (made durable); a store that holds anything (a restart) is left alone.
pub fn bootstrap_cluster<S: LogStore>(store: &mut S, voters: &[u64]) -> Result<(), StoreError> {
    bootstrap_cluster_from(store, voters, Vec::new())
}

/// Like [`bootstrap_cluster`], but the new cluster starts from `data`, a state machine snapshot
/// (a restore from backup). Every founding member must be given the same data: they all start
/// from the same initial snapshot index.
pub fn bootstrap_cluster_from<S: LogStore>(store: &mut S, voters: &[u64], data: Vec<u8>) -> Result<(), StoreError> {
    let empty = store.last_index().unwrap_or(0) == 0 && store.latest_snapshot().is_none();
    if empty && !voters.is_empty() {
        let mut snap = initial_snapshot(voters);
        snap.data = data.into();
        store.apply_snapshot(&snap)?;
        store.flush()?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod durable_suite;
pub mod engine_store;
pub mod mem;
pub mod server_store;
pub mod sled_store;
