//! `tessera dev`: three servers and three agents in one process, and its `--demo`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tessera_proto::v1;
use tessera_tests::{tessera_bin, tls_channel};

/// A `tessera dev` process with its stdout read line by line; killed (SIGKILL) when dropped.
struct Dev {
    child: Child,
    lines: mpsc::Receiver<String>,
    out: String,
    stderr: std::path::PathBuf,
}

impl Dev {
    fn start(args: &[&str], dir: &Path) -> Dev {
        let stderr = dir.with_extension("stderr.log");
        let err = std::fs::File::create(&stderr).expect("create the stderr log");
        let mut child = Command::new(tessera_bin())
            .arg("dev")
            .args(args)
            .env("TESSERA_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("spawn tessera dev");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Dev { child, lines, out: String::new(), stderr }
    }

    /// Read output until a line satisfies `f` (returned), the output ends, or `timeout`.
    fn line(&mut self, timeout: Duration, f: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.out.push_str(&l);
                    self.out.push('\n');
                    if f(&l) {
                        return Some(l);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Wait for the process to exit, reading the rest of its output.
    fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Ok(l) = self.lines.try_recv() {
                self.out.push_str(&l);
                self.out.push('\n');
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // The reader thread ends with the pipe; take what it still has.
                while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
                    self.out.push_str(&l);
                    self.out.push('\n');
                }
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Output and log so far, for failure messages.
    fn report(&self) -> String {
        let log = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let start = log.len().saturating_sub(6000);
        format!("--- stdout ---\n{}\n--- stderr (tail) ---\n{}", self.out, &log[log.floor_char_boundary(start)..])
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python3() -> bool {
    Command::new("python3").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Processes whose command line mentions `pattern`.
fn processes(pattern: &str) -> String {
    let out = Command::new("pgrep").args(["-a", "-f", pattern]).output().expect("run pgrep");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The number after `prefix` in `text`.
fn number_after(text: &str, prefix: &str) -> Option<u64> {
    let at = text.find(prefix)? + prefix.len();
    text[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

#[test]
fn the_demo_resumes_the_lost_shard_from_its_checkpoint_and_succeeds() {
    if !python3() {
        eprintln!("python3 not found: skipping");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let mut dev = Dev::start(&["--demo", "--data-dir", data.to_str().expect("utf-8 path")], &data);
    let status = dev.wait(Duration::from_secs(300));
    let report = dev.report();
    let status = status.unwrap_or_else(|| panic!("tessera dev --demo did not finish\n{report}"));
    assert!(status.success(), "tessera dev --demo failed: {status}\n{report}");
    let out = &dev.out;
    let step = number_after(out, "Shard 0 resumed from its checkpoint at step ")
        .unwrap_or_else(|| panic!("no resume reported\n{report}"));
    assert!(step > 0, "resumed from step 0\n{report}");
    assert!(out.contains("trainer says: resuming from step"), "the trainer did not say it resumed\n{report}");
    assert!(
        out.lines().any(|l| l.starts_with("- Recovery: shard 0 was placed on") && l.contains("s after the kill")),
        "no recovery time\n{report}"
    );
    assert!(out.contains("steps were lost"), "no steps lost\n{report}");
    assert!(out.contains("Job 1 succeeded"), "{report}");
    // Nothing of it is left running: not the trainers, not the killed node's shard.
    let left = processes(&data.join("trainer.py").display().to_string());
    assert!(left.is_empty(), "processes left behind:\n{left}\n{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_three_servers_and_three_agents_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let mut dev = Dev::start(&["--data-dir", data.to_str().expect("utf-8 path")], &data);
    let export = tokio::task::block_in_place(|| {
        dev.line(Duration::from_secs(120), |l| l.trim_start().starts_with("export TESSERA_SERVER="))
    });
    let export = export.unwrap_or_else(|| panic!("no server addresses printed\n{}", dev.report()));
    let addrs: Vec<String> =
        export.trim().trim_start_matches("export TESSERA_SERVER=").split(',').map(str::to_string).collect();
    assert_eq!(addrs.len(), 3, "{export}");
    // tessera dev runs with mutual TLS: a throwaway CA and an admin certificate in its data.
    let certs = data.join("certs");
    tokio::task::block_in_place(|| dev.line(Duration::from_secs(10), |l| l.starts_with("Press Ctrl-C")))
        .unwrap_or_else(|| panic!("no prompt\n{}", dev.report()));

    // Any of the three answers for the cluster: three servers, a leader, three nodes.
    let mut cluster =
        v1::cluster_service_client::ClusterServiceClient::new(tls_channel(&addrs[2], &certs, "user-admin"));
    let status = cluster.status(v1::StatusRequest {}).await.expect("status").into_inner();
    assert_eq!(status.members.len(), 3, "{status:?}");
    assert!(status.leader_id.is_some(), "{status:?}");
    let mut nodes = v1::node_service_client::NodeServiceClient::new(tls_channel(&addrs[0], &certs, "user-admin"));
    let list = nodes.list_nodes(v1::ListNodesRequest::default()).await.expect("list nodes").into_inner().nodes;
    assert_eq!(list.len(), 3, "{list:?}");
    let clouds = |c: v1::Cloud| list.iter().filter(|n| n.cloud == c as i32).count();
    assert_eq!((clouds(v1::Cloud::Aws), clouds(v1::Cloud::Azure)), (2, 1), "{list:?}");
    assert!(list.iter().all(|n| n.simulated && n.state == v1::NodeState::Ready as i32 && !n.gpus.is_empty()));

    // A job runs the trainer tessera dev wrote into its data directory.
    let mut running_trainer = false;
    if python3() {
        let trainer = data.join("trainer.py").display().to_string();
        let mut jobs = v1::job_service_client::JobServiceClient::new(tls_channel(&addrs[1], &certs, "user-admin"));
        let spec = v1::JobSpec {
            name: "long".into(),
            command: vec!["python3".into(), trainer.clone(), "--steps".into(), "100000".into()],
            shards: 2,
            resources: Some(v1::Resources { gpus: 1, ..Default::default() }),
            stop: Some(v1::StopPolicy {
                signal: "SIGUSR1".into(),
                checkpoint_grace_seconds: Some(1),
                term_grace_seconds: Some(2),
            }),
            ..Default::default()
        };
        let id = jobs
            .submit_job(v1::SubmitJobRequest { spec: Some(spec), idempotency_key: String::new() })
            .await
            .expect("submit")
            .into_inner()
            .job_id;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let j = jobs.get_job(v1::GetJobRequest { job_id: id, consistency: 0 }).await.expect("get job");
            let j = j.into_inner().job.expect("job");
            // Training, not just started: a trainer signalled before Python has installed its
            // handlers dies of the signal instead of checkpointing.
            if j.shards.iter().all(|s| s.state == v1::ShardState::Running as i32 && s.step > 0) {
                break;
            }
            assert!(Instant::now() < deadline, "the job never ran: {j:?}\n{}", dev.report());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        running_trainer = !processes(&trainer).is_empty();
        assert!(running_trainer, "no trainer process while the job runs\n{}", dev.report());
    }

    // SIGTERM: the agents stop their shards, everything stops, exit 0.
    let pid = dev.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    let status = tokio::task::block_in_place(|| dev.wait(Duration::from_secs(60)));
    let status = status.unwrap_or_else(|| panic!("tessera dev did not stop on SIGTERM\n{}", dev.report()));
    assert!(status.success(), "tessera dev exited with {status}\n{}", dev.report());
    assert!(dev.out.contains("The cluster has stopped."), "{}", dev.report());
    let left = processes(&data.display().to_string());
    assert!(left.is_empty(), "processes left behind:\n{left}\n{}", dev.report());
    if running_trainer {
        // The trainers were asked to checkpoint and stop (SIGUSR1, then SIGTERM), not killed.
        let said = stdout_logs(&data).iter().filter(|t| t.contains("SIGTERM at step")).count();
        assert_eq!(said, 2, "both trainers should have checkpointed on SIGTERM\n{}", dev.report());
    }
}

/// The contents of every shard's stdout.log under `dir`.
fn stdout_logs(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for e in entries.filter_map(Result::ok) {
        let p = e.path();
        if p.is_dir() {
            out.extend(stdout_logs(&p));
        } else if p.file_name().is_some_and(|n| n == "stdout.log") {
            out.push(std::fs::read_to_string(&p).unwrap_or_default());
        }
    }
    out
}

/// Headless Chromium, if there is one: Debian's `chromium` package.
fn chromium() -> Option<String> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()));
    if found.is_none() {
        assert!(
            std::env::var_os("TESSERA_REQUIRE_CHROMIUM").is_none(),
            "TESSERA_REQUIRE_CHROMIUM is set but no chromium is on PATH"
        );
        eprintln!("chromium not found (Debian's package installs it): skipping");
    }
    found.map(str::to_string)
}

/// Load `url` in headless Chromium: the DOM after its scripts ran, and a screenshot saved to
/// `shot`. A profile of its own each time, so no state is shared between loads.
fn browse(chromium: &str, url: &str, shot: &Path) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let common = |c: &mut Command| {
        c.args(["--headless=new", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors", "--hide-scrollbars"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .stdin(Stdio::null())
            .stderr(Stdio::null());
    };
    let mut dom = Command::new(chromium);
    common(&mut dom);
    let out = dom.args(["--dump-dom", url]).output().expect("run chromium");
    let mut s = Command::new(chromium);
    common(&mut s);
    let _ = s.args(["--window-size=1400,1000", &format!("--screenshot={}", shot.display()), url]).output();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_cluster_jobs_queue_nodes_and_a_failed_gpu_in_a_real_browser() {
    let Some(chromium) = chromium() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let mut dev = Dev::start(&["--data-dir", data.to_str().expect("utf-8 path")], &data);
    let mut wanted = |prefix: &str| {
        tokio::task::block_in_place(|| dev.line(Duration::from_secs(120), |l| l.trim_start().starts_with(prefix)))
            .map(|l| l.trim().to_string())
    };
    let export = wanted("export TESSERA_SERVER=").expect("server addresses");
    let faults = wanted("Simulated GPUs take faults").expect("the fault injection address");
    let login = wanted("https://").expect("the dashboard's address");
    let addrs: Vec<String> =
        export.trim_start_matches("export TESSERA_SERVER=").split(',').map(str::to_string).collect();
    let agent =
        faults.split("curl '").nth(1).and_then(|r| r.split("/simulate").next()).expect("agent address").to_string();
    let (base, token) = login.split_once("/ui/login?token=").expect("a login link");
    let certs = data.join("certs");

    // A job, running; then an XID on GPU 3 of the first node.
    let mut jobs = v1::job_service_client::JobServiceClient::new(tls_channel(&addrs[0], &certs, "user-admin"));
    let spec = v1::JobSpec {
        name: "dash-job".into(),
        command: vec!["sleep".into(), "300".into()],
        shards: 1,
        resources: Some(v1::Resources { gpus: 1, ..Default::default() }),
        ..Default::default()
    };
    let req = v1::SubmitJobRequest { spec: Some(spec), idempotency_key: String::new() };
    let id = jobs.submit_job(req).await.expect("submit").into_inner().job_id;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = jobs.get_job(v1::GetJobRequest { job_id: id, consistency: 0 }).await.expect("get").into_inner().job;
        if j.is_some_and(|j| j.state == v1::JobState::Running as i32) {
            break;
        }
        assert!(Instant::now() < deadline, "the job never ran\n{}", dev.report());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut s = std::net::TcpStream::connect(&agent).expect("the agent's HTTP port");
    std::io::Write::write_all(
        &mut s,
        format!("GET /simulate/xid?gpu=3&xid=79 HTTP/1.0\r\nHost: {agent}\r\n\r\n").as_bytes(),
    )
    .expect("inject");
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut s, &mut reply).expect("the agent's answer");
    assert!(reply.contains("injected"), "{reply}");
    let mut nodes = v1::node_service_client::NodeServiceClient::new(tls_channel(&addrs[1], &certs, "user-admin"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let faulty = loop {
        let list = nodes.list_nodes(v1::ListNodesRequest::default()).await.expect("nodes").into_inner().nodes;
        if let Some(n) = list.iter().find(|n| n.gpus.iter().any(|g| g.health.as_ref().is_some_and(|h| !h.healthy))) {
            break n.name.clone();
        }
        assert!(Instant::now() < deadline, "the XID never marked a GPU\n{}", dev.report());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Every page in a real browser, signed in through the login link; a screenshot of each
    // under target/dashboard/ for people to look at.
    let shots = tessera_tests::workspace_root().join("target/dashboard");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let s = |x: &str| x.to_string();
    let pages: Vec<(String, Vec<String>)> = vec![
        (s("cluster"), vec![s("id=\"leader\""), s("reachable"), s("id=\"members\"")]),
        (s("jobs"), vec![format!("data-job=\"{id}\""), s("dash-job"), s("running")]),
        (
            format!("jobs/{id}"),
            vec![format!("Job {id}: dash-job"), s("id=\"events\""), s(">placed<"), s(">shard_started<")],
        ),
        (s("queue"), vec![s("jobs waiting")]),
        (
            s("nodes"),
            vec![format!("data-node=\"{faulty}\""), s("GPU 3: XID 79"), s("gpu unhealthy"), s("aws / us-east-1")],
        ),
        (s("tenants"), vec![s("data-tenant=\"default\""), s("GPU-h")]),
    ];
    for (page, wants) in pages {
        let url = format!("{base}/ui/login?token={token}&next=/ui/{page}");
        let dom = tokio::task::block_in_place(|| {
            browse(&chromium, &url, &shots.join(format!("{}.png", page.replace('/', "-"))))
        });
        for w in &wants {
            assert!(dom.contains(w.as_str()), "page {page}: no {w:?} in the DOM:\n{dom}\n{}", dev.report());
        }
        assert!(dom.contains("sign out"), "page {page}: not signed in:\n{dom}");
        assert!(shots.join(format!("{}.png", page.replace('/', "-"))).is_file(), "no screenshot of {page}");
    }
    // Without the token, a page sends the browser to sign in.
    let dom = tokio::task::block_in_place(|| browse(&chromium, &format!("{base}/ui/nodes"), &shots.join("login.png")));
    assert!(dom.contains("Sign in") && !dom.contains("GPU 3: XID 79"), "{dom}");
    let dom = tokio::task::block_in_place(|| {
        browse(
            &chromium,
            &format!("{base}/ui/login?token=not-a-token&next=/ui/nodes"),
            &shots.join("login-refused.png"),
        )
    });
    assert!(dom.contains("token not found or revoked"), "{dom}");
}
