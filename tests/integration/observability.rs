//! deploy/prometheus and deploy/grafana against a real cluster: Debian's `prometheus` scrapes
//! three servers and two agents with the shipped scrape configuration (its interval cut to one
//! second), and every query of every panel of the shipped Grafana dashboards must return data.
//!
//! Without a `prometheus` binary the test says so and passes, unless `TESSERA_REQUIRE_PROMETHEUS`
//! is set (CI installs Debian's package and sets it).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tessera_proto::v1;
use tessera_tests::{AgentProc, Cluster, channel, free_port, wait_for_leader, workspace_root};

const T: Duration = Duration::from_secs(60);

/// A child process killed and reaped when dropped, even if the test fails.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn prometheus_binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("prometheus")).find(|f| f.is_file()))
        .unwrap_or(None);
    if found.is_none() {
        assert!(
            std::env::var_os("TESSERA_REQUIRE_PROMETHEUS").is_none(),
            "TESSERA_REQUIRE_PROMETHEUS is set but no prometheus binary is on PATH"
        );
        eprintln!("prometheus not found (Debian's package installs it): skipping");
    }
    found
}

/// `GET path` on `addr`, HTTP/1.0; the body.
fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The result of an instant query, or why there is none.
fn query(prom: &str, q: &str) -> Result<Vec<Value>, String> {
    let body = http_get(prom, &format!("/api/v1/query?query={}", encode(q))).ok_or("no answer")?;
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if v["status"] != "success" {
        return Err(body);
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// Every (panel title, query) of a dashboard, rows' panels included.
fn queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((p["title"].as_str().unwrap_or("?").to_string(), e.to_string()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// A panel's query as Grafana sends it: its interval variables filled in, and the dashboard's
/// own variables at "All".
fn as_sent(expr: &str, variables: &[String]) -> String {
    let mut q = expr.replace("$__rate_interval", "30s").replace("$__interval", "5s").replace("$__range", "5m");
    for v in variables {
        q = q.replace(&format!("${{{v}}}"), ".*").replace(&format!("${v}"), ".*");
    }
    q
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grafana_panel_returns_data_from_prometheus_scraping_a_cluster() {
    let Some(prometheus) = prometheus_binary() else { return };
    let deploy = workspace_root().join("deploy");

    // Three servers with metrics, two agents, and a job running on one of them.
    let http: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let h = http.clone();
    let c = Cluster::start_with(3, &[], move |id| vec!["--http".into(), h[id as usize - 1].clone()]);
    let addrs = c.running_addrs();
    wait_for_leader(&addrs, T).await.unwrap_or_else(|| panic!("no leader\n{}", c.logs()));
    let agents: Vec<AgentProc> =
        ["gpu-a", "gpu-b"].iter().map(|n| AgentProc::start(n, &addrs, "2xH100-80GB", c.dir.path(), &[])).collect();
    let spec = v1::JobSpec {
        name: "observed".into(),
        command: vec!["sleep".into(), "120".into()],
        shards: 1,
        resources: Some(v1::Resources { gpus: 1, ..Default::default() }),
        ..Default::default()
    };
    let mut jobs = v1::job_service_client::JobServiceClient::new(channel(&addrs[0]));
    let deadline = Instant::now() + T;
    let id = loop {
        let req = v1::SubmitJobRequest { spec: Some(spec.clone()), idempotency_key: "observed".into() };
        match jobs.submit_job(req).await {
            Ok(r) => break r.into_inner().job_id,
            Err(e) => assert!(Instant::now() < deadline, "submit: {e}\n{}", c.logs()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // The shipped configuration, with the test's targets and a one-second interval.
    let dir = tempfile::tempdir().expect("temp dir");
    let shipped = std::fs::read_to_string(deploy.join("prometheus/prometheus.yml")).expect("prometheus.yml");
    assert!(shipped.contains("scrape_interval: 15s"), "{shipped}");
    write(&dir.path().join("prometheus.yml"), &shipped.replace("scrape_interval: 15s", "scrape_interval: 1s"));
    let list = |addrs: Vec<String>| {
        format!("- targets: [{}]\n", addrs.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", "))
    };
    write(&dir.path().join("targets/servers.yml"), &list(http.clone()));
    write(&dir.path().join("targets/agents.yml"), &list(agents.iter().map(|a| a.http.clone()).collect()));
    let check = Command::new(prometheus.with_file_name("promtool"))
        .args(["check", "config"])
        .arg(dir.path().join("prometheus.yml"))
        .output();
    if let Ok(o) = check {
        assert!(
            o.status.success(),
            "promtool check config: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let prom_addr = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
    let _prom = Reaped(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus"),
    );
    let prom_log = || std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();

    // Every target up, and the job running.
    let deadline = Instant::now() + T;
    loop {
        let up = query(&prom_addr, "sum(up)").ok().and_then(|r| r.first().cloned());
        let n = up.as_ref().and_then(|u| u["value"][1].as_str()).and_then(|v| v.parse::<f64>().ok());
        if n == Some(5.0) {
            break;
        }
        assert!(Instant::now() < deadline, "targets not all up ({up:?})\n{}", prom_log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deadline = Instant::now() + T;
    loop {
        let j = jobs.get_job(v1::GetJobRequest { job_id: id, consistency: 0 }).await.expect("get").into_inner().job;
        if j.is_some_and(|j| j.state == v1::JobState::Running as i32) {
            break;
        }
        assert!(Instant::now() < deadline, "the job never ran\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every query of every panel returns data (rates need a few samples: wait for them).
    let mut checked = 0;
    for name in ["tessera-servers.json", "tessera-fleet.json"] {
        let text = std::fs::read_to_string(deploy.join("grafana/dashboards").join(name)).expect("dashboard");
        let d: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let variables: Vec<String> = d["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["name"].as_str().map(String::from))
            .collect();
        let qs = queries(&d);
        assert!(qs.len() >= 10, "{name} has {} queries", qs.len());
        for (title, expr) in qs {
            let q = as_sent(&expr, &variables);
            let deadline = Instant::now() + T;
            loop {
                match query(&prom_addr, &q) {
                    Ok(r) if !r.is_empty() => break,
                    other => assert!(
                        Instant::now() < deadline,
                        "{name}: panel {title:?}: {q} returned no data: {other:?}\n{}",
                        prom_log()
                    ),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            checked += 1;
        }
    }
    println!("{checked} panel queries returned data");
    drop(agents);
}
