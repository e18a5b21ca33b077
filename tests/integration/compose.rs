//! deploy/docker and deploy/compose end to end: `deploy/docker/build.sh` builds an image from the
//! binary these tests use, `docker-compose up` starts the cluster of deploy/compose/compose.yaml
//! (three servers, three agents on "aws" and "azure", the object store, certificates made at
//! first start) under a project name of its own, and a job submitted from this host through the
//! published ports, with the admin certificate copied out of the certs volume, runs to success.
//! `down -v` always runs, and the image is removed, even when the test fails.
//!
//! The test reaches nothing outside this machine: the root filesystem (debootstrap, from the
//! Debian mirror) and the object store's image (moto, from PyPI) are made ahead by
//! `bash deploy/docker/build.sh --prepare` (about 3 minutes once, cached under target/docker and
//! in the engine), as CI installs its other tools. Without them, or without docker and
//! docker-compose (or Compose v2's `docker compose`), it says so and passes, unless
//! `TESSERA_REQUIRE_DOCKER=1`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use tessera_tests::{free_port, tessera_bin, workspace_root};

/// How long the cluster may take to elect a leader and register its three agents.
const HEALTHY: Duration = Duration::from_secs(120);
/// How long the job may take (50 steps of 0.1 s, plus placement).
const JOB: Duration = Duration::from_secs(120);

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program).args(args).output().is_ok_and(|o| o.status.success())
}

/// The compose command: docker-compose (1.29) if there is one, else Compose v2's `docker
/// compose`; `None` (after saying why) when docker or compose is missing.
fn compose_command() -> Option<Vec<String>> {
    let found = if !succeeds("docker", &["info"]) {
        Err("docker is missing or its engine does not answer (docker info)")
    } else if succeeds("docker-compose", &["version"]) {
        Ok(vec!["docker-compose".to_string()])
    } else if succeeds("docker", &["compose", "version"]) {
        Ok(vec!["docker".to_string(), "compose".to_string()])
    } else {
        Err("neither docker-compose nor docker compose is installed")
    };
    found.map_err(skip).ok()
}

/// Say why the test skips; a failure instead with `TESSERA_REQUIRE_DOCKER=1`.
fn skip(why: impl std::fmt::Display) {
    assert!(std::env::var("TESSERA_REQUIRE_DOCKER").as_deref() != Ok("1"), "TESSERA_REQUIRE_DOCKER=1 but {why}");
    eprintln!("{why}: skipping the compose cluster test (TESSERA_REQUIRE_DOCKER=1 makes this a failure)");
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The cluster of one test: `down -v` (containers, network, volumes) and the image removed when
/// dropped, whatever happened; the services' logs printed first if the test is failing.
struct Cluster {
    compose: Vec<String>,
    project: String,
    file: PathBuf,
    image: String,
    env: Vec<(String, String)>,
}

impl Cluster {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.compose[0]);
        c.args(&self.compose[1..]).arg("-p").arg(&self.project).arg("-f").arg(&self.file).args(args);
        c.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run compose")
    }

    fn must(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "compose {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let o = self.run(&["logs", "--no-color", "--tail", "40"]);
            eprintln!("---- compose logs ----\n{}", text(&o));
        }
        let o = self.run(&["down", "-v", "--remove-orphans", "--timeout", "5"]);
        if !o.status.success() {
            eprintln!("compose down -v failed: {}", text(&o));
        }
        let _ = Command::new("docker").args(["rmi", "-f", &self.image]).output();
    }
}

/// What an earlier run killed before its guard could run (Ctrl-C, SIGKILL) left behind:
/// `tessera-test-PID` projects and `tessera-test:PID` images whose process is gone.
fn remove_leftovers(compose: &[String], file: &Path) {
    let listed = |args: &[&str]| -> Vec<String> {
        Command::new("docker")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect())
            .unwrap_or_default()
    };
    let dead = |pid: &str| pid.parse::<u32>().is_ok_and(|p| !Path::new(&format!("/proc/{p}")).exists());
    let mut projects = listed(&["ps", "-a", "--format", "{{.Label \"com.docker.compose.project\"}}"]);
    projects.extend(listed(&["volume", "ls", "--format", "{{.Label \"com.docker.compose.project\"}}"]));
    projects.sort();
    projects.dedup();
    for p in projects.iter().filter(|p| p.strip_prefix("tessera-test-").is_some_and(dead)) {
        eprintln!("removing {p}, left behind by a run that was killed");
        let _ = Command::new(&compose[0])
            .args(&compose[1..])
            .args(["-p", p, "-f"])
            .arg(file)
            .args(["down", "-v", "--remove-orphans", "--timeout", "1"])
            .output();
    }
    for image in listed(&["images", "tessera-test", "--format", "{{.Repository}}:{{.Tag}}"]) {
        if image.strip_prefix("tessera-test:").is_some_and(dead) {
            let _ = Command::new("docker").args(["rmi", "-f", &image]).output();
        }
    }
}

/// `tessera ARGS -o json` from this host, as the admin, through the published ports (`-o json`
/// goes before a `--` that starts a job's command).
fn cli(certs: &Path, servers: &str, args: &[&str]) -> Result<Value, String> {
    let mut args = args.to_vec();
    args.insert(args.iter().position(|a| *a == "--").unwrap_or(args.len()), "-o");
    args.insert(args.iter().position(|a| *a == "--").unwrap_or(args.len()), "json");
    let o = Command::new(tessera_bin())
        .args(&args)
        .env("TESSERA_SERVER", servers)
        .env("TESSERA_CA", certs.join("ca.pem"))
        .env("TESSERA_CERT", certs.join("user-admin.pem"))
        .env("TESSERA_KEY", certs.join("user-admin-key.pem"))
        .env_remove("TESSERA_TOKEN")
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(text(&o));
    }
    serde_json::from_slice(&o.stdout).map_err(|e| format!("{e}: {}", text(&o)))
}

