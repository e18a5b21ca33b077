//! Consensus for Tessera's scheduler servers.
//!
//! raft-rs's `RawNode` is driven here (tick, step, ready, persist, send, apply, advance) over a
//! [`storage::LogStore`]: sled for real servers (raft-engine beside it, measured against it),
//! memory for tests. Entries are acknowledged
//! only after the store's `flush()` made them durable, and one flush covers every entry of a
//! `Ready` (group commit). This crate knows nothing of jobs or gRPC: the state machine and the
//! transport are the caller's.

pub mod logging;
pub mod node;
pub mod storage;

#[cfg(test)]
mod tests;

pub use raft::StateRole;
pub use raft::eraftpb;
