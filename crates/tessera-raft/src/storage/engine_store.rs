//! A durable [`LogStore`] over TiKV's raft-engine 0.4, a log store made for raft-rs: it
//! appends every write to the end of a log file and keeps an index of the entries in memory.
//!
//! Layout, in one directory per server:
//! - `engine/`: one raft-engine instance holding one Raft group ([`GROUP`]). Its entries are
//!   exactly the log, `snapshot_index + 1 ..= last_index`. Its keys: `format` (a version
//!   byte), `hard_state` and `conf_state` (protobuf), `snapshot_meta` (a `SnapshotMetadata`:
//!   index, term, conf state) and `snapshot_file` (which file under `snapshots/` holds the
//!   snapshot's data: its number, length and CRC-32, 20 bytes big-endian).
//! - `snapshots/snap-<number>.bin`: the state machine's bytes of the latest snapshot. They can
//!   be hundreds of MiB, so they stay out of the engine's log: written to a `.tmp` file,
//!   fsync'd, renamed, and the directory fsync'd before any engine record names them.
//!
//! Writes are buffered in memory and written by [`LogStore::flush`] as ONE raft-engine batch
//! with one fdatasync: the entries appended since the last flush, the latest hard state, conf
//! state and snapshot record, and the compaction (`Command::Compact`) up to the snapshot. A
//! batch is checksummed and recovered whole or not at all, so every write is atomic, and a
//! crash keeps everything up to the last flush. The snapshot file a record names is already
//! durable when the record is written; the file it replaces is removed after that flush, and
//! files no record names (a crash between the two) are removed when the store opens.
//!
//! Reads: the first and last index, the terms (as runs), the hard state, the conf state and the
//! latest snapshot are kept in memory, with the entries not flushed yet; `entries` reads the
//! others from the engine (its in-memory index, then the file, through raft-engine's one-block
//! cache). Opening the store reads and checks every record and the whole log once: anything
//! that does not decode, a snapshot file that is missing or fails its checksum, or a gap, is a
//! [`StoreError::Corrupt`] naming the record, never a panic.
//!
//! Engine files whose entries are all compacted are removed by raft-engine's
//! `purge_expired_files`, called on a thread of the store's own after each flush that compacted
//! the log, never on the Raft thread. It deletes (or keeps for reuse) whole files once the
//! engine holds more than [`PURGE_THRESHOLD`] bytes, and costs a scan of the in-memory index
//! and a few unlinks; raft-engine copies the live entries of an old file only when few remain
//! there.
//!
//! raft-engine itself panics if an fsync fails (it cannot know what reached the disk); the
//! server cannot go on after that either.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use protobuf::Message;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage};
use raft_engine::{Command, Config, Engine, LogBatch, MessageExt, ReadableSize, RecoveryMode};

use super::mem::{
    SizeBudget, TermRuns, check_append, check_apply_snapshot, check_entries_range, check_save_snapshot,
    check_term_range, new_snapshot, raft_err, snapshot_for_request, snapshot_index_term,
};
use super::{LogStore, SnapshotWriter, StoreError};

/// The one Raft group of the engine.
pub const GROUP: u64 = 1;
const ENGINE_DIR: &str = "engine";
const SNAPSHOT_DIR: &str = "snapshots";
const KEY_FORMAT: &str = "format";
const KEY_HARD_STATE: &str = "hard_state";
const KEY_CONF_STATE: &str = "conf_state";
const KEY_SNAPSHOT_META: &str = "snapshot_meta";
const KEY_SNAPSHOT_FILE: &str = "snapshot_file";
/// The layout described in the module docs.
const FORMAT: u8 = 1;
/// The files of a sled database, which `SledStore` keeps in the same kind of directory.
const SLED_FILES: [&str; 2] = ["conf", "db"];
/// Engine log files are rotated at this size; only whole files are ever removed.
pub const TARGET_FILE_SIZE: u64 = 16 << 20;
/// raft-engine purges nothing until its files hold more than this. It also keeps up to 1.5
/// times as much in purged files for reuse (a reused file spares the metadata updates of a new
/// one). A live log larger than this (more than 100,000 entries of 600 bytes) makes the purge
/// copy the live entries of the oldest files forward instead of only deleting files.
pub const PURGE_THRESHOLD: u64 = 64 << 20;
/// Entries read from the engine at a time when `entries` asks for many.
const READ_CHUNK: u64 = 1024;
/// A flush slower than this is logged.
const SLOW_FLUSH: Duration = Duration::from_millis(100);

/// Tells raft-engine how to index raft-rs's `Entry`.
struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;

    fn index(e: &Entry) -> u64 {
        e.index
    }
}

/// A snapshot data file: `snapshots/snap-<number>.bin`, with the length and CRC-32 of its
/// bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SnapFile {
    number: u64,
    len: u64,
    crc: u32,
}

impl SnapFile {
    const ENCODED_LEN: usize = 20;

    fn name(number: u64) -> String {
        format!("snap-{number:016x}.bin")
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::ENCODED_LEN);
        v.extend_from_slice(&self.number.to_be_bytes());
        v.extend_from_slice(&self.len.to_be_bytes());
        v.extend_from_slice(&self.crc.to_be_bytes());
        v
    }

    fn decode(bytes: &[u8]) -> Option<SnapFile> {
        let number = u64::from_be_bytes(bytes.get(0..8)?.try_into().ok()?);
        let len = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
        let crc = u32::from_be_bytes(bytes.get(16..20)?.try_into().ok()?);
        (bytes.len() == Self::ENCODED_LEN).then_some(SnapFile { number, len, crc })
    }
}

/// A snapshot a [`SnapshotWriter`] made durable, waiting for `adopt_snapshot`.
#[derive(Debug)]
struct Written {
    index: u64,
    term: u64,
    file: SnapFile,
}

/// What the store shares with its snapshot writers.
#[derive(Debug)]
struct Snapshots {
    dir: PathBuf,
    /// The index of the store's latest snapshot (flushed or not): a writer keeps a newer one.
    latest: AtomicU64,
    next_number: AtomicU64,
    written: Mutex<Vec<Written>>,
}

