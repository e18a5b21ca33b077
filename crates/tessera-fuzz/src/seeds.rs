//! Seed corpora (valid inputs built in code, so that mutation starts from the shape a decoder
//! accepts and reaches past its first check) and dictionaries (tokens the mutator inserts).

use std::collections::BTreeMap;

use prost::Message as _;
use tessera_core::command::{Command, ExitStatus};
use tessera_core::model::DrainReason;
use tessera_core::planner::{PlanLimits, plan};
use tessera_core::spec::{JobSpec, parse_toml};
use tessera_core::{ApplyContext, AttemptId, JobId, State, Timestamp};
use tessera_proto::v1;
use tessera_proto::v1::agent_message::Payload as In;
use tessera_raft::eraftpb;
use tessera_raft::node::StateMachine as _;
use tessera_server::sm::{Members, ServerSm, encode_entry};

use crate::fixture::{NOW, T0, fixture, live_attempts, node};
use crate::targets::{PEER, SERVER, request_index};

/// The example specs operators start from.
const GANG_H100: &str = include_str!("../../../deploy/examples/gang-h100.toml");
const QUICK: &str = include_str!("../../../deploy/examples/quick.toml");

/// Every field of the TOML form.
const FULL_SPEC: &str = r#"name = "llama-sft"
tenant = "nlp"
command = ["python", "train.py", "--lr", "3e-4"]
shards = 4
priority = "high"
max_runtime = "2h30m"
checkpoint_dir = "s3://ckpt/llama"

[env]
NCCL_DEBUG = "INFO"

[resources]
gpus = 8
gpu_model = "H100"
min_gpu_memory_gib = 80
cpu = 96.5
memory_gib = 1024

[placement]
clouds = ["aws", "azure"]
regions = ["us-east-1", "eastus"]
labels = { fabric = "efa" }
spot = "prefer"
span_regions = true
span_clouds = false

[retry]
max_attempts = 5
backoff = "30s"
never_retry_exit_codes = [2, 137]

[stop]
signal = "usr2"
checkpoint_grace = "2m"
term_grace = 10
"#;

