//! `tessera-fuzz`: the stable-toolchain fuzz driver.
//!
//! ```text
//! tessera-fuzz [--seconds N] [--iterations N] [--target NAME]... [--seed S] [--findings DIR]
//! tessera-fuzz --list
//! tessera-fuzz --target NAME --input FILE   # run one input again (a finding), panics shown
//! tessera-fuzz --write-corpus DIR      # the seeds as files, DIR/<target>/seed-N, for cargo fuzz
//! ```
//!
//! Each target runs in a child process of its own (this binary with `--worker`), so that an
//! input that kills the process outright (stack overflow, failed allocation, abort) is a
//! finding too: the child is run again with the same seed up to the point it died, writing each
//! input to disk first, and the last one written is the input. Prints executions, executions per
//! second and findings per target; exits 1 when anything was found.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_fuzz::driver::{self, Options, hex};
use tessera_fuzz::{ALL, target};

/// Memory a worker may map: a target that asks for more fails (a finding) instead of taking
/// the machine.
const WORKER_MEMORY: u64 = 8 * 1024 * 1024 * 1024;

struct Args {
    seconds: f64,
    iterations: Option<u64>,
    targets: Vec<String>,
    seed: u64,
    findings: PathBuf,
    list: bool,
    write_corpus: Option<PathBuf>,
    input: Option<PathBuf>,
    worker: bool,
    record_after: Option<u64>,
}

const USAGE: &str = "usage: tessera-fuzz [--seconds N (per target, default 10)] [--iterations N] \
[--target NAME]... [--seed S] [--findings DIR] | --list | --write-corpus DIR | --target NAME --input FILE";

