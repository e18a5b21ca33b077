//! The Raft log stores side by side at depth (issue 13): `SledStore` against `EngineStore`
//! (raft-engine), in one run, on the same disk. sled's flush is `sync_file_range`, not an
//! fsync (see `SLED_FSYNC`), so a third variant, `sled-fsync`, adds the fdatasync that makes
//! it durable, for a like-for-like comparison.
//!
//! ```text
//! cargo build --release -p tessera-benches --bin logstore
//! ./target/release/logstore --rounds 2       # 1,000,000 entries per store, two rounds
//! ./target/release/logstore --entries 30000  # a quick look
//! ```
//!
//! The stores take turns (`--turn` entries each, 20,000 by default) so that the shared disk's
//! slow spells fall on all of them alike; each store's figures count only its own time. For
//! each store, in a fresh directory, it does what a server's Raft thread does for each Ready
//! under a deep queue: append a batch (`--batch` entries of about `--entry-bytes` bytes,
//! the size of a job submission), store the hard state, flush (the fsync), and read the batch
//! back with a size limit, as the leader does to replicate it. Every `--snapshot-every`
//! entries a snapshot of `--snapshot-mib` MiB is written on another thread by the store's
//! snapshot writer and adopted (the log compacted) when it is done, as the server does. It
//! goes on until `--entries` entries have been appended. The stores: `sled` (SledStore as the
//! server uses it), `sled-fsync` (the same, plus the fdatasync its flush lacks) and `engine`
//! (EngineStore).
//!
//! It prints, per store and for the first 100k entries, the 100k around the middle and the last
//! 100k: batches per second (the median over windows of 100 batches), the p50, p99 and max
//! time of one batch (append + hard state + flush + read back), the p50 and p99 of the read
//! alone, and at the end the disk the store's directory takes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use raft::{GetEntriesContext, Storage};
use tessera_raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use tessera_raft::storage::engine_store::EngineStore;
use tessera_raft::storage::sled_store::SledStore;
use tessera_raft::storage::{LogStore, SnapshotWriter, StoreError};

#[derive(Parser, Debug, Clone)]
#[command(about = "SledStore against EngineStore (raft-engine) at depth, side by side")]
struct Args {
    /// Entries appended to each store.
    #[arg(long, default_value_t = 1_000_000)]
    entries: u64,
    /// Entries per batch (one Ready).
    #[arg(long, default_value_t = 64)]
    batch: u64,
    /// Bytes of each entry's data (JSON-like text with a random id in it).
    #[arg(long, default_value_t = 300)]
    entry_bytes: usize,
    /// A snapshot every this many entries (the server's default is 100,000; its tests and
    /// this benchmark use the driver's default, 10,000).
    #[arg(long, default_value_t = 10_000)]
    snapshot_every: u64,
    /// Size of each snapshot, in MiB.
    #[arg(long, default_value_t = 4)]
    snapshot_mib: usize,
    /// Rounds; each round runs every store once, and the order of their turns is reversed every
    /// other round.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Stores to run, in the first round's order: `sled` (SledStore as the server uses it),
    /// `sled-fsync` (the same plus an fdatasync of sled's file at each flush), `engine`.
    #[arg(long, value_delimiter = ',', default_value = "sled,sled-fsync,engine")]
    stores: Vec<String>,
    /// Entries each store appends in its turn before the next store's turn (0: each store
    /// runs to the end alone). Taking turns spreads the shared disk's slow spells over all
    /// the stores.
    #[arg(long, default_value_t = 20_000)]
    turn: u64,
    /// Directory under which each store gets a fresh directory (removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// One batch's times.
#[derive(Clone, Copy)]
struct Sample {
    /// The last index after the batch.
    index: u64,
    /// This store's own busy time when the batch ended (the other stores' turns left out).
    at: Duration,
    /// The whole iteration: adopting a finished snapshot if there is one, append, hard state,
    /// flush, read back, starting a snapshot if one is due.
    total: Duration,
    read: Duration,
}

struct RunResult {
    store: String,
    samples: Vec<Sample>,
    busy: Duration,
    disk_bytes: u64,
    snapshots: u64,
    note: String,
}

/// sled 0.34's flush on Linux ends in `sync_file_range`, which neither writes the file's
/// metadata (its growing length) nor flushes the disk's write cache: enough for kill -9, not
/// for a power cut. The `sled-fsync` variant adds the fdatasync of sled's file that makes it
/// durable, for a like-for-like comparison with raft-engine, which fdatasyncs.
const SLED_FSYNC: &str = "sled-fsync";

/// What a store has to say at the end of its run.
trait Note {
    fn note(&self) -> String;
}

impl Note for SledStore {
    fn note(&self) -> String {
        String::new()
    }
}

impl Note for EngineStore {
    fn note(&self) -> String {
        let p = self.purge_stats();
        format!(
            "{} purges ({} removed {:.0} MiB of engine files), {:.0} ms in all, longest {:.1} ms; engine files now {:.0} MiB (its own count)",
            p.runs,
            p.purged,
            p.bytes as f64 / (1 << 20) as f64,
            p.total.as_secs_f64() * 1e3,
            p.longest.as_secs_f64() * 1e3,
            self.engine_bytes() as f64 / (1 << 20) as f64
        )
    }
}

/// The calls the benchmark makes, object-safe (raft's `Storage::entries` is generic).
trait Bench {
    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError>;
    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StoreError>;
    fn flush(&mut self) -> Result<(), StoreError>;
    fn read(&self, lo: u64, hi: u64, max_size: u64) -> raft::Result<Vec<Entry>>;
    fn writer(&self) -> Option<SnapshotWriter>;
    fn adopt(&mut self, snap: Snapshot) -> Result<bool, StoreError>;
    fn first_index(&self) -> u64;
    fn note(&self) -> String;
}

/// A store, and for `sled-fsync` the file to fdatasync after each flush.
struct Driven<S> {
    store: S,
    sync: Option<std::fs::File>,
}

impl<S: LogStore + Note> Bench for Driven<S> {
    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        self.store.append(entries)
    }
    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StoreError> {
        self.store.set_hard_state(hs)
    }
    fn flush(&mut self) -> Result<(), StoreError> {
        self.store.flush()?;
        if let Some(f) = &self.sync {
            f.sync_data().map_err(|e| StoreError::Engine(format!("fdatasync of sled's db file: {e}")))?;
        }
        Ok(())
    }
    fn read(&self, lo: u64, hi: u64, max_size: u64) -> raft::Result<Vec<Entry>> {
        self.store.entries(lo, hi, max_size, GetEntriesContext::empty(false))
    }
    fn writer(&self) -> Option<SnapshotWriter> {
        self.store.snapshot_writer()
    }
    fn adopt(&mut self, snap: Snapshot) -> Result<bool, StoreError> {
        self.store.adopt_snapshot(snap)
    }
    fn first_index(&self) -> u64 {
        Storage::first_index(&self.store).unwrap_or(0)
    }
    fn note(&self) -> String {
        self.store.note()
    }
}

