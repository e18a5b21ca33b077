//! The client commands of the real `tessera` binary (`job`, `node`, `cluster`) against three real
//! servers and an agent with simulated GPUs running the example trainer.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tessera_tests::{AgentProc, Cluster, free_port, tessera_bin, wait_for_leader, workspace_root};

const T: Duration = Duration::from_secs(60);

/// Run `tessera ARGS` with `env` set (and no TESSERA_SERVER from outside), killing it if it
/// runs past `timeout`.
fn run_env(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Output {
    let mut cmd = Command::new(tessera_bin());
    cmd.args(args).env_remove("TESSERA_SERVER").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // These servers run with --insecure; the TLS paths have tests of their own (security.rs).
    cmd.env("TESSERA_INSECURE", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn tessera");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("wait for tessera"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            let out = rx.recv().ok().and_then(Result::ok);
            panic!(
                "tessera {args:?} ran past {timeout:?}; stdout:\n{}",
                out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
            );
        }
    }
}

fn run(args: &[&str]) -> Output {
    run_env(args, &[], T)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Run, insist on exit 0, and parse stdout as one JSON document.
fn json(args: &[&str]) -> Value {
    let out = run(args);
    assert_eq!(out.status.code(), Some(0), "tessera {args:?}: {}{}", stdout(&out), stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("tessera {args:?}: {e}: {}", stdout(&out)))
}

/// Parse every line of stdout as JSON.
fn json_lines(out: &Output) -> Vec<Value> {
    stdout(out)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Three servers with a leader, and an agent `gpu-a` with 8 simulated H100s. None, after saying
/// so, where python3 is missing.
fn cluster_with_agent() -> Option<(Cluster, String, AgentProc, String)> {
    let python = Command::new("python3").arg("--version").output().is_ok_and(|o| o.status.success());
    if !python {
        eprintln!("python3 not found: skipping");
        return None;
    }
    let c = Cluster::start(3, &[]);
    let addrs = c.running_addrs();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(wait_for_leader(&addrs, T)).unwrap_or_else(|| panic!("no leader\n{}", c.logs()));
    // $2.50 per GPU-hour, for `tessera usage`.
    let agent = AgentProc::start("gpu-a", &addrs, "8xH100-80GB", c.dir.path(), &["--price", "2.5"]);
    let trainer = c.dir.path().join("trainer.py");
    std::fs::copy(workspace_root().join("examples/trainer.py"), &trainer).expect("copy the example trainer");
    let servers = addrs.join(",");
    Some((c, servers, agent, trainer.display().to_string()))
}

/// Wait until `node list` shows the agent's node.
fn wait_for_node(servers: &str, agent: &AgentProc) -> Value {
    let deadline = Instant::now() + T;
    loop {
        let v = json(&["node", "list", "-o", "json", "--server", servers]);
        if let Some(n) = v["nodes"].as_array().and_then(|n| n.first()) {
            return n.clone();
        }
        assert!(Instant::now() < deadline, "the agent never registered\n{}", agent.log_tail());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Poll `job status -o json` until `f` holds.
fn wait_job(servers: &str, id: u64, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + T;
    loop {
        let j = json(&["job", "status", &id.to_string(), "-o", "json", "--server", servers]);
        if f(&j) {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} never reached: {what}; last {j}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A spec file running the trainer for `steps` steps, with no retries and a short stop ladder.
fn trainer_spec(dir: &Path, file: &str, name: &str, trainer: &str, steps: u32) -> String {
    let path = dir.join(file);
    let spec = format!(
        "name = \"{name}\"\n\
         command = [\"python3\", \"{trainer}\", \"--steps\", \"{steps}\", \"--step-seconds\", \"0.05\", \"--checkpoint-every\", \"5\"]\n\
         \n\
         [resources]\n\
         gpus = 1\n\
         \n\
         [retry]\n\
         max_attempts = 1\n\
         \n\
         [stop]\n\
         checkpoint_grace = \"1s\"\n\
         term_grace = \"1s\"\n"
    );
    std::fs::write(&path, spec).expect("write spec");
    path.display().to_string()
}

fn job_id(v: &Value) -> u64 {
    v["job_id"].as_u64().unwrap_or_else(|| panic!("no job_id in {v}"))
}

#[test]
fn jobs_are_submitted_watched_and_their_output_read() {
    let Some((c, servers, _agent, trainer)) = cluster_with_agent() else { return };
    let s = servers.as_str();
    let dir = c.dir.path();

    // A spec file: submit, watch to success, status and logs.
    let spec = trainer_spec(dir, "train.toml", "cli-train", &trainer, 20);
    let id = job_id(&json(&["job", "submit", &spec, "-o", "json", "--server", s]));
    let ids = id.to_string();
    let watched = run(&["job", "watch", &ids, "--server", s]);
    let text = stdout(&watched);
    assert_eq!(watched.status.code(), Some(0), "{text}{}\n{}", stderr(&watched), c.logs());
    assert!(text.contains(&format!("job {id}: succeeded")), "{text}");
    // Watching starts while the job waits or runs: its events as they happen (or, after a slow
    // start, the shard as it stands); a slow start may first see it finished.
    assert!(text.contains("shard 0: placed on gpu-a") || text.contains(" on gpu-a (none/local), attempt 1"), "{text}");
    assert!(!text.contains("job: succeeded"), "the end is said once, as the job's state: {text}");
    // Its timeline, as a table and as JSON.
    let table = stdout(&run(&["job", "events", &ids, "--server", s]));
    let rows: Vec<Vec<&str>> = table.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    let kinds: Vec<&str> = rows.iter().filter_map(|r| r.get(4).copied()).collect();
    assert_eq!(kinds.first(), Some(&"submitted"), "{table}");
    assert_eq!(&kinds[1..3], &["placed", "shard_started"], "{table}");
    assert!(kinds[3..kinds.len() - 2].iter().all(|k| *k == "checkpoint"), "{table}");
    assert_eq!(&kinds[kinds.len() - 2..], &["shard_exited", "finished"], "{table}");
    assert!(table.contains("placed on gpu-a") && table.contains("checkpoint at step 20"), "{table}");
    let ev = json(&["job", "events", &ids, "-o", "json", "--server", s]);
    assert_eq!((ev["job_id"].as_u64(), ev["dropped"].as_u64()), (Some(id), Some(0)), "{ev}");
    let events = ev["events"].as_array().expect("events");
    assert_eq!(events.len(), kinds.len(), "{ev}");
    assert_eq!(events[1]["kind"], "placed");
    assert_eq!((events[1]["shard"].as_u64(), events[1]["node"].as_str()), (Some(0), Some("gpu-a")), "{ev}");
    assert!(events[1]["attempt_id"].as_u64().is_some() && events[0]["shard"].is_null(), "{ev}");
    let seq: Vec<u64> = events.iter().filter_map(|e| e["sequence"].as_u64()).collect();
    assert_eq!(seq, (1..=events.len() as u64).collect::<Vec<_>>());
    let times: Vec<u64> = events.iter().filter_map(|e| e["time_unix_ms"].as_u64()).collect();
    assert!(times.len() == events.len() && times.windows(2).all(|w| w[0] <= w[1]), "{ev}");
    assert_eq!(events.last().map(|e| e["message"].clone()), Some(Value::from("succeeded")));
    let j = json(&["job", "status", &ids, "-o", "json", "--server", s]);
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["name"], "cli-train");
    assert_eq!(j["num_shards"], 1);
    assert_eq!(j["shards"][0]["node"], "gpu-a", "{j}");
    assert_eq!(j["shards"][0]["attempt"], 1, "{j}");
    assert_eq!(j["shards"][0]["last_checkpoint"]["step"], 20, "{j}");
    let table = stdout(&run(&["job", "status", &ids, "--server", s]));
    assert!(table.contains("succeeded") && table.contains("gpu-a") && table.contains("step 20"), "{table}");
    let logs = run(&["job", "logs", &ids, "--server", s]);
    let text = stdout(&logs);
    assert_eq!(logs.status.code(), Some(0), "{}", stderr(&logs));
    assert!(text.contains("step 20/20") && text.contains("done at step 20"), "{text}");
    let chunks = json_lines(&run(&["job", "logs", &ids, "--shard", "0", "-o", "json", "--server", s]));
    assert!(chunks.iter().any(|c| c["stream"] == "stdout" && c["data"].as_str().unwrap_or("").contains("done at")));
    let bad_shard = run(&["job", "logs", &ids, "--shard", "3", "--server", s]);
    assert_eq!(bad_shard.status.code(), Some(3), "{}", stderr(&bad_shard));

    // The one-line form, followed to the end with --watch: JSON lines, the last one final.
    let out = run(&[
        "job",
        "submit",
        "-o",
        "json",
        "--watch",
        "--server",
        s,
        "--name",
        "oneline",
        "--gpus",
        "2",
        "--gpu-model",
        "H100",
        "--cloud",
        "none",
        "--priority",
        "high",
        "--",
        "python3",
        &trainer,
        "--steps",
        "5",
        "--step-seconds",
        "0.05",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    let lines = json_lines(&out);
    let one = job_id(&lines[0]);
    let last = lines.last().expect("watch lines");
    assert_eq!(last["id"], one);
    assert_eq!(last["state"], "succeeded", "{last}");
    assert_eq!((last["name"].as_str(), last["priority"].as_u64()), (Some("oneline"), Some(750)));
    assert_eq!((last["gpus_per_shard"].as_u64(), last["gpu_model"].as_str()), (Some(2), Some("H100")));
    assert_eq!(last["shards"][0]["gpus"].as_array().map(Vec::len), Some(2), "{last}");

    // A command that exits 1 with no retries: watch exits 1.
    let failing = dir.join("fail.toml");
    std::fs::write(
        &failing,
        "name = \"fails\"\ncommand = [\"python3\", \"-c\", \"import sys; print('about to fail'); sys.exit(1)\"]\n\
         [retry]\nmax_attempts = 1\n",
    )
    .unwrap();
    let out = run(&["job", "submit", "--watch", failing.to_str().unwrap(), "--server", s]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    assert!(text.contains("submitted") && text.contains(": failed"), "{text}");
    let failed_id: u64 =
        text.split_whitespace().nth(1).and_then(|w| w.parse().ok()).unwrap_or_else(|| panic!("no job id in {text}"));
    let again = run(&["job", "watch", &failed_id.to_string(), "-o", "json", "--server", s]);
    assert_eq!(again.status.code(), Some(1));
    assert_eq!(json_lines(&again).last().map(|j| j["state"].clone()), Some(Value::from("failed")));
    let ev = json(&["job", "events", &failed_id.to_string(), "-o", "json", "--server", s]);
    let events = ev["events"].as_array().expect("events");
    let exited = events.iter().find(|e| e["kind"] == "shard_exited").unwrap_or_else(|| panic!("{ev}"));
    assert!(exited["message"].as_str().unwrap_or("").starts_with("exited with code 1"), "{ev}");
    let end = events.last().expect("an end");
    assert_eq!(end["kind"], "finished");
    assert!(end["message"].as_str().unwrap_or("").starts_with("failed: shard 0 exited with 1"), "{ev}");
    assert!(!events.iter().any(|e| e["kind"] == "shard_requeued"), "no retries were allowed: {ev}");
    let missing = run(&["job", "events", "999999", "--server", s]);
    assert_eq!(missing.status.code(), Some(3), "{}", stderr(&missing));

    // list hides finished jobs unless --all.
    let live = json(&["job", "list", "-o", "json", "--server", s]);
    assert_eq!(live["jobs"].as_array().map(Vec::len), Some(0), "{live}");
    let all = json(&["job", "list", "--all", "-o", "json", "--server", s]);
    let states: Vec<(u64, String)> = all["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["id"].as_u64().unwrap(), j["state"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(
        states,
        vec![(id, "succeeded".into()), (one, "succeeded".into()), (failed_id, "failed".into())],
        "{all}"
    );
    let table = stdout(&run(&["job", "list", "--all", "--server", s]));
    assert!(table.contains("ID") && table.contains("oneline") && table.contains("high (750)"), "{table}");

    // A key the user gives says when it found an earlier submission's job; without one, the
    // CLI's own key is fresh every time, so each submission is a job of its own.
    let keyed = ["job", "submit", "--idempotency-key", "cli-dup", "-o", "json", "--server", s, "--", "true"];
    let first = json(&keyed);
    let again = json(&keyed);
    assert_eq!((job_id(&again), &again["deduplicated"]), (job_id(&first), &Value::Bool(true)), "{again}");
    assert_eq!(first["deduplicated"], Value::Bool(false), "{first}");
    let plain = ["job", "submit", "-o", "json", "--server", s, "--", "true"];
    let (a, b) = (json(&plain), json(&plain));
    assert_ne!(job_id(&a), job_id(&b));
    assert_eq!((&a["deduplicated"], &b["deduplicated"]), (&Value::Bool(false), &Value::Bool(false)));

    // What it all used: GPU-hours and cost, by tenant, cloud, instance type and node, in the
    // three forms. The jobs that ran are the three above (the keyed and plain ones may not
    // have run yet), on gpu-a at $2.50 per GPU-hour.
    for j in [job_id(&first), job_id(&a), job_id(&b)] {
        wait_job(s, j, "finished", |v| v["state"] == "succeeded");
    }
    let by = "tenant,cloud,instance-type,node";
    let u = json(&["usage", "--since", "1h", "--by", by, "-o", "json", "--server", s]);
    assert_eq!(u["group_by"], serde_json::json!(["tenant", "cloud", "instance-type", "node"]), "{u}");
    let rows = u["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 1, "{u}");
    assert_eq!(rows[0]["keys"][0], "default");
    assert_eq!((rows[0]["keys"][1].as_str(), rows[0]["keys"][3].as_str()), (Some("none"), Some("gpu-a")), "{u}");
    assert_eq!(rows[0]["jobs"], 6, "every job that ran: {u}");
    let hours = rows[0]["gpu_hours"].as_f64().unwrap_or(0.0);
    let cost = rows[0]["cost"].as_f64().unwrap_or(0.0);
    // The training job alone held a GPU for a second or more; all together for minutes at most.
    assert!(hours > 1.0 / 3600.0 && hours < 0.2, "{u}");
    assert!((cost - hours * 2.5).abs() < 0.01, "cost is GPU-hours x $2.50: {u}");
    assert_eq!(u["total_gpu_hours"], rows[0]["gpu_hours"]);
    let per_job = json(&["usage", "--since", "1h", "--by", "job", "-o", "json", "--server", s]);
    let jobs: Vec<&str> = per_job["rows"].as_array().unwrap().iter().filter_map(|r| r["keys"][0].as_str()).collect();
    assert!(jobs.contains(&format!("job-{id}").as_str()) && jobs.len() == 6, "{per_job}");
    let csv = stdout(&run(&["usage", "--since", "1h", "--by", by, "--csv", "--server", s]));
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "tenant,cloud,instance-type,node,gpu_hours,cost,attempts,jobs", "{csv}");
    assert!(lines.len() == 2 && lines[1].starts_with("default,none,") && lines[1].ends_with(",6"), "{csv}");
    let table = stdout(&run(&["usage", "--since", "1h", "--by", by, "--server", s]));
    assert!(table.contains("GPU HOURS") && table.contains("gpu-a") && table.contains("TOTAL"), "{table}");
    // Nothing ran in a range that ended an hour ago.
    let before = json(&["usage", "--since", "3h", "--until", "2h", "-o", "json", "--server", s]);
    assert_eq!(before["rows"], serde_json::json!([]), "{before}");
    let bad = run(&["usage", "--by", "tenant,gpu", "--server", s]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("--by: unknown key \"gpu\""), "{}", stderr(&bad));
}

#[test]
fn operators_see_the_cluster_and_nodes_and_cancel_jobs() {
    let Some((c, servers, agent, trainer)) = cluster_with_agent() else { return };
    let s = servers.as_str();

    // cluster status: three members, one leader, each with its indexes.
    let st = json(&["cluster", "status", "-o", "json", "--server", s]);
    let members = st["members"].as_array().expect("members");
    assert_eq!(members.len(), 3, "{st}");
    let leader = st["leader_id"].as_u64().expect("a leader");
    let leaders: Vec<u64> =
        members.iter().filter(|m| m["role"] == "leader").map(|m| m["id"].as_u64().unwrap()).collect();
    assert_eq!(leaders, vec![leader], "{st}");
    assert!(members.iter().all(|m| m["reachable"] == true && m["applied_index"].as_u64() > Some(0)), "{st}");
    assert!(members.iter().all(|m| m["kind"] == "voter" && m["term"].as_u64() > Some(0)), "{st}");
    let table = stdout(&run(&["cluster", "status", "--server", s]));
    assert!(table.contains(&format!("leader: server {leader}")) && table.contains("follower"), "{table}");

    // node list and show: the agent's eight simulated GPUs.
    let n = wait_for_node(s, &agent);
    assert_eq!(n["name"], "gpu-a");
    assert_eq!((n["gpus_total"].as_u64(), n["gpus_free"].as_u64()), (Some(8), Some(8)), "{n}");
    assert_eq!(n["simulated"], true);
    let gpus = n["gpus"].as_array().expect("gpus");
    assert_eq!(gpus.len(), 8);
    assert!(gpus.iter().all(|g| g["model"].as_str().unwrap_or("").contains("H100") && g["healthy"] == true), "{n}");
    let show = run(&["node", "show", "gpu-a", "--server", s]);
    let text = stdout(&show);
    assert_eq!(show.status.code(), Some(0), "{}", stderr(&show));
    assert!(text.contains("8 in all, 8 free") && text.matches("healthy").count() >= 8, "{text}");
    let table = stdout(&run(&["node", "list", "--server", s]));
    assert!(table.contains("gpu-a") && table.contains("8x") && table.contains("ready"), "{table}");
    let missing = run(&["node", "show", "no-such-node", "--server", s]);
    assert_eq!(missing.status.code(), Some(3));
    assert_eq!(stderr(&missing).trim(), "error: node no-such-node not found");

    // An XID benches a GPU (node show says when it comes back); node clear-gpu returns it.
    let http = &agent.http;
    let mut conn = std::net::TcpStream::connect(http).expect("the agent's HTTP port");
    std::io::Write::write_all(
        &mut conn,
        format!("GET /simulate/xid?gpu=6&xid=48 HTTP/1.0\r\nHost: {http}\r\n\r\n").as_bytes(),
    )
    .expect("inject an XID");
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut conn, &mut reply).expect("the agent's answer");
    assert!(reply.contains("injected"), "{reply}");
    let deadline = Instant::now() + T;
    let benched = loop {
        let v = json(&["node", "show", "gpu-a", "-o", "json", "--server", s]);
        if v["gpus"][6]["healthy"] == false {
            break v;
        }
        assert!(Instant::now() < deadline, "the XID never benched GPU 6: {v}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let g = &benched["gpus"][6];
    assert_eq!((g["health_reason"].as_str(), g["recent_faults"].as_u64()), (Some("XID 48"), Some(1)), "{g}");
    assert!(g["back_unix_ms"].as_u64() > g["unhealthy_since_unix_ms"].as_u64(), "{g}");
    let text = stdout(&run(&["node", "show", "gpu-a", "--server", s]));
    assert!(
        text.contains("unhealthy: XID 48, back in 9m") || text.contains("unhealthy: XID 48, back in 10m"),
        "{text}"
    );
    let cleared = json(&["node", "clear-gpu", "gpu-a", "6", "-o", "json", "--server", s]);
    let g = &cleared["gpus"][6];
    assert_eq!((g["healthy"].as_bool(), g["recent_faults"].as_u64()), (Some(true), Some(0)), "{cleared}");
    assert_eq!(cleared["gpus_free"], 8, "{cleared}");

    // drain and undrain.
    let d = json(&["node", "drain", "gpu-a", "--deadline", "1h", "-o", "json", "--server", s]);
    assert_eq!((d["state"].as_str(), d["drain_reason"].as_str()), (Some("draining"), Some("operator")), "{d}");
    assert!(d["drain_deadline_unix_ms"].as_u64().is_some(), "{d}");
    let u = json(&["node", "undrain", "gpu-a", "-o", "json", "--server", s]);
    assert_eq!(u["state"], "ready", "{u}");
    let again = run(&["node", "undrain", "gpu-a", "--server", s]);
    assert_eq!(again.status.code(), Some(1), "undraining a ready node is refused: {}", stderr(&again));
    assert!(!stderr(&again).contains("Status {"), "{}", stderr(&again));

    // cancel a running job; its status then says cancelled.
    let spec = trainer_spec(c.dir.path(), "long.toml", "long", &trainer, 2000);
    let id = job_id(&json(&["job", "submit", &spec, "-o", "json", "--server", s]));
    let ids = id.to_string();
    wait_job(s, id, "running", |j| j["shards"][0]["state"] == "running");

    // Why jobs wait: one needs more GPUs on one node than any node has, one needs the whole
    // node while the job above holds a GPU of it.
    let never = job_id(&json(&["job", "submit", "--gpus", "16", "-o", "json", "--server", s, "--", "sleep", "1"]));
    let w = json(&["job", "why", &never.to_string(), "-o", "json", "--server", s]);
    assert_eq!((w["state"].as_str(), w["reason"]["kind"].as_str()), (Some("pending"), Some("constraint")), "{w}");
    assert!(
        w["reason"]["message"].as_str().unwrap_or("").contains("no admitted node has 16 healthy matching GPUs"),
        "{w}"
    );
    let funnel: Vec<u64> =
        w["funnel"].as_array().expect("funnel").iter().map(|f| f["nodes"].as_u64().unwrap()).collect();
    assert_eq!(funnel, vec![1, 1, 1, 0, 0], "{w}");
    assert!(
        w["remedies"].as_array().unwrap().iter().any(|r| r == "ask for at most 8 GPUs per shard (and more shards)"),
        "{w}"
    );
    let whole = job_id(&json(&["job", "submit", "--gpus", "8", "-o", "json", "--server", s, "--", "sleep", "1"]));
    // Once the leader's planning round has judged it, it holds the backfill reservation.
    let deadline = Instant::now() + T;
    let w = loop {
        let w = json(&["job", "why", &whole.to_string(), "-o", "json", "--server", s]);
        if w["planned"] == true {
            break w;
        }
        assert!(Instant::now() < deadline, "no planning round judged job {whole}: {w}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(w["reason"]["kind"], "reserved", "{w}");
    let msg = w["reason"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("needs 8 GPUs on one node; it holds the backfill reservation"), "{w}");
    assert_eq!(w["funnel"][4]["nodes"], 0, "no node has 8 GPUs free: {w}");
    assert_eq!(w["jobs_ahead"], 1, "the job submitted before it: {w}");
    let listed = json(&["job", "list", "-o", "json", "--server", s]);
    let kinds: Vec<(u64, Value)> = listed["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| (j["id"].as_u64().unwrap(), j["pending_reason"]["kind"].clone()))
        .collect();
    assert_eq!(kinds, vec![(id, Value::Null), (never, "constraint".into()), (whole, "reserved".into())], "{listed}");
    let table = stdout(&run(&["job", "list", "--server", s]));
    assert!(table.contains("REASON") && table.contains("constraint") && table.contains("reserved"), "{table}");
    let text = stdout(&run(&["job", "why", &never.to_string(), "--server", s]));
    assert!(
        text.contains("nodes, one constraint at a time:") && text.contains("- ask for at most 8 GPUs per shard"),
        "{text}"
    );
    let status = stdout(&run(&["job", "status", &whole.to_string(), "--server", s]));
    assert!(status.contains("waiting:") && status.contains("(reserved;"), "{status}");
    let running = json(&["job", "why", &ids, "-o", "json", "--server", s]);
    assert_eq!(
        (running["reason"].clone(), running["explanation"].as_str()),
        (Value::Null, Some("it is running, not pending"))
    );
    for j in [never, whole] {
        json(&["job", "cancel", &j.to_string(), "-o", "json", "--server", s]);
    }

    let cancel = json(&["job", "cancel", &ids, "-o", "json", "--server", s]);
    assert_eq!((cancel["job_id"].as_u64(), cancel["already_finished"].as_bool()), (Some(id), Some(false)));
    let j = wait_job(s, id, "cancelled", |j| j["state"] == "cancelled");
    assert_eq!(j["shards"][0]["state"], "cancelled", "{j}");
    let twice = json(&["job", "cancel", &ids, "-o", "json", "--server", s]);
    assert_eq!((twice["state"].as_str(), twice["already_finished"].as_bool()), (Some("cancelled"), Some(true)));
    let watched = run(&["job", "watch", &ids, "--server", s]);
    assert_eq!(watched.status.code(), Some(1), "a cancelled job's watch exits 1");
    assert!(stdout(&watched).contains(&format!("job {id}: cancelled")), "{}", stdout(&watched));

    // An unknown job id: a clear message and exit 3.
    let unknown = run(&["job", "status", "999999", "--server", s]);
    assert_eq!(unknown.status.code(), Some(3));
    assert_eq!(stderr(&unknown).trim(), "error: job 999999 not found");

    // A dead first address: the next one answers, from the flag and from TESSERA_SERVER.
    let dead = format!("127.0.0.1:{}", free_port());
    let first_live = s.split(',').next().unwrap();
    let both = format!("{dead},{first_live}");
    let st = json(&["cluster", "status", "-o", "json", "--server", &both]);
    assert_eq!(st["members"].as_array().map(Vec::len), Some(3));
    let out = run_env(&["job", "list", "--all", "-o", "json"], &[("TESSERA_SERVER", &both)], T);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["jobs"][0]["id"], id);
    let repeated = json(&["job", "status", &ids, "-o", "json", "--server", &dead, "--server", first_live]);
    assert_eq!(repeated["id"], id);

    // A snapshot, verified and saved whole.
    let file = c.dir.path().join("backup.snap");
    let snap = json(&["cluster", "snapshot", "save", file.to_str().unwrap(), "-o", "json", "--server", s]);
    let data = std::fs::read(&file).expect("the snapshot file");
    assert_eq!(Some(data.len() as u64), snap["size_bytes"].as_u64(), "{snap}");
    assert_eq!(Some(u64::from(crc32fast::hash(&data))), snap["crc32"].as_u64(), "{snap}");
    assert!(snap["index"].as_u64() > Some(0) && snap["term"].as_u64() > Some(0), "{snap}");
    assert!(!c.dir.path().join("backup.snap.tmp").exists());
}

#[test]
fn bad_input_and_unreachable_servers_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let dead = format!("127.0.0.1:{}", free_port());
    // An invalid spec is refused before any server is asked: field, line, exit 2.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "command = [\"python3\", \"t.py\"]\nshards = 2\n\n[placement]\nspot = \"sometimes\"\n")
        .unwrap();
    let out = run(&["job", "submit", bad.to_str().unwrap(), "--server", &dead]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("line 5") && err.contains("placement.spot") && err.contains("bad.toml"), "{err}");
    // The one-line form names the flag.
    let out = run(&["job", "submit", "--gpus", "0", "--cloud", "gcp", "--server", &dead, "--", "python3", "t.py"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("--gpus") && err.contains("--cloud") && err.contains("gcp"), "{err}");
    // Nothing to run at all, a spec file and a command at once, a job id of 0: exit 2.
    for args in [
        vec!["job", "submit", "--server", &dead],
        vec!["job", "submit", bad.to_str().unwrap(), "--server", &dead, "--", "python3"],
        vec!["job", "status", "0", "--server", &dead],
        vec!["job", "list", "--server", "not an address"],
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
    // No server answers: which ones, and why.
    let other = format!("127.0.0.1:{}", free_port());
    let out = run(&["job", "list", "--server", &format!("{dead},{other}")]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim(),
        format!("error: could not reach any server: {dead} (connection refused), {other} (connection refused)")
    );
    // Help documents the exit codes; completions are generated.
    let help = stdout(&run(&["job", "--help"]));
    assert!(help.contains("Exit codes") && help.contains("3 not found"), "{help}");
    let status_help = stdout(&run(&["job", "status", "--help"]));
    assert!(status_help.contains("\"latest_checkpoint\""), "{status_help}");
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0));
        let script = stdout(&out);
        assert!(script.contains("tessera") && script.contains("snapshot"), "{shell}: {script}");
    }
}

/// A job array and dependencies through the CLI: the array is one row in `job list` with
/// counts per state, at most its limit of elements run at once, each element sees its index,
/// an after-ok job waits for the whole array and then runs, and a job whose after-ok
/// dependency was cancelled is cancelled with the reason.
#[test]
fn arrays_and_dependencies_run_through_the_cli() {
    let Some((c, servers, agent, _trainer)) = cluster_with_agent() else { return };
    let s = servers.as_str();
    wait_for_node(s, &agent);
    // Each element records when it ran, so that the limit can be checked from the outside.
    let marks = c.dir.path().join("marks");
    std::fs::create_dir_all(&marks).expect("marks dir");
    let script = format!(
        "echo \"index=$TESSERA_ARRAY_INDEX of $TESSERA_ARRAY_JOB_ID\"; touch {m}/start-$TESSERA_ARRAY_INDEX; \
         sleep 1; ls {m} | grep -c start- >{m}/seen-$TESSERA_ARRAY_INDEX; rm {m}/start-$TESSERA_ARRAY_INDEX",
        m = marks.display()
    );
    let arr = job_id(&json(&[
        "job", "submit", "--array", "0-7%3", "--name", "sweep", "-o", "json", "--server", s, "--", "sh", "-c", &script,
    ]));
    let after = job_id(&json(&[
        "job",
        "submit",
        "--after-ok",
        &arr.to_string(),
        "--name",
        "report",
        "-o",
        "json",
        "--server",
        s,
        "--",
        "true",
    ]));
    let why = json(&["job", "why", &after.to_string(), "-o", "json", "--server", s]);
    assert_eq!(why["reason"]["kind"], "dependency", "{why}");
    assert!(why["reason"]["message"].as_str().unwrap_or("").contains(&format!("job-{arr}")), "{why}");

    // While it runs: one row for the array, with counts, and no rows for its elements.
    let running = wait_job(s, arr, "running", |j| j["state"] == "running");
    assert_eq!(running["array"]["total"], 8, "{running}");
    let listed = json(&["job", "list", "-o", "json", "--server", s]);
    let rows = listed["jobs"].as_array().cloned().unwrap_or_default();
    assert!(rows.iter().any(|j| j["id"] == arr && j["array"]["indices"] == "0-7%3"), "{listed}");
    assert!(rows.iter().all(|j| j["array_job_id"].is_null()), "elements are listed only with --array: {listed}");

    let done = wait_job(s, arr, "succeeded", |j| j["state"] == "succeeded");
    assert_eq!(done["array"]["succeeded"], 8, "{done}");
    let after_done = wait_job(s, after, "the dependent job succeeded", |j| j["state"] == "succeeded");
    assert!(after_done["started_unix_ms"].as_u64() >= done["finished_unix_ms"].as_u64(), "{after_done}\n{done}");

    // The elements: eight jobs, indices 0..8, never more than three at once.
    let elements = json(&["job", "list", "--all", "--array", &arr.to_string(), "-o", "json", "--server", s]);
    let elements = elements["jobs"].as_array().cloned().unwrap_or_default();
    let mut indices: Vec<u64> = elements.iter().filter_map(|e| e["array_index"].as_u64()).collect();
    indices.sort_unstable();
    assert_eq!(indices, (0..8).collect::<Vec<u64>>(), "{elements:?}");
    let most = (0..8)
        .map(|i| {
            std::fs::read_to_string(marks.join(format!("seen-{i}"))).unwrap_or_default().trim().parse().unwrap_or(0)
        })
        .max()
        .unwrap_or(0);
    assert!((1..=3).contains(&most), "at most 3 elements at once, saw {most}");
    let e3 = elements.iter().find(|e| e["array_index"] == 3).expect("element 3");
    let id3 = e3["id"].as_u64().expect("id").to_string();
    let out = run(&["job", "logs", &id3, "--server", s]);
    assert!(stdout(&out).contains(&format!("index=3 of {arr}")), "{}{}", stdout(&out), stderr(&out));
    let table = stdout(&run(&["job", "list", "--all", "--server", s]));
    let row = table.lines().find(|l| l.contains("sweep [0-7%3]")).unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("8 succeeded"), "{table}");

    // A dependency that is cancelled: the job waiting on it is cancelled, saying why.
    let long = job_id(&json(&["job", "submit", "-o", "json", "--server", s, "--", "sleep", "60"]));
    let dependent =
        job_id(&json(&["job", "submit", "--after-ok", &long.to_string(), "-o", "json", "--server", s, "--", "true"]));
    assert_eq!(run(&["job", "cancel", &long.to_string(), "--server", s]).status.code(), Some(0));
    let j = wait_job(s, dependent, "cancelled", |j| j["state"] == "cancelled");
    assert_eq!(
        j["message"].as_str().unwrap_or(""),
        format!("dependency never satisfied: job-{long} ended cancelled (after-ok)"),
        "{j}"
    );
    // A dependency that can never be met is refused at once, naming the flag's field.
    let out = run(&["job", "submit", "--after-ok", &long.to_string(), "--server", s, "--", "true"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("after_ok") && stderr(&out).contains("already ended cancelled"), "{}", stderr(&out));
}
