//! The Raft log stores side by side at depth (issue 13): `SledStore` against `EngineStore`
//! (raft-engine), in one run, on the same disk. sled's flush is `sync_file_range`, not an
//! fsync (see `SyncedSled`), so a third variant, `sled-fsync`, adds the fdatasync that makes
//! it durable, for a like-for-like comparison.
//!
//! ```text
//! cargo build --release -p tessera-benches --bin logstore
//! ./target/release/logstore                  # 1,000,000 entries per store, one round
//! ./target/release/logstore --rounds 2       # two rounds, alternating which store goes first
//! ```
//!
//! For each store, in a fresh directory, it does what a server's Raft thread does for each
//! Ready under a deep queue: append a batch (`--batch` entries of about `--entry-bytes` bytes,
//! the size of a job submission), store the hard state, flush (the fsync), and read the batch
//! back with a size limit, as the leader does to replicate it. Every `--snapshot-every`
//! entries a snapshot of `--snapshot-mib` MiB is written on another thread by the store's
//! snapshot writer and adopted (the log compacted) when it is done, as the server does. It
//! goes on until `--entries` entries have been appended.
//!
//! It prints, per store and for the first 100k entries, the 100k around the middle and the last
//! 100k: batches per second (the median over windows of 100 batches), the p50, p99 and max
//! time of one batch (append + hard state + flush + read back), the p50 and p99 of the read
//! alone, and at the end the disk the store's directory takes.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use raft::{GetEntriesContext, Storage};
use tessera_raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use tessera_raft::storage::engine_store::EngineStore;
use tessera_raft::storage::sled_store::SledStore;
use tessera_raft::storage::{LogStore, StoreError};

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
    /// Rounds; each round runs every store once, and the first store alternates.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Stores to run, in the first round's order: `sled` (SledStore as the server uses it),
    /// `sled-fsync` (the same plus an fdatasync of sled's file at each flush), `engine`.
    #[arg(long, value_delimiter = ',', default_value = "sled,sled-fsync,engine")]
    stores: Vec<String>,
    /// Directory under which each store gets a fresh directory (removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// One batch's times.
#[derive(Clone, Copy)]
struct Sample {
    /// The last index after the batch.
    index: u64,
    /// When the batch ended, from the start of the run.
    at: Duration,
    /// append + hard state + flush + read back.
    total: Duration,
    read: Duration,
}

struct RunResult {
    store: String,
    samples: Vec<Sample>,
    elapsed: Duration,
    disk_bytes: u64,
    snapshots: u64,
}

fn open(kind: &str, dir: &Path) -> Result<Box<dyn Bench>> {
    Ok(match kind {
        "sled" => Box::new(SledStore::open_with_voters(dir, &[1])?),
        "engine" => Box::new(EngineStore::open_with_voters(dir, &[1])?),
        "sled-fsync" => {
            let store = SledStore::open_with_voters(dir, &[1])?;
            let file = std::fs::File::open(dir.join("db")).context("opening sled's db file")?;
            Box::new(SyncedSled { store, file })
        }
        other => bail!("unknown store {other:?} (sled, sled-fsync, engine)"),
    })
}

/// A LogStore behind a box (raft's `Storage::entries` is generic, so not object-safe).
trait Bench {
    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError>;
    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StoreError>;
    fn flush(&mut self) -> Result<(), StoreError>;
    fn read(&self, lo: u64, hi: u64, max_size: u64) -> raft::Result<Vec<Entry>>;
    fn writer(&self) -> Option<tessera_raft::storage::SnapshotWriter>;
    fn adopt(&mut self, snap: Snapshot) -> Result<bool, StoreError>;
    fn first_index(&self) -> u64;
}

impl<S: LogStore> Bench for S {
    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        LogStore::append(self, entries)
    }
    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StoreError> {
        LogStore::set_hard_state(self, hs)
    }
    fn flush(&mut self) -> Result<(), StoreError> {
        LogStore::flush(self)
    }
    fn read(&self, lo: u64, hi: u64, max_size: u64) -> raft::Result<Vec<Entry>> {
        Storage::entries(self, lo, hi, max_size, GetEntriesContext::empty(false))
    }
    fn writer(&self) -> Option<tessera_raft::storage::SnapshotWriter> {
        LogStore::snapshot_writer(self)
    }
    fn adopt(&mut self, snap: Snapshot) -> Result<bool, StoreError> {
        LogStore::adopt_snapshot(self, snap)
    }
    fn first_index(&self) -> u64 {
        Storage::first_index(self).unwrap_or(0)
    }
}

/// sled 0.34's flush on Linux ends in `sync_file_range`, which neither writes the file's
/// metadata (its growing length) nor flushes the disk's write cache: enough for kill -9, not
/// for a power cut. This variant adds the fdatasync that makes it durable, for a like-for-like
/// comparison with raft-engine, which fdatasyncs.
struct SyncedSled {
    store: SledStore,
    file: std::fs::File,
}