impl Snapshots {
    fn path(&self, number: u64) -> PathBuf {
        self.dir.join(SnapFile::name(number))
    }

    /// Write `data` to a new file, durably: a temporary file, fsync, rename, fsync of the
    /// directory.
    fn write(&self, data: &[u8]) -> Result<SnapFile, StoreError> {
        let number = self.next_number.fetch_add(1, Ordering::Relaxed);
        let path = self.path(number);
        let tmp = path.with_extension("tmp");
        let io = |what: &str, e: std::io::Error| engine(format!("{what} {}: {e}", tmp.display()));
        let mut f = fs::File::create(&tmp).map_err(|e| io("creating", e))?;
        f.write_all(data).map_err(|e| io("writing", e))?;
        f.sync_all().map_err(|e| io("syncing", e))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(|e| io("renaming", e))?;
        sync_dir(&self.dir)?;
        Ok(SnapFile { number, len: data.len() as u64, crc: crc32fast::hash(data) })
    }

    /// Remove a file no record names (any more); a failure only leaves it for the next open.
    fn remove(&self, number: u64) {
        let path = self.path(number);
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "could not remove an old snapshot file");
        }
    }

    fn written(&self) -> std::sync::MutexGuard<'_, Vec<Written>> {
        self.written.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| engine(format!("syncing the directory {}: {e}", dir.display())))
}

/// What the background purges of engine files did so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PurgeStats {
    /// Calls of `purge_expired_files`.
    pub runs: u64,
    /// Calls that removed engine bytes.
    pub purged: u64,
    /// Engine bytes they removed in all.
    pub bytes: u64,
    /// Their time in all.
    pub total: Duration,
    /// The longest one.
    pub longest: Duration,
}

/// Calls raft-engine's `purge_expired_files` on a thread of its own when asked.
struct Purger {
    tx: Option<mpsc::SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<Mutex<PurgeStats>>,
}

impl Purger {
    fn start(eng: Arc<Engine>) -> Result<Purger, StoreError> {
        // One request waiting is enough: a purge looks at everything there is.
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        let stats = Arc::new(Mutex::new(PurgeStats::default()));
        let shared = stats.clone();
        let thread = std::thread::Builder::new()
            .name("log-purge".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    let started = Instant::now();
                    let before = eng.get_used_size() as u64;
                    let result = eng.purge_expired_files();
                    let took = started.elapsed();
                    let after = eng.get_used_size() as u64;
                    {
                        let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
                        s.runs += 1;
                        if after < before {
                            s.purged += 1;
                            s.bytes += before - after;
                        }
                        s.total += took;
                        s.longest = s.longest.max(took);
                    }
                    match result {
                        Ok(_) => tracing::debug!(
                            ms = took.as_millis() as u64,
                            bytes_before = before,
                            bytes_after = after,
                            "raft log files purged"
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "purging raft log files failed; the next compaction retries")
                        }
                    }
                }
            })
            .map_err(|e| engine(format!("starting the log purge thread: {e}")))?;
        Ok(Purger { tx: Some(tx), thread: Some(thread), stats })
    }

    fn request(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(());
        }
    }
}

impl Drop for Purger {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::warn!("the log purge thread panicked");
        }
    }
}

/// The Raft log, hard state, conf state and latest snapshot of one server, in raft-engine.
pub struct EngineStore {
    engine: Arc<Engine>,
    snaps: Arc<Snapshots>,
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Option<Snapshot>,
    last_index: u64,
    terms: TermRuns,
    /// The engine's entries up to here (from the first index) are the log's; the ones after it
    /// are replaced, at the next flush, by `pending`.
    engine_valid_to: u64,
    /// The log's entries after `engine_valid_to`, up to `last_index`: not in the engine yet.
    pending: Vec<Entry>,
    hard_state_dirty: bool,
    conf_state_dirty: bool,
    /// The snapshot record changed: write it and compact the engine up to it at the next flush.
    snapshot_dirty: bool,
    /// The file of the latest snapshot, when the engine's record does not name it yet.
    pending_file: Option<SnapFile>,
    /// The file the engine's record names.
    durable_file: Option<SnapFile>,
    purger: Purger,
}

impl fmt::Debug for EngineStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (snapshot_index, snapshot_term) = snapshot_index_term(self.snapshot.as_ref());
        f.debug_struct("EngineStore")
            .field("snapshot_index", &snapshot_index)
            .field("snapshot_term", &snapshot_term)
            .field("last_index", &self.last_index)
            .field("pending", &self.pending.len())
            .field("hard_state", &self.hard_state)
            .field("conf_state", &self.conf_state)
            .finish_non_exhaustive()
    }
}

fn engine(e: impl fmt::Display) -> StoreError {
    StoreError::Engine(e.to_string())
}

/// A raft-engine failure while reading `what`: damaged bytes are [`StoreError::Corrupt`].
fn read_err(what: impl fmt::Display, e: raft_engine::Error) -> StoreError {
    use raft_engine::Error as E;
    match e {
        E::Corruption(_) | E::Codec(_) | E::Protobuf(_) | E::EntryCompacted | E::EntryNotFound => {
            StoreError::Corrupt { what: what.to_string(), detail: e.to_string() }
        }
        e => engine(e),
    }
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

fn key_name(key: &str) -> String {
    format!("{ENGINE_DIR}/{key}")
}

/// The sizes the engine rotates and purges its files at.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tuning {
    pub(crate) target_file_size: u64,
    pub(crate) purge_threshold: u64,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning { target_file_size: TARGET_FILE_SIZE, purge_threshold: PURGE_THRESHOLD }
    }
}

fn engine_config(dir: &Path, tuning: Tuning) -> Result<Config, StoreError> {
    let dir = dir.to_str().ok_or_else(|| engine(format!("{} is not valid UTF-8", dir.display())))?;
    Ok(Config {
        dir: dir.to_owned(),
        // A torn last batch (a crash in the middle of a write) is dropped; damage anywhere
        // else fails the open.
        recovery_mode: RecoveryMode::TolerateTailCorruption,
        recovery_threads: 2,
        target_file_size: ReadableSize(tuning.target_file_size),
        purge_threshold: ReadableSize(tuning.purge_threshold),
        ..Config::default()
    })
}

