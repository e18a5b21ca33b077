//! Every target for a bounded number of executions, so that `cargo test --workspace` runs the
//! fuzzers too (without timers: the same inputs on every run).

use crate::driver::{self, Options};
use crate::{ALL, TARGETS};

/// Executions per target in tests: a few seconds in all in a debug build.
const ITERATIONS: u64 = 3_000;

fn fuzz(name: &str) {
    let target = crate::target(name).expect("a target of that name");
    driver::install_panic_hook();
    let opts = Options { time: None, iterations: Some(ITERATIONS), seed: 1, findings_dir: None, record: None };
    let report = driver::run(target, &opts, |_| {});
    assert!(report.executions >= ITERATIONS, "{name} ran {} inputs", report.executions);
    let findings: Vec<String> = report
        .findings
        .iter()
        .map(|f| format!("{} ({} inputs), input {}", f.message, f.count, driver::hex(&f.input, 256)))
        .collect();
    assert!(findings.is_empty(), "{name} panicked:\n{}", findings.join("\n"));
}

#[test]
fn spec_toml() {
    fuzz("spec_toml");
}

#[test]
fn spec_one_line() {
    fuzz("spec_one_line");
}

#[test]
fn grpc_requests() {
    fuzz("grpc_requests");
}

#[test]
fn progress_line() {
    fuzz("progress_line");
}

#[test]
fn cloud_metadata() {
    fuzz("cloud_metadata");
}

#[test]
fn raft_message() {
    fuzz("raft_message");
}

#[test]
fn command_decode() {
    fuzz("command_decode");
}

#[test]
fn snapshot_restore() {
    fuzz("snapshot_restore");
}

#[test]
fn peer_identity() {
    fuzz("peer_identity");
}

#[test]
fn every_target_is_listed_once_with_seeds_that_run_clean() {
    assert_eq!(ALL.len(), TARGETS.len());
    for (t, (name, run)) in ALL.iter().zip(TARGETS) {
        assert_eq!(t.name, *name);
        let seeds = (t.seeds)();
        assert!(!seeds.is_empty(), "{name} has no seeds");
        for seed in &seeds {
            assert!(seed.len() <= t.max_len, "a seed of {name} is over its max_len");
            run(seed);
        }
    }
    let fuzz_targets = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/fuzz_targets");
    for (name, _) in TARGETS {
        let file = fuzz_targets.join(format!("{name}.rs"));
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        assert!(
            text.contains(&format!("tessera_fuzz::{name}(")),
            "{} does not call tessera_fuzz::{name}",
            file.display()
        );
    }
}

/// Seeds should get past the decoders: most of them must be accepted, not refused at the door.
#[test]
fn seeds_reach_past_the_decoders() {
    use crate::targets::Sig;
    let refused = [
        Sig::new("usage").done(),
        Sig::new("raft").add("undecodable").done(),
        Sig::new("raft").add("misaddressed").done(),
    ];
    for t in ALL {
        for (i, seed) in (t.seeds)().iter().enumerate() {
            let sig = (t.probe)(seed);
            assert!(!refused.contains(&sig), "seed {i} of {} is refused before it is decoded", t.name);
        }
    }
}

/// Every request seed decodes and passes the server's first checks (it reaches the state).
#[test]
fn request_seeds_are_accepted() {
    use crate::targets::{REQUESTS, Sig, request};
    let mut kinds = std::collections::BTreeSet::new();
    for seed in crate::seeds::grpc_requests() {
        let name = REQUESTS[usize::from(seed[0]) % REQUESTS.len()];
        kinds.insert(name);
        assert!(request(name, &seed[1..], Sig::new(name)).is_ok(), "the {name} seed is refused");
    }
    let missing: Vec<_> = REQUESTS.iter().filter(|r| !kinds.contains(*r)).collect();
    assert!(missing.is_empty(), "no seed for {missing:?}");
}
