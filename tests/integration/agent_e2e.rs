//! Real servers, real agents (simulated GPUs), the example trainer writing real checkpoints.

use std::time::{Duration, Instant};

use tessera_proto::v1;
use tessera_tests::{AgentProc, Cluster, channel, wait_for_leader, workspace_root};

const T: Duration = Duration::from_secs(30);

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

fn python3() -> bool {
    std::process::Command::new("python3").arg("--version").output().is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_trainer_runs_to_success_and_checkpoints() {
    if !python3() {
        eprintln!("python3 not found: skipping");
        return;
    }
    let c = Cluster::start(3, &[]);
    let addrs = c.running_addrs();
    wait_for_leader(&addrs, T).await.expect("leader");
    let (tr, _reaper) = trainer(c.dir.path());
    let a = AgentProc::start("gpu-a", &addrs, "8xH100-80GB", c.dir.path(), &[]);
    let id = submit(&addrs, train_job(&tr, 20, 0.05)).await;
    let j = wait_until(&addrs, id, "succeeded", |j| j.state == v1::JobState::Succeeded as i32).await;
    let ck = j.shards[0].last_checkpoint.clone().unwrap_or_else(|| panic!("no checkpoint\n{}", a.log_tail()));
    assert!(ck.step >= 15, "{ck:?}");
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
    if !python3() {
        eprintln!("python3 not found: skipping");
        return;
    }
    let c = Cluster::start(3, &[]);
    let addrs = c.running_addrs();
    wait_for_leader(&addrs, T).await.expect("leader");
    let (tr, _reaper) = trainer(c.dir.path());
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
    eprintln!("agent kill -9 -> shard running elsewhere: {:?}", killed.elapsed());
    assert_ne!(moved.shards[0].node_id, j.shards[0].node_id);
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_follows_the_ladder_and_leaves_no_process_behind() {
    if !python3() {
        eprintln!("python3 not found: skipping");
        return;
    }
    let c = Cluster::start(3, &[]);
    let addrs = c.running_addrs();
    wait_for_leader(&addrs, T).await.expect("leader");
    let (tr, _reaper) = trainer(c.dir.path());
    let _a = AgentProc::start("gpu-a", &addrs, "8xH100-80GB", c.dir.path(), &[]);
    let id = submit(&addrs, train_job(&tr, 100_000, 0.05)).await;
    wait_until(&addrs, id, "running", |j| j.shards.first().is_some_and(|s| s.state == v1::ShardState::Running as i32))
        .await;
    let mut jobs = v1::job_service_client::JobServiceClient::new(channel(&addrs[1]));
    jobs.cancel_job(v1::CancelJobRequest { job_id: id, reason: "test".into() }).await.unwrap();
    wait_until(&addrs, id, "cancelled", |j| j.state == v1::JobState::Cancelled as i32).await;
    let left = std::process::Command::new("pgrep").args(["-f", &tr]).output().unwrap();
    assert!(left.stdout.is_empty(), "trainer processes left: {}", String::from_utf8_lossy(&left.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_keep_running_through_a_leader_change() {
    if !python3() {
        eprintln!("python3 not found: skipping");
        return;
    }
    let mut c = Cluster::start(3, &[]);
    let addrs = c.running_addrs();
    let leader = wait_for_leader(&addrs, T).await.expect("leader");
    let (tr, _reaper) = trainer(c.dir.path());
    let _a = AgentProc::start("gpu-a", &addrs, "8xH100-80GB", c.dir.path(), &[]);
    let id = submit(&addrs, train_job(&tr, 120, 0.05)).await;
    let j = wait_until(&addrs, id, "running", |j| {
        j.shards.first().is_some_and(|s| s.state == v1::ShardState::Running as i32)
    })
    .await;
    c.servers.get_mut(&leader).unwrap().kill();
    let rest = c.running_addrs();
    let done = wait_until(&rest, id, "succeeded", |j| j.state == v1::JobState::Succeeded as i32).await;
    assert_eq!(done.shards[0].attempt_id, j.shards[0].attempt_id, "the shard was not restarted");
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
                if out.contains("DCGM_FI_DEV_GPU_UTIL") || Instant::now() > deadline {
                    return out;
                }
            }
        }
        assert!(Instant::now() < deadline, "no metrics at {addr}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