fn parse_args() -> Result<Args, String> {
    let findings = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    let mut a = Args {
        seconds: 10.0,
        iterations: None,
        targets: Vec::new(),
        seed: 0x7e55_e7a0,
        findings: findings.join("fuzz-findings"),
        list: false,
        write_corpus: None,
        input: None,
        worker: false,
        record_after: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| inline.clone().or_else(|| it.next()).ok_or(format!("{name}: needs a value"));
        match flag.as_str() {
            "--seconds" => {
                let v = value("--seconds")?;
                a.seconds = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                    .ok_or(format!("--seconds: '{v}' is not a number of seconds"))?;
            }
            "--iterations" => {
                let v = value("--iterations")?;
                a.iterations = Some(v.parse().map_err(|_| format!("--iterations: '{v}' is not a count"))?);
            }
            "--target" => {
                for name in value("--target")?.split(',').filter(|n| !n.is_empty()) {
                    if target(name).is_none() {
                        let names: Vec<_> = ALL.iter().map(|t| t.name).collect();
                        return Err(format!("--target: no target '{name}' (targets: {})", names.join(", ")));
                    }
                    a.targets.push(name.to_string());
                }
            }
            "--seed" => {
                let v = value("--seed")?;
                a.seed = v.parse().map_err(|_| format!("--seed: '{v}' is not a number"))?;
            }
            "--findings" => a.findings = PathBuf::from(value("--findings")?),
            "--write-corpus" => a.write_corpus = Some(PathBuf::from(value("--write-corpus")?)),
            "--input" => a.input = Some(PathBuf::from(value("--input")?)),
            "--list" => a.list = true,
            "--worker" => a.worker = true,
            "--record-after" => {
                let v = value("--record-after")?;
                a.record_after = Some(v.parse().map_err(|_| format!("--record-after: '{v}' is not a count"))?);
            }
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument '{other}'\n{USAGE}")),
        }
    }
    if a.targets.is_empty() {
        a.targets = ALL.iter().map(|t| t.name.to_string()).collect();
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if args.list {
        for t in ALL {
            println!("{}", t.name);
        }
        return ExitCode::SUCCESS;
    }
    if let Some(dir) = &args.write_corpus {
        return write_corpus(dir, &args.targets);
    }
    if let Some(file) = &args.input {
        return replay(&args, file);
    }
    if args.worker {
        return worker(&args);
    }
    parent(&args)
}

fn write_corpus(dir: &std::path::Path, targets: &[String]) -> ExitCode {
    for name in targets {
        let Some(t) = target(name) else { continue };
        let sub = dir.join(name);
        if let Err(e) = std::fs::create_dir_all(&sub) {
            eprintln!("{}: {e}", sub.display());
            return ExitCode::FAILURE;
        }
        for (i, seed) in (t.seeds)().iter().enumerate() {
            let path = sub.join(format!("seed-{i:02}"));
            if let Err(e) = std::fs::write(&path, seed) {
                eprintln!("{}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
        println!("{}: {} seeds", sub.display(), (t.seeds)().len());
    }
    ExitCode::SUCCESS
}

/// Run one saved input through its target on a server-sized stack, with the panic shown.
fn replay(args: &Args, file: &std::path::Path) -> ExitCode {
    let [name] = args.targets.as_slice() else {
        eprintln!("--input: name the one target it is for with --target");
        return ExitCode::from(2);
    };
    let Some(t) = target(name) else { return ExitCode::from(2) };
    let data = match std::fs::read(file) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    println!("{name}: {} bytes: {}", data.len(), hex(&data, 96));
    let run = std::thread::Builder::new().stack_size(driver::STACK_BYTES).spawn(move || (t.probe)(&data));
    match run.map(|h| h.join()) {
        Ok(Ok(_)) => {
            println!("{name}: no panic");
            ExitCode::SUCCESS
        }
        _ => ExitCode::FAILURE,
    }
}

/// In the child: run one target, report progress and findings on stdout, one line each.
fn worker(args: &Args) -> ExitCode {
    let Some(t) = args.targets.first().and_then(|n| target(n)) else { return ExitCode::from(2) };
    let limit = WORKER_MEMORY;
    if let Err(e) = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_AS, limit, limit) {
        eprintln!("could not limit the worker's memory: {e}");
    }
    driver::install_panic_hook();
    let pending = pending_path(args, t.name);
    if args.record_after.is_some()
        && let Err(e) = std::fs::create_dir_all(&args.findings)
    {
        eprintln!("{}: {e}", args.findings.display());
    }
    let opts = Options {
        time: args.iterations.is_none().then(|| Duration::from_secs_f64(args.seconds)),
        iterations: args.iterations,
        seed: args.seed,
        findings_dir: Some(args.findings.clone()),
        record: args.record_after.map(|n| (n, pending)),
    };
    // On a thread with the stack of a tokio worker (2 MiB), where the server decodes requests:
    // input nested deeply enough to overflow it is a finding, as it would be in the server.
    let run = std::thread::Builder::new().stack_size(driver::STACK_BYTES).spawn(move || {
        let mut out = std::io::stdout().lock();
        driver::run(t, &opts, |n| {
            let _ = writeln!(out, "progress {n}");
            let _ = out.flush();
        })
    });
    let report = match run.map(|h| h.join()) {
        Ok(Ok(report)) => report,
        _ => return ExitCode::from(3),
    };
    let mut out = std::io::stdout().lock();
    for f in &report.findings {
        let path = f.path.as_ref().map_or_else(|| "-".to_string(), |p| p.display().to_string());
        let _ = writeln!(out, "finding {} {} {}", f.count, path, f.message.replace('\n', " "));
    }
    let _ = writeln!(out, "result {} {} {}", report.executions, report.elapsed.as_secs_f64(), report.corpus);
    ExitCode::SUCCESS
}

fn pending_path(args: &Args, target: &str) -> PathBuf {
    args.findings.join(format!(".{target}-pending.bin"))
}

/// What a worker said before it ended.
#[derive(Default)]
struct Heard {
    progress: u64,
    findings: Vec<(u64, String, String)>,
    result: Option<(u64, f64, usize)>,
}

/// A worker that reports no progress for this long is stuck on one input: it is killed, and
/// that is a finding.
const STUCK: Duration = Duration::from_secs(60);

/// Run one worker for `target`; `record_after` runs it again to capture an input (see
/// `driver::Options::record`), up to `iterations` executions.
fn spawn_worker(
    args: &Args,
    target: &str,
    iterations: Option<u64>,
    record_after: Option<u64>,
) -> std::io::Result<(Heard, std::process::ExitStatus)> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("--worker")
        .args(["--target", target])
        .args(["--seed", &args.seed.to_string()])
        .args(["--seconds", &args.seconds.to_string()])
        .arg("--findings")
        .arg(&args.findings)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(n) = iterations {
        cmd.args(["--iterations", &n.to_string()]);
    }
    if let Some(n) = record_after {
        cmd.args(["--record-after", &n.to_string()]);
    }
    let mut child = cmd.spawn()?;
    // A watchdog kills the worker when it stops reporting progress.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let beat = Arc::new(Mutex::new(Some(Instant::now())));
    let watchdog = {
        let beat = beat.clone();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(200));
                let Ok(last) = beat.lock().map(|b| *b) else { return };
                match last {
                    None => return,
                    Some(t) if t.elapsed() > STUCK => {
                        eprintln!("the worker reported nothing for {} s: killing it", STUCK.as_secs());
                        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                        return;
                    }
                    Some(_) => {}
                }
            }
        })
    };
    let mut heard = Heard::default();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(mut b) = beat.lock() {
                *b = Some(Instant::now());
            }
            let mut words = line.splitn(2, ' ');
            match (words.next(), words.next()) {
                (Some("progress"), Some(n)) => heard.progress = n.trim().parse().unwrap_or(heard.progress),
                (Some("finding"), Some(rest)) => {
                    let mut parts = rest.splitn(3, ' ');
                    let count = parts.next().and_then(|c| c.parse().ok()).unwrap_or(1);
                    let path = parts.next().unwrap_or("-").to_string();
                    let message = parts.next().unwrap_or("").to_string();
                    heard.findings.push((count, path, message));
                }
                (Some("result"), Some(rest)) => {
                    let v: Vec<&str> = rest.split(' ').collect();
                    if let [execs, secs, corpus] = v.as_slice() {
                        heard.result = Some((
                            execs.parse().unwrap_or(0),
                            secs.parse().unwrap_or(0.0),
                            corpus.parse().unwrap_or(0),
                        ));
                    }
                }
                _ => {}
            }
        }
    }
    let status = child.wait();
    if let Ok(mut b) = beat.lock() {
        *b = None;
    }
    let _ = watchdog.join();
    Ok((heard, status?))
}