impl EngineStore {
    /// Open the store in `dir`, creating an empty one (no configuration, empty log) if there is
    /// none. A server that joins an existing cluster starts like this and learns the
    /// configuration from the leader. Fails with [`StoreError::Corrupt`] if what is there does
    /// not decode, a snapshot file is missing or damaged, or the log has a gap, and with
    /// [`StoreError::Engine`] if raft-engine cannot open it (e.g. another process holds it).
    pub fn open(dir: &Path) -> Result<EngineStore, StoreError> {
        EngineStore::open_tuned(dir, Tuning::default())
    }

    pub(crate) fn open_tuned(dir: &Path, tuning: Tuning) -> Result<EngineStore, StoreError> {
        let engine_dir = dir.join(ENGINE_DIR);
        let snap_dir = dir.join(SNAPSHOT_DIR);
        for d in [&engine_dir, &snap_dir] {
            fs::create_dir_all(d).map_err(|e| engine(format!("creating {}: {e}", d.display())))?;
        }
        // A store reopened at once may find the engine's directory lock (a flock) still held
        // for a moment, e.g. by a child process this one forked and that has not exec'd yet
        // (seen once in the tests, which spawn the kill -9 children). SledStore waits too.
        let mut attempts = 0;
        let eng = loop {
            match Engine::open(engine_config(&engine_dir, tuning)?) {
                Ok(eng) => break eng,
                Err(e) if attempts < 50 && e.to_string().contains("Failed to lock file") => {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e @ (raft_engine::Error::Corruption(_) | raft_engine::Error::Codec(_))) => {
                    return Err(StoreError::Corrupt { what: ENGINE_DIR.into(), detail: e.to_string() });
                }
                Err(e) => return Err(engine(format!("opening {}: {e}", engine_dir.display()))),
            }
        };
        let eng = Arc::new(eng);

        let get = |k: &str| eng.get(GROUP, k.as_bytes());
        let fresh = eng.first_index(GROUP).is_none()
            && [KEY_FORMAT, KEY_HARD_STATE, KEY_CONF_STATE, KEY_SNAPSHOT_META, KEY_SNAPSHOT_FILE]
                .iter()
                .all(|k| get(k).is_none());
        // A server switched from sled in place must not start over with an empty log (it
        // would come up as a new member): its state has to be copied across first.
        if fresh && SLED_FILES.iter().all(|f| dir.join(f).is_file()) {
            return Err(StoreError::Invalid(format!(
                "{} holds a sled database (SledStore): copy its state into a new EngineStore first",
                dir.display()
            )));
        }
        match get(KEY_FORMAT) {
            // The format record is the first thing a new store writes, before any snapshot
            // file: an engine without it beside snapshot files lost its log (raft-engine
            // reads damage inside its last file as a torn tail and drops everything after it).
            None if fresh && let Some(name) = first_snapshot_file(&snap_dir)? => {
                return Err(StoreError::Corrupt {
                    what: ENGINE_DIR.into(),
                    detail: format!("no record at all, but {SNAPSHOT_DIR}/{name} exists: the log was lost"),
                });
            }
            None if fresh => {
                let mut batch = LogBatch::default();
                batch.put(GROUP, KEY_FORMAT.as_bytes().to_vec(), vec![FORMAT]).map_err(engine)?;
                eng.write(&mut batch, true).map_err(engine)?;
            }
            None => {
                return Err(StoreError::Corrupt {
                    what: key_name(KEY_FORMAT),
                    detail: "missing from a store that holds other records".into(),
                });
            }
            Some(v) if v == [FORMAT] => {}
            Some(v) => {
                return Err(StoreError::Corrupt {
                    what: key_name(KEY_FORMAT),
                    detail: format!("unknown store format {}", hex(&v)),
                });
            }
        }
        let hard_state: HardState = match get(KEY_HARD_STATE) {
            Some(v) => decode(key_name(KEY_HARD_STATE), &v)?,
            None => HardState::default(),
        };
        let conf_state: ConfState = match get(KEY_CONF_STATE) {
            Some(v) => decode(key_name(KEY_CONF_STATE), &v)?,
            None => ConfState::default(),
        };

        let mut snaps = Snapshots {
            dir: snap_dir,
            latest: AtomicU64::new(0),
            next_number: AtomicU64::new(0),
            written: Mutex::new(Vec::new()),
        };
        let (snapshot, durable_file) = match (get(KEY_SNAPSHOT_META), get(KEY_SNAPSHOT_FILE)) {
            (None, None) => (None, None),
            (Some(m), Some(f)) => {
                let meta: SnapshotMetadata = decode(key_name(KEY_SNAPSHOT_META), &m)?;
                let file = SnapFile::decode(&f).ok_or_else(|| StoreError::Corrupt {
                    what: key_name(KEY_SNAPSHOT_FILE),
                    detail: format!("{} bytes, not {}", f.len(), SnapFile::ENCODED_LEN),
                })?;
                let data = read_snapshot_file(&snaps, file)?;
                let mut snap = Snapshot::default();
                snap.set_metadata(meta);
                snap.data = data.into();
                (Some(snap), Some(file))
            }
            (m, _) => {
                return Err(StoreError::Corrupt {
                    what: key_name(KEY_SNAPSHOT_META),
                    detail: format!(
                        "snapshot metadata {} without its file record {}",
                        if m.is_some() { "present" } else { "missing" },
                        if m.is_some() { "missing" } else { "present" },
                    ),
                });
            }
        };
        let next = clean_snapshot_dir(&snaps.dir, durable_file.map(|f| f.number))?;
        snaps.next_number = AtomicU64::new(next.max(durable_file.map_or(0, |f| f.number + 1)));
        snaps.latest = AtomicU64::new(snapshot_index_term(snapshot.as_ref()).0);

        let purger = Purger::start(eng.clone())?;
        let mut store = EngineStore {
            engine: eng,
            snaps: Arc::new(snaps),
            hard_state,
            conf_state,
            snapshot,
            last_index: 0,
            terms: TermRuns::default(),
            engine_valid_to: 0,
            pending: Vec::new(),
            hard_state_dirty: false,
            conf_state_dirty: false,
            snapshot_dirty: false,
            pending_file: None,
            durable_file,
            purger,
        };
        store.load_log()?;
        tracing::debug!(
            dir = %dir.display(),
            first_index = store.first(),
            last_index = store.last_index,
            term = store.hard_state.term,
            commit = store.hard_state.commit,
            engine_bytes = store.engine.get_used_size(),
            "raft log store opened"
        );
        Ok(store)
    }

