//! The targets. Each takes any bytes, runs the decoder and what the server or agent does next
//! with what it decoded, checks what must hold, and returns a signature of the outcome (see
//! [`crate::Target::probe`]). A panic anywhere below is a finding.

use std::time::{Duration, SystemTime};

use tessera_core::command::{ApplyContext, Command};
use tessera_core::model::NodeInfo;
use tessera_core::planner::{PlanLimits, plan};
use tessera_core::spec::{JobSpec, OneLine, SpecError, parse_toml};
use tessera_core::{JobId, NodeId, State};
use tessera_proto::convert::{
    cloud_from_proto, job_state_from_proto, job_to_proto, node_to_proto, rejection_to_status, spec_error_to_status,
    spec_from_proto,
};
use tessera_proto::v1;
use tessera_proto::v1::agent_message::Payload as In;
use tessera_raft::eraftpb;
use tessera_raft::node::StateMachine as _;
use tessera_server::api::{Page, find_node, job_id, page};
use tessera_server::live::LiveView;
use tessera_server::logs::{LogStore, Owner};
use tessera_server::sm::{Members, ServerSm};

use crate::fixture::{NOW, fixture};

/// A signature of an outcome: FNV-1a over its parts, with ASCII digits left out so that
/// positions and ids in error messages do not make every input look new.
#[derive(Clone, Copy)]
pub(crate) struct Sig(u64);

impl Sig {
    pub(crate) fn new(kind: &str) -> Sig {
        Sig(0xcbf2_9ce4_8422_2325).add(kind)
    }

    pub(crate) fn add(self, part: &str) -> Sig {
        let mut h = self.0 ^ 0xff;
        for b in part.bytes().filter(|b| !b.is_ascii_digit()).take(96) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        Sig(h)
    }

    pub(crate) fn num(self, n: u64) -> Sig {
        Sig((self.0 ^ n).wrapping_mul(0x0100_0000_01b3))
    }

    pub(crate) fn done(self) -> u64 {
        self.0
    }
}

/// The signature of a spec error: its fields, in order.
fn spec_error_sig(sig: Sig, e: &SpecError) -> Sig {
    e.errors.iter().take(4).fold(sig, |s, fe| s.add(&fe.field))
}

/// What holds for every spec a parser accepts: it validates, and it comes back unchanged from
/// the wire form (`SubmitJob` on the API) and from the log (`Command::encode`).
fn check_accepted_spec(spec: &JobSpec, from: &str) {
    if let Err(e) = spec.validate() {
        panic!("{from} accepted a spec that does not validate: {e}");
    }
    match spec_from_proto(v1::JobSpec::from(spec)) {
        Ok(back) => assert_eq!(&back, spec, "{from}: the spec changed on its way through the wire form"),
        Err(e) => panic!("{from}: the wire form of an accepted spec is refused: {e}"),
    }
    let cmd =
        Command::SubmitJob { spec: spec.clone(), idempotency_key: None, priority_defaulted: false, submitted_by: None };
    match Command::decode(&cmd.encode()) {
        Ok(back) => assert_eq!(back, cmd, "{from}: the spec changed on its way through the log"),
        Err(e) => panic!("{from}: the log encoding of an accepted spec does not decode: {e}"),
    }
}