fn parent(args: &Args) -> ExitCode {
    let budget = args.iterations.map_or_else(|| format!("{} s", args.seconds), |n| format!("{n} executions"));
    println!("tessera-fuzz: seed {}, {budget} per target, findings in {}", args.seed, args.findings.display());
    println!("{:<18} {:>12} {:>10} {:>8} {:>9}", "target", "executions", "exec/s", "corpus", "findings");
    let started = Instant::now();
    let mut total_findings = 0;
    for name in &args.targets {
        let (heard, status) = match spawn_worker(args, name, args.iterations, None) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("{name}: could not run the worker: {e}");
                return ExitCode::from(2);
            }
        };
        let mut findings = heard.findings.clone();
        let (execs, secs, corpus) = match heard.result {
            Some(r) => r,
            None => {
                // The worker died: run it again to the same point, writing each input first.
                let note = format!("{name}: the worker died ({status}) after about {} executions", heard.progress);
                eprintln!("{note}; running it again to capture the input");
                let pending = pending_path(args, name);
                let _ = std::fs::remove_file(&pending);
                // It died within one progress step (256 executions) of what it last reported.
                let until = heard.progress + 1024;
                let input = match spawn_worker(args, name, Some(until), Some(heard.progress)) {
                    Ok((again, _)) if again.result.is_none() => std::fs::read(&pending).ok(),
                    _ => None,
                };
                let message = format!("the process died: {status}");
                let path = match input {
                    Some(input) => {
                        let _ = std::fs::remove_file(&pending);
                        driver::save(&args.findings, name, &input)
                            .map_or_else(|e| format!("(not saved: {e})"), |p| p.display().to_string())
                    }
                    None => "(the run again did not die: no input)".to_string(),
                };
                findings.push((1, path, message));
                (heard.progress, 0.0, 0)
            }
        };
        let rate = if secs > 0.0 { execs as f64 / secs } else { 0.0 };
        println!("{name:<18} {execs:>12} {rate:>10.0} {corpus:>8} {:>9}", findings.len());
        for (count, path, message) in &findings {
            println!("  FINDING ({count} inputs): {message}");
            println!("    input: {path}");
            if let Ok(input) = std::fs::read(path) {
                println!("    hex:   {}", hex(&input, 96));
            }
        }
        total_findings += findings.len();
    }
    println!("{} targets in {:.1} s, {total_findings} findings", args.targets.len(), started.elapsed().as_secs_f64());
    if total_findings > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