    /// Open the store in `dir` and, if it is empty, give it `voters` as its conf state (made
    /// durable before this returns); a store that already holds anything keeps its state. For
    /// tests of the store: a founding member of a real cluster uses
    /// [`crate::storage::bootstrap_cluster`], whose initial snapshot later members need.
    /// With no voters this is [`EngineStore::open`].
    pub fn open_with_voters(dir: &Path, voters: &[u64]) -> Result<EngineStore, StoreError> {
        let mut store = EngineStore::open(dir)?;
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

    /// The bytes of the engine's log files (not counting purged files kept for reuse, nor the
    /// snapshot file).
    pub fn engine_bytes(&self) -> usize {
        self.engine.get_used_size()
    }

    /// What the background purges of engine files did since the store opened.
    pub fn purge_stats(&self) -> PurgeStats {
        *self.purger.stats.lock().unwrap_or_else(PoisonError::into_inner)
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

    fn dirty(&self) -> bool {
        !self.pending.is_empty() || self.hard_state_dirty || self.conf_state_dirty || self.snapshot_dirty
    }

    /// Read and check the whole log: indexes follow each other from the snapshot on, terms
    /// never decrease. Entries at or below the snapshot's index (which an atomic compaction
    /// never leaves) are compacted away.
    fn load_log(&mut self) -> Result<(), StoreError> {
        let (snap_index, snap_term) = snapshot_index_term(self.snapshot.as_ref());
        if self.engine.first_index(GROUP).is_some_and(|f| f <= snap_index) {
            tracing::warn!(snap_index, "compacting log entries left below the snapshot");
            let mut batch = LogBatch::default();
            batch.add_command(GROUP, Command::Compact { index: snap_index + 1 });
            self.engine.write(&mut batch, true).map_err(engine)?;
        }
        let mut last = snap_index;
        let mut last_term = snap_term;
        let mut terms = TermRuns::default();
        if let (Some(first), Some(end)) = (self.engine.first_index(GROUP), self.engine.last_index(GROUP)) {
            if first != snap_index + 1 {
                return Err(StoreError::Corrupt {
                    what: format!("{ENGINE_DIR}/entry {first}"),
                    detail: format!("gap in the log: the first entry is {first}, the snapshot is at {snap_index}"),
                });
            }
            let mut chunk = Vec::new();
            let mut lo = first;
            while lo <= end {
                let hi = (lo + READ_CHUNK).min(end + 1);
                chunk.clear();
                self.fetch(lo, hi, None, &mut chunk)?;
                for e in &chunk {
                    let what = || format!("{ENGINE_DIR}/entry {}", e.index);
                    if e.index != last + 1 {
                        return Err(StoreError::Corrupt {
                            what: what(),
                            detail: format!("gap in the log: entry {} follows {last}", e.index),
                        });
                    }
                    if e.term < last_term {
                        return Err(StoreError::Corrupt {
                            what: what(),
                            detail: format!("entry {} has term {} below the previous {last_term}", e.index, e.term),
                        });
                    }
                    terms.push(e.index, e.term);
                    last = e.index;
                    last_term = e.term;
                }
                lo = hi;
            }
        }
        self.last_index = last;
        self.engine_valid_to = last;
        self.terms = terms;
        Ok(())
    }

    /// Entries `lo..hi` from the engine, cut by `max_size` as raft-rs's `limit_size` would
    /// (an entry's size in the engine is its encoded size), checked to be the ones asked for.
    fn fetch(&self, lo: u64, hi: u64, max_size: Option<u64>, out: &mut Vec<Entry>) -> Result<(), StoreError> {
        let what = || format!("{ENGINE_DIR}/entries {lo}..{hi}");
        let start = out.len();
        let max = max_size.map(|m| usize::try_from(m).unwrap_or(usize::MAX));
        self.engine.fetch_entries_to::<EntryExt>(GROUP, lo, hi, max, out).map_err(|e| read_err(what(), e))?;
        for (e, want) in out[start..].iter().zip(lo..) {
            if e.index != want {
                return Err(StoreError::Corrupt {
                    what: what(),
                    detail: format!("expected entry {want}, found {}", e.index),
                });
            }
        }
        let got = (out.len() - start) as u64;
        if got == 0 && hi > lo {
            return Err(StoreError::Corrupt { what: what(), detail: "no entry in the engine".into() });
        }
        if max.is_none() && got != hi - lo {
            return Err(StoreError::Corrupt {
                what: what(),
                detail: format!("entry {} missing from the log", lo + got),
            });
        }
        Ok(())
    }

    fn read_entries(&self, low: u64, high: u64, max_size: Option<u64>) -> Result<Vec<Entry>, StoreError> {
        let mut budget = SizeBudget::new(max_size);
        let mut out = Vec::with_capacity((high - low).min(1024) as usize);
        // From the engine: up to what it holds of the log, a chunk at a time.
        let engine_hi = high.min(self.engine_valid_to + 1);
        let mut lo = low;
        let mut chunk = Vec::new();
        while lo < engine_hi {
            let hi = (lo + READ_CHUNK).min(engine_hi);
            chunk.clear();
            // The engine cuts where the budget left would: it returns fewer only when the
            // next entry does not fit.
            self.fetch(lo, hi, budget.remaining(), &mut chunk)?;
            let got = chunk.len() as u64;
            for e in chunk.drain(..) {
                if !budget.admit(&e) {
                    return Ok(out);
                }
                out.push(e);
            }
            if got < hi - lo {
                return Ok(out);
            }
            lo = hi;
        }
        // Then from the entries not flushed yet.
        if high > lo {
            let offset = self.engine_valid_to + 1;
            for e in &self.pending[(lo - offset) as usize..(high - offset) as usize] {
                if !budget.admit(e) {
                    break;
                }
                out.push(e.clone());
            }
        }
        Ok(out)
    }

    /// Drop the entries up to `index` (kept in the snapshot) from the log in memory; the
    /// engine's are compacted at the next flush.
    fn compact_in_memory(&mut self, index: u64) {
        self.terms.compact_to(index);
        if index > self.engine_valid_to {
            let n = ((index - self.engine_valid_to) as usize).min(self.pending.len());
            self.pending.drain(..n);
            self.engine_valid_to = index;
        }
    }

    /// Make `snap`, whose data is in `file`, the latest snapshot; written at the next flush.
    fn set_snapshot(&mut self, snap: Snapshot, file: SnapFile) {
        if let Some(old) = self.pending_file.replace(file) {
            // Never named by a durable record.
            self.snaps.remove(old.number);
        }
        self.snaps.latest.store(snap.get_metadata().index, Ordering::Release);
        self.snapshot = Some(snap);
        self.snapshot_dirty = true;
    }
}

/// Read a snapshot file and check it against its record.
fn read_snapshot_file(snaps: &Snapshots, file: SnapFile) -> Result<Vec<u8>, StoreError> {
    let what = format!("{SNAPSHOT_DIR}/{}", SnapFile::name(file.number));
    let data = fs::read(snaps.path(file.number))
        .map_err(|e| StoreError::Corrupt { what: what.clone(), detail: format!("cannot read it: {e}") })?;
    if data.len() as u64 != file.len {
        return Err(StoreError::Corrupt {
            what,
            detail: format!("{} bytes, the record says {}", data.len(), file.len),
        });
    }
    let crc = crc32fast::hash(&data);
    if crc != file.crc {
        return Err(StoreError::Corrupt {
            what,
            detail: format!("checksum {crc:08x}, the record says {:08x}", file.crc),
        });
    }
    Ok(data)
}

/// The name of a snapshot data file in `dir`, if there is one.
fn first_snapshot_file(dir: &Path) -> Result<Option<String>, StoreError> {
    let entries = fs::read_dir(dir).map_err(|e| engine(format!("listing {}: {e}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(|e| engine(format!("listing {}: {e}", dir.display())))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("snap-") && name.ends_with(".bin") {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// Remove the snapshot files and temporary files that `keep` is not (left by a crash before
/// the record naming them was written, or after it replaced them). Returns the number after
/// the highest one seen, where new files start.
fn clean_snapshot_dir(dir: &Path, keep: Option<u64>) -> Result<u64, StoreError> {
    let mut next = 0;
    let entries = fs::read_dir(dir).map_err(|e| engine(format!("listing {}: {e}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(|e| engine(format!("listing {}: {e}", dir.display())))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(number) = name
            .strip_prefix("snap-")
            .and_then(|n| n.strip_suffix(".bin").or_else(|| n.strip_suffix(".tmp")))
            .and_then(|n| u64::from_str_radix(n, 16).ok())
        else {
            continue;
        };
        next = next.max(number.saturating_add(1));
        if Some(number) == keep && name.ends_with(".bin") {
            continue;
        }
        tracing::info!(file = name, "removing a snapshot file no record names");
        if let Err(e) = fs::remove_file(entry.path()) {
            tracing::warn!(file = name, error = %e, "could not remove a stale snapshot file");
        }
    }
    Ok(next)
}

impl Storage for EngineStore {
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

impl LogStore for EngineStore {
    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        let (Some(head), Some(tail)) = (entries.first(), entries.last()) else { return Ok(()) };
        check_append(self.first(), self.last_index, |i| self.term_in_range(i), entries)?;
        if head.index <= self.engine_valid_to {
            // Overwrites flushed entries: the engine's from here on are replaced at the flush.
            self.pending.clear();
            self.engine_valid_to = head.index - 1;
        } else {
            self.pending.truncate((head.index - self.engine_valid_to - 1) as usize);
        }
        self.pending.extend_from_slice(entries);
        self.terms.truncate_from(head.index);
        for e in entries {
            self.terms.push(e.index, e.term);
        }
        self.last_index = tail.index;
        Ok(())
    }

    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StoreError> {
        self.hard_state = hs.clone();
        self.hard_state_dirty = true;
        Ok(())
    }

    fn set_conf_state(&mut self, cs: &ConfState) -> Result<(), StoreError> {
        self.conf_state = cs.clone();
        self.conf_state_dirty = true;
        Ok(())
    }

    fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<(), StoreError> {
        check_apply_snapshot(snap, self.snapshot_index())?;
        let file = self.snaps.write(snap.get_data())?;
        let meta = snap.get_metadata();
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.hard_state.commit = meta.index;
        self.conf_state = meta.get_conf_state().clone();
        // The whole log goes: the engine's entries are compacted at the flush.
        self.pending.clear();
        self.engine_valid_to = meta.index;
        self.terms = TermRuns::default();
        self.last_index = meta.index;
        self.hard_state_dirty = true;
        self.conf_state_dirty = true;
        self.set_snapshot(snap.clone(), file);
        Ok(())
    }

    fn save_snapshot(&mut self, data: Vec<u8>, index: u64, conf: &ConfState) -> Result<(), StoreError> {
        check_save_snapshot(index, self.snapshot_index(), self.last_index, self.hard_state.commit)?;
        let snap = new_snapshot(data, index, self.term_in_range(index), conf);
        let file = self.snaps.write(snap.get_data())?;
        self.compact_in_memory(index);
        self.set_snapshot(snap, file);
        Ok(())
    }

    fn latest_snapshot(&self) -> Option<Snapshot> {
        self.snapshot.clone()
    }

    fn snapshot_writer(&self) -> Option<SnapshotWriter> {
        let snaps = self.snaps.clone();
        Some(Box::new(move |snap: &Snapshot| {
            let (index, term) = (snap.get_metadata().index, snap.get_metadata().term);
            if snaps.latest.load(Ordering::Acquire) >= index {
                return Ok(false);
            }
            // Durable now; the engine names it once the Raft thread adopts it and flushes (a
            // crash before that finds the older snapshot and the whole log, and removes it).
            let file = snaps.write(snap.get_data())?;
            snaps.written().push(Written { index, term, file });
            Ok(true)
        }))
    }

    fn adopt_snapshot(&mut self, snap: Snapshot) -> Result<bool, StoreError> {
        let (index, term) = (snap.get_metadata().index, snap.get_metadata().term);
        let len = snap.get_data().len() as u64;
        let mut found = None;
        let current = self.snapshot_index();
        self.snaps.written().retain(|w| {
            if found.is_none() && index > current && (w.index, w.term, w.file.len) == (index, term, len) {
                found = Some(w.file);
                false
            } else if w.index <= index.max(current) {
                // Older than what the store keeps now: never adopted.
                self.snaps.remove(w.file.number);
                false
            } else {
                true
            }
        });
        if index <= current {
            return Ok(false);
        }
        if index > self.last_index {
            if let Some(f) = found {
                self.snaps.remove(f.number);
            }
            return Err(StoreError::Invalid(format!("snapshot at {index} is past the last index {}", self.last_index)));
        }
        // A snapshot that no writer of this store wrote is written now.
        let file = match found {
            Some(f) => f,
            None => self.snaps.write(snap.get_data())?,
        };
        self.compact_in_memory(index);
        self.set_snapshot(snap, file);
        Ok(true)
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        if !self.dirty() {
            return Ok(());
        }
        let started = Instant::now();
        let mut batch = LogBatch::default();
        if let (Some(first), Some(last)) = (self.engine.first_index(GROUP), self.engine.last_index(GROUP)) {
            // The engine's entries up to the snapshot go. So do the ones past `engine_valid_to`
            // when no pending entry replaces them: then the log is empty (all of it was
            // compacted or a snapshot was installed), and all of the engine's go.
            let to = if self.pending.is_empty() && last > self.engine_valid_to {
                last + 1
            } else {
                self.snapshot_index() + 1
            };
            if first < to {
                batch.add_command(GROUP, Command::Compact { index: to });
            }
        }
        batch.add_entries::<EntryExt>(GROUP, &self.pending).map_err(engine)?;
        let put = |batch: &mut LogBatch, k: &str, v: Vec<u8>| batch.put(GROUP, k.as_bytes().to_vec(), v);
        if self.hard_state_dirty {
            put(&mut batch, KEY_HARD_STATE, encode("hard state", &self.hard_state)?).map_err(engine)?;
        }
        if self.snapshot_dirty {
            let (Some(snap), Some(file)) = (&self.snapshot, self.pending_file) else {
                return Err(StoreError::Invalid("a snapshot to write without its file".into()));
            };
            put(&mut batch, KEY_SNAPSHOT_META, encode("snapshot metadata", snap.get_metadata())?).map_err(engine)?;
            put(&mut batch, KEY_SNAPSHOT_FILE, file.encode()).map_err(engine)?;
            // The records written once (format, conf state) are written again with each
            // compaction, so that they never hold an old engine file back from the purge.
            put(&mut batch, KEY_FORMAT, vec![FORMAT]).map_err(engine)?;
        }
        if self.conf_state_dirty || self.snapshot_dirty {
            put(&mut batch, KEY_CONF_STATE, encode("conf state", &self.conf_state)?).map_err(engine)?;
        }
        let bytes = self.engine.write(&mut batch, true).map_err(engine)?;
        self.pending.clear();
        self.engine_valid_to = self.last_index;
        self.hard_state_dirty = false;
        self.conf_state_dirty = false;
        if std::mem::take(&mut self.snapshot_dirty) {
            let new = self.pending_file.take();
            if let Some(old) = std::mem::replace(&mut self.durable_file, new)
                && Some(old) != new
            {
                self.snaps.remove(old.number);
            }
            self.purger.request();
        }
        let took = started.elapsed();
        if took >= SLOW_FLUSH {
            tracing::warn!(bytes, ms = took.as_millis() as u64, "slow fsync of the Raft log");
        }
        Ok(())
    }
}

impl Drop for EngineStore {
    /// Writes what is buffered, as sled does when its database is dropped: a store dropped
    /// without a crash keeps everything.
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "flushing the raft log store on close failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use raft::Storage;
    use raft::eraftpb::ConfState;

    use super::*;
    use crate::storage::durable_suite::{self, Durable, all, hs};
    use crate::storage::mem::conformance;

    impl Durable for EngineStore {
        fn open(dir: &Path) -> Result<Self, StoreError> {
            EngineStore::open(dir)
        }
        fn open_with_voters(dir: &Path, voters: &[u64]) -> Result<Self, StoreError> {
            EngineStore::open_with_voters(dir, voters)
        }
        fn is_empty(&self) -> bool {
            EngineStore::is_empty(self)
        }
    }

    #[test]
    fn conformance() {
        durable_suite::conformance::<EngineStore>();
    }

    #[test]
    fn a_snapshot_written_in_the_background_is_adopted_and_survives_a_restart() {
        durable_suite::a_snapshot_written_in_the_background_is_adopted_and_survives_a_restart::<EngineStore>();
    }

    #[test]
    fn reopen_keeps_what_was_flushed() {
        durable_suite::reopen_keeps_what_was_flushed::<EngineStore>();
    }

    #[test]
    fn open_empty_and_bootstrap() {
        durable_suite::open_empty_and_bootstrap::<EngineStore>();
    }

    /// The snapshot files in the store's directory.
    fn snapshot_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir.join(SNAPSHOT_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn writes_reach_the_engine_only_at_the_flush_and_reads_see_them_before() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = EngineStore::open_with_voters(dir.path(), &[1]).unwrap();
        s.append(&conformance::entries(1..=10, 1)).unwrap();
        s.flush().unwrap();
        // Overwrite a flushed suffix, extend it, then compact into the part not flushed.
        s.append(&conformance::entries(6..=8, 2)).unwrap();
        s.append(&conformance::entries(9..=12, 2)).unwrap();
        assert_eq!(s.engine.last_index(GROUP), Some(10), "nothing written before the flush");
        let mut want = conformance::entries(1..=5, 1);
        want.extend(conformance::entries(6..=12, 2));
        assert_eq!(all(&s), want);
        // A read across the flushed and the pending part, cut by size.
        let size = |e: &Entry| u64::from(e.compute_size());
        let max = size(&want[3]) + size(&want[4]) + size(&want[5]);
        let got = s.entries(4, 13, max, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(got, want[3..6].to_vec());
        s.set_hard_state(&hs(2, 1, 9)).unwrap();
        s.save_snapshot(b"at 7".to_vec(), 7, &ConfState::default()).unwrap();
        assert_eq!(all(&s), want[7..].to_vec());
        s.flush().unwrap();
        assert_eq!((s.engine.first_index(GROUP), s.engine.last_index(GROUP)), (Some(8), Some(12)));
        assert_eq!(all(&s), want[7..].to_vec());
        // Compacting everything, the unflushed tail included, leaves the engine empty.
        s.append(&conformance::entries(13..=14, 3)).unwrap();
        s.set_hard_state(&hs(3, 1, 14)).unwrap();
        s.save_snapshot(b"at 14".to_vec(), 14, &ConfState::default()).unwrap();
        s.flush().unwrap();
        assert_eq!(s.engine.first_index(GROUP), None);
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (15, 14));
        drop(s);
        let s = EngineStore::open(dir.path()).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (15, 14));
        assert_eq!(s.term(14).unwrap(), 3);
        assert_eq!(s.latest_snapshot().unwrap().get_data(), b"at 14");
        assert_eq!(snapshot_files(dir.path()).len(), 1, "the replaced snapshot files are removed");
    }

    #[test]
    fn a_snapshot_written_but_never_adopted_is_removed_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ConfState { voters: vec![1], ..Default::default() };
        {
            let mut s = EngineStore::open_with_voters(dir.path(), &[1]).unwrap();
            s.append(&conformance::entries(1..=10, 1)).unwrap();
            s.set_hard_state(&hs(1, 1, 10)).unwrap();
            s.save_snapshot(b"at 3".to_vec(), 3, &cs).unwrap();
            s.flush().unwrap();
            let write = s.snapshot_writer().unwrap();
            assert!(write(&new_snapshot(b"at 8".to_vec(), 8, 1, &cs)).unwrap());
            assert_eq!(snapshot_files(dir.path()).len(), 2);
            // Dropped before adopting it, as a crash would.
        }
        let s = EngineStore::open(dir.path()).unwrap();
        assert_eq!(s.latest_snapshot().unwrap().get_data(), b"at 3");
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (4, 10));
        assert_eq!(snapshot_files(dir.path()), vec![SnapFile::name(0)]);
        // New files do not reuse the removed one's number.
        assert_eq!(s.snaps.next_number.load(Ordering::Relaxed), 2);
    }

    /// Open the engine alone, as a damaged disk or another program would leave it.
    fn raw_engine(dir: &Path) -> Engine {
        Engine::open(engine_config(&dir.join(ENGINE_DIR), Tuning::default()).unwrap()).unwrap()
    }

    fn tamper(dir: &Path, f: impl FnOnce(&mut LogBatch)) {
        let e = raw_engine(dir);
        let mut batch = LogBatch::default();
        f(&mut batch);
        e.write(&mut batch, true).unwrap();
    }

    fn put_raw(dir: &Path, key: &str, value: &[u8]) {
        tamper(dir, |b| b.put(GROUP, key.as_bytes().to_vec(), value.to_vec()).unwrap());
    }

    fn corrupt_what(r: Result<EngineStore, StoreError>) -> String {
        match r {
            Err(StoreError::Corrupt { what, .. }) => what,
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    /// A store with entries 1..=5 (term 1) and a snapshot at 2, flushed.
    fn fresh() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let mut s = EngineStore::open_with_voters(d.path(), &[1]).unwrap();
        s.append(&conformance::entries(1..=5, 1)).unwrap();
        s.set_hard_state(&hs(1, 1, 5)).unwrap();
        s.save_snapshot(b"snapshot at 2".to_vec(), 2, &ConfState::default()).unwrap();
        s.flush().unwrap();
        d
    }

    #[test]
    fn damaged_records_are_errors_naming_the_record() {
        for (key, value) in [
            (KEY_HARD_STATE, &[0x0a][..]),
            (KEY_CONF_STATE, &[0xff, 0xff, 0xff][..]),
            (KEY_SNAPSHOT_META, &[0xff, 0xff][..]),
            (KEY_SNAPSHOT_FILE, &[0; 12][..]),
            (KEY_FORMAT, &[9][..]),
        ] {
            let d = fresh();
            put_raw(d.path(), key, value);
            assert_eq!(corrupt_what(EngineStore::open(d.path())), key_name(key), "{key}");
        }

        // A snapshot record without its file record.
        let d = fresh();
        tamper(d.path(), |b| b.delete(GROUP, KEY_SNAPSHOT_FILE.as_bytes().to_vec()));
        assert_eq!(corrupt_what(EngineStore::open(d.path())), key_name(KEY_SNAPSHOT_META));

        // The snapshot file missing, cut short, or with a flipped byte.
        let file = format!("{SNAPSHOT_DIR}/{}", SnapFile::name(0));
        let d = fresh();
        fs::remove_file(d.path().join(&file)).unwrap();
        assert_eq!(corrupt_what(EngineStore::open(d.path())), file);
        let d = fresh();
        fs::write(d.path().join(&file), b"snapshot").unwrap();
        assert_eq!(corrupt_what(EngineStore::open(d.path())), file);
        let d = fresh();
        fs::write(d.path().join(&file), b"snapshot at 3").unwrap();
        assert_eq!(corrupt_what(EngineStore::open(d.path())), file);

        // Terms going down: entries 4 and 5 rewritten with term 0.
        let d = fresh();
        tamper(d.path(), |b| b.add_entries::<EntryExt>(GROUP, &conformance::entries(4..=5, 0)).unwrap());
        assert_eq!(corrupt_what(EngineStore::open(d.path())), format!("{ENGINE_DIR}/entry 4"));

        // A gap between the snapshot and the first entry.
        let d = fresh();
        tamper(d.path(), |b| b.add_command(GROUP, Command::Compact { index: 5 }));
        assert_eq!(corrupt_what(EngineStore::open(d.path())), format!("{ENGINE_DIR}/entry 5"));

        // Other records but no format: not a store this code wrote.
        let d = fresh();
        tamper(d.path(), |b| b.delete(GROUP, KEY_FORMAT.as_bytes().to_vec()));
        assert_eq!(corrupt_what(EngineStore::open(d.path())), key_name(KEY_FORMAT));

        // The undamaged store opens.
        let d = fresh();
        let s = EngineStore::open(d.path()).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (3, 5));
    }

    /// Bytes of the engine's log file flipped: raft-engine reads damage in its last file as a
    /// torn tail and drops everything from there. The open never panics and never hands out a
    /// damaged entry; a store that lost even its format record beside a snapshot file is an
    /// error (the other cuts cannot be told from a crash before the flush).
    #[test]
    fn damaged_engine_files_fail_the_open_without_a_panic() {
        let mut errors = 0;
        for at in [0.1, 0.5, 0.9] {
            let d = fresh();
            let mut files: Vec<PathBuf> = fs::read_dir(d.path().join(ENGINE_DIR))
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "raftlog"))
                .collect();
            files.sort();
            let path = files.last().unwrap();
            let mut bytes = fs::read(path).unwrap();
            let used = bytes.iter().rposition(|b| *b != 0).unwrap();
            let i = (used as f64 * at) as usize;
            bytes[i] ^= 0x5a;
            fs::write(path, &bytes).unwrap();
            match EngineStore::open(d.path()) {
                Err(StoreError::Corrupt { .. } | StoreError::Engine(_)) => errors += 1,
                Err(e) => panic!("flipped byte {i}: unexpected error {e}"),
                Ok(s) => {
                    // Taken for a torn tail: what is left must still be a whole log.
                    let entries = all(&s);
                    assert_eq!(entries.len() as u64, s.last_index().unwrap() + 1 - s.first_index().unwrap());
                    eprintln!("flipped byte {i} of {used}: opened with log {:?}", (s.first_index(), s.last_index()));
                }
            }
        }
        assert!(errors > 0, "a flip near the start of the only file cuts the whole store, and is found");
    }

    #[test]
    fn entries_left_below_the_snapshot_are_compacted() {
        let d = tempfile::tempdir().unwrap();
        {
            let mut s = EngineStore::open_with_voters(d.path(), &[1]).unwrap();
            s.append(&conformance::entries(1..=5, 1)).unwrap();
            s.set_hard_state(&hs(1, 1, 5)).unwrap();
            s.flush().unwrap();
        }
        // A snapshot record at 3 written without the compaction that goes with it.
        let data = b"snapshot at 3";
        fs::write(d.path().join(SNAPSHOT_DIR).join(SnapFile::name(7)), data).unwrap();
        let file = SnapFile { number: 7, len: data.len() as u64, crc: crc32fast::hash(data) };
        let meta = new_snapshot(Vec::new(), 3, 1, &ConfState::default()).take_metadata();
        tamper(d.path(), |b| {
            b.put(GROUP, KEY_SNAPSHOT_META.as_bytes().to_vec(), meta.write_to_bytes().unwrap()).unwrap();
            b.put(GROUP, KEY_SNAPSHOT_FILE.as_bytes().to_vec(), file.encode()).unwrap();
        });
        {
            let s = EngineStore::open(d.path()).unwrap();
            assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (4, 5));
            assert_eq!(s.engine.first_index(GROUP), Some(4));
            assert_eq!(all(&s), conformance::entries(4..=5, 1));
            assert_eq!(s.latest_snapshot().unwrap().get_data(), data);
        }
        assert_eq!(raw_engine(d.path()).first_index(GROUP), Some(4), "the compaction is durable");
    }

    #[test]
    fn a_directory_holding_a_sled_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = crate::storage::sled_store::SledStore::open_with_voters(dir.path(), &[1]).unwrap();
            s.append(&conformance::entries(1..=3, 1)).unwrap();
            s.flush().unwrap();
        }
        match EngineStore::open(dir.path()) {
            Err(StoreError::Invalid(msg)) => assert!(msg.contains("sled"), "{msg}"),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn compacted_engine_files_are_purged_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let tuning = Tuning { target_file_size: 256 << 10, purge_threshold: 1 << 20 };
        let mut s = EngineStore::open_tuned(dir.path(), tuning).unwrap();
        s.set_conf_state(&ConfState { voters: vec![1], ..Default::default() }).unwrap();
        let data = vec![b'x'; 1000];
        let mut rng = 1u64;
        let mut written = 0;
        // 6 MiB of entries that do not compress, a compaction every 500.
        for i in 1..=6000u64 {
            let mut data = data.clone();
            for b in data.iter_mut() {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                *b = rng as u8;
            }
            written += data.len();
            s.append(&[Entry { index: i, term: 1, data: data.into(), ..Default::default() }]).unwrap();
            s.set_hard_state(&hs(1, 1, i)).unwrap();
            if i % 500 == 0 {
                s.save_snapshot(format!("at {i}").into_bytes(), i - 100, &ConfState::default()).unwrap();
            }
            s.flush().unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.purge_stats().purged == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let stats = s.purge_stats();
        assert!(stats.purged > 0 && stats.bytes > 0, "{stats:?}");
        assert!(s.engine_bytes() < written / 2, "{} engine bytes left of {written} written", s.engine_bytes());
        assert_eq!(all(&s).len(), 100);
        drop(s);
        let s = EngineStore::open_tuned(dir.path(), tuning).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (5901, 6000));
        assert_eq!(s.latest_snapshot().unwrap().get_data(), b"at 6000");
    }

    // ---- kill -9 ----

    /// Run by [`kill9_loop`] in a child process, which it kills.
    #[test]
    #[ignore = "child process of kill9_loop"]
    fn kill9_child() {
        durable_suite::kill9_child::<EngineStore>();
    }

    #[test]
    fn kill9_loop() {
        // module_path!() starts with the crate's name, test names do not.
        durable_suite::kill9_loop::<EngineStore>(&format!(
            "{}::kill9_child",
            module_path!().split_once("::").unwrap().1
        ));
    }
}