fn open(kind: &str, dir: &Path) -> Result<Box<dyn Bench>> {
    Ok(match kind {
        "sled" => Box::new(Driven { store: SledStore::open_with_voters(dir, &[1])?, sync: None }),
        SLED_FSYNC => {
            let store = SledStore::open_with_voters(dir, &[1])?;
            let file = std::fs::File::open(dir.join("db")).context("opening sled's db file")?;
            Box::new(Driven { store, sync: Some(file) })
        }
        "engine" => Box::new(Driven { store: EngineStore::open_with_voters(dir, &[1])?, sync: None }),
        other => bail!("unknown store {other:?} (sled, sled-fsync, engine)"),
    })
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Entry data shaped like a job submission: JSON text with a random id, padded to `len`.
fn entry_data(index: u64, len: usize, rng: &mut u64) -> Vec<u8> {
    let mut s = format!(
        r#"{{"v":1,"cmd":"SubmitJob","id":"{:016x}{:016x}","tenant":"team-{}","spec":{{"name":"train-{index}","image":"registry.example/ml/trainer:{}","gpus":{},"priority":{},"args":["--lr","0.0003","--steps","{}"]"#,
        xorshift(rng),
        xorshift(rng),
        index % 37,
        index % 11,
        1 << (index % 4),
        index % 5,
        xorshift(rng) % 100_000,
    );
    while s.len() + 2 < len {
        s.push_str(",\"pad\":\"");
        let n = (len.saturating_sub(s.len() + 3)).min(40);
        for _ in 0..n {
            s.push(char::from(b'a' + (xorshift(rng) % 26) as u8));
        }
        s.push('"');
    }
    s.push_str("}}");
    s.into_bytes()
}

fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    for e in rd.flatten() {
        let Ok(m) = e.metadata() else { continue };
        total += if m.is_dir() { dir_bytes(&e.path()) } else { m.blocks() * 512 };
    }
    total
}

/// One store's run, driven a turn at a time so that the stores take turns on the disk.
struct Runner {
    kind: String,
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    store: Option<Box<dyn Bench>>,
    rng: u64,
    next: u64,
    last_snapshot: u64,
    snapshots: u64,
    /// A snapshot being written on another thread.
    in_flight: Option<mpsc::Receiver<Result<Option<Snapshot>, StoreError>>>,
    /// One that finished between turns, adopted at the start of the next.
    finished: Option<Result<Option<Snapshot>, StoreError>>,
    busy: Duration,
    samples: Vec<Sample>,
}

