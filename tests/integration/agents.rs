//! The leader's side of the agent stream, against three real servers, with a scripted agent
//! speaking the protocol (the real agent arrives with its own issue).

use std::time::{Duration, Instant};

use tessera_proto::v1;
use tessera_proto::v1::agent_message::Payload as In;
use tessera_proto::v1::server_message::Payload as Out;
use tessera_tests::{Cluster, channel, wait_for_leader};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const T: Duration = Duration::from_secs(20);

struct Agent {
    name: String,
    tx: mpsc::Sender<v1::AgentMessage>,
    rx: tonic::Streaming<v1::ServerMessage>,
    seq: u64,
    node_id: u64,
}

fn register(name: &str, running: Vec<v1::RunningAttempt>) -> v1::Register {
    v1::Register {
        agent_version: "scripted".into(),
        running_attempts: running,
        advertise_addr: format!("127.0.0.{}:0", 10 + name.len()),
        ..tessera_tests::sim_register(name)
    }
}

impl Agent {
    /// Connect to whichever server leads, register, and wait for Registered.
    async fn connect(addrs: &[String], name: &str, running: Vec<v1::RunningAttempt>) -> Agent {
        let deadline = Instant::now() + T;
        let mut i = 0;
        loop {
            assert!(Instant::now() < deadline, "agent {name} could not register");
            let addr = &addrs[i % addrs.len()];
            i += 1;
            let (tx, out) = mpsc::channel(64);
            let first = v1::AgentMessage { seq: 1, payload: Some(In::Register(register(name, running.clone()))) };
            tx.send(first).await.unwrap();
            let mut client = v1::agent_service_client::AgentServiceClient::new(channel(addr));
            let resp = match client.session(ReceiverStream::new(out)).await {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("agent {name}: session at {addr}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let mut rx = resp.into_inner();
            match rx.message().await {
                Ok(Some(v1::ServerMessage { payload: Some(Out::Registered(r)) })) => {
                    return Agent { name: name.into(), tx, rx, seq: 1, node_id: r.node_id };
                }
                other => {
                    eprintln!("agent {name}: at {addr}: {other:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
            }
        }
    }

    async fn send(&mut self, p: In) {
        self.seq += 1;
        let _ = self.tx.send(v1::AgentMessage { seq: self.seq, payload: Some(p) }).await;
    }

    /// The next message that is not an Ack, within `timeout`.
    async fn next(&mut self, timeout: Duration) -> Option<Out> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.message()).await {
                Ok(Ok(Some(v1::ServerMessage { payload: Some(Out::Ack(a)) }))) => {
                    assert!(!a.rejected, "agent {}: report {} rejected: {}", self.name, a.seq, a.reason);
                }
                Ok(Ok(Some(v1::ServerMessage { payload: Some(p) }))) => return Some(p),
                _ => return None,
            }
        }
    }

    async fn assignment(&mut self, timeout: Duration) -> Option<v1::AssignShard> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.next(deadline - Instant::now()).await? {
                Out::AssignShard(a) => return Some(a),
                _ => continue,
            }
        }
        None
    }

    /// Keep the session alive with heartbeats from a task of its own.
    fn heartbeats(&self) -> tokio::task::JoinHandle<()> {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut seq = 1_000_000;
            loop {
                seq += 1;
                let hb = v1::AgentMessage { seq, payload: Some(In::Heartbeat(v1::Heartbeat::default())) };
                if tx.send(hb).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    }
}

fn job(shards: u32, gpus: u32) -> v1::SubmitJobRequest {
    v1::SubmitJobRequest {
        spec: Some(v1::JobSpec {
            command: vec!["python3".into(), "train.py".into()],
            shards,
            resources: Some(v1::Resources { gpus, ..Default::default() }),
            ..Default::default()
        }),
        idempotency_key: String::new(),
    }
}

async fn submit(addr: &str, req: v1::SubmitJobRequest) -> u64 {
    let mut c = v1::job_service_client::JobServiceClient::new(channel(addr));
    c.submit_job(req).await.unwrap().into_inner().job_id
}

async fn get_job(addr: &str, id: u64) -> v1::Job {
    let mut c = v1::job_service_client::JobServiceClient::new(channel(addr));
    c.get_job(v1::GetJobRequest { job_id: id, consistency: 0 }).await.unwrap().into_inner().job.unwrap()
}

async fn node_state(addr: &str, id: u64) -> i32 {
    let mut c = v1::node_service_client::NodeServiceClient::new(channel(addr));
    let r = v1::GetNodeRequest { node: Some(v1::NodeRef { node: Some(v1::node_ref::Node::Id(id)) }), consistency: 0 };
    c.get_node(r).await.unwrap().into_inner().node.unwrap().state
}

