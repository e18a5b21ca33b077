//! Helpers for Tessera's integration tests: finding (and if needed building) the `tessera`
//! binary, running it, and cleaning up after it.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Path of the `tessera` binary of this workspace, built on first use if missing.
pub fn tessera_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // Test executables live in target/<profile>/deps/, other binaries (the load generator)
        // in target/<profile>/: the server binary sits in target/<profile>/.
        let exe = std::env::current_exe().expect("test executable path");
        let name = format!("tessera{}", std::env::consts::EXE_SUFFIX);
        let here = exe.parent().expect("executable directory").to_path_buf();
        let dir =
            if here.ends_with("deps") { here.parent().expect("target profile directory").to_path_buf() } else { here };
        let bin = dir.join(name);
        // Under cargo, always ask it to bring the binary up to date (a no-op when it is):
        // `cargo test -p tessera-tests` alone does not rebuild another package's binary.
        if !bin.exists() || std::env::var_os("CARGO").is_some() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-p", "tessera", "--bin", "tessera"]);
            if dir.ends_with("release") {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("run cargo build");
            assert!(status.success(), "cargo build -p tessera failed");
        }
        bin
    })
    .clone()
}

/// Run `tessera ARGS` to completion.
pub fn tessera(args: &[&str]) -> Output {
    Command::new(tessera_bin()).args(args).output().expect("run tessera")
}

/// `tessera certs --dir DIR --days 2 ARGS...`, which must succeed.
pub fn certs(dir: &Path, args: &[&str]) {
    let mut all = vec!["certs", "--dir", dir.to_str().expect("utf-8"), "--days", "2"];
    all.extend_from_slice(args);
    let out = tessera(&all);
    assert!(out.status.success(), "tessera {all:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A Python that runs `check` (Python code) without error: `$var`, else `python3`. The tests
/// that need a Python package say so and skip when there is none.
pub fn python_with(var: &str, check: &str) -> Option<String> {
    std::env::var(var)
        .ok()
        .into_iter()
        .chain(["python3".to_string()])
        .find(|p| Command::new(p).args(["-c", check]).output().is_ok_and(|o| o.status.success()))
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

// ---------------------------------------------------------------------------------------------
// Server processes
// ---------------------------------------------------------------------------------------------

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tessera_proto::v1;
use tonic::transport::Channel;

/// A free TCP port on 127.0.0.1 (bound, then released for the server to take).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}

/// A `tessera` process with its output in `<dir>.log`; killed (SIGKILL) and reaped when
/// dropped, even if a test fails.
pub struct Proc {
    dir: PathBuf,
    args: Vec<String>,
    log_filter: &'static str,
    /// Extra environment variables.
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Proc {
    fn new(dir: &Path, args: Vec<String>, log_filter: &'static str) -> Proc {
        Proc::with_env(dir, args, log_filter, Vec::new())
    }

    fn with_env(dir: &Path, args: Vec<String>, log_filter: &'static str, env: Vec<(String, String)>) -> Proc {
        let mut p = Proc { dir: dir.to_path_buf(), args, log_filter, env, child: None };
        p.restart();
        p
    }

    /// Start it again (after a kill) with the same arguments and directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.dir.display());
        std::fs::create_dir_all(&self.dir).expect("create the process's directory");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))
            .expect("open the process's log");
        let child = Command::new(tessera_bin())
            .args(&self.args)
            .env("TESSERA_LOG", self.log_filter)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn tessera");
        self.child = Some(child);
    }

    /// kill -9, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Is the process running?
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Send a signal by name (STOP to cut it off without closing its connections, CONT, ...).
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").args([format!("-{sig}"), c.id().to_string()]).status();
        }
    }

    /// Its whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }

    /// Its log so far (for failure messages).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default();
        let start = text.len().saturating_sub(3000);
        text[text.floor_char_boundary(start)..].to_string()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too; no SIGCONT needed.
        self.kill();
    }
}

/// One `tessera server` process.
pub struct ServerProc {
    /// Raft id.
    pub id: u64,
    /// gRPC address.
    pub addr: String,
    proc: Proc,
}