impl Runner {
    fn new(kind: &str, base: &Path) -> Result<Runner> {
        let tmp = tempfile::Builder::new().prefix(&format!("logstore-{kind}-")).tempdir_in(base)?;
        let dir = tmp.path().join("store");
        let store = open(kind, &dir).with_context(|| format!("opening {kind}"))?;
        Ok(Runner {
            kind: kind.to_owned(),
            _tmp: tmp,
            dir,
            store: Some(store),
            rng: 0x2545_f491_4f6c_dd1d,
            next: 1,
            last_snapshot: 0,
            snapshots: 0,
            in_flight: None,
            finished: None,
            busy: Duration::ZERO,
            samples: Vec::new(),
        })
    }

    fn done(&self, args: &Args) -> bool {
        self.next > args.entries
    }

    /// Batches until the log holds `until` entries (or all of them).
    fn turn(&mut self, args: &Args, blob: &Arc<Vec<u8>>, until: u64) -> Result<()> {
        let kind = self.kind.clone();
        let Some(store) = self.store.as_mut() else { bail!("{kind}: already finished") };
        let until = until.min(args.entries);
        while self.next <= until {
            let t0 = Instant::now();
            // A snapshot written in the background is adopted by the Raft thread, in its cycle.
            let done = match self.finished.take() {
                Some(r) => Some(r),
                None => self.in_flight.as_ref().and_then(|rx| rx.try_recv().ok()),
            };
            if let Some(done) = done {
                self.in_flight = None;
                if let Some(snap) = done? {
                    store.adopt(snap)?;
                    self.snapshots += 1;
                }
            }
            let (lo, hi) = (self.next, (self.next + args.batch).min(args.entries + 1));
            let batch: Vec<Entry> = (lo..hi)
                .map(|i| Entry {
                    index: i,
                    term: 1,
                    data: entry_data(i, args.entry_bytes, &mut self.rng).into(),
                    ..Default::default()
                })
                .collect();
            store.append(&batch)?;
            let last = hi - 1;
            store.set_hard_state(&HardState { term: 1, vote: 1, commit: last, ..Default::default() })?;
            store.flush()?;
            let r0 = Instant::now();
            let got = store.read(lo, hi, 1 << 20)?;
            let read = r0.elapsed();
            if got.len() as u64 != hi - lo || got.first().map(|e| e.index) != Some(lo) {
                bail!("{kind}: read back {} entries of {lo}..{hi}", got.len());
            }
            // Every `snapshot_every` applied entries, a snapshot on another thread.
            if last >= self.last_snapshot + args.snapshot_every && self.in_flight.is_none() {
                if let Some(write) = store.writer() {
                    let mut snap = Snapshot { data: blob.as_ref().clone().into(), ..Default::default() };
                    let meta = snap.mut_metadata();
                    meta.index = last;
                    meta.term = 1;
                    meta.set_conf_state(ConfState { voters: vec![1], ..Default::default() });
                    let (tx, rx) = mpsc::channel();
                    std::thread::spawn(move || {
                        let r = write(&snap).map(|w| w.then_some(snap));
                        let _ = tx.send(r);
                    });
                    self.in_flight = Some(rx);
                }
                self.last_snapshot = last;
            }
            let total = t0.elapsed();
            self.busy += total;
            self.samples.push(Sample { index: last, at: self.busy, total, read });
            self.next = hi;
        }
        // A snapshot still being written finishes before the next store's turn, so that it
        // does not write during another store's batches; it is adopted in this store's next
        // iteration, as if it had just finished.
        if let Some(rx) = self.in_flight.take() {
            self.finished = Some(rx.recv().map_err(|_| anyhow::anyhow!("{kind}: snapshot writer vanished"))?);
        }
        Ok(())
    }

    fn finish(mut self) -> Result<RunResult> {
        let Some(mut store) = self.store.take() else { bail!("{}: already finished", self.kind) };
        if let Some(Ok(Some(snap))) = self.finished.take() {
            store.adopt(snap)?;
            store.flush()?;
            self.snapshots += 1;
        }
        let (first, note) = (store.first_index(), store.note());
        drop(store);
        let disk_bytes = dir_bytes(&self.dir);
        eprintln!(
            "{}: {} entries, {:.1} s busy, {} snapshots adopted, log starts at {first}, {:.1} MiB on disk{}{note}",
            self.kind,
            self.next - 1,
            self.busy.as_secs_f64(),
            self.snapshots,
            disk_bytes as f64 / (1 << 20) as f64,
            if note.is_empty() { "" } else { "; " },
        );
        Ok(RunResult {
            store: self.kind,
            samples: self.samples,
            busy: self.busy,
            disk_bytes,
            snapshots: self.snapshots,
            note,
        })
    }
}