async fn wait_job_state(addr: &str, id: u64, state: v1::JobState) -> v1::Job {
    let deadline = Instant::now() + T;
    loop {
        let j = get_job(addr, id).await;
        if j.state == state as i32 {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} stayed {:?}", j.state);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_runs_a_job_to_success() {
    let c = Cluster::start(3, &[]);
    let addrs = c.running_addrs();
    wait_for_leader(&addrs, T).await.expect("leader");
    let mut a = Agent::connect(&addrs, "gpu-a", vec![]).await;
    let _hb = a.heartbeats();
    let id = submit(&addrs[1], job(1, 4)).await;
    let asg = a.assignment(T).await.unwrap_or_else(|| panic!("no assignment\n{}", c.logs()));
    assert_eq!((asg.job_id, asg.shard_index, asg.attempt, asg.gpus.len()), (id, 0, 1, 4));
    let launch = asg.launch.clone().unwrap();
    assert_eq!((launch.world_size, launch.rank, launch.nnodes, launch.num_shards), (1, 0, 1, 1));
    assert!(asg.resume_from.is_none());
    assert_eq!(asg.checkpoint_signal, "SIGUSR1");
    a.send(In::ShardStarted(v1::ShardStarted { attempt_id: asg.attempt_id, ..Default::default() })).await;
    a.send(In::CheckpointReport(v1::CheckpointReport {
        attempt_id: asg.attempt_id,
        step: 10,
        uri: "/ckpt/10".into(),
        ..Default::default()
    }))
    .await;
    a.send(In::ShardExited(v1::ShardExited {
        attempt_id: asg.attempt_id,
        termination: Some(v1::shard_exited::Termination::ExitCode(0)),
        ..Default::default()
    }))
    .await;
    let j = wait_job_state(&addrs[2], id, v1::JobState::Succeeded).await;
    assert_eq!(j.shards[0].last_checkpoint.as_ref().map(|c| c.step), Some(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_agent_stream_moves_its_shard_to_another_node_from_the_checkpoint() {
    let c = Cluster::start(3, &[]);
    let addrs = c.running_addrs();
    wait_for_leader(&addrs, T).await.expect("leader");
    let mut a = Agent::connect(&addrs, "gpu-a", vec![]).await;
    let mut b = Agent::connect(&addrs, "gpu-b", vec![]).await;
    let (ha, hb) = (a.heartbeats(), b.heartbeats());
    let id = submit(&addrs[0], job(1, 8)).await;
    // Best fit and equal price: the lower node id, gpu-a, takes it.
    let first = a.assignment(T).await.expect("assignment on gpu-a");
    a.send(In::ShardStarted(v1::ShardStarted { attempt_id: first.attempt_id, ..Default::default() })).await;
    a.send(In::CheckpointReport(v1::CheckpointReport {
        attempt_id: first.attempt_id,
        step: 40,
        uri: "/ckpt/40".into(),
        ..Default::default()
    }))
    .await;
    wait_job_state(&addrs[0], id, v1::JobState::Running).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The agent dies: its stream closes.
    ha.abort();
    let node_a = a.node_id;
    drop(a);
    let lost_at = Instant::now();
    let moved = b.assignment(T).await.unwrap_or_else(|| panic!("the shard never moved\n{}", c.logs()));
    eprintln!("agent stream lost -> shard assigned elsewhere: {:?}", lost_at.elapsed());
    assert_eq!((moved.job_id, moved.attempt), (id, 2));
    assert_eq!(moved.resume_from.as_deref(), Some("/ckpt/40"));
    assert_eq!(node_state(&addrs[1], node_a).await, v1::NodeState::Down as i32);
    hb.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_is_marked_down_only_after_the_fence_timeout() {
    let c = Cluster::start(3, &[]);
    let addrs = c.running_addrs();
    wait_for_leader(&addrs, T).await.expect("leader");
    // Registers, then says nothing while keeping its stream open (cut off without a FIN).
    let a = Agent::connect(&addrs, "gpu-silent", vec![]).await;
    let registered = Instant::now();
    let deadline = registered + T;
    loop {
        if node_state(&addrs[0], a.node_id).await == v1::NodeState::Down as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "the silent node was never marked down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = registered.elapsed();
    // Its shards may move only once its own fence (3 s by default) has stopped them.
    assert!(after >= Duration::from_secs(3), "marked down after {after:?}, before the fence timeout");
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_shards_survive_a_leader_change() {
    let mut c = Cluster::start(3, &[]);
    let addrs = c.running_addrs();
    let leader = wait_for_leader(&addrs, T).await.expect("leader");
    let mut a = Agent::connect(&addrs, "gpu-a", vec![]).await;
    let ha = a.heartbeats();
    let id = submit(&addrs[0], job(1, 2)).await;
    let asg = a.assignment(T).await.unwrap_or_else(|| panic!("no assignment\n{}", c.logs()));
    a.send(In::ShardStarted(v1::ShardStarted { attempt_id: asg.attempt_id, ..Default::default() })).await;
    wait_job_state(&addrs[0], id, v1::JobState::Running).await;
    // The leader dies; the agent reconnects to the new one and reports what it runs.
    ha.abort();
    c.servers.get_mut(&leader).unwrap().kill();
    drop(a);
    let rest = c.running_addrs();
    wait_for_leader(&rest, T).await.expect("new leader");
    let running =
        vec![v1::RunningAttempt { attempt_id: asg.attempt_id, job_id: id, shard_index: 0, ..Default::default() }];
    let mut a = Agent::connect(&rest, "gpu-a", running).await;
    let _hb = a.heartbeats();
    // Nothing is restarted or placed twice.
    while let Some(m) = a.next(Duration::from_secs(2)).await {
        assert!(!matches!(m, Out::AssignShard(_) | Out::StopShard(_) | Out::ForgetAttempts(_)), "unexpected {m:?}");
    }
    let j = get_job(&rest[0], id).await;
    assert_eq!(j.state, v1::JobState::Running as i32);
    assert_eq!(j.shards[0].attempt_id, Some(asg.attempt_id), "the same attempt still runs");
}