impl ServerProc {
    /// Start `tessera server` with these extra arguments.
    pub fn start(id: u64, addr: &str, data_dir: &Path, extra: &[String]) -> ServerProc {
        let mut args = vec![
            "server".to_string(),
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            addr.to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        // Plain TCP unless the caller gives TLS files (the security tests do).
        if !extra.iter().any(|a| a == "--tls-ca" || a == "--insecure") {
            args.push("--insecure".into());
        }
        args.extend(extra.iter().cloned());
        ServerProc { id, addr: addr.to_string(), proc: Proc::new(data_dir, args, "info,raft=warn") }
    }
}

impl std::ops::Deref for ServerProc {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl std::ops::DerefMut for ServerProc {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

/// A cluster of server processes in a temporary directory.
pub struct Cluster {
    /// The servers, by id.
    pub servers: BTreeMap<u64, ServerProc>,
    /// Keeps the data directories alive.
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Start `n` servers forming a new cluster, with extra server arguments.
    pub fn start(n: u64, extra: &[&str]) -> Cluster {
        Cluster::start_with(n, extra, |_| Vec::new())
    }

    /// Start `n` servers forming a new cluster over mutual TLS: server `id` gets
    /// `<certs>/ca.pem`, `<certs>/server-<id>.pem` and `<certs>/server-<id>-key.pem` (as
    /// `tessera certs server <id> --host 127.0.0.1 --dir <certs>` writes them).
    pub fn start_tls(n: u64, certs: &Path, extra: &[&str]) -> Cluster {
        Cluster::start_with(n, extra, |id| {
            let files = tessera_tls::TlsFiles::in_dir(certs, &format!("server-{id}"));
            [("--tls-ca", files.ca), ("--tls-cert", files.cert), ("--tls-key", files.key)]
                .into_iter()
                .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
                .collect()
        })
    }

    /// Start `n` servers forming a new cluster, server `id` with `per_server(id)` and `extra`
    /// as extra arguments.
    pub fn start_with(n: u64, extra: &[&str], per_server: impl Fn(u64) -> Vec<String>) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let addrs: BTreeMap<u64, String> = (1..=n).map(|i| (i, format!("127.0.0.1:{}", free_port()))).collect();
        let initial = addrs.iter().map(|(i, a)| format!("{i}={a}")).collect::<Vec<_>>().join(",");
        let mut servers = BTreeMap::new();
        for (id, addr) in &addrs {
            let mut args = vec!["--initial-cluster".to_string(), initial.clone()];
            args.extend(per_server(*id));
            args.extend(extra.iter().map(|s| s.to_string()));
            servers.insert(*id, ServerProc::start(*id, addr, &dir.path().join(format!("s{id}")), &args));
        }
        Cluster { servers, dir }
    }

    /// Addresses of the running servers.
    pub fn running_addrs(&self) -> Vec<String> {
        self.servers.values().filter(|s| s.running()).map(|s| s.addr.clone()).collect()
    }

