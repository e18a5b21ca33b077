//! The store a server keeps its log in: raft-engine for a new data directory (see
//! docs/performance.md, "Log store: sled against raft-engine"), or sled where the directory
//! already holds a sled store (a server upgraded in place keeps its log) or the configuration
//! asks for it. One type for the Raft driver, which delegates every call.

use std::path::Path;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage};

use super::engine_store::EngineStore;
use super::sled_store::SledStore;
use super::{LogStore, SnapshotWriter, StoreError};

/// Which engine keeps the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreKind {
    /// TiKV's raft-engine ([`EngineStore`]): the default for new data directories.
    #[default]
    RaftEngine,
    /// sled ([`SledStore`]): what servers used before; kept for directories that hold it.
    Sled,
}

impl StoreKind {
    /// The name used in configuration files and flags.
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::RaftEngine => "raft-engine",
            StoreKind::Sled => "sled",
        }
    }

    /// Parse a configuration value; the error lists the accepted names.
    pub fn parse(s: &str) -> Result<StoreKind, String> {
        match s {
            "raft-engine" => Ok(StoreKind::RaftEngine),
            "sled" => Ok(StoreKind::Sled),
            other => Err(format!("{other:?} is not a log store (raft-engine or sled)")),
        }
    }
}

/// A server's log store: raft-engine or sled.
pub enum ServerStore {
    /// Over raft-engine.
    Engine(EngineStore),
    /// Over sled.
    Sled(SledStore),
}

/// Does `dir` hold a sled database (its `conf` and `db` files)?
fn holds_sled(dir: &Path) -> bool {
    dir.join("conf").is_file() && dir.join("db").is_file()
}

impl ServerStore {
    /// Open the store in `dir`: the kind it already holds, else `wanted`.
    pub fn open(dir: &Path, wanted: StoreKind) -> Result<ServerStore, StoreError> {
        if holds_sled(dir) || (wanted == StoreKind::Sled && !dir.join("engine").exists()) {
            return SledStore::open(dir).map(ServerStore::Sled);
        }
        EngineStore::open(dir).map(ServerStore::Engine)
    }

    /// Which engine it is.
    pub fn kind(&self) -> StoreKind {
        match self {
            ServerStore::Engine(_) => StoreKind::RaftEngine,
            ServerStore::Sled(_) => StoreKind::Sled,
        }
    }

    /// Nothing stored yet (a new server).
    pub fn is_empty(&self) -> bool {
        match self {
            ServerStore::Engine(s) => s.is_empty(),
            ServerStore::Sled(s) => s.is_empty(),
        }
    }
}

macro_rules! each {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            ServerStore::Engine($s) => $e,
            ServerStore::Sled($s) => $e,
        }
    };
}

impl Storage for ServerStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        each!(self, s => s.initial_state())
    }
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        each!(self, s => s.entries(low, high, max_size, context))
    }
    fn term(&self, idx: u64) -> raft::Result<u64> {
        each!(self, s => s.term(idx))
    }
    fn first_index(&self) -> raft::Result<u64> {
        each!(self, s => s.first_index())
    }
    fn last_index(&self) -> raft::Result<u64> {
        each!(self, s => s.last_index())
    }
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        each!(self, s => s.snapshot(request_index, to))
    }
}

impl LogStore for ServerStore {
    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        each!(self, s => s.append(entries))
    }
    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StoreError> {
        each!(self, s => s.set_hard_state(hs))
    }
    fn set_conf_state(&mut self, cs: &ConfState) -> Result<(), StoreError> {
        each!(self, s => s.set_conf_state(cs))
    }
    fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<(), StoreError> {
        each!(self, s => s.apply_snapshot(snap))
    }
    fn save_snapshot(&mut self, data: Vec<u8>, index: u64, conf: &ConfState) -> Result<(), StoreError> {
        each!(self, s => s.save_snapshot(data, index, conf))
    }
    fn latest_snapshot(&self) -> Option<Snapshot> {
        each!(self, s => s.latest_snapshot())
    }
    fn snapshot_writer(&self) -> Option<SnapshotWriter> {
        each!(self, s => s.snapshot_writer())
    }
    fn adopt_snapshot(&mut self, snap: Snapshot) -> Result<bool, StoreError> {
        each!(self, s => s.adopt_snapshot(snap))
    }
    fn flush(&mut self) -> Result<(), StoreError> {
        each!(self, s => s.flush())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new directory gets what is asked for; a directory keeps the kind it holds, whatever
    /// is asked for later; both pass the store conformance suite through the enum.
    #[test]
    fn a_directory_keeps_the_kind_it_holds() {
        let root = tempfile::tempdir().unwrap();
        for (name, first) in [("e", StoreKind::RaftEngine), ("s", StoreKind::Sled)] {
            let dir = root.path().join(name);
            let mut s = ServerStore::open(&dir, first).unwrap();
            assert_eq!(s.kind(), first);
            assert!(s.is_empty());
            crate::storage::bootstrap_cluster(&mut s, &[1, 2, 3]).unwrap();
            drop(s);
            let other = if first == StoreKind::Sled { StoreKind::RaftEngine } else { StoreKind::Sled };
            let s = ServerStore::open(&dir, other).unwrap();
            assert_eq!(s.kind(), first, "{name}: reopened as the kind it holds");
            assert!(!s.is_empty());
            assert_eq!(s.latest_snapshot().map(|x| x.get_metadata().index), Some(crate::storage::INITIAL_INDEX));
        }
        assert!(StoreKind::parse("rocksdb").unwrap_err().contains("raft-engine or sled"));
    }
}