/// A leader that all three servers know, and three ready agents (two aws, one azure).
fn healthy(certs: &Path, servers: &str) -> Result<(), String> {
    let status = cli(certs, servers, &["cluster", "status"])?;
    let members = status["members"].as_array().cloned().unwrap_or_default();
    let leader = status["leader_id"].as_u64().unwrap_or(0);
    if leader == 0 || members.len() != 3 || !members.iter().all(|m| m["leader_id"].as_u64() == Some(leader)) {
        return Err(format!("no leader known to all three servers yet: {status}"));
    }
    let nodes = cli(certs, servers, &["node", "list"])?;
    let mut ready: Vec<String> = nodes["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["state"] == "ready" && n["gpus_total"] == 8)
        .map(|n| format!("{}:{}", n["name"].as_str().unwrap_or("?"), n["cloud"].as_str().unwrap_or("?")))
        .collect();
    ready.sort();
    if ready != ["aws-1:aws", "aws-2:aws", "azure-1:azure"] {
        return Err(format!("ready nodes: {ready:?}"));
    }
    Ok(())
}

#[test]
fn the_compose_cluster_runs_a_job_submitted_from_the_host() {
    let root = workspace_root();
    let bin = tessera_bin();
    // The binary sits in <target>/debug: build.sh caches its root filesystem in <target>/docker.
    let target = bin.parent().and_then(Path::parent).expect("target directory").to_path_buf();
    let Some(compose) = compose_command() else { return };
    let pid = std::process::id();
    let image = format!("tessera-test:{pid}");
    let file = root.join("deploy/compose/compose.yaml");
    remove_leftovers(&compose, &file);

    let t0 = Instant::now();
    // --offline: the root filesystem and the object store's image come from `build.sh
    // --prepare` (Debian mirror, PyPI), run ahead like CI's other installs; this test reaches
    // nothing outside the machine.
    let out = Command::new("bash")
        .arg(root.join("deploy/docker/build.sh"))
        .args(["--offline", "--bin", bin.to_str().expect("utf-8 path"), "--tag", &image])
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("run deploy/docker/build.sh");
    if out.status.code() == Some(3) {
        return skip(String::from_utf8_lossy(&out.stderr).trim().trim_start_matches("build.sh: "));
    }
    assert!(out.status.success(), "deploy/docker/build.sh: {}", text(&out));
    eprintln!("image {image} built in {:.1} s", t0.elapsed().as_secs_f64());

    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let env = [
        ("TESSERA_IMAGE", image.clone()),
        ("TESSERA_PORT_1", ports[0].to_string()),
        ("TESSERA_PORT_2", ports[1].to_string()),
        ("TESSERA_PORT_3", ports[2].to_string()),
        ("TESSERA_UI_PORT", ports[3].to_string()),
        ("TESSERA_S3_PORT", ports[4].to_string()),
    ];
    let cluster = Cluster {
        compose,
        project: format!("tessera-test-{pid}"),
        file,
        image: image.clone(),
        env: env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
    };
    let servers = format!("127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1], ports[2]);

    let t1 = Instant::now();
    cluster.must(&["up", "-d"]);

    // The admin's certificate, copied out of the certs volume (as README.md shows).
    let certs = tempfile::tempdir().expect("temp dir");
    let server1 = cluster.must(&["ps", "-q", "server-1"]).trim().to_string();
    assert!(!server1.is_empty(), "no server-1 container");
    for f in ["ca.pem", "user-admin.pem", "user-admin-key.pem"] {
        let o = Command::new("docker")
            .args(["cp", &format!("{server1}:/etc/tessera/certs/{f}")])
            .arg(certs.path().join(f))
            .output()
            .expect("docker cp");
        assert!(o.status.success(), "docker cp {f}: {}", text(&o));
    }

    while let Err(why) = healthy(certs.path(), &servers) {
        assert!(t1.elapsed() < HEALTHY, "not healthy {HEALTHY:?} after up: {why}");
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("compose up -d to a leader and 3 ready nodes: {:.1} s", t1.elapsed().as_secs_f64());

    let t2 = Instant::now();
    let submitted = cli(
        certs.path(),
        &servers,
        &[
            "job",
            "submit",
            "--shards",
            "2",
            "--gpus",
            "8",
            "--cloud",
            "aws,azure",
            "--name",
            "compose-test",
            "--",
            "python3",
            "/opt/tessera/examples/trainer.py",
            "--steps",
            "50",
            "--step-seconds",
            "0.1",
            "--checkpoint-every",
            "10",
        ],
    )
    .expect("job submit");
    let id = submitted["job_id"].as_u64().expect("job_id").to_string();
    let job = loop {
        let job = cli(certs.path(), &servers, &["job", "status", &id]).expect("job status");
        if matches!(job["state"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
            break job;
        }
        assert!(t2.elapsed() < JOB, "job {id} not done in {JOB:?}: {job}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(job["state"], "succeeded", "job {id}: {job}");
    let on: Vec<&str> = job["shards"].as_array().into_iter().flatten().filter_map(|s| s["node"].as_str()).collect();
    eprintln!("job {id} succeeded on {on:?} in {:.1} s", t2.elapsed().as_secs_f64());

    // The same job, seen from the cli service inside the network.
    let inside = cluster.must(&["run", "--rm", "cli", "tessera", "job", "status", &id, "-o", "json"]);
    let inside: Value = serde_json::from_str(&inside).expect("job status JSON from the cli service");
    assert_eq!(inside["state"], "succeeded", "{inside}");
}
