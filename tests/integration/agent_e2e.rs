//! Real servers, real agents (simulated GPUs), the example trainer writing real checkpoints.

use std::time::{Duration, Instant};

use tessera_proto::v1;
use tessera_tests::{AgentProc, Cluster, Moto, channel, python_with, wait_for_leader, workspace_root};

const T: Duration = Duration::from_secs(30);

/// Print one recovery time, for `benches/scripts/recovery.sh`, which runs these tests several
/// times and reports the medians (docs/failure-handling.md).
fn recovery(scenario: &str, took: Duration) {
    eprintln!("RECOVERY {scenario} {}", took.as_millis());
}

/// Kills every process whose command line mentions `pattern` when dropped (shards of a
/// kill -9'd agent outlive it, as they would on a real host).
struct Reaper(String);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pkill").args(["-9", "-f", &self.0]).status();
    }
}

/// Copy the example trainer into the test's directory, so its command line is unique to the
/// test (and the reaper finds exactly its processes).
fn trainer(dir: &std::path::Path) -> (String, Reaper) {
    let path = dir.join("trainer.py");
    std::fs::copy(workspace_root().join("examples/trainer.py"), &path).expect("copy the example trainer");
    let p = path.display().to_string();
    (p.clone(), Reaper(p))
}

fn train_job(trainer: &str, steps: u32, step_seconds: f64) -> v1::SubmitJobRequest {
    v1::SubmitJobRequest {
        spec: Some(v1::JobSpec {
            name: "e2e".into(),
            command: vec![
                "python3".into(),
                trainer.into(),
                "--steps".into(),
                steps.to_string(),
                "--step-seconds".into(),
                step_seconds.to_string(),
                "--checkpoint-every".into(),
                "5".into(),
            ],
            shards: 1,
            resources: Some(v1::Resources { gpus: 1, ..Default::default() }),
            stop: Some(v1::StopPolicy {
                signal: "SIGUSR1".into(),
                checkpoint_grace_seconds: Some(2),
                term_grace_seconds: Some(2),
            }),
            ..Default::default()
        }),
        idempotency_key: String::new(),
    }
}

async fn submit(addrs: &[String], req: v1::SubmitJobRequest) -> u64 {
    let mut c = v1::job_service_client::JobServiceClient::new(channel(&addrs[0]));
    c.submit_job(req).await.expect("submit").into_inner().job_id
}

async fn job(addrs: &[String], id: u64) -> Option<v1::Job> {
    for a in addrs {
        let mut c = v1::job_service_client::JobServiceClient::new(channel(a));
        if let Ok(r) = c.get_job(v1::GetJobRequest { job_id: id, consistency: 0 }).await {
            return r.into_inner().job;
        }
    }
    None
}