/// What holds for every refusal: at least one problem, and each names a field.
fn check_spec_error(e: &SpecError, from: &str) {
    assert!(!e.errors.is_empty(), "{from}: an error without problems");
    for fe in &e.errors {
        assert!(!fe.field.trim().is_empty(), "{from}: a problem that names no field: {fe}");
        assert!(!fe.message.trim().is_empty(), "{from}: a problem without a message: {fe:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Specs
// ---------------------------------------------------------------------------------------------

pub(crate) fn spec_toml(data: &[u8]) -> u64 {
    let src = String::from_utf8_lossy(data);
    match parse_toml(&src) {
        Ok(spec) => {
            check_accepted_spec(&spec, "parse_toml");
            Sig::new("ok").num(u64::from(spec.shards > 1)).num(spec.placement.clouds.len() as u64).done()
        }
        Err(e) => {
            check_spec_error(&e, "parse_toml");
            let lines = src.matches('\n').count() + 1;
            for fe in &e.errors {
                if let Some((line, column)) = fe.location {
                    assert!(line >= 1 && line <= lines && column >= 1, "{fe} points outside the source");
                }
            }
            spec_error_sig(Sig::new("err"), &e).done()
        }
    }
}

/// Flags of `tessera job submit` that take a value, as clap reads them.
const ONE_LINE_FLAGS: [&str; 7] = ["--shards", "--gpus", "--gpu-model", "--cloud", "--priority", "--name", "--tenant"];

pub(crate) fn spec_one_line(data: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(data);
    let mut args = text.split('\n').map(str::to_owned);
    let mut line = OneLine::default();
    while let Some(arg) = args.next() {
        if arg == "--" {
            line.command = args.by_ref().collect();
            break;
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg, None),
        };
        if !ONE_LINE_FLAGS.contains(&flag.as_str()) {
            // clap refuses it before any spec is built.
            return Sig::new("usage").done();
        }
        let Some(value) = inline.or_else(|| args.next()) else { return Sig::new("usage").done() };
        let number = || value.parse::<u32>().ok();
        match flag.as_str() {
            "--shards" => match number() {
                Some(n) => line.shards = Some(n),
                None => return Sig::new("usage").done(),
            },
            "--gpus" => match number() {
                Some(n) => line.gpus = Some(n),
                None => return Sig::new("usage").done(),
            },
            "--gpu-model" => line.gpu_model = Some(value),
            "--cloud" => line.clouds = Some(value),
            "--priority" => line.priority = Some(value),
            "--name" => line.name = Some(value),
            _ => line.tenant = Some(value),
        }
    }
    match line.to_spec() {
        Ok(spec) => {
            check_accepted_spec(&spec, "OneLine::to_spec");
            Sig::new("ok").done()
        }
        Err(e) => {
            check_spec_error(&e, "OneLine::to_spec");
            for fe in &e.errors {
                assert!(
                    fe.field.starts_with("--") || fe.field.starts_with("command"),
                    "a one-line error names '{}', not a flag",
                    fe.field
                );
            }
            spec_error_sig(Sig::new("err"), &e).done()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// gRPC requests
// ---------------------------------------------------------------------------------------------

/// The request messages, by the first byte of an input (modulo their number).
pub(crate) const REQUESTS: [&str; 33] = [
    "SubmitJobRequest",
    "GetJobRequest",
    "ListJobsRequest",
    "CancelJobRequest",
    "WatchJobRequest",
    "JobLogsRequest",
    "ListNodesRequest",
    "GetNodeRequest",
    "DrainNodeRequest",
    "UndrainNodeRequest",
    "ClearGpuHealthRequest",
    "StatusRequest",
    "AddServerRequest",
    "RemoveServerRequest",
    "SnapshotRequest",
    "AgentMessage",
    "Register",
    "Heartbeat",
    "ShardStarted",
    "ShardExited",
    "CheckpointReport",
    "GpuHealthReport",
    "SpotNotice",
    "LogChunk",
    "LogRead",
    "RaftBatch",
    "ServerMessage",
    "CreateTokenRequest",
    "RevokeTokenRequest",
    "SetTenantRequest",
    "GetTenantRequest",
    "JobEventsRequest",
    "UsageRequest",
];

/// The selector byte of a request message, for seeds.
pub(crate) fn request_index(name: &str) -> u8 {
    REQUESTS.iter().position(|r| *r == name).map_or(0, |i| i as u8)
}

/// Apply a command to a copy of the fixture as the server's state machine would, after a trip
/// through the log encoding. Returns a signature of the outcome.
fn apply_to_fixture(cmd: Command, sig: Sig) -> Sig {
    let bytes = cmd.encode();
    match Command::decode(&bytes) {
        Ok(back) => assert_eq!(back, cmd, "a command changed on its way through the log"),
        Err(e) => panic!("the log encoding of {} does not decode: {e}", cmd.kind()),
    }
    let mut state = fixture().clone();
    let index = state.applied_index() + 1;
    let sig = sig.add(cmd.kind());
    match state.apply(cmd, ApplyContext { index, now: NOW }) {
        Ok(events) => {
            if let Err(broken) = state.check_invariants() {
                panic!("an applied command broke an invariant: {broken}");
            }
            // What the leader does after every write: plan, and apply the plan.
            plan_and_apply(&mut state);
            sig.add("applied").num(events.len().min(4) as u64)
        }
        Err(r) => {
            let status = rejection_to_status(&r);
            assert!(!status.message().is_empty(), "a rejection without a message: {r:?}");
            sig.add("rejected").add(&format!("{:?}", status.code()))
        }
    }
}

/// One placement round on `state`, as the leader's placement loop runs it, with small limits.
fn plan_and_apply(state: &mut State) -> bool {
    let limits = PlanLimits { max_shards: 256, max_preemptions: 4, max_victim_candidates: 16 };
    let out = plan(state, NOW, &limits);
    if out.plan.is_empty() {
        return false;
    }
    let index = state.applied_index() + 1;
    let applied = state.apply(Command::ApplyPlan { plan: out.plan }, ApplyContext { index, now: NOW }).is_ok();
    if let Err(broken) = state.check_invariants() {
        panic!("applying a plan broke an invariant: {broken}");
    }
    applied
}

fn status_sig(sig: Sig, s: &tonic::Status) -> Sig {
    let field = s.message().split(':').next().unwrap_or("");
    sig.add(&format!("{:?}", s.code())).add(field)
}

pub(crate) fn grpc_requests(data: &[u8]) -> u64 {
    let Some((&selector, body)) = data.split_first() else { return 0 };
    let name = REQUESTS[usize::from(selector) % REQUESTS.len()];
    let sig = Sig::new(name);
    match request(name, body, sig) {
        Ok(sig) => sig.done(),
        Err(sig) => sig.done(),
    }
}

/// Decode `body` as `name` and run it. `Err` carries the signature of an early refusal.
pub(crate) fn request(name: &str, body: &[u8], sig: Sig) -> Result<Sig, Sig> {
    fn decode<M: prost::Message + Default>(body: &[u8], sig: Sig) -> Result<M, Sig> {
        M::decode(body).map_err(|_| sig.add("undecodable"))
    }
    let refused = |s: tonic::Status| status_sig(sig, &s);
    let state = fixture();
    Ok(match name {
        "SubmitJobRequest" => {
            let req: v1::SubmitJobRequest = decode(body, sig)?;
            let wire = req.spec.ok_or(sig.add("no spec"))?;
            match spec_from_proto(wire) {
                Ok(spec) => {
                    check_accepted_spec(&spec, "spec_from_proto");
                    let key = (!req.idempotency_key.is_empty()).then_some(req.idempotency_key);
                    apply_to_fixture(
                        Command::SubmitJob {
                            spec,
                            idempotency_key: key,
                            priority_defaulted: false,
                            submitted_by: None,
                        },
                        sig,
                    )
                }
                Err(e) => {
                    check_spec_error(&e, "spec_from_proto");
                    for fe in &e.errors {
                        assert!(
                            fe.field.starts_with("spec."),
                            "spec_from_proto names '{}', not a wire field",
                            fe.field
                        );
                    }
                    assert!(!spec_error_to_status(&e).message().is_empty());
                    spec_error_sig(sig.add("invalid"), &e)
                }
            }
        }
        "GetJobRequest" => {
            let req: v1::GetJobRequest = decode(body, sig)?;
            let id = job_id(req.job_id).map_err(refused)?;
            sig.num(u64::from(state.job(id).map(|j| job_to_proto(j, state)).is_some()))
        }
        "JobEventsRequest" => {
            let req: v1::JobEventsRequest = decode(body, sig)?;
            let id = job_id(req.job_id).map_err(refused)?;
            let events = state.job(id).map(|j| tessera_proto::convert::job_events_to_proto(j, state));
            // Numbered from 1, in order.
            if let Some(e) = &events {
                assert!(e.events.windows(2).all(|w| w[0].sequence < w[1].sequence), "{e:?}");
            }
            sig.num(events.map_or(0, |e| e.events.len().min(8) as u64 + 1))
        }
        "UsageRequest" => {
            // TenantService::usage: the checks, then the count on the state.
            let req: v1::UsageRequest = decode(body, sig)?;
            if req.since_unix_ms == 0 {
                return Err(sig.add("no since"));
            }
            let until = req.until_unix_ms.unwrap_or(NOW.0);
            if until <= req.since_unix_ms {
                return Err(sig.add("empty range"));
            }
            let mut by = Vec::new();
            for (i, k) in req.group_by.iter().enumerate() {
                let k = tessera_proto::convert::usage_key_from_proto(*k, &format!("group_by[{i}]"))
                    .map_err(|e| refused(e.into()))?;
                if by.contains(&k) {
                    return Err(sig.add("key twice"));
                }
                by.push(k);
            }
            let q = tessera_core::usage::UsageQuery {
                since: tessera_core::Timestamp(req.since_unix_ms),
                until: tessera_core::Timestamp(until),
                by: &by,
                tenants: None,
            };
            let rows = tessera_core::usage::usage(state, &q);
            assert!(rows.iter().all(|r| r.keys.len() == by.len() && r.gpu_hours >= 0.0), "{rows:?}");
            sig.num(rows.len().min(8) as u64)
        }
        "WatchJobRequest" => {
            let req: v1::WatchJobRequest = decode(body, sig)?;
            let id = job_id(req.job_id).map_err(refused)?;
            sig.num(u64::from(state.job(id).map(|j| job_to_proto(j, state)).is_some()))
        }
        "ListJobsRequest" => {
            let req: v1::ListJobsRequest = decode(body, sig)?;
            let mut states = Vec::new();
            for (i, s) in req.states.iter().enumerate() {
                if let Some(s) = job_state_from_proto(*s, &format!("states[{i}]")).map_err(|e| refused(e.into()))? {
                    states.push(s);
                }
            }
            let Page { size, first } = page(req.page_size, &req.page_token).map_err(refused)?;
            let listed: Vec<v1::Job> = state
                .jobs()
                .range(JobId(first)..)
                .map(|(_, j)| j)
                .filter(|j| states.is_empty() || states.contains(&j.state))
                .filter(|j| req.tenant.is_empty() || j.spec.tenant == req.tenant)
                .take(size)
                .map(|j| job_to_proto(j, state))
                .collect();
            sig.num(listed.len() as u64)
        }
        "CancelJobRequest" => {
            let req: v1::CancelJobRequest = decode(body, sig)?;
            let id = job_id(req.job_id).map_err(refused)?;
            let reason = (!req.reason.is_empty()).then_some(req.reason);
            apply_to_fixture(Command::CancelJob { job: id, reason }, sig)
        }
        "JobLogsRequest" => {
            let req: v1::JobLogsRequest = decode(body, sig)?;
            let id = job_id(req.job_id).map_err(refused)?;
            let streams: Vec<i32> = match v1::LogSelection::try_from(req.streams) {
                Ok(v1::LogSelection::Stdout) => vec![1],
                Ok(v1::LogSelection::Stderr) => vec![2],
                Ok(_) => vec![1, 2],
                Err(_) => return Err(sig.add("bad streams")),
            };
            let logs = fixture_logs();
            let kept = logs.read(id, req.shard_index, req.attempt, &streams, req.tail_bytes);
            sig.num(kept.len() as u64)
        }
        "ListNodesRequest" => {
            let req: v1::ListNodesRequest = decode(body, sig)?;
            let Page { size, first } = page(req.page_size, &req.page_token).map_err(refused)?;
            let cloud = cloud_from_proto(req.cloud, "cloud").map_err(|e| refused(e.into()))?;
            let listed = state
                .nodes()
                .range(NodeId(first)..)
                .map(|(_, n)| (n, node_to_proto(n, state)))
                .filter(|(n, p)| {
                    (req.states.is_empty() || req.states.contains(&p.state))
                        && cloud.is_none_or(|c| c == n.info.cloud)
                        && (req.region.is_empty() || req.region == n.info.region)
                        && req.labels.iter().all(|(k, v)| n.info.labels.get(k) == Some(v))
                })
                .take(size)
                .count();
            sig.num(listed as u64)
        }
        "GetNodeRequest" => {
            let req: v1::GetNodeRequest = decode(body, sig)?;
            let id = find_node(state, &req.node).map_err(refused)?;
            let node = node_to_proto(&state.nodes()[&id], state);
            sig.num(node.gpus.len() as u64)
        }
        "DrainNodeRequest" => {
            let req: v1::DrainNodeRequest = decode(body, sig)?;
            let deadline = req.deadline_seconds.map(|s| NOW.plus_secs(s));
            let node = find_node(state, &req.node).map_err(refused)?;
            let reason = tessera_core::model::DrainReason::Operator;
            apply_to_fixture(Command::DrainNode { node, reason, deadline }, sig)
        }
        "UndrainNodeRequest" => {
            let req: v1::UndrainNodeRequest = decode(body, sig)?;
            let node = find_node(state, &req.node).map_err(refused)?;
            apply_to_fixture(Command::UndrainNode { node }, sig)
        }
        "ClearGpuHealthRequest" => {
            let req: v1::ClearGpuHealthRequest = decode(body, sig)?;
            let node = find_node(state, &req.node).map_err(refused)?;
            let all: Vec<u32> = state.nodes()[&node].gpus.iter().map(|g| g.index).collect();
            let gpus = if req.gpu_indices.is_empty() { all } else { req.gpu_indices };
            let reason = if req.reason.is_empty() { "cleared by an operator".to_string() } else { req.reason };
            // The server writes one command per GPU; a few show what each does.
            gpus.into_iter().take(4).fold(sig, |sig, gpu| {
                apply_to_fixture(
                    Command::SetGpuHealth {
                        node,
                        gpu,
                        healthy: true,
                        reason: reason.clone(),
                        xid: None,
                        cool_down: false,
                    },
                    sig,
                )
            })
        }
        "StatusRequest" => {
            decode::<v1::StatusRequest>(body, sig)?;
            sig
        }
        "AddServerRequest" => {
            let req: v1::AddServerRequest = decode(body, sig)?;
            if req.id == 0 || req.address.is_empty() {
                return Err(sig.add("id and address required"));
            }
            // The transport dials the new member at this address.
            let ok = tonic::transport::Endpoint::from_shared(format!("http://{}", req.address)).is_ok();
            sig.num(u64::from(ok))
        }
        "RemoveServerRequest" => {
            let req: v1::RemoveServerRequest = decode(body, sig)?;
            sig.num(u64::from(req.id == 0))
        }
        "SnapshotRequest" => {
            decode::<v1::SnapshotRequest>(body, sig)?;
            sig
        }
        "CreateTokenRequest" => {
            let req: v1::CreateTokenRequest = decode(body, sig)?;
            let (token, _secret) =
                tessera_server::api::acl::token_from_request(req, "user/fuzz".into(), NOW).map_err(refused)?;
            apply_to_fixture(Command::Acl { change: tessera_core::acl::AclChange::CreateToken { token } }, sig)
        }
        "RevokeTokenRequest" => {
            let req: v1::RevokeTokenRequest = decode(body, sig)?;
            let accessor = req.accessor.trim().to_string();
            apply_to_fixture(Command::Acl { change: tessera_core::acl::AclChange::RevokeToken { accessor } }, sig)
        }
        "SetTenantRequest" => {
            let req: v1::SetTenantRequest = decode(body, sig)?;
            let current = state.tenants().get(&req.name);
            let cmd = tessera_server::api::tenants::set_tenant_command(req, current, NOW).map_err(refused)?;
            apply_to_fixture(cmd, sig)
        }
        "GetTenantRequest" => {
            let req: v1::GetTenantRequest = decode(body, sig)?;
            let found = state.tenants().get(&req.name).map(|t| tessera_proto::convert::tenant_to_proto(t, state, NOW));
            sig.num(u64::from(found.is_some()))
        }
        "AgentMessage" => {
            let msg: v1::AgentMessage = decode(body, sig)?;
            match msg.payload {
                Some(p) => agent_report(p, sig),
                None => sig.add("empty"),
            }
        }
        "Register" => agent_report(In::Register(decode(body, sig)?), sig),
        "Heartbeat" => agent_report(In::Heartbeat(decode(body, sig)?), sig),
        "ShardStarted" => agent_report(In::ShardStarted(decode(body, sig)?), sig),
        "ShardExited" => agent_report(In::ShardExited(decode(body, sig)?), sig),
        "CheckpointReport" => agent_report(In::CheckpointReport(decode(body, sig)?), sig),
        "GpuHealthReport" => agent_report(In::GpuHealthReport(decode(body, sig)?), sig),
        "SpotNotice" => agent_report(In::SpotNotice(decode(body, sig)?), sig),
        "LogChunk" => agent_report(In::LogChunk(decode(body, sig)?), sig),
        "LogRead" => agent_report(In::LogRead(decode(body, sig)?), sig),
        "RaftBatch" => {
            let batch: v1::RaftBatch = decode(body, sig)?;
            // RaftRpc::send: the batch must be for this server, from a member.
            if batch.to_id != SERVER || batch.from_id != PEER {
                return Err(sig.add("misaddressed batch"));
            }
            batch.messages.iter().take(8).fold(sig, |sig, m| raft_bytes(m, sig))
        }
        "ServerMessage" => {
            let msg: v1::ServerMessage = decode(body, sig)?;
            sig.num(u64::from(msg.payload.is_some()))
        }
        other => unreachable!("no request named {other}"),
    })
}

/// Output kept for the fixture's live attempts, as agents would have sent it.
fn fixture_logs() -> LogStore {
    let logs = LogStore::default();
    for id in crate::fixture::live_attempts() {
        if let Some((job, shard)) = fixture().attempt(id) {
            let number = shard.attempt.as_ref().map_or(1, |a| a.number);
            let owner = Owner { job: job.id, shard: shard.index, attempt: number };
            logs.append(id.0, owner, 1, 0, b"step 1 loss 2.5\nstep 2 loss 2.1\n");
            logs.append(id.0, owner, 2, 0, b"warning: slow data loader\n");
        }
    }
    logs
}

/// What the leader does with one report on an agent's stream (`tessera_server::agents`).
fn agent_report(payload: In, sig: Sig) -> Sig {
    let state = fixture();
    let node = crate::fixture::node("aws-1");
    match payload {
        In::Register(reg) => match NodeInfo::try_from(&reg) {
            Ok(info) => apply_to_fixture(Command::RegisterNode { info }, sig.add("register")),
            Err(e) => {
                assert!(e.field.starts_with("register."), "a registration error names '{}'", e.field);
                sig.add("register refused").add(&e.field)
            }
        },
        In::Heartbeat(hb) => {
            let live = LiveView::default();
            live.heartbeat(node, hb, NOW.0);
            let mut shown = 0;
            for job in state.jobs().values() {
                let mut p = job_to_proto(job, state);
                live.overlay_job(&mut p);
                shown += p.shards.iter().filter(|s| s.step > 0).count();
            }
            for n in state.nodes().values() {
                let mut p = node_to_proto(n, state);
                live.overlay_node(&mut p);
            }
            sig.add("heartbeat").num(shown.min(4) as u64)
        }
        In::LogChunk(c) => {
            if c.data.len() > 4 * 1024 * 1024 {
                return sig.add("chunk too large");
            }
            let logs = fixture_logs();
            let id = tessera_core::AttemptId(c.attempt_id);
            let owner = logs.owner(c.attempt_id).or_else(|| {
                state.attempt(id).and_then(|(j, s)| {
                    s.attempt.as_ref().map(|a| Owner { job: j.id, shard: s.index, attempt: a.number })
                })
            });
            let Some(owner) = owner else { return sig.add("chunk for no live attempt") };
            logs.append(c.attempt_id, owner, c.stream, c.offset, &c.data);
            let kept = logs.read(owner.job, Some(owner.shard), None, &[1, 2], Some(64));
            sig.add("chunk").num(kept.len() as u64)
        }
        In::LogRead(r) => {
            // An answer nobody waits for (a late one, or one never asked) is dropped.
            let hub = tessera_server::hub::AgentHub::new(Default::default());
            let n = r.data.len().min(1 << 20) as u64;
            hub.log_read(node, r);
            sig.add("log read").num(u64::from(n > 0))
        }
        other => match tessera_server::agents::report_command(node, other) {
            Some(cmd) => apply_to_fixture(cmd, sig),
            None => sig.add("no command"),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Progress file
// ---------------------------------------------------------------------------------------------

pub(crate) fn progress_line(data: &[u8]) -> u64 {
    use tessera_agent::shard::ProgressParser;
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000);
    let mut whole = ProgressParser::new();
    let mut reports = whole.feed(data, now);
    reports.extend(whole.finish(now));
    // The same bytes as the tailer may read them: in pieces whose sizes come from the data.
    let mut pieces = ProgressParser::new();
    let mut again = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = (usize::from(data[i % data.len()]) % 61 + 1).min(rest.len());
        let (piece, tail) = rest.split_at(n);
        again.extend(pieces.feed(piece, now));
        rest = tail;
        i += 1;
    }
    again.extend(pieces.finish(now));
    assert_eq!(whole.progress(), pieces.progress(), "the progress depends on how the file was read");
    assert_eq!(reports, again, "the checkpoints reported depend on how the file was read");
    let p = whole.progress();
    if let Some(c) = &p.last_checkpoint {
        assert!(!c.uri.trim().is_empty(), "an empty checkpoint URI was reported");
    }
    Sig::new("progress")
        .num(p.valid_lines.min(3))
        .num(p.malformed_lines.min(3))
        .num(u64::from(p.total_steps.is_some()))
        .num(p.metrics.len().min(3) as u64)
        .num(reports.len().min(3) as u64)
        .done()
}

// ---------------------------------------------------------------------------------------------
// Cloud metadata
// ---------------------------------------------------------------------------------------------

fn cloud_sig(sig: Sig, r: Result<(), tessera_agent::cloud::CloudError>) -> Sig {
    use tessera_agent::cloud::CloudError;
    match r {
        Ok(()) => sig.add("ok"),
        Err(CloudError::Malformed { path, field, message }) => {
            assert!(!field.is_empty() && !path.is_empty(), "a metadata error names no field: {message}");
            // An error quotes at most 64 characters of the answer, each escaped to at most 10.
            assert!(message.chars().count() <= 1_000, "an error quotes too much of the answer: {message}");
            sig.add(&field)
        }
        Err(other) => panic!("a parser gave a transport error: {other}"),
    }
}

/// 1 to 128 printable ASCII characters, as every metadata value kept must be.
fn check_value(what: &str, v: &str) {
    assert!(
        !v.is_empty() && v.len() <= tessera_agent::cloud::MAX_VALUE_BYTES && v.bytes().all(|c| c.is_ascii_graphic()),
        "{what} '{v}' was accepted"
    );
}

pub(crate) fn cloud_metadata(data: &[u8]) -> u64 {
    use tessera_agent::cloud::{self, AWS_INSTANCE_TYPE, AWS_LIFE_CYCLE, AWS_REGION, AWS_ZONE};
    let Some((&selector, body)) = data.split_first() else { return 0 };
    let now_ms = crate::fixture::NOW.0;
    match selector % 5 {
        0 => {
            // The token answer: the TTL header up to the first newline, then the body.
            let (ttl, token) = match body.iter().position(|b| *b == b'\n') {
                Some(i) => (Some(&body[..i]), &body[i + 1..]),
                None => (None, body),
            };
            let r = cloud::parse_aws_token(token, ttl).map(|(token, ttl)| {
                assert!(!token.is_empty() && token.len() <= 4096 && token.bytes().all(|c| c.is_ascii_graphic()));
                assert!(ttl <= cloud::AWS_TOKEN_TTL_SECS);
            });
            cloud_sig(Sig::new("aws token"), r).done()
        }
        1 => {
            let paths = [AWS_INSTANCE_TYPE, AWS_REGION, AWS_ZONE, AWS_LIFE_CYCLE];
            let path = paths[body.first().map_or(0, |b| usize::from(*b) % paths.len())];
            let r = cloud::parse_aws_value(path, body.get(1..).unwrap_or_default()).map(|v| check_value(path, &v));
            cloud_sig(Sig::new("aws value"), r).done()
        }
        2 => {
            let r = cloud::parse_aws_instance_action(body).map(|n| {
                check_value("action", &n.detail);
                assert!(n.deadline_unix_ms < 253_402_300_800_000, "a deadline after 9999");
            });
            cloud_sig(Sig::new("aws instance-action"), r).done()
        }
        3 => {
            let r = cloud::parse_azure_instance(body).map(|info| {
                check_value("region", &info.region);
                check_value("zone", &info.zone);
                check_value("instance type", &info.instance_type);
                check_value("vm id", &info.instance_id);
            });
            cloud_sig(Sig::new("azure instance"), r).done()
        }
        _ => {
            let r = cloud::parse_azure_events(body, now_ms).map(|n| {
                if let Some(n) = n {
                    check_value("event id", &n.event_id);
                    assert!(n.detail.chars().count() <= 300, "detail too long: {}", n.detail.len());
                }
            });
            cloud_sig(Sig::new("azure events"), r).done()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raft
// ---------------------------------------------------------------------------------------------

/// This server and the member the raft messages come from.
pub(crate) const SERVER: u64 = 1;
/// A member of the cluster.
pub(crate) const PEER: u64 = 2;

/// The cap on one raft message here: the server's is 256 MiB (a snapshot travels whole), which
/// only makes every input slower to reject.
const FUZZ_MAX_RAFT_MESSAGE: usize = 4 * 1024 * 1024;

pub(crate) fn raft_message(data: &[u8]) -> u64 {
    raft_bytes(data, Sig::new("raft")).done()
}

/// What `RaftService.Send` does with one message of a batch from member [`PEER`], then what the
/// receiving server does with its entries (apply, as a follower does once they commit) and its
/// snapshot (restore).
fn raft_bytes(bytes: &[u8], sig: Sig) -> Sig {
    if bytes.len() > FUZZ_MAX_RAFT_MESSAGE {
        return sig.add("too large");
    }
    let m = match <eraftpb::Message as protobuf::Message>::parse_from_bytes(bytes) {
        Ok(m) => m,
        Err(_) => return sig.add("undecodable"),
    };
    if m.from != PEER || m.to != SERVER {
        return sig.add("misaddressed");
    }
    // Which outcomes the entries had, as a set: their order and number are not news.
    let mut seen = 0u64;
    for e in m.get_entries().iter().take(8) {
        seen |= match e.get_entry_type() {
            eraftpb::EntryType::EntryNormal if e.data.is_empty() => 1,
            eraftpb::EntryType::EntryNormal => {
                let mut sm = server_sm();
                match sm.apply(fixture().applied_index() + 1, &e.data) {
                    tessera_server::sm::Outcome::Applied(_) => {
                        plan_and_apply(&mut sm.state);
                        2
                    }
                    tessera_server::sm::Outcome::Rejected(_) => 4,
                    tessera_server::sm::Outcome::Undecodable(_) => 8,
                }
            }
            eraftpb::EntryType::EntryConfChange => {
                let mut cc = eraftpb::ConfChange::default();
                if protobuf::Message::merge_from_bytes(&mut cc, &e.data).is_ok() { 16 } else { 32 }
            }
            eraftpb::EntryType::EntryConfChangeV2 => 64,
        };
    }
    let mut sig = sig.add(&format!("{:?}", m.get_msg_type())).num(seen);
    if m.has_snapshot() && !m.get_snapshot().get_data().is_empty() {
        let mut sm = server_sm();
        sig = match sm.restore(m.get_snapshot().get_data()) {
            Ok(()) => {
                if let Err(broken) = sm.state.check_invariants() {
                    panic!("a restored raft snapshot breaks an invariant: {broken}");
                }
                sig.add("restored")
            }
            Err(_) => sig.add("snapshot refused"),
        };
    }
    sig
}

/// The server's state machine over a copy of the fixture.
fn server_sm() -> ServerSm {
    let mut sm = ServerSm::new(Members::default(), tokio::sync::broadcast::channel(4).0);
    sm.state = fixture().clone();
    sm
}

// ---------------------------------------------------------------------------------------------
// Log entries and snapshots
// ---------------------------------------------------------------------------------------------

/// The kind of a serde error, without what it quotes of the input: "missing field `node`"
/// stays whole, "invalid type: string \"abc\", expected u64" loses "abc".
fn error_class(m: &str) -> &str {
    let m = m.split(" at line").next().unwrap_or(m);
    let m = m.split('"').next().unwrap_or(m);
    if m.starts_with("unknown variant") || m.starts_with("unknown field") {
        m.split('`').next().unwrap_or(m)
    } else {
        m
    }
}

pub(crate) fn command_decode(data: &[u8]) -> u64 {
    use tessera_core::command::DecodeError;
    match Command::decode(data) {
        Ok(cmd) => apply_to_fixture(cmd, Sig::new("decoded")).done(),
        Err(DecodeError::TooLarge(_)) => Sig::new("too large").done(),
        Err(DecodeError::UnknownVersion(_)) => Sig::new("unknown version").done(),
        Err(DecodeError::Malformed(m)) => {
            // serde's message says what was expected where: "missing field `node`".
            Sig::new("malformed").add(error_class(&m)).done()
        }
    }
}

pub(crate) fn snapshot_restore(data: &[u8]) -> u64 {
    use tessera_core::state::SnapshotError;
    let state = match State::restore(data) {
        Ok(state) => state,
        Err(SnapshotError::UnknownVersion(_)) => return Sig::new("unknown version").done(),
        Err(SnapshotError::Malformed(m)) => {
            return Sig::new("malformed").add(error_class(&m)).done();
        }
        Err(SnapshotError::Inconsistent(m)) => return Sig::new("inconsistent").add(&m).done(),
    };
    if let Err(broken) = state.check_invariants() {
        panic!("a restored snapshot breaks an invariant: {broken}");
    }
    let again = State::restore(&state.snapshot()).unwrap_or_else(|e| panic!("a restored state does not restore: {e}"));
    assert_eq!(again, state, "a restored state changed through snapshot and restore");
    assert_eq!(again.hash(), state.hash(), "two equal states hash differently");
    // What a server restored from it does: answer reads, then plan and apply the plan.
    for job in state.jobs().values() {
        job_to_proto(job, &state);
    }
    for node in state.nodes().values() {
        node_to_proto(node, &state);
    }
    let sig = Sig::new("restored").num(state.jobs().len().min(4) as u64).num(state.nodes().len().min(4) as u64);
    let mut next = state;
    sig.num(u64::from(plan_and_apply(&mut next))).done()
}

/// What a peer presents about itself: a certificate (DER; its `tessera://` SAN URIs, read after
/// the CA check), the principal a server forwards a request for (the JSON of
/// `x-tessera-on-behalf`), or an `authorization` header; picked by the first byte.
pub(crate) fn peer_identity(data: &[u8]) -> u64 {
    use tessera_core::acl::{Principal, Resource, Rpc, authorize};
    let Some((&selector, body)) = data.split_first() else { return 0 };
    let sig = Sig::new("peer_identity");
    match selector % 3 {
        0 => match tessera_tls::identity::from_der(body) {
            Ok(p) => {
                let uris = tessera_tls::identity::uris(&p).expect("a parsed identity writes back");
                let again = tessera_tls::identity::from_uris(uris.iter().map(String::as_str));
                assert_eq!(again.as_ref(), Ok(&p), "an identity changed through its URIs");
                sig.add("cert").add(&p.audit_name()).done()
            }
            Err(_) => sig.add("cert refused").done(),
        },
        1 => match serde_json::from_slice::<Principal>(body) {
            Ok(p) => {
                let mut allowed = 0u64;
                for rpc in Rpc::ALL {
                    for res in [Resource::Any, Resource::Tenant("ml"), Resource::Node("n"), Resource::Server(2)] {
                        allowed += u64::from(authorize(&p, rpc, res, true).is_ok());
                    }
                }
                sig.add("principal").num(allowed).done()
            }
            Err(_) => sig.add("principal refused").done(),
        },
        _ => {
            let auth = bearer_auth();
            let mut headers = http::HeaderMap::new();
            let Ok(v) = http::HeaderValue::from_bytes(body) else { return sig.add("header refused").done() };
            headers.insert("authorization", v);
            match auth.authenticate(None, &headers) {
                Ok(p) => sig.add("token").add(&p.audit_name()).done(),
                Err(s) => sig.add("token refused").num(s.code() as u64).done(),
            }
        }
    }
}

/// An insecure server's authenticator that knows one token, secret "fuzz-secret".
fn bearer_auth() -> &'static tessera_server::auth::Auth {
    static AUTH: std::sync::OnceLock<tessera_server::auth::Auth> = std::sync::OnceLock::new();
    AUTH.get_or_init(|| {
        let auth = tessera_server::auth::Auth::new(false);
        let mut acl = tessera_core::acl::Acl { bootstrapped: true, ..Default::default() };
        let t = tessera_core::acl::Token {
            accessor: "00000000-0000-4000-8000-000000000001".into(),
            name: "fuzz".into(),
            role: tessera_core::acl::Role::Viewer,
            tenants: Default::default(),
            secret_sha256: tessera_core::acl::secret_hash("fuzz-secret"),
            created: NOW,
            expires: None,
            created_by: String::new(),
        };
        acl.tokens.insert(t.accessor.clone(), t);
        auth.refresh(&acl);
        auth
    })
}
