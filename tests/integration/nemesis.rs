//! deploy/nemesis end to end, short and seeded: `deploy/nemesis/run.sh --minutes 1.5 --seed 1`
//! brings up the compose cluster under a project of its own (tessera-nemesis-PID, free ports),
//! runs its client workload while faults are injected (kill -9 of a server and of the leader,
//! partitions, frozen containers, an agent host restarted with its disk wiped), heals, waits for
//! every job to end, and checks: no acknowledged job lost or duplicated, every job ended, no GPU
//! under two attempts, no shard running as two processes, shards that lost their host resumed
//! from their checkpoint in the object store (docs/nemesis.md). It exits 1 on a violation; the
//! test fails then, with its report.
//!
//! It runs only with `TESSERA_NEMESIS=1` (not yet in CI: see docs/nemesis.md). Like
//! `compose.rs`, it reaches nothing outside the machine (build.sh --offline) and says why
//! and passes without docker, compose, the prepared images, nsenter and iptables, or a Python
//! with the client (TESSERA_CLIENT_PYTHON), unless `TESSERA_REQUIRE_DOCKER=1`. run.sh removes
//! its cluster and image whatever happens (a trap); the test checks that nothing is left.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use tessera_tests::{python_with, tessera_bin, workspace_root};

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program).args(args).output().is_ok_and(|o| o.status.success())
}

/// Say why the test skips; a failure instead with `TESSERA_REQUIRE_DOCKER=1`.
fn skip(why: impl std::fmt::Display) {
    assert!(std::env::var("TESSERA_REQUIRE_DOCKER").as_deref() != Ok("1"), "TESSERA_REQUIRE_DOCKER=1 but {why}");
    eprintln!("{why}: skipping the nemesis test (TESSERA_REQUIRE_DOCKER=1 makes this a failure)");
}

/// What is missing for run.sh, if anything.
fn missing() -> Option<&'static str> {
    if !succeeds("docker", &["info"]) {
        Some("docker is missing or its engine does not answer (docker info)")
    } else if !succeeds("docker-compose", &["version"]) && !succeeds("docker", &["compose", "version"]) {
        Some("neither docker-compose nor docker compose is installed")
    } else if !succeeds("nsenter", &["--version"]) || !succeeds("iptables", &["--version"]) {
        Some("nsenter or iptables is missing (the partitions need them)")
    } else {
        None
    }
}

/// Containers, volumes and networks of this run's project (labels set by compose).
fn leftovers(project: &str) -> Vec<String> {
    let label = format!("label=com.docker.compose.project={project}");
    let mut left = Vec::new();
    for what in [["ps", "-a", "{{.Names}}"], ["volume", "ls", "{{.Name}}"], ["network", "ls", "{{.Name}}"]] {
        let o = Command::new("docker").args(&what[..2]).args(["--filter", &label, "--format", what[2]]).output();
        if let Ok(o) = o {
            left.extend(String::from_utf8_lossy(&o.stdout).lines().filter(|l| !l.is_empty()).map(str::to_string));
        }
    }
    left
}

#[test]
fn faults_across_hosts_lose_no_acknowledged_job_and_run_no_shard_twice() {
    // Opt-in for now: it holds two cores for minutes beside the other tests, and its first runs
    // found product bugs not all fixed yet (docs/nemesis.md). CI does not set it yet.
    if std::env::var("TESSERA_NEMESIS").as_deref() != Ok("1") {
        eprintln!("TESSERA_NEMESIS is not 1: skipping the nemesis run (bash deploy/nemesis/run.sh runs it by hand)");
        return;
    }
    let root = workspace_root();
    let bin = tessera_bin();
    let target = bin.parent().and_then(Path::parent).expect("target directory").to_path_buf();
    if let Some(why) = missing() {
        return skip(why);
    }
    let Some(py) = python_with("TESSERA_CLIENT_PYTHON", "import tessera_client, grpc") else {
        return skip("no Python with tessera_client and grpc (TESSERA_CLIENT_PYTHON)");
    };
    let out = tempfile::tempdir().expect("temp dir");
    let log = std::fs::File::create(out.path().join("run.log")).expect("run.log");
    let t0 = Instant::now();
    let mut child = Command::new("bash")
        .arg(root.join("deploy/nemesis/run.sh"))
        .args(["--minutes", "1.5", "--seed", "1", "--drain-timeout", "60", "--bin"])
        .arg(&bin)
        .arg("--out")
        .arg(out.path())
        .env("CARGO_TARGET_DIR", &target)
        .env("TESSERA_CLIENT_PYTHON", &py)
        .stdout(log.try_clone().expect("run.log"))
        .stderr(log)
        .spawn()
        .expect("run deploy/nemesis/run.sh");
    let pid = child.id();
    let status = child.wait().expect("wait for run.sh");
    eprintln!("deploy/nemesis/run.sh: {status} after {:.0} s", t0.elapsed().as_secs_f64());
    let project = format!("tessera-nemesis-{pid}");
    let left = leftovers(&project);
    assert!(left.is_empty(), "run.sh left {project}'s {left:?} behind");
    let images = Command::new("docker").args(["images", "-q", &format!("tessera-nemesis:{pid}")]).output();
    assert!(images.is_ok_and(|o| o.stdout.is_empty()), "run.sh left its image tessera-nemesis:{pid} behind");
    if status.code() == Some(3) {
        return skip("the images are not prepared (bash deploy/docker/build.sh --prepare)");
    }
    let run_log = std::fs::read_to_string(out.path().join("run.log")).unwrap_or_default();
    let report = std::fs::read_to_string(out.path().join("report.txt")).unwrap_or_default();
    assert!(status.success(), "the nemesis checker failed ({status}):\n{run_log}");
    eprintln!("{report}");
    assert!(report.contains("no violations"), "{report}");
}
