//! The stable-toolchain fuzzer: run a target on its seeds, then on seeded mutations of its
//! corpus for a time or a number of executions, catching each panic with its input.
//!
//! There is no coverage instrumentation on stable Rust. Instead an input joins the corpus when
//! its outcome signature ([`crate::Target::probe`]) is new: a new error field, a new message
//! kind, a command that applied. That keeps mutating from inputs that got further.
//!
//! The sequence of inputs depends only on the seed, so a run that died outright (a stack
//! overflow or an allocation failure, which no `catch_unwind` sees) can be run again up to the
//! same point with each input written to disk first: the binary does that (see `main.rs`).

use std::collections::{BTreeMap, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::Target;
use crate::mutate::{Mutator, Rng};

/// Most inputs kept in a target's corpus.
const MAX_CORPUS: usize = 4096;
/// The stack the targets run on: a tokio worker's, where the server decodes what it receives.
pub const STACK_BYTES: usize = 2 * 1024 * 1024;
/// An input that takes longer than this is a finding too (a hang in waiting).
pub const SLOW_INPUT: Duration = Duration::from_secs(5);

/// How long and how to run one target.
#[derive(Debug, Clone)]
pub struct Options {
    /// Stop after this long (the seeds always run).
    pub time: Option<Duration>,
    /// Stop after this many executions.
    pub iterations: Option<u64>,
    /// Seed of the mutations.
    pub seed: u64,
    /// Where findings are written (`<target>-<hash>.bin`); None: not written.
    pub findings_dir: Option<PathBuf>,
    /// Write each input to this file before running it, from this execution on (to capture an
    /// input that kills the process).
    pub record: Option<(u64, PathBuf)>,
}

/// A panic and the input that caused it.
#[derive(Debug, Clone)]
pub struct Finding {
    /// The panic message, with where it happened.
    pub message: String,
    /// The input.
    pub input: Vec<u8>,
    /// Where the input was saved.
    pub path: Option<PathBuf>,
    /// Inputs that panicked the same way.
    pub count: u64,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Report {
    /// Target name.
    pub target: &'static str,
    /// Inputs run.
    pub executions: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Distinct panics (by message, digits aside).
    pub findings: Vec<Finding>,
    /// Corpus size at the end.
    pub corpus: usize,
}

impl Report {
    /// Executions per second.
    pub fn rate(&self) -> f64 {
        self.executions as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Where the last panic on this thread happened, set by the driver's panic hook.
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Silence the default panic output (every caught panic would print) and remember where each
/// panic happened instead.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let place = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = Some(place);
        }
    }));
}

/// The panic's message and where it happened.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> (String, String) {
    let text = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    };
    let place = LAST_PANIC.lock().ok().and_then(|mut l| l.take()).unwrap_or_default();
    (text, place)
}

/// The same panic at another value: the same place, and the message without its digits.
fn panic_key(text: &str, place: &str) -> String {
    let text: String = text.chars().filter(|c| !c.is_ascii_digit()).take(160).collect();
    format!("{place} {text}")
}

/// FNV-1a of an input, for file names.
pub fn input_hash(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// Lowercase hex of `data`, cut at `max` bytes.
pub fn hex(data: &[u8], max: usize) -> String {
    let mut s: String = data.iter().take(max).map(|b| format!("{b:02x}")).collect();
    if data.len() > max {
        s.push_str(&format!("... ({} bytes)", data.len()));
    }
    s
}

/// Save a finding's input as `<dir>/<target>-<hash>.bin`.
pub fn save(dir: &Path, target: &str, input: &[u8]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{target}-{:016x}.bin", input_hash(input)));
    std::fs::write(&path, input)?;
    Ok(path)
}

/// Run `target` as `opts` says; `progress` hears the number of executions now and then.
pub fn run(target: &Target, opts: &Options, mut progress: impl FnMut(u64)) -> Report {
    let started = Instant::now();
    let mut rng = Rng::new(opts.seed ^ crate::driver::input_hash(target.name.as_bytes()));
    let mutator = Mutator { dictionary: target.dictionary, max_len: target.max_len };
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    let mut seen: HashSet<u64> = HashSet::new();
    let mut findings: BTreeMap<String, Finding> = BTreeMap::new();
    let mut executions: u64 = 0;

    let mut exec = |input: &[u8], executions: &mut u64| -> Option<u64> {
        if let Some((from, path)) = &opts.record
            && *executions >= *from
        {
            // Best effort: the replay is only as good as this write.
            let _ = std::fs::write(path, input);
        }
        *executions += 1;
        let t = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| (target.probe)(input)));
        let took = t.elapsed();
        let (text, place) = match outcome {
            Ok(sig) if took <= SLOW_INPUT => return Some(sig),
            Ok(_) => {
                (format!("slow input: {} ms (limit {} ms)", took.as_millis(), SLOW_INPUT.as_millis()), String::new())
            }
            Err(payload) => panic_message(payload.as_ref()),
        };
        let key = panic_key(&text, &place);
        let message = if place.is_empty() { text } else { format!("{text} (at {place})") };
        match findings.get_mut(&key) {
            Some(f) => {
                f.count += 1;
                // Keep the shortest input: the easiest to read.
                if input.len() < f.input.len() {
                    f.input = input.to_vec();
                }
            }
            None => {
                findings.insert(key, Finding { message, input: input.to_vec(), path: None, count: 1 });
            }
        }
        None
    };

    for seed in (target.seeds)() {
        if let Some(sig) = exec(&seed, &mut executions)
            && seen.insert(sig)
        {
            corpus.push(seed.clone());
        } else if corpus.is_empty() {
            corpus.push(seed);
        }
    }
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    let seeds = corpus.len();
    progress(executions);

    let done = |executions: u64| {
        opts.iterations.is_some_and(|n| executions >= n) || opts.time.is_some_and(|t| started.elapsed() >= t)
    };
    while !done(executions) {
        for _ in 0..256 {
            // A seed one time in four: seeds are the shapes (every request kind, every command),
            // and a corpus grown from a few of them would crowd the rest out.
            let base = if rng.one_in(4) { &corpus[rng.below(seeds)] } else { &corpus[rng.below(corpus.len())] };
            let other = &corpus[rng.below(corpus.len())];
            let mut input = base.clone();
            let framed = match target.protobuf_after {
                Some(skip) if input.len() >= skip && rng.one_in(2) => {
                    let mut body = input.split_off(skip);
                    let ok = mutator.mutate_proto(&mut rng, &mut body, 0);
                    input.extend(body);
                    ok
                }
                _ => false,
            };
            if !framed {
                mutator.mutate(&mut rng, &mut input, other);
            }
            input.truncate(target.max_len);
            if let Some(sig) = exec(&input, &mut executions)
                && seen.insert(sig)
            {
                if corpus.len() < MAX_CORPUS {
                    corpus.push(input);
                } else {
                    // Full: the new input takes the place of one found earlier (seeds stay).
                    let i = seeds + rng.below(corpus.len() - seeds);
                    corpus[i] = input;
                }
            }
            if opts.iterations.is_some_and(|n| executions >= n) {
                break;
            }
        }
        progress(executions);
    }

    let mut findings: Vec<Finding> = findings.into_values().collect();
    if let Some(dir) = &opts.findings_dir {
        for f in &mut findings {
            f.path = save(dir, target.name, &f.input).ok();
        }
    }
    Report { target: target.name, executions, elapsed: started.elapsed(), findings, corpus: corpus.len() }
}