impl Bench for SyncedSled {
    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        LogStore::append(&mut self.store, entries)
    }
    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StoreError> {
        LogStore::set_hard_state(&mut self.store, hs)
    }
    fn flush(&mut self) -> Result<(), StoreError> {
        LogStore::flush(&mut self.store)?;
        self.file.sync_data().map_err(|e| StoreError::Engine(format!("fdatasync of sled's db file: {e}")))
    }
    fn read(&self, lo: u64, hi: u64, max_size: u64) -> raft::Result<Vec<Entry>> {
        Storage::entries(&self.store, lo, hi, max_size, GetEntriesContext::empty(false))
    }
    fn writer(&self) -> Option<tessera_raft::storage::SnapshotWriter> {
        LogStore::snapshot_writer(&self.store)
    }
    fn adopt(&mut self, snap: Snapshot) -> Result<bool, StoreError> {
        LogStore::adopt_snapshot(&mut self.store, snap)
    }
    fn first_index(&self) -> u64 {
        Storage::first_index(&self.store).unwrap_or(0)
    }
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

fn run_one(kind: &str, args: &Args, base: &Path) -> Result<RunResult> {
    let tmp = tempfile::Builder::new().prefix(&format!("logstore-{kind}-")).tempdir_in(base)?;
    let dir = tmp.path().join("store");
    let mut store = open(kind, &dir).with_context(|| format!("opening {kind}"))?;
    let conf = ConfState { voters: vec![1], ..Default::default() };
    let blob: Vec<u8> = {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        (0..args.snapshot_mib << 20).map(|_| (xorshift(&mut rng) % 64) as u8 + b' ').collect()
    };
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut samples = Vec::with_capacity((args.entries / args.batch + 1) as usize);
    let mut next = 1u64;
    let mut last_snapshot = 0u64;
    let mut snapshots = 0;
    let mut in_flight: Option<mpsc::Receiver<Result<Option<Snapshot>, StoreError>>> = None;
    let started = Instant::now();
    while next <= args.entries {
        let t0 = Instant::now();
        // A snapshot written in the background is adopted by the Raft thread, in its cycle.
        if let Some(rx) = &in_flight
            && let Ok(done) = rx.try_recv()
        {
            in_flight = None;
            if let Some(snap) = done? {
                store.adopt(snap)?;
                snapshots += 1;
            }
        }
        let hi = (next + args.batch).min(args.entries + 1);
        let batch: Vec<Entry> = (next..hi)
            .map(|i| Entry { index: i, term: 1, data: entry_data(i, args.entry_bytes, &mut rng).into(), ..Default::default() })
            .collect();
        store.append(&batch)?;
        let last = hi - 1;
        store.set_hard_state(&HardState { term: 1, vote: 1, commit: last, ..Default::default() })?;
        store.flush()?;
        let r0 = Instant::now();
        let got = store.read(next, hi, 1 << 20)?;
        let read = r0.elapsed();
        if got.len() as u64 != hi - next || got.first().map(|e| e.index) != Some(next) {
            bail!("{kind}: read back {} entries of {next}..{hi}", got.len());
        }
        // Every `snapshot_every` applied entries, a snapshot on another thread.
        if last >= last_snapshot + args.snapshot_every && in_flight.is_none() {
            if let Some(write) = store.writer() {
                let mut snap = Snapshot { data: blob.clone().into(), ..Default::default() };
                let meta = snap.mut_metadata();
                meta.index = last;
                meta.term = 1;
                meta.set_conf_state(conf.clone());
                let (tx, rx) = mpsc::channel();
                std::thread::spawn(move || {
                    let r = write(&snap).map(|w| w.then_some(snap));
                    let _ = tx.send(r);
                });
                in_flight = Some(rx);
            }
            last_snapshot = last;
        }
        samples.push(Sample { index: last, at: started.elapsed(), total: t0.elapsed(), read });
        next = hi;
    }
    let elapsed = started.elapsed();
    // Let the last snapshot finish and be adopted, as the server would.
    if let Some(rx) = in_flight.take()
        && let Ok(Some(snap)) = rx.recv()?
    {
        store.adopt(snap)?;
        store.flush()?;
        snapshots += 1;
    }
    let first = store.first_index();
    drop(store);
    let disk_bytes = dir_bytes(&dir);
    eprintln!(
        "{kind}: {} entries in {:.1} s, {snapshots} snapshots adopted, log starts at {first}, {:.1} MiB on disk",
        args.entries,
        elapsed.as_secs_f64(),
        disk_bytes as f64 / (1 << 20) as f64
    );
    Ok(RunResult { store: kind.to_owned(), samples, elapsed, disk_bytes, snapshots })
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
    let mut rates: Vec<f64> = s
        .windows(101)
        .step_by(100)
        .map(|w| 100.0 / (w[100].at - w[0].at).as_secs_f64().max(1e-9))
        .collect();
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
        for kind in &order {
            eprintln!("round {}: {kind}", round + 1);
            results.push((round + 1, run_one(kind, &args, &base)?));
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
            row.push(format!("{:.0}", r.disk_bytes as f64 / (1 << 20) as f64));
            row.push(format!("{:.0}", r.elapsed.as_secs_f64()));
            row.push(r.snapshots.to_string());
            rows.push(row);
        }
    }
    print_table(
        &rows,
        &[
            "round",
            "store",
            "entries",
            "batches/s",
            "entries/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "read p50 us",
            "read p99 us",
            "disk MiB",
            "total s",
            "snapshots",
        ],
    );
    Ok(())
}