pub(crate) fn spec_toml() -> Vec<Vec<u8>> {
    [
        GANG_H100,
        QUICK,
        FULL_SPEC,
        "command = [\"x\"]\nshards = 2\n\n[resources]\ngpus = 0\n",
        "command = [\"x\"]\npriority = \"urgentest\"\n[placement]\nclouds = [\"gcp\"]\n[env]\nTESSERA_RANK = \"1\"\n",
        "command = ['sleep', '1']\npriority = 1000\nmax_runtime = 86400\n[retry]\nbackoff = 0\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

pub(crate) fn spec_one_line() -> Vec<Vec<u8>> {
    [
        "--shards\n4\n--gpus\n8\n--gpu-model\nH100\n--cloud\naws,azure\n--priority\nhigh\n--name\nllama-sft\n--tenant\nnlp\n--\npython\ntrain.py\n--lr\n3e-4",
        "--gpus=1\n--\npython3\ntrain.py",
        "--priority\n42\n--cloud\nnone\n--\n/usr/bin/sleep\n1",
        "--gpus\n0\n--priority\nsoon\n--\nx",
        "--\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn with_selector(name: &str, body: Vec<u8>) -> Vec<u8> {
    let mut out = vec![request_index(name)];
    out.extend(body);
    out
}

fn node_ref_name(name: &str) -> Option<v1::NodeRef> {
    Some(v1::NodeRef { node: Some(v1::node_ref::Node::Name(name.into())) })
}

fn node_ref_id(id: u64) -> Option<v1::NodeRef> {
    Some(v1::NodeRef { node: Some(v1::node_ref::Node::Id(id)) })
}

/// The registration an agent on `name` sends, with the attempts it runs.
fn register(name: &str, running: &[AttemptId]) -> v1::Register {
    let info = crate::fixture::node_info(name, tessera_core::spec::Cloud::Aws, 4, "NVIDIA H100 80GB HBM3", false);
    v1::Register {
        name: info.name,
        cloud: v1::Cloud::Aws as i32,
        region: info.region,
        zone: info.zone,
        instance_type: info.instance_type,
        spot: info.spot,
        price_per_gpu_hour_micros: info.price_micros_per_gpu_hour,
        cpu_millis: info.cpu_millis,
        memory_mib: info.memory_mib,
        gpus: info
            .gpus
            .iter()
            .enumerate()
            .map(|(i, g)| v1::GpuInfo {
                index: i as u32,
                uuid: g.uuid.clone(),
                model: g.model.clone(),
                memory_mib: g.memory_mib,
            })
            .collect(),
        labels: info.labels.into_iter().collect(),
        agent_version: info.agent_version,
        simulated: true,
        running_attempts: running
            .iter()
            .map(|a| v1::RunningAttempt { attempt_id: a.0, job_id: 1, shard_index: 0, pid: 4242, started_unix_ms: T0 })
            .collect(),
        instance_id: "i-0123456789abcdef0".into(),
        advertise_addr: "10.0.0.1:7100".into(),
        protocol_version: 1,
        rendezvous_port_min: 29_500,
        rendezvous_port_max: 29_999,
    }
}

/// The reports of an agent on the fixture's node aws-1.
fn agent_payloads() -> Vec<(&'static str, In)> {
    let live = live_attempts();
    let attempt = live.first().map_or(1, |a| a.0);
    let heartbeat = v1::Heartbeat {
        sent_unix_ms: NOW.0,
        gpus: (0..4)
            .map(|i| v1::GpuTelemetry {
                gpu_index: i,
                sample_unix_ms: NOW.0,
                utilization_percent: Some(97),
                memory_used_mib: Some(70_000),
                memory_total_mib: Some(81_920),
                temperature_c: Some(64),
                power_w: Some(612.5),
                power_limit_w: Some(700.0),
                ..Default::default()
            })
            .collect(),
        progress: live
            .iter()
            .map(|a| v1::AttemptProgress {
                attempt_id: a.0,
                step: 150,
                total_steps: Some(1000),
                metrics: [("loss".to_string(), 2.25), ("lr".to_string(), 3e-4)].into_iter().collect(),
                malformed_lines: 0,
                updated_unix_ms: NOW.0,
            })
            .collect(),
        running_attempt_ids: live.iter().map(|a| a.0).collect(),
    };
    vec![
        ("Register", In::Register(register("aws-1", &live))),
        ("Register", In::Register(register("aws-9", &[]))),
        ("Heartbeat", In::Heartbeat(heartbeat)),
        ("ShardStarted", In::ShardStarted(v1::ShardStarted { attempt_id: attempt, pid: 4242, started_unix_ms: NOW.0 })),
        (
            "ShardExited",
            In::ShardExited(v1::ShardExited {
                attempt_id: attempt,
                termination: Some(v1::shard_exited::Termination::ExitCode(1)),
                node_fault: false,
                message: "CUDA error: out of memory".into(),
                exited_unix_ms: NOW.0,
            }),
        ),
        (
            "ShardExited",
            In::ShardExited(v1::ShardExited {
                attempt_id: attempt,
                termination: Some(v1::shard_exited::Termination::Signal(9)),
                node_fault: true,
                message: String::new(),
                exited_unix_ms: NOW.0,
            }),
        ),
        (
            "CheckpointReport",
            In::CheckpointReport(v1::CheckpointReport {
                attempt_id: attempt,
                step: 200,
                uri: "s3://ckpt/gang/step-200".into(),
                reported_unix_ms: NOW.0,
            }),
        ),
        (
            "GpuHealthReport",
            In::GpuHealthReport(v1::GpuHealthReport {
                gpu_index: 1,
                healthy: false,
                reason: "XID 79: GPU has fallen off the bus".into(),
                xid: Some(79),
            }),
        ),
        (
            "SpotNotice",
            In::SpotNotice(v1::SpotNotice {
                kind: 1,
                deadline_unix_ms: NOW.0 + 120_000,
                event_id: "aws:terminate:2026-11-26T12:34:56Z".into(),
                detail: "terminate".into(),
            }),
        ),
        (
            "LogChunk",
            In::LogChunk(v1::LogChunk {
                attempt_id: attempt,
                stream: 1,
                offset: 33,
                data: b"step 3 loss 1.9\n".to_vec(),
            }),
        ),
        (
            "LogRead",
            In::LogRead(v1::LogRead {
                request_id: 7,
                attempt_id: attempt,
                stream: 2,
                offset: 1_048_576,
                data: b"Traceback (most recent call last):\n".to_vec(),
                end: 2_000_000,
                found: true,
            }),
        ),
    ]
}

pub(crate) fn grpc_requests() -> Vec<Vec<u8>> {
    let gang = parse_toml(GANG_H100).map(|s| v1::JobSpec::from(&s)).ok();
    let small = v1::JobSpec::from(&JobSpec::new(vec!["python3".into(), "train.py".into()], 1, 1));
    let mut out = vec![
        with_selector(
            "SubmitJobRequest",
            v1::SubmitJobRequest { spec: gang, idempotency_key: "tessera-cli-1-abc".into() }.encode_to_vec(),
        ),
        with_selector(
            "SubmitJobRequest",
            v1::SubmitJobRequest { spec: Some(small), ..Default::default() }.encode_to_vec(),
        ),
        with_selector("GetJobRequest", v1::GetJobRequest { job_id: 1, consistency: 1 }.encode_to_vec()),
        with_selector(
            "CreateTokenRequest",
            v1::CreateTokenRequest {
                name: "ml-ci".into(),
                role: "submitter".into(),
                tenants: vec!["nlp".into()],
                ttl_seconds: 3600,
            }
            .encode_to_vec(),
        ),
        with_selector(
            "RevokeTokenRequest",
            v1::RevokeTokenRequest { accessor: "00000000-0000-4000-8000-000000000001".into() }.encode_to_vec(),
        ),
        with_selector(
            "SetTenantRequest",
            v1::SetTenantRequest {
                name: "nlp".into(),
                weight: Some(3),
                gpu_hours_quota: Some(100.0),
                cloud_gpu_hours_quota: [("azure".to_string(), 40.0)].into(),
                max_priority: Some(750),
                default_priority: Some(500),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        with_selector("GetTenantRequest", v1::GetTenantRequest { name: "nlp".into() }.encode_to_vec()),
        with_selector("JobEventsRequest", v1::JobEventsRequest { job_id: 1, consistency: 0 }.encode_to_vec()),
        with_selector(
            "UsageRequest",
            v1::UsageRequest {
                since_unix_ms: 1,
                until_unix_ms: None,
                group_by: vec![
                    v1::UsageKey::Tenant as i32,
                    v1::UsageKey::Cloud as i32,
                    v1::UsageKey::InstanceType as i32,
                ],
                tenant: String::new(),
                consistency: 0,
            }
            .encode_to_vec(),
        ),
        with_selector(
            "ListJobsRequest",
            v1::ListJobsRequest {
                states: vec![1, 2],
                tenant: "nlp".into(),
                include_finished: true,
                include_shards: true,
                page_size: 10,
                page_token: "0".into(),
                consistency: 0,
                array_job_id: 0,
            }
            .encode_to_vec(),
        ),
        with_selector(
            "CancelJobRequest",
            v1::CancelJobRequest { job_id: 1, reason: "no longer needed".into() }.encode_to_vec(),
        ),
        with_selector("CancelJobRequest", v1::CancelJobRequest { job_id: 2, reason: String::new() }.encode_to_vec()),
        with_selector("WatchJobRequest", v1::WatchJobRequest { job_id: 1 }.encode_to_vec()),
        with_selector(
            "JobLogsRequest",
            v1::JobLogsRequest {
                job_id: 1,
                shard_index: Some(0),
                streams: 0,
                follow: false,
                tail_bytes: Some(16),
                attempt: None,
            }
            .encode_to_vec(),
        ),
        with_selector(
            "ListNodesRequest",
            v1::ListNodesRequest {
                states: vec![1],
                cloud: 1,
                region: "us-east-1".into(),
                labels: [("fabric".to_string(), "efa".to_string())].into_iter().collect(),
                include_telemetry: true,
                page_size: 2,
                page_token: "1".into(),
                consistency: 2,
            }
            .encode_to_vec(),
        ),
        with_selector(
            "GetNodeRequest",
            v1::GetNodeRequest { node: node_ref_name("aws-1"), consistency: 0 }.encode_to_vec(),
        ),
        with_selector("GetNodeRequest", v1::GetNodeRequest { node: node_ref_id(3), consistency: 2 }.encode_to_vec()),
        with_selector(
            "DrainNodeRequest",
            v1::DrainNodeRequest { node: node_ref_name("aws-1"), deadline_seconds: Some(600), reason: "kernel".into() }
                .encode_to_vec(),
        ),
        with_selector(
            "UndrainNodeRequest",
            v1::UndrainNodeRequest { node: node_ref_name("aws-spot-1") }.encode_to_vec(),
        ),
        with_selector(
            "ClearGpuHealthRequest",
            v1::ClearGpuHealthRequest {
                node: node_ref_name("azure-1"),
                gpu_indices: vec![0, 1],
                reason: "reset".into(),
            }
            .encode_to_vec(),
        ),
        with_selector("StatusRequest", v1::StatusRequest {}.encode_to_vec()),
        with_selector(
            "AddServerRequest",
            v1::AddServerRequest { id: 4, address: "10.0.0.4:7001".into(), learner: true }.encode_to_vec(),
        ),
        with_selector("RemoveServerRequest", v1::RemoveServerRequest { id: 3 }.encode_to_vec()),
        with_selector("SnapshotRequest", v1::SnapshotRequest {}.encode_to_vec()),
        with_selector(
            "RaftBatch",
            v1::RaftBatch { from_id: PEER, to_id: SERVER, messages: raft_message().into_iter().take(3).collect() }
                .encode_to_vec(),
        ),
        with_selector(
            "ServerMessage",
            v1::ServerMessage {
                payload: Some(v1::server_message::Payload::StopShard(v1::StopShard {
                    attempt_id: 3,
                    reason: v1::StopReason::Spot as i32,
                    checkpoint_grace_ms: 90_000,
                    term_grace_ms: 10_000,
                    message: "spot notice".into(),
                })),
            }
            .encode_to_vec(),
        ),
    ];
    for (seq, (name, payload)) in agent_payloads().into_iter().enumerate() {
        let alone = match &payload {
            In::Register(m) => m.encode_to_vec(),
            In::Heartbeat(m) => m.encode_to_vec(),
            In::ShardStarted(m) => m.encode_to_vec(),
            In::ShardExited(m) => m.encode_to_vec(),
            In::CheckpointReport(m) => m.encode_to_vec(),
            In::GpuHealthReport(m) => m.encode_to_vec(),
            In::SpotNotice(m) => m.encode_to_vec(),
            In::LogChunk(m) => m.encode_to_vec(),
            In::LogRead(m) => m.encode_to_vec(),
        };
        out.push(with_selector(name, alone));
        let msg = v1::AgentMessage { seq: seq as u64 + 1, payload: Some(payload) };
        out.push(with_selector("AgentMessage", msg.encode_to_vec()));
    }
    out
}

pub(crate) fn progress_line() -> Vec<Vec<u8>> {
    let mut long = b"{\"step\": 6, \"pad\": \"".to_vec();
    long.extend(std::iter::repeat_n(b'y', tessera_agent::shard::progress::MAX_LINE_BYTES - long.len() - 2));
    long.extend_from_slice(b"\"}\n{\"step\": 7}\n");
    vec![
        b"{\"step\": 1, \"total_steps\": 10, \"metrics\": {\"loss\": 2.5, \"lr\": 1}}\n{\"step\": 2}\n".to_vec(),
        b"{\"step\": 10, \"checkpoint\": \"file:///c/10\"}\n{\"step\": 11, \"checkpoint\": \"file:///c/10\"}\r\n{\"step\": 20, \"checkpoint\": \"s3://c/20\", \"metrics\": {}}".to_vec(),
        b"not json\n{\"step\": -1}\n{\"step\": 3, \"metrics\": [1]}\n   \r\n{\"step\": 4, \"extra\": true}\n".to_vec(),
        long,
    ]
}

pub(crate) fn cloud_metadata() -> Vec<Vec<u8>> {
    let with = |selector: u8, body: &[u8]| {
        let mut v = vec![selector];
        v.extend_from_slice(body);
        v
    };
    vec![
        with(0, b"21600\nAQAEAHaLqTWq0-token-value=="),
        with(0, b"AQAEAHaLqTWq0-token-value=="),
        with(1, b"\x00p5.48xlarge"),
        with(1, b"\x01us-east-1\n"),
        with(1, b"\x03spot"),
        with(2, br#"{"action": "terminate", "time": "2026-11-26T12:34:56Z"}"#),
        with(
            3,
            br#"{"compute": {"location": "eastus", "zone": "2", "vmSize": "Standard_ND96isr_H100_v5", "vmId": "02aab8a4-74ef-476e-8182-f6d2ba4166a6", "priority": "Spot", "name": "gpu-7"}, "network": {}}"#,
        ),
        with(
            4,
            br#"{"DocumentIncarnation": 3, "Events": [{"EventId": "C7061BAC-AFDC-4513-B24B-AA5F13A16123", "EventStatus": "Scheduled", "EventType": "Freeze", "ResourceType": "VirtualMachine", "Resources": ["gpu-7"], "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT", "Description": "host update", "EventSource": "Platform", "DurationInSeconds": 9}, {"EventId": "A123BC45-1234-5678-AB90-ABCDEF123456", "EventStatus": "Scheduled", "EventType": "Preempt", "ResourceType": "VirtualMachine", "Resources": ["gpu-7"], "NotBefore": "Thu, 29 Feb 2024 23:59:59 GMT", "Description": "Spot eviction", "EventSource": "Platform", "DurationInSeconds": -1}]}"#,
        ),
        with(4, br#"{"DocumentIncarnation": 4, "Events": [{"EventId": "X1", "EventType": "Terminate", "NotBefore": ""}]}"#),
    ]
}

fn entry(cmd: &Command, index: u64) -> eraftpb::Entry {
    let mut e = eraftpb::Entry::default();
    e.set_entry_type(eraftpb::EntryType::EntryNormal);
    e.term = 2;
    e.index = index;
    e.data = encode_entry(cmd, NOW).into();
    let mut context = SERVER.to_be_bytes().to_vec();
    context.extend_from_slice(&index.to_be_bytes());
    e.context = context.into();
    e
}

fn message(kind: eraftpb::MessageType) -> eraftpb::Message {
    let mut m = eraftpb::Message::default();
    m.set_msg_type(kind);
    m.from = PEER;
    m.to = SERVER;
    m.term = 2;
    m.log_term = 2;
    m.index = 40;
    m.commit = 40;
    m
}

pub(crate) fn raft_message() -> Vec<Vec<u8>> {
    use protobuf::Message as _;
    let bytes = |m: &eraftpb::Message| m.write_to_bytes().unwrap_or_default();
    let mut append = message(eraftpb::MessageType::MsgAppend);
    let commands = command_list();
    append.set_entries(commands.iter().take(4).enumerate().map(|(i, c)| entry(c, 41 + i as u64)).collect());
    let mut conf = eraftpb::Entry::default();
    conf.set_entry_type(eraftpb::EntryType::EntryConfChange);
    conf.index = 45;
    let mut cc = eraftpb::ConfChange::default();
    cc.set_change_type(eraftpb::ConfChangeType::AddLearnerNode);
    cc.node_id = 4;
    cc.context = b"10.0.0.4:7001".to_vec().into();
    conf.data = cc.write_to_bytes().unwrap_or_default().into();
    let mut with_conf = message(eraftpb::MessageType::MsgAppend);
    with_conf.set_entries(vec![conf].into());

    let mut snap = message(eraftpb::MessageType::MsgSnapshot);
    let mut sm = ServerSm::new(
        Members { addresses: BTreeMap::from([(1, "10.0.0.1:7001".into()), (2, "10.0.0.2:7001".into())]) },
        tokio::sync::broadcast::channel(1).0,
    );
    sm.state = fixture().clone();
    let mut s = eraftpb::Snapshot { data: sm.snapshot().into(), ..Default::default() };
    s.mut_metadata().index = 40;
    s.mut_metadata().term = 2;
    s.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
    snap.set_snapshot(s);

    let mut vote = message(eraftpb::MessageType::MsgRequestVote);
    vote.priority = 1;
    let heartbeat = message(eraftpb::MessageType::MsgHeartbeat);
    let mut response = message(eraftpb::MessageType::MsgAppendResponse);
    response.reject = true;
    response.reject_hint = 12;
    vec![bytes(&append), bytes(&heartbeat), bytes(&with_conf), bytes(&snap), bytes(&vote), bytes(&response)]
}

/// One command of each kind, naming what the fixture holds.
fn command_list() -> Vec<Command> {
    let live = live_attempts();
    let attempt = live.first().copied().unwrap_or(AttemptId(1));
    let aws = node("aws-1");
    let mut pending = fixture().clone();
    let index = pending.applied_index() + 1;
    let job = JobSpec::new(vec!["python3".into(), "eval.py".into()], 1, 2);
    let _ = pending.apply(
        Command::SubmitJob { spec: job, idempotency_key: None, priority_defaulted: false, submitted_by: None },
        ApplyContext { index, now: NOW },
    );
    let placed = plan(&pending, NOW, &PlanLimits::default()).plan;
    let full = parse_toml(FULL_SPEC).unwrap_or_else(|_| JobSpec::new(vec!["x".into()], 1, 1));
    vec![
        Command::SubmitJob {
            spec: full,
            idempotency_key: Some("key-1".into()),
            priority_defaulted: false,
            submitted_by: None,
        },
        Command::ApplyPlan { plan: placed },
        Command::ShardStarted { attempt },
        Command::ShardExited {
            attempt,
            exit: ExitStatus { code: Some(2), signal: None },
            node_fault: false,
            message: Some("bad config".into()),
        },
        Command::RecordCheckpoint { attempt, step: 300, uri: "s3://ckpt/gang/step-300".into() },
        Command::CancelJob { job: JobId(1), reason: Some("operator".into()) },
        Command::RegisterNode {
            info: crate::fixture::node_info("aws-2", tessera_core::spec::Cloud::Aws, 8, "H100", true),
        },
        Command::MarkNodeDown { node: aws, reason: "no heartbeat for 30s".into(), registration: Some(1) },
        Command::DrainNode { node: aws, reason: DrainReason::Operator, deadline: Some(Timestamp(NOW.0 + 3_600_000)) },
        Command::UndrainNode { node: node("aws-spot-1") },
        Command::SetGpuHealth {
            node: aws,
            gpu: 0,
            healthy: false,
            reason: "XID 48".into(),
            xid: None,
            cool_down: false,
        },
        Command::SetTenant {
            name: "vision".into(),
            weight: 10,
            gpu_quota: None,
            max_priority: None,
            default_priority: Some(300),
            gpu_hours_quota: None,
            cloud_gpu_hours_quota: Default::default(),
            gpu_hours_window_ms: tessera_core::model::DEFAULT_GPU_HOURS_WINDOW_MS,
            mode: Default::default(),
        },
        Command::SetFairShareHalfLife { half_life_ms: 86_400_000 },
    ]
}

pub(crate) fn command_decode() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = command_list().iter().map(Command::encode).collect();
    out.push(br#"{"v":1,"type":"undrain_node","node":7}"#.to_vec());
    out
}

pub(crate) fn snapshot_restore() -> Vec<Vec<u8>> {
    let mut busy = fixture().clone();
    for (i, cmd) in command_list().into_iter().enumerate() {
        let index = busy.applied_index() + 1 + i as u64;
        let _ = busy.apply(cmd, ApplyContext { index, now: NOW });
    }
    vec![fixture().snapshot(), State::new().snapshot(), busy.snapshot()]
}

// ---------------------------------------------------------------------------------------------
// Dictionaries
// ---------------------------------------------------------------------------------------------

/// Numbers at the edges of the integer types, as text.
const EDGE: [&[u8]; 17] = [
    b"0",
    b"-1",
    b"255",
    b"65535",
    b"65536",
    b"2147483647",
    b"2147483648",
    b"-2147483649",
    b"4294967295",
    b"4294967296",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"18446744073709551615",
    b"18446744073709551616",
    b"1e309",
    b"-0.0",
    b"1.5",
];

const TOML_WORDS: [&[u8]; 45] = [
    b"name = ",
    b"tenant = ",
    b"command = ",
    b"shards = ",
    b"priority = ",
    b"max_runtime = ",
    b"checkpoint_dir = ",
    b"[env]\n",
    b"[resources]\n",
    b"gpus = ",
    b"gpu_model = ",
    b"min_gpu_memory_gib = ",
    b"cpu = ",
    b"memory_gib = ",
    b"[placement]\n",
    b"clouds = ",
    b"regions = ",
    b"labels = ",
    b"spot = ",
    b"span_regions = ",
    b"span_clouds = ",
    b"[retry]\n",
    b"max_attempts = ",
    b"backoff = ",
    b"never_retry_exit_codes = ",
    b"[stop]\n",
    b"signal = ",
    b"checkpoint_grace = ",
    b"term_grace = ",
    b"\"aws\"",
    b"\"azure\"",
    b"\"none\"",
    b"\"critical\"",
    b"\"1h30m\"",
    b"\"99999999999999999999d\"",
    b"nan",
    b"inf",
    b"'''",
    b"\"\"\"",
    b"[[",
    b"]]",
    b"{ a = 1 }",
    b"1979-05-27T07:32:00Z",
    b"\\u0000",
    b"\"\\uD800\"",
];

pub(crate) const DICT_TOML: &[&[u8]] = &concat_dict::<62>(&TOML_WORDS, &EDGE);

const ONE_LINE_WORDS: [&[u8]; 16] = [
    b"--shards\n",
    b"--gpus\n",
    b"--gpu-model\n",
    b"--cloud\n",
    b"--priority\n",
    b"--name\n",
    b"--tenant\n",
    b"\n--\n",
    b"aws,azure",
    b"none",
    b"critical",
    b"1001",
    b"H100",
    b",,",
    b"=",
    b"\0",
];

pub(crate) const DICT_ONE_LINE: &[&[u8]] = &concat_dict::<33>(&ONE_LINE_WORDS, &EDGE);

const PROTO_WORDS: [&[u8]; 18] = [
    // Varints: u64::MAX, 2^32, u32::MAX, -1 as int32 (ten bytes), an overlong eleven-byte one.
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\x80\x80\x80\x80\x10",
    b"\xff\xff\xff\xff\x0f",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    // Tags: fields 1 to 8 length-delimited; field 1 as a group; field 100 as a group, open and close.
    b"\x0a",
    b"\x12",
    b"\x1a",
    b"\x22",
    b"\x2a",
    b"\x32",
    b"\x3a",
    b"\x42",
    b"\x0b",
    b"\x0c",
    b"\xa3\x06",
    b"\xa4\x06",
    b"aws-1",
    b"SIGUSR1",
];

pub(crate) const DICT_PROTO: &[&[u8]] = &concat_dict::<35>(&PROTO_WORDS, &EDGE);

const JSON_WORDS: [&[u8]; 52] = [
    b"{",
    b"}",
    b"[",
    b"]",
    b"null",
    b"true",
    b"\"v\":1,",
    b"\"v\":2,",
    b"\"type\":",
    b"\"submit_job\"",
    b"\"cancel_job\"",
    b"\"register_node\"",
    b"\"mark_node_down\"",
    b"\"drain_node\"",
    b"\"set_gpu_health\"",
    b"\"apply_plan\"",
    b"\"shard_started\"",
    b"\"shard_exited\"",
    b"\"record_checkpoint\"",
    b"\"set_tenant\"",
    b"\"set_fair_share_half_life\"",
    b"\"placements\"",
    b"\"preemptions\"",
    b"\"shards\"",
    b"\"gpus\"",
    b"\"node\"",
    b"\"attempt\"",
    b"\"holder\"",
    b"\"index\"",
    b"\"jobs\"",
    b"\"nodes\"",
    b"\"tenants\"",
    b"\"state\"",
    b"\"Running\"",
    b"{\"Stopping\":\"Drain\"}",
    b"\"step\"",
    b"\"total_steps\"",
    b"\"checkpoint\"",
    b"\"metrics\"",
    b"\"Events\"",
    b"\"EventType\"",
    b"\"Preempt\"",
    b"\"NotBefore\"",
    b"\"compute\"",
    b"\"vmSize\"",
    b"\"zone\"",
    b"\"action\"",
    b"\"time\"",
    b"Mon, 19 Sep 2016 18:29:47 GMT",
    b"2026-11-26T12:34:56Z",
    b"\"\\ud800\"",
    b"\"\\u0000\"",
];

pub(crate) const DICT_JSON: &[&[u8]] = &concat_dict::<69>(&JSON_WORDS, &EDGE);

/// `a` then `b`, in a constant.
const fn concat_dict<const N: usize>(a: &[&'static [u8]], b: &[&'static [u8]]) -> [&'static [u8]; N] {
    let mut out: [&'static [u8]; N] = [b""; N];
    let mut i = 0;
    while i < a.len() {
        out[i] = a[i];
        i += 1;
    }
    let mut j = 0;
    while j < b.len() {
        out[i + j] = b[j];
        j += 1;
    }
    out
}

/// A real certificate of each kind, the JSON of a forwarded principal, and bearer headers.
pub(crate) fn peer_identity() -> Vec<Vec<u8>> {
    use tessera_core::acl::{Principal, Role};
    let mut out = Vec::new();
    if let Ok((ca, _)) = tessera_tls::issue::Ca::create("fuzz CA", 1) {
        let who = [
            Principal::Server { id: 3 },
            Principal::Agent { node: "aws-node-17".into() },
            Principal::User {
                name: "bob".into(),
                role: Some(Role::Submitter),
                tenants: ["ml".to_string()].into(),
                token: None,
            },
        ];
        for p in who {
            let hosts = if matches!(p, Principal::Server { .. }) { vec!["127.0.0.1".to_string()] } else { Vec::new() };
            if let Ok(issued) = ca.issue(&p, &hosts, 1) {
                let der = rustls_pki_types::pem::PemObject::from_pem_slice(issued.cert_pem.as_bytes())
                    .map(|c: rustls_pki_types::CertificateDer<'static>| c.to_vec());
                if let Ok(der) = der {
                    out.push([vec![0], der].concat());
                }
            }
        }
    }
    for json in [
        r#"{"kind":"user","name":"alice","role":"admin","tenants":[],"token":null}"#,
        r#"{"kind":"user","name":"bob","role":"submitter","tenants":["ml"],"token":"x"}"#,
        r#"{"kind":"server","id":2}"#,
        r#"{"kind":"insecure"}"#,
    ] {
        out.push([&[1u8][..], json.as_bytes()].concat());
    }
    for h in ["Bearer fuzz-secret", "Bearer nope", "bearer fuzz-secret", "Basic abc"] {
        out.push([&[2u8][..], h.as_bytes()].concat());
    }
    out
}