    /// Logs of every server, for failure messages.
    pub fn logs(&self) -> String {
        self.servers.values().map(|s| format!("--- server {} ---\n{}\n", s.id, s.log_tail())).collect()
    }
}

/// Where `TESSERA_KEEP_LOGS` asks for the servers' logs to be copied when a cluster ends
/// (benchmark runs delete their temporary directories; this keeps what is needed to debug them).
impl Drop for Cluster {
    fn drop(&mut self) {
        let Some(keep) = std::env::var_os("TESSERA_KEEP_LOGS") else { return };
        let keep = PathBuf::from(keep);
        let _ = std::fs::create_dir_all(&keep);
        // Nanoseconds: two clusters of one run (--tls both) may end within a second.
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        for s in self.servers.values() {
            let from = s.dir.with_extension("log");
            let _ = std::fs::copy(&from, keep.join(format!("{stamp}-s{}.log", s.id)));
        }
    }
}

/// Connect to a server (lazily; calls fail fast while it is down).
pub fn channel(addr: &str) -> Channel {
    secure_channel(&tessera_tls::Security::Insecure, addr)
}

/// Connect to a server with `sec`: plain like [`channel`], or over mutual TLS with the
/// certificate it holds (lazily; calls fail fast while the server is down).
pub fn secure_channel(sec: &tessera_tls::Security, addr: &str) -> Channel {
    let ep = sec
        .endpoint(addr)
        .expect("endpoint")
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(15));
    sec.connect_lazy(&ep)
}

/// Connect to a server over mutual TLS with the certificate `<dir>/<stem>.pem` (lazily).
pub fn tls_channel(addr: &str, dir: &Path, stem: &str) -> Channel {
    let tls = tessera_tls::Tls::load(tessera_tls::TlsFiles::in_dir(dir, stem)).expect("load TLS files");
    secure_channel(&tessera_tls::Security::Tls(tls), addr)
}

/// The leader as the running servers see it (a majority must agree), within `timeout`.
pub async fn wait_for_leader(addrs: &[String], timeout: Duration) -> Option<u64> {
    wait_for_leader_with(&tessera_tls::Security::Insecure, addrs, timeout).await
}

/// [`wait_for_leader`], asking with `sec` (plain, or TLS with its certificate).
pub async fn wait_for_leader_with(sec: &tessera_tls::Security, addrs: &[String], timeout: Duration) -> Option<u64> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
        for a in addrs {
            let mut c = v1::cluster_service_client::ClusterServiceClient::new(secure_channel(sec, a));
            if let Ok(r) = c.status(v1::StatusRequest {}).await
                && let Some(l) = r.into_inner().leader_id
            {
                *votes.entry(l).or_default() += 1;
            }
        }
        if let Some((l, n)) = votes.iter().max_by_key(|(_, n)| **n)
            && *n * 2 > addrs.len()
        {
            return Some(*l);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// The registration of a simulated p5.48xlarge on aws us-east-1a with 8 H100s, for scripted
/// agents (tests) and simulated fleets (the load generator).
pub fn sim_register(name: &str) -> v1::Register {
    v1::Register {
        name: name.into(),
        cloud: v1::Cloud::Aws as i32,
        region: "us-east-1".into(),
        zone: "us-east-1a".into(),
        instance_type: "p5.48xlarge".into(),
        price_per_gpu_hour_micros: 4_000_000,
        cpu_millis: 192_000,
        memory_mib: 2_000_000,
        gpus: (0..8)
            .map(|i| v1::GpuInfo {
                index: i,
                uuid: format!("GPU-{name}-{i}"),
                model: "NVIDIA H100 80GB HBM3 (simulated)".into(),
                memory_mib: 81_920,
            })
            .collect(),
        simulated: true,
        advertise_addr: "127.0.0.1".into(),
        ..Default::default()
    }
}

/// A one-GPU job spec running `cmd`.
pub fn spec(name: &str) -> v1::JobSpec {
    v1::JobSpec {
        name: name.into(),
        command: vec!["python3".into(), "train.py".into()],
        shards: 1,
        resources: Some(v1::Resources { gpus: 1, ..Default::default() }),
        ..Default::default()
    }
}

/// Submit with an idempotency key, trying each address in turn until `timeout`. Returns the
/// job id once a server acknowledged it.
pub async fn submit(addrs: &[String], key: &str, timeout: Duration) -> Option<u64> {
    let deadline = Instant::now() + timeout;
    let mut i = 0usize;
    while Instant::now() < deadline {
        let addr = &addrs[i % addrs.len()];
        i += 1;
        let mut c = v1::job_service_client::JobServiceClient::new(channel(addr));
        let req = v1::SubmitJobRequest { spec: Some(spec(key)), idempotency_key: key.into() };
        match c.submit_job(req).await {
            Ok(r) => return Some(r.into_inner().job_id),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    None
}

/// Every job id a server holds (linearizable, or its own applied state when `stale`).
pub async fn job_ids(addr: &str, stale: bool) -> Result<Vec<u64>, tonic::Status> {
    let mut c = v1::job_service_client::JobServiceClient::new(channel(addr));
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let r = c
            .list_jobs(v1::ListJobsRequest {
                include_finished: true,
                page_size: 1000,
                page_token: token.clone(),
                consistency: if stale { v1::ReadConsistency::Stale as i32 } else { 0 },
                ..Default::default()
            })
            .await?
            .into_inner();
        ids.extend(r.jobs.iter().map(|j| j.id));
        if r.next_page_token.is_empty() {
            return Ok(ids);
        }
        token = r.next_page_token;
    }
}

/// A server's applied index (its own view).
pub async fn applied_index(addr: &str) -> Option<u64> {
    let mut c = v1::cluster_service_client::ClusterServiceClient::new(channel(addr));
    let r = c.status(v1::StatusRequest {}).await.ok()?.into_inner();
    r.members.iter().find(|m| m.id == r.responder_id).map(|m| m.applied_index)
}

/// One `tessera agent` process.
pub struct AgentProc {
    /// Node name.
    pub name: String,
    /// Metrics address.
    pub http: String,
    proc: Proc,
}

impl AgentProc {
    /// Start an agent named `name` with simulated `gpus` (like "8xH100-80GB"; empty: none)
    /// against `servers`; its attempts work in `<dir>/agent-<name>/`.
    pub fn start(name: &str, servers: &[String], gpus: &str, dir: &Path, extra: &[&str]) -> AgentProc {
        AgentProc::start_with_env(name, servers, gpus, dir, extra, &[])
    }

    /// [`AgentProc::start`] with extra environment variables (object-store credentials, say).
    pub fn start_with_env(
        name: &str,
        servers: &[String],
        gpus: &str,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> AgentProc {
        let work_dir = dir.join(format!("agent-{name}"));
        let http = format!("127.0.0.1:{}", free_port());
        let mut args = vec![
            "agent".to_string(),
            "--name".into(),
            name.into(),
            "--advertise".into(),
            "127.0.0.1".into(),
            "--servers".into(),
            servers.join(","),
            "--work-dir".into(),
            work_dir.display().to_string(),
            "--http".into(),
            http.clone(),
        ];
        if !gpus.is_empty() {
            args.extend(["--simulate-gpus".to_string(), gpus.to_string()]);
        }
        if !extra.iter().any(|a| *a == "--ca" || *a == "--insecure") {
            args.push("--insecure".into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        AgentProc { name: name.into(), http, proc: Proc::with_env(&work_dir, args, "info", env) }
    }
}

impl std::ops::Deref for AgentProc {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl std::ops::DerefMut for AgentProc {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

/// moto's S3 server (PyPI `moto[server]`) on 127.0.0.1, a real S3 API for checkpoint tests;
/// killed on drop. Found at `TESSERA_MOTO_SERVER`, else `target/moto-venv/bin/moto_server`
/// (where `.ci/run` installs it), else `moto_server` on the PATH.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Holds its log.
    dir: tempfile::TempDir,
}

impl Moto {
    /// Start it without waiting for it to answer (importing moto takes many seconds on a busy
    /// machine: start it first, set the rest up meanwhile, then [`Moto::create_bucket`] waits),
    /// or `None` (after saying why) when it is not installed; with `TESSERA_REQUIRE_MOTO=1` a
    /// missing server is a failure instead.
    pub fn start() -> Option<Moto> {
        let on_path = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).map(|d| d.join("moto_server")).collect::<Vec<_>>())
            .unwrap_or_default();
        let candidates = [std::env::var("TESSERA_MOTO_SERVER").ok().map(PathBuf::from)]
            .into_iter()
            .flatten()
            .chain([workspace_root().join("target/moto-venv/bin/moto_server")])
            .chain(on_path);
        let Some(bin) = candidates.into_iter().find(|b| b.is_file()) else {
            assert!(
                std::env::var("TESSERA_REQUIRE_MOTO").as_deref() != Ok("1"),
                "TESSERA_REQUIRE_MOTO=1 but moto_server was not found (pip install 'moto[server]')"
            );
            eprintln!("moto_server not found (pip install 'moto[server]', or set TESSERA_MOTO_SERVER): skipping");
            return None;
        };
        let dir = tempfile::tempdir().expect("a directory for moto's log");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("moto.log")).expect("moto's log");
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("start moto_server");
        Some(Moto { child, endpoint: format!("http://127.0.0.1:{port}"), dir })
    }

    /// Wait until it answers.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(180);
        while self.http("GET", "/").is_err() {
            let log = std::fs::read_to_string(self.dir.path().join("moto.log")).unwrap_or_default();
            assert!(Instant::now() < deadline, "moto_server did not answer at {}:\n{log}", self.endpoint);
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// One unsigned request (moto's server does not check signatures); the response body.
    pub fn http(&self, method: &str, path: &str) -> std::io::Result<String> {
        use std::io::{Read, Write};
        let addr = self.endpoint.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        let ok = head.lines().next().is_some_and(|l| l.contains(" 200 ") || l.contains(" 204 "));
        if !ok {
            return Err(std::io::Error::other(format!("{method} {path}: {}", head.lines().next().unwrap_or(""))));
        }
        Ok(body.to_string())
    }

    /// Create a bucket.
    pub fn create_bucket(&self, bucket: &str) {
        self.wait_ready();
        self.http("PUT", &format!("/{bucket}")).expect("create the bucket");
    }

    /// The keys under `prefix` in `bucket`.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let body = self.http("GET", &format!("/{bucket}?list-type=2&prefix={prefix}")).expect("list the bucket");
        body.split("<Key>").skip(1).filter_map(|k| k.split_once("</Key>").map(|(k, _)| k.to_string())).collect()
    }

    /// The credentials and endpoint an agent needs for it.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