/// One round: every store, taking turns of `--turn` entries each.
fn run_round(order: &[String], args: &Args, base: &Path) -> Result<Vec<RunResult>> {
    let blob: Arc<Vec<u8>> = {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        Arc::new((0..args.snapshot_mib << 20).map(|_| (xorshift(&mut rng) % 64) as u8 + b' ').collect())
    };
    let mut runners = order.iter().map(|k| Runner::new(k, base)).collect::<Result<Vec<_>>>()?;
    let turn = if args.turn == 0 { args.entries } else { args.turn };
    let mut until = 0;
    while runners.iter().any(|r| !r.done(args)) {
        until += turn;
        for r in &mut runners {
            r.turn(args, &blob, until)?;
        }
        if until % 100_000 < turn {
            eprintln!("  {} entries", until.min(args.entries));
        }
    }
    runners.into_iter().map(Runner::finish).collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

/// Figures of the batches whose last index lies in `lo..hi`.
fn phase_row(r: &RunResult, name: &str, lo: u64, hi: u64, batch: u64) -> Vec<String> {
    let s: Vec<Sample> = r.samples.iter().copied().filter(|s| s.index >= lo && s.index < hi).collect();
    let mut totals: Vec<Duration> = s.iter().map(|s| s.total).collect();
    totals.sort();
    let mut reads: Vec<Duration> = s.iter().map(|s| s.read).collect();
    reads.sort();
    // Batches per second over windows of 100 batches, from the wall clock.
    let mut rates: Vec<f64> =
        s.windows(101).step_by(100).map(|w| 100.0 / (w[100].at - w[0].at).as_secs_f64().max(1e-9)).collect();
    rates.sort_by(f64::total_cmp);
    let median_rate = rates.get(rates.len() / 2).copied().unwrap_or(0.0);
    vec![
        r.store.clone(),
        name.to_owned(),
        format!("{median_rate:.0}"),
        format!("{:.0}", median_rate * batch as f64),
        ms(percentile(&totals, 0.5)),
        ms(percentile(&totals, 0.99)),
        ms(totals.last().copied().unwrap_or_default()),
        us(percentile(&reads, 0.5)),
        us(percentile(&reads, 0.99)),
    ]
}

fn print_table(rows: &[Vec<String>], header: &[&str]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let cells: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:>w$}")).collect();
        println!("| {} |", cells.join(" | "));
    };
    line(header.to_vec());
    println!("|{}|", widths.iter().map(|w| format!("{}:", "-".repeat(w + 1))).collect::<Vec<_>>().join("|"));
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base)?;
    println!(
        "logstore: {} entries of ~{} bytes per store, {} per batch (append + hard state + flush + read back), a {} MiB snapshot every {} entries (background writer, adopted when written), stores under {}",
        args.entries,
        args.entry_bytes,
        args.batch,
        args.snapshot_mib,
        args.snapshot_every,
        base.display()
    );
    let mut results = Vec::new();
    for round in 0..args.rounds {
        let mut order = args.stores.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        eprintln!("round {}: {}", round + 1, order.join(", "));
        for r in run_round(&order, &args, &base)? {
            results.push((round + 1, r));
        }
    }
    let n = args.entries;
    let depth = 100_000.min(n);
    let phases = [
        ("first 100k", 0, depth),
        ("middle 100k", n / 2 - depth / 2, n / 2 + depth / 2),
        ("last 100k", n - depth, n + 1),
    ];
    let mut rows = Vec::new();
    for (round, r) in &results {
        for (name, lo, hi) in phases {
            let mut row = phase_row(r, name, lo, hi, args.batch);
            row.insert(0, round.to_string());
            rows.push(row);
        }
    }
    print_table(
        &rows,
        &[
            "round",
            "store",
            "depth",
            "batches/s",
            "entries/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "read p50 us",
            "read p99 us",
        ],
    );
    println!();
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|(round, r)| {
            vec![
                round.to_string(),
                r.store.clone(),
                format!("{:.1}", r.busy.as_secs_f64()),
                format!("{:.0}", r.disk_bytes as f64 / (1 << 20) as f64),
                r.snapshots.to_string(),
            ]
        })
        .collect();
    print_table(&rows, &["round", "store", "busy s", "disk MiB at the end", "snapshots adopted"]);
    for (round, r) in &results {
        if !r.note.is_empty() {
            println!("round {round}, {}: {}", r.store, r.note);
        }
    }
    Ok(())
}