async fn wait_until(addrs: &[String], id: u64, what: &str, f: impl Fn(&v1::Job) -> bool) -> v1::Job {
    let deadline = Instant::now() + T;
    loop {
        if let Some(j) = job(addrs, id).await
            && f(&j)
        {
            return j;
        }
        if Instant::now() > deadline {
            panic!("job {id} never reached: {what}; last {:?}", job(addrs, id).await);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Three servers with a leader, and the example trainer copied for this test. None, after
/// saying so, where python3 is missing.
async fn cluster_with_trainer() -> Option<(Cluster, Vec<String>, String, Reaper)> {
    if !python3() {
        eprintln!("python3 not found: skipping");
        return None;
    }
    let c = Cluster::start(3, &[]);
    let addrs = c.running_addrs();
    wait_for_leader(&addrs, T).await.expect("leader");
    let (tr, reaper) = trainer(c.dir.path());
    Some((c, addrs, tr, reaper))
}

/// The job's timeline (JobService.JobEvents), as "kind shard: message" lines, after checking
/// that it is numbered in order from 1 with nothing dropped.
async fn timeline(addrs: &[String], id: u64) -> Vec<String> {
    let mut c = v1::job_service_client::JobServiceClient::new(channel(&addrs[0]));
    let r = c.job_events(v1::JobEventsRequest { job_id: id, consistency: 0 }).await.expect("JobEvents").into_inner();
    let seq: Vec<u64> = r.events.iter().map(|e| e.sequence).collect();
    assert_eq!(seq, (1..=r.events.len() as u64).collect::<Vec<_>>(), "{r:?}");
    assert_eq!(r.dropped, 0);
    r.events
        .iter()
        .map(|e| {
            let kind = v1::JobEventKind::try_from(e.kind).map_or("?", |k| k.as_str_name());
            format!("{} {}: {}", kind.trim_start_matches("JOB_EVENT_KIND_"), opt(e.shard_index), e.message)
        })
        .collect()
}

fn opt(v: Option<u32>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

/// The first line of `lines` at or after `from` that starts with `prefix` and contains `has`;
/// its position.
fn find_line(lines: &[String], from: usize, prefix: &str, has: &str) -> usize {
    lines.iter().skip(from).position(|l| l.starts_with(prefix) && l.contains(has)).map(|i| i + from).unwrap_or_else(
        || panic!("no {prefix:?} with {has:?} after line {from} of the timeline:\n{}", lines.join("\n")),
    )
}

/// Shard 0 reports running.
fn running(j: &v1::Job) -> bool {
    j.shards.first().is_some_and(|s| s.state == v1::ShardState::Running as i32)
}

fn python3() -> bool {
    std::process::Command::new("python3").arg("--version").output().is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_trainer_runs_to_success_and_checkpoints() {
    let Some((c, addrs, tr, _reaper)) = cluster_with_trainer().await else { return };
    let a = AgentProc::start("gpu-a", &addrs, "8xH100-80GB", c.dir.path(), &[]);
    let id = submit(&addrs, train_job(&tr, 20, 0.05)).await;
    let j = wait_until(&addrs, id, "succeeded", |j| j.state == v1::JobState::Succeeded as i32).await;
    let ck = j.shards[0].last_checkpoint.clone().unwrap_or_else(|| panic!("no checkpoint\n{}", a.log_tail()));
    assert!(ck.step >= 15, "{ck:?}");
    // Progress and telemetry come from the heartbeats, kept on the leader: a follower shows
    // them too (it passes the read on). The final step arrives with the heartbeat after the exit.
    let leader = wait_for_leader(&addrs, T).await.expect("leader");
    let follower = c.servers.values().find(|s| s.id != leader).map(|s| s.addr.clone()).expect("a follower");
    let f = [follower.clone()];
    let j = wait_until(&f, id, "the final step", |j| j.shards[0].step == 20).await;
    assert_eq!(j.shards[0].total_steps, Some(20));
    assert!(j.shards[0].metrics.contains_key("loss"), "{:?}", j.shards[0].metrics);
    let node = get_node(&follower, "gpu-a").await.expect("gpu-a");
    assert!(node.last_heartbeat_unix_ms > 0);
    assert!(
        node.gpus.iter().all(|g| g.telemetry.as_ref().is_some_and(|t| t.memory_total_mib == Some(81_920))),
        "{node:?}"
    );
    let file = ck.uri.strip_prefix("file://").unwrap_or(&ck.uri);
    assert!(std::path::Path::new(file).exists(), "the checkpoint file {} exists", ck.uri);
    // The node registered with simulated GPUs.
    let mut nodes = v1::node_service_client::NodeServiceClient::new(channel(&addrs[0]));
    let list = nodes.list_nodes(v1::ListNodesRequest::default()).await.unwrap().into_inner().nodes;
    assert_eq!(list.len(), 1);
    assert!(list[0].simulated);
    // Its metrics use dcgm-exporter's names and say the GPUs are simulated.
    let text = http_get(&a.http, "/metrics").await;
    assert!(text.contains("DCGM_FI_DEV_GPU_UTIL") && text.contains("simulated=\"true\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_s_shard_resumes_elsewhere_from_its_checkpoint() {
    let Some((c, addrs, tr, _reaper)) = cluster_with_trainer().await else { return };
    let mut a = AgentProc::start("gpu-a", &addrs, "8xH100-80GB", c.dir.path(), &[]);
    let id = submit(&addrs, train_job(&tr, 200, 0.05)).await;
    let j = wait_until(&addrs, id, "a checkpoint at step 10", |j| {
        j.shards.first().and_then(|s| s.last_checkpoint.as_ref()).is_some_and(|c| c.step >= 10)
    })
    .await;
    let before = j.shards[0].last_checkpoint.clone().unwrap().step;
    // Start a second agent, then kill -9 the first.
    let _b = AgentProc::start("gpu-b", &addrs, "8xH100-80GB", c.dir.path(), &[]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.kill();
    let killed = Instant::now();
    let moved = wait_until(&addrs, id, "attempt 2 running", |j| {
        j.shards[0].attempt == 2 && j.shards[0].state == v1::ShardState::Running as i32
    })
    .await;
    recovery("agent-killed", killed.elapsed());
    assert_ne!(moved.shards[0].node_id, j.shards[0].node_id);
    // The killed agent's shard may outlive it, as on a host where only the agent died (it dies
    // at its next write to the agent's pipes). The agent comes back, as systemd restarts it,
    // and kills whatever is left before anything else: no shard runs twice.
    a.restart();
    registered(&addrs[0], "gpu-a", &a).await;
    assert_invariants(&addrs, &[id], &tr).await;
    let done = wait_until(&addrs, id, "succeeded", |j| j.state == v1::JobState::Succeeded as i32).await;
    assert!(done.shards[0].last_checkpoint.as_ref().unwrap().step >= before);
    // The resumed attempt started from the checkpoint, not from step 0.
    let log = std::fs::read_to_string(
        c.dir
            .path()
            .join("agent-gpu-b")
            .join(format!("job-{id}/shard-0/attempt-{}/stdout.log", done.shards[0].attempt_id.unwrap_or(0))),
    )
    .unwrap_or_default();
    assert!(log.contains("resuming from step"), "the second attempt did not resume:\n{log}");
    // Its timeline tells the story, in order.
    let t = timeline(&addrs, id).await;
    assert!(t[0].starts_with("SUBMITTED -: submitted"), "{t:?}");
    let i = find_line(&t, 0, "PLACED 0:", "placed on gpu-a");
    let i = find_line(&t, i, "SHARD_STARTED 0:", "started on gpu-a");
    let i = find_line(&t, i, "CHECKPOINT 0:", "checkpoint at step");
    let i = find_line(&t, i, "NODE_LOST 0:", "gpu-a was lost");
    let i = find_line(&t, i, "SHARD_REQUEUED 0:", "back in the queue: gpu-a was lost");
    let i = find_line(&t, i, "RESTARTED 0:", "placed again on gpu-b (attempt 2) (resumes from the checkpoint at step");
    let i = find_line(&t, i, "SHARD_EXITED 0:", "exited with code 0");
    assert_eq!(i + 2, t.len(), "{t:?}");
    assert_eq!(t[i + 1], "FINISHED -: succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_follows_the_ladder_and_leaves_no_process_behind() {
    let Some((c, addrs, tr, _reaper)) = cluster_with_trainer().await else { return };
    let _a = AgentProc::start("gpu-a", &addrs, "8xH100-80GB", c.dir.path(), &[]);
    let id = submit(&addrs, train_job(&tr, 100_000, 0.05)).await;
    wait_until(&addrs, id, "running", running).await;
    let mut jobs = v1::job_service_client::JobServiceClient::new(channel(&addrs[1]));
    jobs.cancel_job(v1::CancelJobRequest { job_id: id, reason: "test".into() }).await.unwrap();
    wait_until(&addrs, id, "cancelled", |j| j.state == v1::JobState::Cancelled as i32).await;
    let left = std::process::Command::new("pgrep").args(["-f", &tr]).output().unwrap();
    assert!(left.stdout.is_empty(), "trainer processes left: {}", String::from_utf8_lossy(&left.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_keep_running_through_a_leader_change() {
    let Some((mut c, addrs, tr, _reaper)) = cluster_with_trainer().await else { return };
    let leader = wait_for_leader(&addrs, T).await.expect("leader");
    let a = AgentProc::start("gpu-a", &addrs, "8xH100-80GB", c.dir.path(), &[]);
    let id = submit(&addrs, train_job(&tr, 120, 0.05)).await;
    let j = wait_until(&addrs, id, "running", running).await;
    c.servers.get_mut(&leader).unwrap().kill();
    let killed = Instant::now();
    let rest = c.running_addrs();
    // A client's view: the first write acknowledged after the kill (1 s per try, then the next
    // server; the idempotency key makes retrying safe).
    let probe = loop {
        let mut acked = None;
        for a in &rest {
            let mut jobs = v1::job_service_client::JobServiceClient::new(channel(a));
            let mut req = train_job(&tr, 1, 0.01);
            req.idempotency_key = "after-the-leader-died".into();
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(1), jobs.submit_job(req)).await {
                acked = Some(r.into_inner().job_id);
                break;
            }
        }
        if let Some(id) = acked {
            break id;
        }
        assert!(killed.elapsed() < T, "no write was acknowledged after the leader died\n{}", c.logs());
    };
    recovery("leader-killed", killed.elapsed());
    let done = wait_until(&rest, id, "succeeded", |j| j.state == v1::JobState::Succeeded as i32).await;
    assert_eq!(
        done.shards[0].attempt_id,
        j.shards[0].attempt_id,
        "the shard was restarted: {done:?}\n--- agent ---\n{}\n{}",
        a.log_tail(),
        c.logs()
    );
    assert_invariants(&rest, &[id, probe], &tr).await;
}

async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + T;
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
            if s.write_all(req.as_bytes()).await.is_ok() {
                let mut out = String::new();
                let _ = s.read_to_string(&mut out).await;
                // Metrics appear with the first heartbeat; other paths answer at once.
                if !path.starts_with("/metrics")
                    || out.contains("tessera_agent_shards_running")
                    || Instant::now() > deadline
                {
                    return out;
                }
            }
        }
        assert!(Instant::now() < deadline, "no metrics at {addr}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Wait until the agent's node is registered, and return it.
async fn registered(addr: &str, name: &str, agent: &AgentProc) -> v1::Node {
    let deadline = Instant::now() + T;
    loop {
        if let Some(n) = get_node(addr, name).await {
            return n;
        }
        assert!(Instant::now() < deadline, "agent {name} never registered\n{}", agent.log_tail());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn get_node(addr: &str, name: &str) -> Option<v1::Node> {
    let mut c = v1::node_service_client::NodeServiceClient::new(channel(addr));
    let r = v1::GetNodeRequest {
        node: Some(v1::NodeRef { node: Some(v1::node_ref::Node::Name(name.into())) }),
        consistency: 0,
    };
    c.get_node(r).await.ok()?.into_inner().node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xid_on_a_simulated_gpu_moves_the_shard_off_it_until_cleared() {
    let Some((c, addrs, tr, _reaper)) = cluster_with_trainer().await else { return };
    let a = AgentProc::start("gpu-a", &addrs, "2xH100-80GB", c.dir.path(), &[]);
    let id = submit(&addrs, train_job(&tr, 400, 0.05)).await;
    let first = wait_until(&addrs, id, "running", running).await;
    assert_eq!(first.shards[0].gpus, vec![0]);
    // A watcher from before the fault sees it happen, event by event.
    let mut watch = v1::job_service_client::JobServiceClient::new(channel(&addrs[1]))
        .watch_job(v1::WatchJobRequest { job_id: id })
        .await
        .expect("WatchJob")
        .into_inner();
    let watched = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(Some(m)) = watch.message().await {
            if let Some(e) = m.event {
                let restarted = e.kind == v1::JobEventKind::Restarted as i32;
                seen.push(e);
                if restarted {
                    break;
                }
            }
        }
        seen
    });
    // XID 31 (a GPU memory page fault) is the program's fault: the GPU stays in service. XID 79
    // (fallen off the bus), reported after it, benches the GPU.
    let reply = http_get(&a.http, "/simulate/xid?gpu=0&xid=31").await;
    assert!(reply.contains("injected"), "{reply}");
    let reply = http_get(&a.http, "/simulate/xid?gpu=0&xid=79").await;
    assert!(reply.contains("injected"), "{reply}");
    let xid = Instant::now();
    let moved =
        // The new attempt lands on the same node, and its agent must actually start it.
        wait_until(&addrs, id, "attempt 2 running on GPU 1", |j| {
            j.shards[0].attempt == 2 && j.shards[0].gpus == vec![1] && j.shards[0].state == v1::ShardState::Running as i32
        })
        .await;
    recovery("gpu-xid", xid.elapsed());
    assert_eq!(moved.shards[0].node_id, first.shards[0].node_id, "same node, healthy GPU");
    assert_invariants(&addrs, &[id], &tr).await;
    let node = get_node(&addrs[0], "gpu-a").await.expect("node");
    let health = node.gpus[0].health.clone().unwrap_or_default();
    // Benched by the 79 (a GPU already out keeps its first reason: the 31 did not bench it), for
    // the ten-minute cool-down of a first hardware fault.
    assert!(!health.healthy && health.reason == "XID 79", "{health:?}");
    assert_eq!(health.recent_faults, 1);
    let back = health.until_unix_ms.expect("a cool-down") - health.since_unix_ms;
    assert_eq!(back, 600_000, "{health:?}");
    // An operator clears it: healthy at once, its fault forgotten.
    let mut nodes = v1::node_service_client::NodeServiceClient::new(channel(&addrs[2]));
    let clear = v1::ClearGpuHealthRequest {
        node: Some(v1::NodeRef { node: Some(v1::node_ref::Node::Name("gpu-a".into())) }),
        gpu_indices: vec![0],
        reason: "reset by hand".into(),
    };
    let cleared = nodes.clear_gpu_health(clear).await.expect("clear").into_inner().node.expect("node");
    let h = cleared.gpus[0].health.clone().unwrap_or_default();
    assert!(h.healthy && h.recent_faults == 0 && h.until_unix_ms.is_none(), "{h:?}");
    let seen = tokio::time::timeout(T, watched).await.expect("the watcher saw the restart").expect("watcher");
    use v1::JobEventKind as K;
    // The shard may checkpoint as it stops: the rest comes in this order.
    let kinds: Vec<i32> =
        seen.iter().filter(|e| e.sequence > 0 && e.kind != K::Checkpoint as i32).map(|e| e.kind).collect();
    let fault = kinds.iter().position(|k| *k == K::GpuFault as i32).expect("GPU_FAULT watched");
    assert!(
        kinds[fault..].starts_with(&[
            K::GpuFault as i32,
            K::ShardExited as i32,
            K::ShardRequeued as i32,
            K::Restarted as i32
        ]),
        "{seen:?}"
    );
    let f = &seen.iter().find(|e| e.kind == K::GpuFault as i32).unwrap();
    assert_eq!(f.stop_reason, v1::StopReason::GpuFault as i32);
    assert!(f.message.contains("GPU 0: XID 79") && f.node_name == "gpu-a", "{f:?}");
    // Watched stored events are numbered as the timeline numbers them, without gaps.
    let stored: Vec<u64> = seen.iter().map(|e| e.sequence).filter(|s| *s > 0).collect();
    assert!(stored.windows(2).all(|w| w[1] == w[0] + 1), "{stored:?}");
    let t = timeline(&addrs, id).await;
    let at = find_line(&t, 0, "GPU_FAULT 0:", "a GPU of gpu-a failed: stopping it (GPU 0: XID 79)");
    assert_eq!(t[at].split_once(' ').map(|x| x.0), Some("GPU_FAULT"));
    let restart = find_line(&t, at, "RESTARTED 0:", "placed again on gpu-a (attempt 2)");
    assert_eq!(stored.last(), Some(&(restart as u64 + 1)), "the watcher's numbers are the timeline's");
    // Real GPUs refuse injected faults; bad requests name the parameter.
    assert!(http_get(&a.http, "/simulate/xid?gpu=zero&xid=79").await.contains("gpu"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_agent_fences_its_shards() {
    let Some((c, addrs, tr, _reaper)) = cluster_with_trainer().await else { return };
    let a = AgentProc::start("gpu-a", &addrs, "8xH100-80GB", c.dir.path(), &[]);
    let id = submit(&addrs, train_job(&tr, 100_000, 0.05)).await;
    wait_until(&addrs, id, "running", running).await;
    // Every server freezes: the agent's messages go unacknowledged.
    for s in c.servers.values() {
        s.signal("STOP");
    }
    let stopped = Instant::now();
    let deadline = stopped + T;
    loop {
        let left = std::process::Command::new("pgrep").args(["-f", &tr]).output().unwrap();
        if left.stdout.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the agent never fenced its shard\n{}", a.log_tail());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fenced = stopped.elapsed();
    for s in c.servers.values() {
        s.signal("CONT");
    }
    // The fence (3 s) counts from the last acknowledged message, which came at most one
    // heartbeat (1 s) before the servers froze; then the group is killed at once.
    assert!(fenced >= Duration::from_secs(2), "shard stopped after {fenced:?}, before the fence timeout");
    eprintln!("servers frozen -> agent stopped its shard: {fenced:?}");
    let metrics = http_get(&a.http, "/metrics").await;
    assert!(metrics.contains("tessera_agent_fenced_total 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_driver_the_agent_starts_with_no_gpus_and_says_so() {
    let c = Cluster::start(3, &[]);
    let addrs = c.running_addrs();
    wait_for_leader(&addrs, T).await.expect("leader");
    let a = AgentProc::start("cpu-only", &addrs, "", c.dir.path(), &[]);
    let node = registered(&addrs[0], "cpu-only", &a).await;
    assert!(node.gpus.is_empty());
    assert!(!node.simulated);
    assert!(a.log_tail().contains("no NVIDIA driver"), "{}", a.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_progress_lines_are_counted_not_fatal() {
    let c = Cluster::start(3, &[]);
    let addrs = c.running_addrs();
    wait_for_leader(&addrs, T).await.expect("leader");
    let a = AgentProc::start("gpu-a", &addrs, "1xA100-40GB", c.dir.path(), &[]);
    let script = r#"printf 'not json\n{"step": -1}\n{"step": 3, "checkpoint": "file:///tmp/none-3"}\n[1,2]\n' >> "$TESSERA_PROGRESS_FILE"; sleep 3"#;
    let mut req = train_job("unused", 1, 0.0);
    req.spec.as_mut().unwrap().command = vec!["sh".into(), "-c".into(), script.into()];
    let id = submit(&addrs, req).await;
    let deadline = Instant::now() + T;
    loop {
        let m = http_get(&a.http, "/metrics").await;
        if m.contains("tessera_agent_progress_lines_rejected 3") {
            break;
        }
        assert!(Instant::now() < deadline, "malformed lines not counted:\n{m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let j = wait_until(&addrs, id, "succeeded", |j| j.state == v1::JobState::Succeeded as i32).await;
    assert_eq!(j.shards[0].last_checkpoint.as_ref().map(|c| c.step), Some(3), "the good line still counted");
}

/// Collect a job's output through `JobService.JobLogs` on `addr` until the stream ends.
async fn logs(addr: &str, id: u64, follow: bool) -> String {
    let mut c = v1::job_service_client::JobServiceClient::new(channel(addr));
    let req = v1::JobLogsRequest { job_id: id, follow, ..Default::default() };
    let mut stream = c.job_logs(req).await.expect("job logs").into_inner();
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = tokio::time::timeout(T, stream.message()).await.expect("log stream stalled") {
        if chunk.stream == v1::LogStream::Stdout as i32 {
            out.extend(chunk.data);
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_reach_the_user_through_any_server_and_follow_to_the_end() {
    let Some((c, addrs, tr, _reaper)) = cluster_with_trainer().await else { return };
    let leader = wait_for_leader(&addrs, T).await.expect("leader");
    let follower = c.servers.values().find(|s| s.id != leader).unwrap().addr.clone();
    let _a = AgentProc::start("gpu-a", &addrs, "8xH100-80GB", c.dir.path(), &[]);
    let id = submit(&addrs, train_job(&tr, 40, 0.05)).await;
    wait_until(&addrs, id, "running", running).await;
    // Followed from a follower (which passes the leader's stream through) to the job's end.
    let followed = logs(&follower, id, true).await;
    assert!(followed.contains("step 1/40") && followed.contains("done at step 40"), "{followed}");
    let j = job(&addrs, id).await.unwrap();
    assert_eq!(j.state, v1::JobState::Succeeded as i32);
    // Afterwards, without following: what is kept.
    let kept = logs(&addrs[0], id, false).await;
    assert!(kept.contains("done at step 40"), "{kept}");
    let mut cl = v1::job_service_client::JobServiceClient::new(channel(&addrs[0]));
    let missing = cl.job_logs(v1::JobLogsRequest { job_id: 999, ..Default::default() }).await;
    assert_eq!(missing.err().map(|s| s.code()), Some(tonic::Code::NotFound));
}

/// Every chunk of a JobLogs call, with its stream and offset.
async fn log_chunks(addr: &str, req: v1::JobLogsRequest) -> Vec<v1::JobLogsResponse> {
    let mut c = v1::job_service_client::JobServiceClient::new(channel(addr));
    let mut stream = c.job_logs(req).await.expect("job logs").into_inner();
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = tokio::time::timeout(T, stream.message()).await.expect("log stream stalled") {
        out.push(chunk);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_s_whole_output_is_read_from_its_agent_after_leader_changes() {
    let Some((mut c, addrs, _tr, _reaper)) = cluster_with_trainer().await else { return };
    let a = AgentProc::start("gpu-a", &addrs, "8xH100-80GB", c.dir.path(), &[]);
    registered(&addrs[0], "gpu-a", &a).await;
    // 3 MiB of numbered lines, more than the leader keeps in memory (1 MiB per stream).
    let script = "for i in $(seq 1 60000); do printf 'line %08d %040d\\n' $i 0; done; echo the-end >&2";
    let mut req = train_job("unused", 1, 0.0);
    if let Some(s) = req.spec.as_mut() {
        s.command = vec!["sh".into(), "-c".into(), script.into()];
    }
    let id = submit(&addrs, req).await;
    wait_until(&addrs, id, "succeeded", |j| j.state == v1::JobState::Succeeded as i32).await;
    let expected: String = (1..=60000).map(|i| format!("line {i:08} {:040}\n", 0)).collect();
    let stdout = |chunks: &[v1::JobLogsResponse]| -> (Vec<u64>, Vec<u8>) {
        let mine: Vec<&v1::JobLogsResponse> =
            chunks.iter().filter(|c| c.stream == v1::LogStream::Stdout as i32).collect();
        (mine.iter().map(|c| c.offset).collect(), mine.iter().flat_map(|c| c.data.clone()).collect())
    };
    // The leader holds only the tail; the rest comes from the agent's disk, in order.
    let all = log_chunks(&addrs[0], v1::JobLogsRequest { job_id: id, ..Default::default() }).await;
    let (offsets, data) = stdout(&all);
    assert_eq!(offsets.first(), Some(&0));
    assert_eq!(data.len(), expected.len(), "{offsets:?}");
    assert!(data == expected.as_bytes(), "the output differs from what the job wrote");

    // Two leader changes: no server holds any of it in memory any more.
    for _ in 0..2 {
        let leader = wait_for_leader(&c.running_addrs(), T).await.expect("leader");
        c.servers.get_mut(&leader).expect("leader process").kill();
        wait_for_leader(&c.running_addrs(), T).await.expect("a new leader");
        c.servers.get_mut(&leader).expect("leader process").restart();
    }
    let addrs = c.running_addrs();
    wait_for_leader(&addrs, T).await.expect("leader");
    registered(&addrs[0], "gpu-a", &a).await;
    let deadline = Instant::now() + T;
    let data = loop {
        // The agent reconnects to the new leader within a few heartbeats.
        let (_, data) = stdout(&log_chunks(&addrs[0], v1::JobLogsRequest { job_id: id, ..Default::default() }).await);
        if data.len() == expected.len() || Instant::now() > deadline {
            break data;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(data == expected.as_bytes(), "after two leader changes: {} of {} bytes", data.len(), expected.len());
    let tail =
        log_chunks(&addrs[1], v1::JobLogsRequest { job_id: id, tail_bytes: Some(100), ..Default::default() }).await;
    let (offsets, data) = stdout(&tail);
    assert_eq!(
        (offsets, data),
        (vec![expected.len() as u64 - 100], expected.as_bytes()[expected.len() - 100..].to_vec())
    );
    let err = log_chunks(
        &addrs[2],
        v1::JobLogsRequest { job_id: id, streams: v1::LogSelection::Stderr as i32, ..Default::default() },
    )
    .await;
    assert_eq!(err.iter().flat_map(|c| c.data.clone()).collect::<Vec<u8>>(), b"the-end\n");
}

/// A leader frozen (SIGSTOP, as a paused VM or container) for 8 s, well past the election and
/// fence timeouts, restarts no shard: the agents leave its silent connections and register
/// with its successor inside their fence, and once it resumes it judges no one on the silence
/// it slept through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_frozen_for_eight_seconds_restarts_no_shard() {
    let Some((c, addrs, tr, _reaper)) = cluster_with_trainer().await else { return };
    let a = AgentProc::start("gpu-a", &addrs, "8xH100-80GB", c.dir.path(), &[]);
    let b = AgentProc::start("gpu-b", &addrs, "8xH100-80GB", c.dir.path(), &[]);
    registered(&addrs[0], "gpu-a", &a).await;
    registered(&addrs[0], "gpu-b", &b).await;
    let mut req = train_job(&tr, 100_000, 0.05);
    let spec = req.spec.as_mut().unwrap();
    spec.shards = 2;
    spec.resources = Some(v1::Resources { gpus: 8, ..Default::default() });
    let id = submit(&addrs, req).await;
    let before = wait_until(&addrs, id, "both shards running", |j| {
        j.shards.iter().all(|s| s.state == v1::ShardState::Running as i32)
    })
    .await;
    let leader = wait_for_leader(&addrs, T).await.expect("leader");
    let frozen = &c.servers[&leader];
    let others: Vec<String> = addrs.iter().filter(|a| **a != frozen.addr).cloned().collect();
    frozen.signal("STOP");
    tokio::time::sleep(Duration::from_secs(8)).await;
    frozen.signal("CONT");
    // Time for the resumed server to hear of its successor, and for any verdict to land.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = job(&others, id).await.expect("the job");
    // On failure, what the agents did about their sessions (their logs are mostly progress).
    let sessions = |agent: &AgentProc| -> String {
        plain(&agent.log())
            .lines()
            .filter(|l| {
                ["regist", "session", "silence", "fence", "leader", "unreachable"].iter().any(|w| l.contains(w))
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    for (s0, s1) in before.shards.iter().zip(&after.shards) {
        assert_eq!(
            (s1.attempt_id, s1.state),
            (s0.attempt_id, v1::ShardState::Running as i32),
            "shard {} was restarted or stopped:\n--- gpu-a ---\n{}\n--- gpu-b ---\n{}\n{}",
            s0.index,
            sessions(&a),
            sessions(&b),
            c.logs()
        );
    }
    for name in ["gpu-a", "gpu-b"] {
        let node = get_node(&others[0], name).await.expect("node");
        assert_eq!(node.state, v1::NodeState::Ready as i32, "{name} is not ready: {node:?}");
    }
    for agent in [&a, &b] {
        assert!(
            !agent.log().contains("killing every shard"),
            "{} fenced its shards:\n{}",
            agent.name,
            agent.log_tail()
        );
    }
    let new_leader = wait_for_leader(&others, T).await.expect("a leader");
    assert_ne!(new_leader, leader, "the frozen leader was not replaced");
    assert!(!frozen.log().contains("marking node down"), "the deposed leader judged nodes:\n{}", frozen.log_tail());
}

/// Text without its terminal colour sequences (ESC [ ... m).
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(ch) = chars.next() {
        if ch == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// Checkpoints in a real S3 API (moto's server): the agent copies each one from the shard's
/// local directory and reports it only once it is in the bucket; a spot notice's checkpoint is
/// in the bucket before the deadline; a host that dies with its disk takes nothing with it,
/// because the next attempt downloads the checkpoint; old steps are pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_in_s3_outlive_their_host_and_a_spot_notice() {
    use tessera_agent::cloud::fake::FakeAws;
    let Some(moto) = Moto::start() else { return };
    let Some((c, addrs, tr, _reaper)) = cluster_with_trainer().await else { return };
    moto.create_bucket("ckpt");
    let fake = FakeAws::start().await.expect("fake AWS metadata on 127.0.0.1");
    let env = moto.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let endpoint = fake.endpoint();
    let spot_args = ["--cloud", "aws", "--metadata-endpoint", &endpoint, "--checkpoint-keep", "2"];
    let spot = AgentProc::start_with_env("gpu-spot", &addrs, "8xH100-80GB", c.dir.path(), &spot_args, &env);
    registered(&addrs[0], "gpu-spot", &spot).await;
    let mut b =
        AgentProc::start_with_env("gpu-b", &addrs, "8xH100-80GB", c.dir.path(), &["--checkpoint-keep", "2"], &env);
    registered(&addrs[0], "gpu-b", &b).await;

    let mut req = train_job(&tr, 300, 0.05);
    let spec = req.spec.as_mut().unwrap();
    spec.checkpoint_dir = "s3://ckpt/runs".into();
    spec.placement = Some(v1::Placement { spot: v1::SpotPolicy::Prefer as i32, ..Default::default() });
    let id = submit(&addrs, req).await;
    let prefix = format!("s3://ckpt/runs/job-{id}/shard-0/");
    let in_s3 = |j: &v1::Job, after: u64| {
        j.shards[0].last_checkpoint.as_ref().is_some_and(|ck| ck.step > after && ck.uri.starts_with(&prefix))
    };
    let first = wait_until(&addrs, id, "a checkpoint in S3", |j| in_s3(j, 10)).await;
    assert_eq!(first.shards[0].node_name, "gpu-spot");
    let ck = first.shards[0].last_checkpoint.clone().unwrap();
    // What the servers hold is in the bucket, under the job, shard, step and attempt.
    let key = ck.uri.trim_start_matches("s3://ckpt/");
    assert!(
        key.ends_with(&format!("-{}/ckpt-shard0-step{:08}.json", first.shards[0].attempt_id.unwrap(), ck.step)),
        "{key}"
    );
    assert!(moto.keys("ckpt", key).contains(&key.to_string()), "{key} is not in the bucket");

    // AWS posts the two-minute warning: the shard checkpoints, the copy lands before the
    // deadline, and the shard moves to gpu-b, which downloads it.
    fake.post_instance_action("terminate", &rfc3339_in(120));
    let moved = wait_until(&addrs, id, "running on gpu-b", |j| {
        j.shards[0].node_name == "gpu-b" && j.shards[0].state == v1::ShardState::Running as i32
    })
    .await;
    let out = attempt_log(&c, &first.shards[0], id);
    assert!(out.contains("checkpoint requested"), "the shard was not asked to checkpoint at the notice:\n{out}");
    let margin = plain(&spot.log())
        .lines()
        .rev()
        .filter(|l| l.contains("before the spot deadline"))
        .find_map(|l| l.split("spot_margin_ms=").nth(1)?.split_whitespace().next()?.parse::<i64>().ok());
    let margin = margin.unwrap_or_else(|| panic!("no checkpoint copied after the notice:\n{}", spot.log_tail()));
    assert!(margin > 60_000, "the notice gave 120 s; the copy left {margin} ms");
    eprintln!("SPOT_CHECKPOINT_MARGIN_MS {margin}");
    let resumed = wait_until(&addrs, id, "gpu-b's attempt resumed and checkpointed to S3", |j| {
        let attempt = j.shards[0].attempt_id.unwrap_or(0);
        j.shards[0].last_checkpoint.as_ref().is_some_and(|ck| ck.uri.contains(&format!("-{attempt}/")))
    })
    .await;
    let out = attempt_log(&c, &moved.shards[0], id);
    let local = c
        .dir
        .path()
        .join(format!("agent-gpu-b/job-{id}/shard-0/attempt-{}/resume/", moved.shards[0].attempt_id.unwrap()));
    assert!(
        out.contains("resuming from step") && out.contains(&local.display().to_string()),
        "gpu-b's attempt did not resume from a downloaded copy in {}:\n{out}",
        local.display()
    );
    assert!(b.log().contains("checkpoint downloaded"), "{}", b.log_tail());

    // gpu-b dies with its disk (kill -9 of the agent and its shard, then its directory wiped),
    // and a third host takes over: the checkpoint it resumes from can only come from S3.
    let _c3 =
        AgentProc::start_with_env("gpu-c", &addrs, "8xH100-80GB", c.dir.path(), &["--checkpoint-keep", "2"], &env);
    registered(&addrs[0], "gpu-c", &_c3).await;
    let step_before = resumed.shards[0].last_checkpoint.as_ref().unwrap().step;
    b.kill();
    for pid in pids_with(&tr, &format!("TESSERA_JOB_ID={id}")) {
        let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    std::fs::remove_dir_all(c.dir.path().join("agent-gpu-b")).expect("wipe gpu-b's disk");
    let third = wait_until(&addrs, id, "running on gpu-c", |j| {
        j.shards[0].node_name == "gpu-c" && j.shards[0].state == v1::ShardState::Running as i32
    })
    .await;
    let done = succeeded_within(&addrs, id, Duration::from_secs(120)).await;
    let out = attempt_log(&c, &third.shards[0], id);
    let resumed_at: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("resuming from step ")?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("gpu-c's attempt did not resume:\n{out}"));
    assert!(resumed_at >= step_before, "resumed at {resumed_at}, before the durable step {step_before}");
    assert!(out.contains("/resume/"), "{out}");
    let last = done.shards[0].last_checkpoint.clone().unwrap();
    assert_eq!(last.step, 300);
    assert!(last.uri.starts_with(&prefix), "{last:?}");

    // Keep-last-2: once the servers have accepted the last checkpoint (pruning follows the
    // acknowledgements, at the agent's next heartbeat), only the newest two steps are left.
    let deadline = Instant::now() + T;
    loop {
        let keys = moto.keys("ckpt", &format!("runs/job-{id}/shard-0/"));
        let steps: std::collections::BTreeSet<String> =
            keys.iter().filter_map(|k| Some(k.split('/').nth(3)?.split('-').next()?.to_string())).collect();
        if steps.len() == 2 {
            assert!(steps.contains(&format!("{:012}", 300)), "{keys:?}");
            break;
        }
        assert!(Instant::now() < deadline, "not pruned to two steps: {keys:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Wait until the job succeeded.
async fn succeeded_within(addrs: &[String], id: u64, timeout: Duration) -> v1::Job {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(j) = job(addrs, id).await
            && j.state == v1::JobState::Succeeded as i32
        {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} did not succeed: {:?}", job(addrs, id).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn rfc3339_in(secs: u64) -> String {
    // AWS's form, YYYY-MM-DDTHH:MM:SSZ, computed from the Unix time (civil-from-days).
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + secs;
    let (days, rem) = ((t / 86_400) as i64, t % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_metadata_places_the_node_and_a_spot_notice_moves_its_shard() {
    if !python3() {
        eprintln!("python3 not found: skipping");
        return;
    }
    use tessera_agent::cloud::fake::{AwsIdentity, FakeAws};
    let fake = FakeAws::start().await.expect("fake AWS metadata on 127.0.0.1");
    assert!(fake.endpoint().starts_with("http://127.0.0.1:"));
    fake.set_identity(AwsIdentity { zone: "us-east-1b".into(), ..AwsIdentity::default() });
    let c = Cluster::start(3, &[]);
    let addrs = c.running_addrs();
    wait_for_leader(&addrs, T).await.expect("leader");
    let (tr, _reaper) = trainer(c.dir.path());
    let endpoint = fake.endpoint();
    let spot = AgentProc::start(
        "gpu-spot",
        &addrs,
        "8xH100-80GB",
        c.dir.path(),
        &["--cloud", "aws", "--metadata-endpoint", &endpoint],
    );
    let node = registered(&addrs[0], "gpu-spot", &spot).await;
    assert_eq!(
        (node.cloud, node.region.as_str(), node.zone.as_str(), node.spot),
        (v1::Cloud::Aws as i32, "us-east-1", "us-east-1b", true)
    );
    assert_eq!(node.instance_type, "p5.48xlarge");
    let _od = AgentProc::start("gpu-ondemand", &addrs, "8xH100-80GB", c.dir.path(), &[]);
    let mut req = train_job(&tr, 2000, 0.05);
    req.spec.as_mut().unwrap().placement =
        Some(v1::Placement { spot: v1::SpotPolicy::Prefer as i32, ..Default::default() });
    let id = submit(&addrs, req).await;
    let first = wait_until(&addrs, id, "running on the spot node", |j| {
        j.shards.first().is_some_and(|s| s.state == v1::ShardState::Running as i32)
    })
    .await;
    assert_eq!(first.shards[0].node_name, "gpu-spot");
    // AWS posts the two-minute warning.
    fake.post_instance_action("terminate", &rfc3339_in(120));
    let noticed = Instant::now();
    let moved = wait_until(&addrs, id, "moved to the on-demand node", |j| {
        j.shards[0].attempt == 2 && j.shards[0].state == v1::ShardState::Running as i32
    })
    .await;
    recovery("spot-notice", noticed.elapsed());
    assert_eq!(moved.shards[0].node_name, "gpu-ondemand");
    assert_invariants(&addrs, &[id], &tr).await;
    assert_eq!(get_node(&addrs[0], "gpu-spot").await.unwrap().state, v1::NodeState::Draining as i32);
    let out = std::fs::read_to_string(
        c.dir
            .path()
            .join("agent-gpu-spot")
            .join(format!("job-{id}/shard-0/attempt-{}/stdout.log", first.shards[0].attempt_id.unwrap_or(0))),
    )
    .unwrap_or_default();
    assert!(out.contains("checkpoint requested"), "the shard was not asked to checkpoint at the notice:\n{out}");
    let t = timeline(&addrs, id).await;
    let i = find_line(&t, 0, "SPOT_NOTICE 0:", "spot interruption notice for gpu-spot: stopping it");
    let i = find_line(&t, i, "SHARD_REQUEUED 0:", "spot interruption notice");
    find_line(&t, i, "RESTARTED 0:", "placed again on gpu-ondemand (attempt 2)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_metadata_places_the_node_and_a_preempt_event_drains_it() {
    use tessera_agent::cloud::fake::FakeAzure;
    let fake = FakeAzure::start().await.expect("fake Azure metadata on 127.0.0.1");
    let c = Cluster::start(3, &[]);
    let addrs = c.running_addrs();
    wait_for_leader(&addrs, T).await.expect("leader");
    let endpoint = fake.endpoint();
    let a = AgentProc::start(
        "gpu-az",
        &addrs,
        "8xH100-80GB",
        c.dir.path(),
        &["--cloud", "azure", "--metadata-endpoint", &endpoint],
    );
    let node = registered(&addrs[0], "gpu-az", &a).await;
    assert_eq!(
        (node.cloud, node.region.as_str(), node.zone.as_str(), node.spot),
        (v1::Cloud::Azure as i32, "eastus", "eastus-2", true)
    );
    assert_eq!(node.instance_type, "Standard_ND96isr_H100_v5");
    // A shard runs there; the Preempt event drains the node, the shard stops, and then (not
    // before) the agent acknowledges the event so Azure need not wait out its notice.
    let mut req = train_job("unused", 1, 0.0);
    if let Some(s) = req.spec.as_mut() {
        s.command = vec!["sleep".into(), "300".into()];
        s.stop = Some(v1::StopPolicy {
            signal: "none".into(),
            checkpoint_grace_seconds: Some(0),
            term_grace_seconds: Some(1),
        });
    }
    let id = submit(&addrs, req).await;
    wait_until(&addrs, id, "running", running).await;
    fake.post_preempt("evt-1", "");
    let deadline = Instant::now() + T;
    while get_node(&addrs[0], "gpu-az").await.map(|n| n.state) != Some(v1::NodeState::Draining as i32) {
        assert!(Instant::now() < deadline, "the Preempt event did not drain the node\n{}", a.log_tail());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + T;
    loop {
        let acked = fake.acknowledged();
        if acked == vec!["evt-1".to_string()] {
            break;
        }
        assert!(acked.is_empty(), "acknowledged more than once: {acked:?}");
        assert!(Instant::now() < deadline, "the event was never acknowledged\n{}", a.log_tail());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Acknowledged only once the shard had stopped (no other node to move to: it waits).
    let j = job(&addrs, id).await.expect("job");
    assert_ne!(j.shards[0].state, v1::ShardState::Running as i32, "{j:?}");
}

/// Pids of live processes whose command line mentions `pattern` and whose environment holds
/// `var` (like `TESSERA_SHARD_INDEX=1`; empty: any).
fn pids_with(pattern: &str, var: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains(pattern) && env.split(|b| *b == 0).any(|kv| kv == var.as_bytes())
        })
        .collect()
}

/// Wait (up to `timeout`: importing torch takes a while on a busy machine) until shard 0 has a
/// checkpoint at `step` or later; the job then.
async fn checkpointed(addrs: &[String], id: u64, step: u64, timeout: Duration, agents: [&AgentProc; 2]) -> v1::Job {
    let deadline = Instant::now() + timeout;
    loop {
        let j = job(addrs, id).await;
        if let Some(j) = j.filter(|j| j.shards[0].last_checkpoint.as_ref().is_some_and(|c| c.step >= step)) {
            return j;
        }
        let [a, b] = agents;
        assert!(Instant::now() < deadline, "no checkpoint at step {step}\n{}\n{}", a.log_tail(), b.log_tail());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Wait (up to `timeout`) until the job has succeeded; failing or running out of time fails the
/// test with the agents' logs.
async fn succeeded(addrs: &[String], id: u64, timeout: Duration, agents: [&AgentProc; 2]) -> v1::Job {
    let deadline = Instant::now() + timeout;
    loop {
        let j = job(addrs, id).await.expect("job");
        if j.state == v1::JobState::Succeeded as i32 {
            return j;
        }
        let [a, b] = agents;
        assert!(
            j.state != v1::JobState::Failed as i32 && Instant::now() < deadline,
            "job {id} did not finish: {j:?}\n{}\n{}",
            a.log_tail(),
            b.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The real PyTorch DDP example: two ranks on two nodes rendezvous through the MASTER_ADDR and
/// MASTER_PORT the agents set, train with gloo on CPU, checkpoint through the progress protocol,
/// and when one rank is killed the gang restarts from rank 0's checkpoint and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pytorch_ddp_gang_trains_on_two_nodes_and_resumes_after_a_rank_dies() {
    let Some(py) = python_with("TESSERA_TORCH_PYTHON", "import torch.distributed as d; assert d.is_gloo_available()")
    else {
        eprintln!("no Python with torch and gloo (set TESSERA_TORCH_PYTHON): skipping");
        return;
    };
    let c = Cluster::start(3, &[]);
    let addrs = c.running_addrs();
    wait_for_leader(&addrs, T).await.expect("leader");
    let script = c.dir.path().join("ddp_train.py");
    std::fs::copy(workspace_root().join("examples/ddp_train.py"), &script).expect("copy the DDP example");
    let script = script.display().to_string();
    let _reaper = Reaper(script.clone());
    let a = AgentProc::start("ddp-a", &addrs, "1xH100-80GB", c.dir.path(), &[]);
    let b = AgentProc::start("ddp-b", &addrs, "1xH100-80GB", c.dir.path(), &[]);
    let req = v1::SubmitJobRequest {
        spec: Some(v1::JobSpec {
            name: "ddp".into(),
            command: vec![
                py,
                script.clone(),
                "--steps".into(),
                "120".into(),
                "--step-seconds".into(),
                "0.1".into(),
                "--checkpoint-every".into(),
                "10".into(),
            ],
            shards: 2,
            resources: Some(v1::Resources { gpus: 1, ..Default::default() }),
            retry: Some(v1::RetryPolicy { max_attempts: 3, backoff_seconds: Some(0), never_retry_exit_codes: vec![] }),
            ..Default::default()
        }),
        idempotency_key: String::new(),
    };
    let id = submit(&addrs, req).await;
    // Importing torch takes a while on a busy machine.
    let before = checkpointed(&addrs, id, 20, Duration::from_secs(120), [&a, &b]).await;
    assert_ne!(before.shards[0].node_name, before.shards[1].node_name, "one rank per node");
    let first_attempt = before.shards[1].attempt;

    // Rank 1 dies (like a segfault): the gang restarts from rank 0's last checkpoint.
    let victims = pids_with(&script, "TESSERA_SHARD_INDEX=1");
    assert!(!victims.is_empty(), "rank 1's process not found");
    for pid in victims {
        let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    let done = succeeded(&addrs, id, Duration::from_secs(180), [&a, &b]).await;
    assert!(done.shards[1].attempt > first_attempt, "rank 1 was not restarted: {done:?}");
    let ck = done.shards[0].last_checkpoint.clone().expect("a final checkpoint");
    assert_eq!(ck.step, 120, "{ck:?}");
    assert!(std::path::Path::new(ck.uri.strip_prefix("file://").unwrap_or(&ck.uri)).exists(), "{}", ck.uri);
    // Both ranks of the new attempt resumed from a checkpoint and finished; rank 0 used gloo.
    let node0 = &done.shards[0].node_name;
    let node1 = &done.shards[1].node_name;
    for (shard, node) in [(0, node0), (1, node1)] {
        let log =
            std::fs::read_to_string(c.dir.path().join(format!("agent-{node}")).join(format!(
                "job-{id}/shard-{shard}/attempt-{}/stdout.log",
                done.shards[shard].attempt_id.unwrap_or(0)
            )))
            .unwrap_or_default();
        assert!(
            log.contains("backend=gloo") && log.contains("resuming from step") && log.contains("done at step 120"),
            "rank {shard}'s log:\n{log}"
        );
    }
}

/// How the 2 x 2 gang below is launched.
#[derive(Clone, Copy, PartialEq)]
enum TwoByTwo {
    /// `launch = "process"` running `torchrun ddp_train.py` without flags.
    Torchrun,
    /// `launch = "per-gpu"` running `python ddp_train.py`.
    PerGpu,
}

/// Two shards of two (simulated) GPUs each, four ranks of the real PyTorch DDP example training
/// with gloo on CPU: WORLD_SIZE 4 and ranks 0..3 each once; then one node's processes are
/// killed, and the gang resumes from rank 0's checkpoint and finishes.
async fn a_two_by_two_gang(mode: TwoByTwo) {
    let Some(py) = python_with("TESSERA_TORCH_PYTHON", "import torch.distributed as d; assert d.is_gloo_available()")
    else {
        eprintln!("no Python with torch and gloo (set TESSERA_TORCH_PYTHON): skipping");
        return;
    };
    let c = Cluster::start(3, &[]);
    let addrs = c.running_addrs();
    wait_for_leader(&addrs, T).await.expect("leader");
    let script = c.dir.path().join("ddp_train.py");
    std::fs::copy(workspace_root().join("examples/ddp_train.py"), &script).expect("copy the DDP example");
    let script = script.display().to_string();
    let _reaper = Reaper(script.clone());
    // A rendezvous port of this test's own: other gangs on this host (tests run in parallel)
    // would get 29500 too.
    let port = tessera_tests::free_port();
    let ports = format!("{port}-{port}");
    let a = AgentProc::start("gang-a", &addrs, "2xH100-80GB", c.dir.path(), &["--rendezvous-ports", &ports]);
    let b = AgentProc::start("gang-b", &addrs, "2xH100-80GB", c.dir.path(), &["--rendezvous-ports", &ports]);
    let (steps, launch) = (60u64, mode);
    let mut command = match launch {
        TwoByTwo::Torchrun => {
            // The venv's torchrun next to its python, else the module.
            let torchrun = std::path::Path::new(&py).with_file_name("torchrun");
            if torchrun.is_file() {
                vec![torchrun.display().to_string()]
            } else {
                vec![py.clone(), "-m".into(), "torch.distributed.run".into()]
            }
        }
        TwoByTwo::PerGpu => vec![py.clone()],
    };
    command.extend(
        [script.as_str(), "--steps", &steps.to_string(), "--step-seconds", "0.1", "--checkpoint-every", "10"]
            .map(String::from),
    );
    let req = v1::SubmitJobRequest {
        spec: Some(v1::JobSpec {
            name: "gang2x2".into(),
            command,
            shards: 2,
            resources: Some(v1::Resources { gpus: 2, ..Default::default() }),
            launch: match launch {
                TwoByTwo::Torchrun => v1::LaunchMode::Process as i32,
                TwoByTwo::PerGpu => v1::LaunchMode::PerGpu as i32,
            },
            retry: Some(v1::RetryPolicy { max_attempts: 3, backoff_seconds: Some(0), never_retry_exit_codes: vec![] }),
            stop: Some(v1::StopPolicy {
                signal: "SIGUSR1".into(),
                checkpoint_grace_seconds: Some(5),
                term_grace_seconds: Some(5),
            }),
            ..Default::default()
        }),
        idempotency_key: String::new(),
    };
    let started = Instant::now();
    let id = submit(&addrs, req).await;
    // Six Python processes importing torch on a busy machine take a while.
    let before = checkpointed(&addrs, id, 20, Duration::from_secs(300), [&a, &b]).await;
    assert_ne!(before.shards[0].node_name, before.shards[1].node_name, "one shard per node");
    let first_attempt = before.shards[1].attempt;

    // One node's processes die (torchrun and its workers, or the two per-GPU processes).
    let victims = pids_with(&script, "TESSERA_SHARD_INDEX=1");
    let expected = if launch == TwoByTwo::Torchrun { 3 } else { 2 };
    assert!(victims.len() >= expected, "shard 1's processes not found: {victims:?}");
    for pid in victims {
        let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    let done = succeeded(&addrs, id, Duration::from_secs(300), [&a, &b]).await;
    let took = started.elapsed();
    assert!(done.shards[1].attempt > first_attempt, "shard 1 was not restarted: {done:?}");
    let ck = done.shards[0].last_checkpoint.clone().expect("a final checkpoint");
    assert_eq!(ck.step, steps, "{ck:?}");
    // The last attempts: four ranks of a world of 4, each once, two per node, each resumed from
    // the checkpoint and finished.
    let mut ranks = Vec::new();
    for s in &done.shards {
        let log = attempt_log(&c, s, id);
        let mine: Vec<&str> = log.lines().filter(|l| l.starts_with("rank ")).collect();
        assert_eq!(mine.len(), 2, "shard {} should run two ranks:\n{log}", s.index);
        for line in mine {
            let (rank, world) =
                line["rank ".len()..].split_whitespace().next().and_then(|r| r.split_once('/')).expect(line);
            assert_eq!(world, "4", "{line}");
            assert!(line.contains("backend=gloo"), "{line}");
            ranks.push(rank.parse::<u32>().expect(line));
        }
        assert_eq!(log.matches("resuming from step").count(), 2, "shard {}:\n{log}", s.index);
        assert_eq!(log.matches(&format!("done at step {steps}")).count(), 2, "shard {}:\n{log}", s.index);
    }
    ranks.sort_unstable();
    assert_eq!(ranks, [0, 1, 2, 3]);
    let name = match launch {
        TwoByTwo::Torchrun => "torchrun-2x2",
        TwoByTwo::PerGpu => "per-gpu-2x2",
    };
    eprintln!("LAUNCH {name} {:.1}", took.as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torchrun_gang_of_two_nodes_by_two_gpus_trains_and_resumes_after_a_node_dies() {
    a_two_by_two_gang(TwoByTwo::Torchrun).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_gpu_gang_of_two_nodes_by_two_gpus_trains_and_resumes_after_a_node_dies() {
    a_two_by_two_gang(TwoByTwo::PerGpu).await;
}

/// What must hold after any failure: every acknowledged job is still known, no attempt holds
/// GPUs on two nodes, no shard's GPUs are held by two attempts, and no shard runs as two
/// processes (looked up by the launch environment of processes running `trainer`).
async fn assert_invariants(addrs: &[String], acked: &[u64], trainer: &str) {
    let mut jobs = v1::job_service_client::JobServiceClient::new(channel(&addrs[0]));
    let list = jobs
        .list_jobs(v1::ListJobsRequest { include_finished: true, page_size: 1000, ..Default::default() })
        .await
        .expect("list jobs")
        .into_inner()
        .jobs;
    for id in acked {
        assert!(list.iter().any(|j| j.id == *id), "acknowledged job {id} was lost");
    }
    let mut nodes = v1::node_service_client::NodeServiceClient::new(channel(&addrs[0]));
    let nodes = nodes.list_nodes(v1::ListNodesRequest::default()).await.expect("list nodes").into_inner().nodes;
    let mut holder_node = std::collections::BTreeMap::new();
    let mut shard_attempt = std::collections::BTreeMap::new();
    for n in &nodes {
        for g in &n.gpus {
            if let Some(a) = &g.allocation {
                let node = holder_node.entry(a.attempt_id).or_insert(n.id);
                assert_eq!(*node, n.id, "attempt {} holds GPUs on two nodes", a.attempt_id);
                let att = shard_attempt.entry((a.job_id, a.shard_index)).or_insert(a.attempt_id);
                assert_eq!(
                    *att, a.attempt_id,
                    "job {} shard {} holds GPUs under two attempts",
                    a.job_id, a.shard_index
                );
            }
        }
    }
    let mut running = std::collections::BTreeMap::<(String, String), u32>::new();
    for pid in pids_with(trainer, "") {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let get = |k: &str| {
            env.split(|b| *b == 0)
                .find_map(|kv| {
                    kv.strip_prefix(format!("{k}=").as_bytes()).map(|v| String::from_utf8_lossy(v).into_owned())
                })
                .unwrap_or_default()
        };
        *running.entry((get("TESSERA_JOB_ID"), get("TESSERA_SHARD_INDEX"))).or_default() += 1;
    }
    for ((job, shard), n) in running {
        assert!(n <= 1, "job {job} shard {shard} runs as {n} processes");
    }
}

fn with_priority(mut req: v1::SubmitJobRequest, priority: u32) -> v1::SubmitJobRequest {
    if let Some(s) = req.spec.as_mut() {
        s.priority = Some(priority);
    }
    req
}

/// The stdout of one attempt of a shard, from the agent's work directory.
fn attempt_log(c: &Cluster, s: &v1::Shard, job: u64) -> String {
    let path = c.dir.path().join(format!("agent-{}", s.node_name)).join(format!(
        "job-{job}/shard-{}/attempt-{}/stdout.log",
        s.index,
        s.attempt_id.unwrap_or(0)
    ));
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_priority_job_preempts_the_one_that_loses_least_and_the_victim_resumes() {
    let Some((c, addrs, tr, _reaper)) = cluster_with_trainer().await else { return };
    let _a = AgentProc::start("gpu-a", &addrs, "2xH100-80GB", c.dir.path(), &[]);
    // Two low-priority jobs fill the node: one checkpoints every 5 steps, one never does.
    let cheap = submit(&addrs, with_priority(train_job(&tr, 200, 0.05), 250)).await;
    let mut dear = with_priority(train_job(&tr, 100_000, 0.05), 250);
    if let Some(s) = dear.spec.as_mut() {
        s.command[7] = "1000000".into();
    }
    let dear = submit(&addrs, dear).await;
    wait_until(&addrs, cheap, "a checkpoint at step 10", |j| {
        j.shards[0].last_checkpoint.as_ref().is_some_and(|c| c.step >= 10)
    })
    .await;
    wait_until(&addrs, dear, "running", running).await;
    // A high-priority job arrives on the full node.
    let urgent = submit(&addrs, with_priority(train_job(&tr, 20, 0.05), 750)).await;
    let arrived = Instant::now();
    wait_until(&addrs, urgent, "the urgent job running", running).await;
    recovery("preemption", arrived.elapsed());
    let stopped = wait_until(&addrs, cheap, "preempted", |j| {
        j.shards[0].stop_reason == v1::StopReason::Preempt as i32 || j.shards[0].attempt >= 2
    })
    .await;
    assert!(stopped.shards[0].preempted_by_job_id == Some(urgent) || stopped.shards[0].attempt >= 2, "{stopped:?}");
    wait_until(&addrs, urgent, "succeeded", |j| j.state == v1::JobState::Succeeded as i32).await;
    let done = wait_until(&addrs, cheap, "succeeded", |j| j.state == v1::JobState::Succeeded as i32).await;
    let other = job(&addrs, dear).await.expect("the other job");
    assert_eq!(other.shards[0].attempt, 1, "the job with no checkpoint was not the victim: {other:?}");
    assert_eq!(done.shards[0].attempt, 2, "the victim was requeued once: {done:?}");
    let log = attempt_log(&c, &done.shards[0], cheap);
    assert!(log.contains("resuming from step"), "the victim did not resume from its checkpoint:\n{log}");
    let t = timeline(&addrs, cheap).await;
    let i = find_line(&t, 0, "PREEMPTED 0:", &format!("preempted by job {urgent} of higher priority"));
    find_line(&t, i, "RESTARTED 0:", "resumes from the checkpoint at step");
    assert_invariants(&addrs, &[cheap, dear, urgent], &tr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_moves_long_shards_from_their_checkpoint_and_lets_short_ones_finish() {
    let Some((c, addrs, tr, _reaper)) = cluster_with_trainer().await else { return };
    let a = AgentProc::start("gpu-a", &addrs, "2xH100-80GB", c.dir.path(), &[]);
    let long = submit(&addrs, train_job(&tr, 200, 0.05)).await;
    let mut short = train_job(&tr, 100, 0.05);
    if let Some(s) = short.spec.as_mut() {
        s.max_runtime_seconds = Some(600);
    }
    let short = submit(&addrs, short).await;
    wait_until(&addrs, long, "a checkpoint at step 10", |j| {
        j.shards[0].last_checkpoint.as_ref().is_some_and(|c| c.step >= 10)
    })
    .await;
    wait_until(&addrs, short, "running", running).await;
    let _b = AgentProc::start("gpu-b", &addrs, "2xH100-80GB", c.dir.path(), &[]);
    registered(&addrs[0], "gpu-b", &a).await;
    let mut nodes = v1::node_service_client::NodeServiceClient::new(channel(&addrs[1]));
    nodes
        .drain_node(v1::DrainNodeRequest {
            node: Some(v1::NodeRef { node: Some(v1::node_ref::Node::Name("gpu-a".into())) }),
            deadline_seconds: Some(3600),
            reason: "maintenance".into(),
        })
        .await
        .expect("drain");
    let drained = Instant::now();
    let moved = wait_until(&addrs, long, "moved to gpu-b", |j| {
        j.shards[0].node_name == "gpu-b" && j.shards[0].state == v1::ShardState::Running as i32
    })
    .await;
    recovery("drain", drained.elapsed());
    assert_eq!(moved.shards[0].attempt, 2);
    let done_short = wait_until(&addrs, short, "succeeded", |j| j.state == v1::JobState::Succeeded as i32).await;
    assert_eq!(
        (done_short.shards[0].node_name.as_str(), done_short.shards[0].attempt),
        ("gpu-a", 1),
        "the short job finished where it was"
    );
    let done = wait_until(&addrs, long, "succeeded", |j| j.state == v1::JobState::Succeeded as i32).await;
    assert!(attempt_log(&c, &done.shards[0], long).contains("resuming from step"));
    // Nothing new goes to the draining node.
    let node = get_node(&addrs[0], "gpu-a").await.expect("gpu-a");
    assert_eq!(node.state, v1::NodeState::Draining as i32);
    let late = submit(&addrs, train_job(&tr, 5, 0.05)).await;
    let late = wait_until(&addrs, late, "succeeded", |j| j.state == v1::JobState::Succeeded as i32).await;
    assert_eq!(late.shards[0].node_name, "gpu-b");
    assert_invariants(&addrs, &[long, short], &tr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failed_rank_restarts_its_gang_in_place_from_the_checkpoint() {
    let Some((c, addrs, tr, _reaper)) = cluster_with_trainer().await else { return };
    let _a = AgentProc::start("gpu-a", &addrs, "1xH100-80GB", c.dir.path(), &[]);
    let _b = AgentProc::start("gpu-b", &addrs, "1xH100-80GB", c.dir.path(), &[]);
    let mut req = train_job(&tr, 200, 0.05);
    if let Some(s) = req.spec.as_mut() {
        s.shards = 2;
        s.retry = Some(v1::RetryPolicy { max_attempts: 3, backoff_seconds: Some(0), never_retry_exit_codes: vec![] });
    }
    let id = submit(&addrs, req).await;
    let before = wait_until(&addrs, id, "both ranks checkpointed", |j| {
        j.shards.iter().all(|s| s.last_checkpoint.as_ref().is_some_and(|c| c.step >= 10))
    })
    .await;
    // Rank 1 crashes (nothing wrong with its node): the gang restarts, every rank where it was.
    for pid in pids_with(&tr, "TESSERA_SHARD_INDEX=1") {
        let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    let crashed = Instant::now();
    let again = wait_until(&addrs, id, "both ranks running again", |j| {
        j.shards.iter().all(|s| s.attempt == 2 && s.state == v1::ShardState::Running as i32)
    })
    .await;
    recovery("rank-failed", crashed.elapsed());
    for (b, a) in before.shards.iter().zip(&again.shards) {
        assert_eq!((&a.node_name, &a.gpus), (&b.node_name, &b.gpus), "rank {} moved", a.index);
    }
    assert_eq!(again.failures, 1, "a crash of the job's own code uses one retry");
    let done = wait_until(&addrs, id, "succeeded", |j| j.state == v1::JobState::Succeeded as i32).await;
    for s in &done.shards {
        assert!(attempt_log(&c, s, id).contains("resuming from step"), "rank {} did not resume", s.index);
    }
    assert_invariants(&addrs, &[id], &tr).await;
}

/// A TCP proxy on 127.0.0.1 that can cut the traffic both ways without closing anything, as a
/// network partition does (no FIN, no reset), and heal it.
struct Partition {
    addr: String,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Partition {
    async fn to(target: String) -> Partition {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let c = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else { continue };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(Self::pipe(cr, sw, c.clone()));
                tokio::spawn(Self::pipe(sr, cw, c.clone()));
            }
        });
        Partition { addr, cut, task }
    }

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // While cut, bytes vanish: the sockets stay open and nobody is told.
            if !cut.load(std::sync::atomic::Ordering::SeqCst) && to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    fn set(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cut_off_without_a_fin_stops_its_shard_before_it_runs_elsewhere() {
    let Some((c, addrs, tr, _reaper)) = cluster_with_trainer().await else { return };
    let leader = wait_for_leader(&addrs, T).await.expect("leader");
    let net = Partition::to(c.servers[&leader].addr.clone()).await;
    let a = AgentProc::start("gpu-a", std::slice::from_ref(&net.addr), "1xH100-80GB", c.dir.path(), &[]);
    let id = submit(&addrs, train_job(&tr, 300, 0.05)).await;
    wait_until(&addrs, id, "a checkpoint on gpu-a", |j| {
        j.shards[0].node_name == "gpu-a" && j.shards[0].last_checkpoint.as_ref().is_some_and(|c| c.step >= 10)
    })
    .await;
    let _b = AgentProc::start("gpu-b", &addrs, "1xH100-80GB", c.dir.path(), &[]);
    registered(&addrs[0], "gpu-b", &a).await;

    net.set(true);
    let cut = Instant::now();
    // Watch both copies: the old attempt's process must be gone before the new one runs.
    let (mut old_gone, mut moved) = (None, None);
    let deadline = cut + T;
    while moved.is_none() {
        if old_gone.is_none() && pids_with(&tr, "TESSERA_ATTEMPT=1").is_empty() {
            old_gone = Some(cut.elapsed());
        }
        if job(&addrs, id).await.is_some_and(|j| j.shards[0].attempt == 2 && running(&j)) {
            moved = Some(cut.elapsed());
        }
        assert!(Instant::now() < deadline, "the shard never moved\n{}", a.log_tail());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (old_gone, moved) = (old_gone.unwrap_or(Duration::MAX), moved.unwrap_or_default());
    recovery("agent-cut-off", moved);
    assert!(old_gone <= moved, "attempt 2 ran at {moved:?}, attempt 1 stopped at {old_gone:?}\n{}", a.log_tail());
    assert!(moved >= Duration::from_secs(3), "moved after {moved:?}, before the agent's fence timeout");
    assert_eq!(get_node(&addrs[0], "gpu-a").await.expect("gpu-a").state, v1::NodeState::Down as i32);

    // The partition heals: the agent registers again, and is told to forget the attempt it had
    // already stopped.
    net.set(false);
    let deadline = Instant::now() + T;
    while get_node(&addrs[0], "gpu-a").await.is_none_or(|n| n.state != v1::NodeState::Ready as i32) {
        assert!(Instant::now() < deadline, "gpu-a never came back\n{}", a.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + T;
    while !a.log().contains("forgetting attempts") {
        assert!(Instant::now() < deadline, "gpu-a was not told to forget its attempt\n{}", a.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        a.log_tail().contains("killing every shard")
            || http_get(&a.http, "/metrics").await.contains("tessera_agent_fenced_total 1")
    );
    wait_until(&addrs, id, "succeeded", |j| j.state == v1::JobState::Succeeded as i32).await;
    assert_invariants(&addrs, &[id], &tr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_logs_follow_a_shard_across_its_attempts() {
    let Some((c, addrs, _tr, _reaper)) = cluster_with_trainer().await else { return };
    let a = AgentProc::start("gpu-a", &addrs, "8xH100-80GB", c.dir.path(), &[]);
    registered(&addrs[0], "gpu-a", &a).await;
    // Attempt 1 fails, attempt 2 succeeds: one follow shows both, in order.
    let mut req = train_job("unused", 1, 0.0);
    if let Some(s) = req.spec.as_mut() {
        let script = "echo \"attempt $TESSERA_ATTEMPT starts\"; sleep 2; echo \"attempt $TESSERA_ATTEMPT ends\"; \
                      [ \"$TESSERA_ATTEMPT\" = 2 ]";
        s.command = vec!["sh".into(), "-c".into(), script.into()];
        s.retry = Some(v1::RetryPolicy { max_attempts: 3, backoff_seconds: Some(0), ..Default::default() });
    }
    let id = submit(&addrs, req).await;
    wait_until(&addrs, id, "running", running).await;
    let followed = logs(&addrs[1], id, true).await;
    let order = ["attempt 1 starts", "attempt 1 ends", "attempt 2 starts", "attempt 2 ends"];
    let at: Vec<Option<usize>> = order.iter().map(|l| followed.find(l)).collect();
    assert!(at.iter().all(Option::is_some) && at.windows(2).all(|w| w[0] < w[1]), "{followed}");
    let j = job(&addrs, id).await.expect("job");
    assert_eq!((j.state, j.shards[0].attempt), (v1::JobState::Succeeded as i32, 2), "{j:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_max_runtime_is_stopped_and_fails_with_time_limit() {
    let Some((c, addrs, _tr, _reaper)) = cluster_with_trainer().await else { return };
    let a = AgentProc::start("gpu-a", &addrs, "8xH100-80GB", c.dir.path(), &[]);
    registered(&addrs[0], "gpu-a", &a).await;
    let marker = format!("time-limit-{}", std::process::id());
    let mut req = train_job("unused", 1, 0.0);
    if let Some(s) = req.spec.as_mut() {
        s.command = vec!["sh".into(), "-c".into(), format!("sleep 120; echo {marker}")];
        s.max_runtime_seconds = Some(2);
    }
    let id = submit(&addrs, req).await;
    wait_until(&addrs, id, "running", running).await;
    let started = Instant::now();
    let done = wait_until(&addrs, id, "failed", |j| j.state == v1::JobState::Failed as i32).await;
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    assert_eq!(done.message, "time limit: ran past its max runtime of 2 s", "{done:?}");
    assert_eq!(done.shards[0].state, v1::ShardState::Failed as i32);
    let left: Vec<String> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).into_owned())
        .filter(|c| c.contains(&marker))
        .collect();
    assert!(left.is_empty(), "the shard's process is still there: {left:?}");
    let t = timeline(&addrs, id).await;
    let i = find_line(&t, 0, "SHARD_STOPPING 0:", "the job ran past its time limit: stopping it");
    find_line(&t, i, "SHARD_EXITED 0:", "killed by signal");
    assert_eq!(t.last().map(String::as_str), Some("FINISHED -: failed: time limit: ran past its max runtime of 2 s"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_shard_restarts_its_gang_after_its_progress_timeout() {
    let Some((c, addrs, _tr, _reaper)) = cluster_with_trainer().await else { return };
    let a = AgentProc::start("gpu-a", &addrs, "8xH100-80GB", c.dir.path(), &[]);
    registered(&addrs[0], "gpu-a", &a).await;
    // The timeout: 10 s, or TESSERA_HANG_TIMEOUT_SECS (10 to 120) to measure another.
    let timeout =
        std::env::var("TESSERA_HANG_TIMEOUT_SECS").ok().and_then(|v| v.parse().ok()).filter(|t| (10..=120).contains(t));
    let timeout: u64 = timeout.unwrap_or(10);
    // One step, then a hang (as in a NCCL deadlock: the process lives, progress stops).
    let mut req = train_job("unused", 1, 0.0);
    if let Some(s) = req.spec.as_mut() {
        let script = "echo '{\"step\": 1}' >> \"$TESSERA_PROGRESS_FILE\"; sleep 600";
        s.command = vec!["sh".into(), "-c".into(), script.into()];
        s.progress_timeout_seconds = Some(timeout);
    }
    let id = submit(&addrs, req).await;
    wait_until(&addrs, id, "step 1", |j| j.shards.first().is_some_and(|s| s.step == 1)).await;
    let hung = Instant::now();
    let deadline = hung + Duration::from_secs(timeout) + T;
    let restarted = loop {
        if let Some(j) = job(&addrs, id).await
            && j.shards[0].attempt >= 2
            && j.shards[0].state == v1::ShardState::Running as i32
        {
            break j;
        }
        assert!(Instant::now() < deadline, "the gang did not restart: {:?}", job(&addrs, id).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let took = hung.elapsed();
    // From the last step to the gang running again, the timeout included.
    recovery(&format!("progress-timeout-{timeout}s"), took);
    let at_least = Duration::from_secs(timeout.saturating_sub(2));
    assert!(took >= at_least && took < Duration::from_secs(timeout + 30), "restarted after {took:?}");
    assert_eq!((restarted.failures, restarted.restarts), (0, 1), "a restart, not a failure: {restarted:?}");
    let t = timeline(&addrs, id).await;
    let i = find_line(&t, 0, "SHARD_STOPPING 0:", "it made no progress (a hang)");
    assert!(t[i].contains(&format!("no new step for {timeout} s; stalled ranks: 0")), "{}", t[i]);
    let i = find_line(&t, i, "SHARD_REQUEUED 0:", "no progress");
    find_line(&t, i, "RESTARTED 0:", "placed again on gpu-a (attempt 2)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_far_behind_its_gang_shows_as_a_straggler() {
    let Some((c, addrs, _tr, _reaper)) = cluster_with_trainer().await else { return };
    let a = AgentProc::start("gpu-a", &addrs, "8xH100-80GB", c.dir.path(), &[]);
    registered(&addrs[0], "gpu-a", &a).await;
    let mut req = train_job("unused", 1, 0.0);
    if let Some(s) = req.spec.as_mut() {
        let script = "if [ \"$TESSERA_SHARD_INDEX\" = 2 ]; then s=10; else s=100; fi; \
                      echo \"{\\\"step\\\": $s}\" >> \"$TESSERA_PROGRESS_FILE\"; sleep 120";
        s.command = vec!["sh".into(), "-c".into(), script.into()];
        s.shards = 3;
    }
    let id = submit(&addrs, req).await;
    let j = wait_until(&addrs, id, "every rank's step", |j| j.shards.len() == 3 && j.shards.iter().all(|s| s.step > 0))
        .await;
    let marked: Vec<(u64, bool)> = j.shards.iter().map(|s| (s.step, s.straggler)).collect();
    assert_eq!(marked, vec![(100, false), (100, false), (10, true)], "{j:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gangs_whose_rank_0_share_a_host_get_different_rendezvous_ports() {
    let Some((c, addrs, _tr, _reaper)) = cluster_with_trainer().await else { return };
    let a = AgentProc::start("gpu-a", &addrs, "8xH100-80GB", c.dir.path(), &["--rendezvous-ports", "41000-41009"]);
    registered(&addrs[0], "gpu-a", &a).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut req = train_job("unused", 1, 0.0);
        if let Some(s) = req.spec.as_mut() {
            s.command = vec!["sh".into(), "-c".into(), "echo port=$MASTER_PORT; sleep 3".into()];
        }
        ids.push(submit(&addrs, req).await);
    }
    let mut ports = Vec::new();
    for id in ids {
        wait_until(&addrs, id, "succeeded", |j| j.state == v1::JobState::Succeeded as i32).await;
        let out = logs(&addrs[0], id, false).await;
        let port = out.trim().strip_prefix("port=").and_then(|p| p.parse::<u16>().ok());
        ports.push(port.unwrap_or_else(|| panic!("no port in {out:?}")));
    }
    assert!(ports.iter().all(|p| (41_000..=41_009).contains(p)), "{ports:?}");
    assert_ne!(ports[0], ports[1], "both ran at once on one host: {ports:?}");
}
