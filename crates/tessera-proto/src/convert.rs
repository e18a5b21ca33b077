//! The one place where the wire types of [`crate::v1`] and the types of [`tessera_core`] meet.
//!
//! - Job specs both ways: [`spec_from_proto`] (also `TryFrom<v1::JobSpec> for JobSpec`) maps every
//!   field, fills the documented defaults of unset fields, then runs [`JobSpec::validate`]; its
//!   errors name the wire field with a `spec.` prefix, like `spec.resources.gpus`.
//!   `From<&JobSpec> for v1::JobSpec` goes back.
//! - Core state to the wire: [`job_to_proto`], [`node_to_proto`], [`checkpoint_to_proto`], and the
//!   enums (`From` impls).
//! - What agents and clients send: `TryFrom<&v1::Register> for NodeInfo`, and the enums a client
//!   puts in requests ([`cloud_from_proto`], [`spot_policy_from_proto`], [`job_state_from_proto`],
//!   [`enum_from_proto`] for the rest). An unknown enum number or a missing required message is an
//!   error naming the field, never a panic.
//! - Refusals to gRPC status codes: [`rejection_to_status`], [`spec_error_to_status`].
//!
//! Every struct is destructured field by field on both sides, so a field added to a core type or
//! a proto message does not compile until it is mapped here.

use tessera_core::model::{
    Attempt, Checkpoint, DrainReason, Gpu, GpuHealth, GpuInfo, Job, JobEvent, JobEventKind, JobState, Node, NodeInfo,
    NodeState, Requeue, Shard, ShardState, StopReason,
};
use tessera_core::spec::{
    self, Cloud, FieldError, LaunchMode, Placement, Resources, RetryPolicy, SpotPolicy, StopPolicy,
};
use tessera_core::timeline::{self, Entry};
use tessera_core::why::WhyKind;
use tessera_core::{JobSpec, Rejection, SpecError, State};
use tonic::{Code, Status};

use crate::v1;

/// A wire message that cannot be mapped onto a core type: an unknown enum number, an
/// `UNSPECIFIED` where a value is required, a missing required message, or a number too large
/// for the core type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConvertError {
    /// Dotted path of the wire field, like `register.gpus[2].index`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl ConvertError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConvertError { field: field.into(), message: message.into() }
    }
}

impl From<ConvertError> for FieldError {
    fn from(e: ConvertError) -> Self {
        FieldError { field: e.field, message: e.message, location: None }
    }
}

impl From<ConvertError> for Status {
    fn from(e: ConvertError) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// Enums
// ---------------------------------------------------------------------------------------------

/// Check an enum number from the wire against the values this build knows.
///
/// `E` is a generated enum such as [`v1::NodeState`]; `field` names the wire field for the error.
pub fn enum_from_proto<E: TryFrom<i32>>(value: i32, field: &str) -> Result<E, ConvertError> {
    E::try_from(value).map_err(|_| {
        let name = std::any::type_name::<E>().rsplit("::").next().unwrap_or("enum");
        ConvertError::new(field, format!("{value} is not a known {name} value"))
    })
}

impl From<Cloud> for v1::Cloud {
    fn from(c: Cloud) -> Self {
        match c {
            Cloud::Aws => v1::Cloud::Aws,
            Cloud::Azure => v1::Cloud::Azure,
            Cloud::None => v1::Cloud::None,
        }
    }
}

/// A cloud from the wire. `Ok(None)` for `CLOUD_UNSPECIFIED`, whose meaning depends on the field
/// (refused in a placement or a registration, "any" in a filter).
pub fn cloud_from_proto(value: i32, field: &str) -> Result<Option<Cloud>, ConvertError> {
    Ok(match enum_from_proto::<v1::Cloud>(value, field)? {
        v1::Cloud::Unspecified => None,
        v1::Cloud::Aws => Some(Cloud::Aws),
        v1::Cloud::Azure => Some(Cloud::Azure),
        v1::Cloud::None => Some(Cloud::None),
    })
}

/// A cloud that must be given: `CLOUD_UNSPECIFIED` is an error.
fn required_cloud(value: i32, field: &str) -> Result<Cloud, ConvertError> {
    cloud_from_proto(value, field)?
        .ok_or_else(|| ConvertError::new(field, "must be CLOUD_AWS, CLOUD_AZURE or CLOUD_NONE, not CLOUD_UNSPECIFIED"))
}

impl From<SpotPolicy> for v1::SpotPolicy {
    fn from(s: SpotPolicy) -> Self {
        match s {
            SpotPolicy::Avoid => v1::SpotPolicy::Avoid,
            SpotPolicy::Allow => v1::SpotPolicy::Allow,
            SpotPolicy::Prefer => v1::SpotPolicy::Prefer,
            SpotPolicy::Require => v1::SpotPolicy::Require,
        }
    }
}

/// A spot policy from the wire; `SPOT_POLICY_UNSPECIFIED` is the core's default, ALLOW.
pub fn spot_policy_from_proto(value: i32, field: &str) -> Result<SpotPolicy, ConvertError> {
    Ok(match enum_from_proto::<v1::SpotPolicy>(value, field)? {
        v1::SpotPolicy::Unspecified => SpotPolicy::default(),
        v1::SpotPolicy::Avoid => SpotPolicy::Avoid,
        v1::SpotPolicy::Allow => SpotPolicy::Allow,
        v1::SpotPolicy::Prefer => SpotPolicy::Prefer,
        v1::SpotPolicy::Require => SpotPolicy::Require,
    })
}

impl From<LaunchMode> for v1::LaunchMode {
    fn from(m: LaunchMode) -> Self {
        match m {
            LaunchMode::Process => v1::LaunchMode::Process,
            LaunchMode::PerGpu => v1::LaunchMode::PerGpu,
        }
    }
}

/// A launch mode from the wire; `LAUNCH_MODE_UNSPECIFIED` is the default, PROCESS.
pub fn launch_mode_from_proto(value: i32, field: &str) -> Result<LaunchMode, ConvertError> {
    Ok(match enum_from_proto::<v1::LaunchMode>(value, field)? {
        v1::LaunchMode::Unspecified | v1::LaunchMode::Process => LaunchMode::Process,
        v1::LaunchMode::PerGpu => LaunchMode::PerGpu,
    })
}

impl From<JobState> for v1::JobState {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Pending => v1::JobState::Pending,
            JobState::Running => v1::JobState::Running,
            JobState::Succeeded => v1::JobState::Succeeded,
            JobState::Failed => v1::JobState::Failed,
            JobState::Cancelled => v1::JobState::Cancelled,
        }
    }
}

/// A job state from the wire (a `ListJobs` filter). `Ok(None)` for `JOB_STATE_UNSPECIFIED`.
pub fn job_state_from_proto(value: i32, field: &str) -> Result<Option<JobState>, ConvertError> {
    Ok(match enum_from_proto::<v1::JobState>(value, field)? {
        v1::JobState::Unspecified => None,
        v1::JobState::Pending => Some(JobState::Pending),
        v1::JobState::Running => Some(JobState::Running),
        v1::JobState::Succeeded => Some(JobState::Succeeded),
        v1::JobState::Failed => Some(JobState::Failed),
        v1::JobState::Cancelled => Some(JobState::Cancelled),
    })
}

/// The state alone; the reason of `Stopping` goes to `Shard.stop_reason`.
impl From<ShardState> for v1::ShardState {
    fn from(s: ShardState) -> Self {
        match s {
            ShardState::Pending => v1::ShardState::Pending,
            ShardState::Assigned => v1::ShardState::Assigned,
            ShardState::Running => v1::ShardState::Running,
            ShardState::Stopping(_) => v1::ShardState::Stopping,
            ShardState::Succeeded => v1::ShardState::Succeeded,
            ShardState::Failed => v1::ShardState::Failed,
            ShardState::Cancelled => v1::ShardState::Cancelled,
        }
    }
}

/// The reason alone; the job a preemption makes room for goes to `Shard.preempted_by_job_id`.
impl From<StopReason> for v1::StopReason {
    fn from(r: StopReason) -> Self {
        match r {
            StopReason::Cancelled => v1::StopReason::Cancel,
            StopReason::Preempted { .. } => v1::StopReason::Preempt,
            StopReason::Drain => v1::StopReason::Drain,
            StopReason::SpotInterruption => v1::StopReason::Spot,
            StopReason::GpuFault => v1::StopReason::GpuFault,
            StopReason::GangRestart => v1::StopReason::GangRestart,
            StopReason::JobFailed => v1::StopReason::JobFailed,
            StopReason::TimeLimit => v1::StopReason::TimeLimit,
            StopReason::Stalled | StopReason::Hung => v1::StopReason::Stalled,
        }
    }
}

/// The kind of state alone, for filters; [`node_to_proto`] also carries reason, deadline and
/// time.
impl From<&NodeState> for v1::NodeState {
    fn from(s: &NodeState) -> Self {
        match s {
            NodeState::Ready => v1::NodeState::Ready,
            NodeState::Draining { .. } => v1::NodeState::Draining,
            NodeState::Down { .. } => v1::NodeState::Down,
        }
    }
}

impl From<DrainReason> for v1::DrainReason {
    fn from(r: DrainReason) -> Self {
        match r {
            DrainReason::Operator => v1::DrainReason::Operator,
            DrainReason::SpotInterruption => v1::DrainReason::SpotInterruption,
        }
    }
}

impl From<&GpuHealth> for v1::GpuHealth {
    fn from(h: &GpuHealth) -> Self {
        match h {
            GpuHealth::Healthy => v1::GpuHealth {
                healthy: true,
                reason: String::new(),
                since_unix_ms: 0,
                until_unix_ms: None,
                recent_faults: 0,
            },
            GpuHealth::Unhealthy { reason, since, until } => v1::GpuHealth {
                healthy: false,
                reason: reason.clone(),
                since_unix_ms: since.0,
                until_unix_ms: until.map(|t| t.0),
                recent_faults: 0,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Job specs
// ---------------------------------------------------------------------------------------------

/// The wire name of a field the core's validation names by its TOML path, with the `spec.`
/// prefix. The TOML form counts some sizes in other units (`cpu` in cores, `memory_gib`) and
/// durations without a unit suffix; the API names the field the client actually sent.
fn wire_field(core_field: &str) -> String {
    if core_field.starts_with("spec.") {
        return core_field.to_owned();
    }
    let field = match core_field {
        "resources.min_gpu_memory_gib" => "resources.min_gpu_memory_mib",
        "resources.cpu" => "resources.cpu_millis",
        "resources.memory_gib" => "resources.memory_mib",
        "max_runtime" => "max_runtime_seconds",
        "progress_timeout" => "progress_timeout_seconds",
        "retry.backoff" => "retry.backoff_seconds",
        "stop.checkpoint_grace" => "stop.checkpoint_grace_seconds",
        "stop.term_grace" => "stop.term_grace_seconds",
        other => other,
    };
    format!("spec.{field}")
}

/// The same errors with wire field names (see [`spec_from_proto`]).
fn spec_error_to_wire(e: &SpecError) -> SpecError {
    SpecError {
        errors: e
            .errors
            .iter()
            .map(|fe| FieldError { field: wire_field(&fe.field), message: fe.message.clone(), location: fe.location })
            .collect(),
    }
}

fn spec_field_error(field: &str, message: impl Into<String>) -> FieldError {
    FieldError { field: format!("spec.{field}"), message: message.into(), location: None }
}

/// Map a wire job spec onto the core's and validate it.
///
/// Unset fields take the defaults the proto documents (which are the core's): an empty name is
/// derived from the command, an empty tenant is "default", an unset priority is 500, an unset
/// placement allows spot, unset retry and stop policies are the core's defaults, and a
/// `retry.max_attempts` of 0 is 3. Every problem found is reported, each naming its wire field
/// with a `spec.` prefix (`spec.resources.gpus`, `spec.placement.clouds[1]`,
/// `spec.retry.backoff_seconds`).
pub fn spec_from_proto(p: v1::JobSpec) -> Result<JobSpec, SpecError> {
    let mut errors: Vec<FieldError> = Vec::new();
    let v1::JobSpec {
        name,
        tenant,
        command,
        env,
        shards,
        resources,
        placement,
        priority,
        max_runtime_seconds,
        checkpoint_dir,
        retry,
        stop,
        progress_timeout_seconds,
        array,
        after_ok,
        after_any,
        launch,
    } = p;

    let name = if name.is_empty() { JobSpec::new(command.clone(), 1, 1).name } else { name };
    let tenant = if tenant.is_empty() { spec::DEFAULT_TENANT.to_owned() } else { tenant };

    let resources = match resources {
        Some(v1::Resources { gpus, gpu_model, min_gpu_memory_mib, cpu_millis, memory_mib }) => Resources {
            gpus,
            gpu_model: (!gpu_model.is_empty()).then_some(gpu_model),
            min_gpu_memory_mib,
            cpu_millis,
            memory_mib,
        },
        None => {
            errors.push(spec_field_error("resources", "is required (at least resources.gpus)"));
            // A stand-in that validates, so that only the real problem is reported.
            Resources { gpus: 1, gpu_model: None, min_gpu_memory_mib: 0, cpu_millis: 0, memory_mib: 0 }
        }
    };

    let placement = match placement {
        Some(v1::Placement { clouds: wire_clouds, regions, labels, spot, span_regions, span_clouds }) => {
            let mut clouds = Vec::with_capacity(wire_clouds.len());
            for (i, value) in wire_clouds.into_iter().enumerate() {
                match required_cloud(value, &format!("spec.placement.clouds[{i}]")) {
                    Ok(c) => clouds.push(c),
                    Err(e) => errors.push(e.into()),
                }
            }
            let spot = spot_policy_from_proto(spot, "spec.placement.spot").unwrap_or_else(|e| {
                errors.push(e.into());
                SpotPolicy::default()
            });
            Placement { clouds, regions, labels, spot, span_regions, span_clouds }
        }
        None => Placement::default(),
    };

    let priority = match priority {
        None => spec::DEFAULT_PRIORITY,
        Some(p) => u16::try_from(p).unwrap_or_else(|_| {
            errors.push(spec_field_error(
                "priority",
                format!("must be between 0 and {} (got {p})", spec::limits::MAX_PRIORITY),
            ));
            spec::DEFAULT_PRIORITY
        }),
    };

    let retry = match retry {
        Some(v1::RetryPolicy { max_attempts, backoff_seconds, never_retry_exit_codes }) => {
            let default = RetryPolicy::default();
            RetryPolicy {
                max_attempts: if max_attempts == 0 { default.max_attempts } else { max_attempts },
                backoff_secs: backoff_seconds.unwrap_or(default.backoff_secs),
                never_retry_exit_codes,
            }
        }
        None => RetryPolicy::default(),
    };

    let stop = match stop {
        Some(v1::StopPolicy { signal, checkpoint_grace_seconds, term_grace_seconds }) => {
            let default = StopPolicy::default();
            StopPolicy {
                signal: if signal.is_empty() { default.signal } else { signal },
                checkpoint_grace_secs: checkpoint_grace_seconds.unwrap_or(default.checkpoint_grace_secs),
                term_grace_secs: term_grace_seconds.unwrap_or(default.term_grace_secs),
            }
        }
        None => StopPolicy::default(),
    };

    let launch = launch_mode_from_proto(launch, "spec.launch").unwrap_or_else(|e| {
        errors.push(e.into());
        LaunchMode::default()
    });

    let spec = JobSpec {
        name,
        tenant,
        command,
        env,
        shards,
        resources,
        placement,
        priority,
        max_runtime_secs: max_runtime_seconds,
        progress_timeout_secs: progress_timeout_seconds,
        launch,
        checkpoint_dir: (!checkpoint_dir.is_empty()).then_some(checkpoint_dir),
        retry,
        stop,
        array: None,
        after_ok,
        after_any,
    };
    let mut spec = spec;
    if !array.is_empty() {
        match spec::ArraySpec::parse(&array) {
            Ok(a) => spec.array = Some(a),
            Err(m) => errors.push(spec_field_error("array", m)),
        }
    }
    if let Err(invalid) = spec.validate() {
        for fe in spec_error_to_wire(&invalid).errors {
            // A field whose mapping already failed has its error; do not report it twice.
            if !errors.iter().any(|e| e.field == fe.field) {
                errors.push(fe);
            }
        }
    }
    if errors.is_empty() { Ok(spec) } else { Err(SpecError { errors }) }
}

impl TryFrom<v1::JobSpec> for JobSpec {
    type Error = SpecError;

    /// See [`spec_from_proto`].
    fn try_from(p: v1::JobSpec) -> Result<Self, SpecError> {
        spec_from_proto(p)
    }
}

impl From<&JobSpec> for v1::JobSpec {
    fn from(s: &JobSpec) -> Self {
        let JobSpec {
            name,
            tenant,
            command,
            env,
            shards,
            resources,
            placement,
            priority,
            max_runtime_secs,
            progress_timeout_secs,
            launch,
            checkpoint_dir,
            retry,
            stop,
            array,
            after_ok,
            after_any,
        } = s;
        let Resources { gpus, gpu_model, min_gpu_memory_mib, cpu_millis, memory_mib } = resources;
        let Placement { clouds, regions, labels, spot, span_regions, span_clouds } = placement;
        let RetryPolicy { max_attempts, backoff_secs, never_retry_exit_codes } = retry;
        let StopPolicy { signal, checkpoint_grace_secs, term_grace_secs } = stop;
        v1::JobSpec {
            name: name.clone(),
            tenant: tenant.clone(),
            command: command.clone(),
            env: env.clone(),
            shards: *shards,
            resources: Some(v1::Resources {
                gpus: *gpus,
                gpu_model: gpu_model.clone().unwrap_or_default(),
                min_gpu_memory_mib: *min_gpu_memory_mib,
                cpu_millis: *cpu_millis,
                memory_mib: *memory_mib,
            }),
            placement: Some(v1::Placement {
                clouds: clouds.iter().map(|c| v1::Cloud::from(*c) as i32).collect(),
                regions: regions.clone(),
                labels: labels.clone(),
                spot: v1::SpotPolicy::from(*spot) as i32,
                span_regions: *span_regions,
                span_clouds: *span_clouds,
            }),
            priority: Some(u32::from(*priority)),
            max_runtime_seconds: *max_runtime_secs,
            progress_timeout_seconds: *progress_timeout_secs,
            launch: v1::LaunchMode::from(*launch) as i32,
            checkpoint_dir: checkpoint_dir.clone().unwrap_or_default(),
            retry: Some(v1::RetryPolicy {
                max_attempts: *max_attempts,
                backoff_seconds: Some(*backoff_secs),
                never_retry_exit_codes: never_retry_exit_codes.clone(),
            }),
            stop: Some(v1::StopPolicy {
                signal: signal.clone(),
                checkpoint_grace_seconds: Some(*checkpoint_grace_secs),
                term_grace_seconds: Some(*term_grace_secs),
            }),
            array: array.as_ref().map(ToString::to_string).unwrap_or_default(),
            after_ok: after_ok.clone(),
            after_any: after_any.clone(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Jobs
// ---------------------------------------------------------------------------------------------

/// A checkpoint on the wire; `shard_index` is the shard that reported it (the core keeps it per
/// shard, so the index comes from the caller).
pub fn checkpoint_to_proto(c: &Checkpoint, shard_index: u32) -> v1::Checkpoint {
    let Checkpoint { step, uri, at } = c;
    v1::Checkpoint { step: *step, uri: uri.clone(), time_unix_ms: at.0, shard_index }
}

fn shard_to_proto(shard: &Shard, state: &State) -> v1::Shard {
    let Shard { index, state: shard_state, attempt, attempts, restarts, checkpoint, not_before } = shard;
    let (stop_reason, preempted_by_job_id) = match shard_state {
        ShardState::Stopping(reason) => {
            let by = match reason {
                StopReason::Preempted { by } => Some(by.0),
                _ => None,
            };
            (v1::StopReason::from(*reason), by)
        }
        _ => (v1::StopReason::Unspecified, None),
    };
    let node = attempt.as_ref().and_then(|a| state.node(a.node));
    let mut out = v1::Shard {
        index: *index,
        state: v1::ShardState::from(*shard_state) as i32,
        stop_reason: stop_reason as i32,
        preempted_by_job_id,
        node_id: None,
        node_name: node.map(|n| n.info.name.clone()).unwrap_or_default(),
        cloud: node.map_or(v1::Cloud::Unspecified, |n| n.info.cloud.into()) as i32,
        region: node.map(|n| n.info.region.clone()).unwrap_or_default(),
        attempt_id: None,
        attempt: 0,
        attempts: *attempts,
        gpus: Vec::new(),
        assigned_unix_ms: None,
        started_unix_ms: None,
        restarts: *restarts,
        last_checkpoint: checkpoint.as_ref().map(|c| checkpoint_to_proto(c, *index)),
        not_before_unix_ms: not_before.0,
        // Progress lives in the leader's memory, not in the core; the server fills it in.
        step: 0,
        total_steps: None,
        metrics: Default::default(),
        straggler: false,
    };
    if let Some(Attempt { id, number, node, gpus, assigned_at, started_at, port: _ }) = attempt {
        out.node_id = Some(node.0);
        out.attempt_id = Some(id.0);
        out.attempt = *number;
        out.gpus = gpus.clone();
        out.assigned_unix_ms = Some(assigned_at.0);
        out.started_unix_ms = started_at.map(|t| t.0);
    }
    out
}

/// A job on the wire, with its shards (their attempts, node ids and checkpoints). `state` gives
/// the names, clouds and regions of the shards' nodes. Progress (`Shard.step`, `metrics`) is not
/// in the core and is left empty. A listing without shards clears `shards` afterwards.
pub fn job_to_proto(job: &Job, state: &State) -> v1::Job {
    let Job {
        id,
        spec,
        state: job_state,
        shards,
        submitted_at,
        started_at,
        finished_at,
        failures,
        cancel_requested,
        message,
        submitted_by,
        // The timeline is returned by JobEvents, not with the job.
        events: _,
        array,
        element_of,
        waiting_on,
        stalls: _,
    } = job;
    // As the core's resume point: the highest step, then the latest time.
    let latest_checkpoint = shards
        .iter()
        .filter_map(|s| s.checkpoint.as_ref().map(|c| (s.index, c)))
        .max_by_key(|(_, c)| (c.step, c.at))
        .map(|(index, c)| checkpoint_to_proto(c, index));
    v1::Job {
        id: id.0,
        spec: Some(spec.into()),
        state: v1::JobState::from(*job_state) as i32,
        submitted_unix_ms: submitted_at.0,
        started_unix_ms: started_at.map(|t| t.0),
        finished_unix_ms: finished_at.map(|t| t.0),
        shards: shards.iter().map(|s| shard_to_proto(s, state)).collect(),
        restarts: shards.iter().fold(0u32, |sum, s| sum.saturating_add(s.restarts)),
        message: message.clone().unwrap_or_default(),
        latest_checkpoint,
        failures: *failures,
        cancel_requested: *cancel_requested,
        submitted_by: submitted_by.clone().unwrap_or_default(),
        // Advice from the planner and the fleet, not state: the server fills it in.
        pending_reason: None,
        array: array.as_ref().map(|p| v1::ArrayStatus {
            total: spec.array.as_ref().map_or(0, |a| a.len()),
            not_created: spec.array.as_ref().map_or(0, |a| a.len()).saturating_sub(p.next),
            pending: p.queued,
            running: p.active.saturating_sub(p.queued),
            succeeded: p.succeeded,
            failed: p.failed,
            cancelled: p.cancelled,
        }),
        array_job_id: element_of.map_or(0, |e| e.array.0),
        array_index: element_of.map(|e| e.index),
        waiting_on: waiting_on.iter().map(|j| j.0).collect(),
    }
}

/// One stored event on the wire, numbered in its job's timeline (SUBMITTED is 1, so the first
/// stored event is 2).
pub fn job_event_to_proto(e: &JobEvent, state: &State) -> v1::JobEvent {
    use v1::JobEventKind as K;
    let JobEvent { seq, at, kind, shard, attempt, node, detail: _ } = e;
    let (wire, stop) = match *kind {
        JobEventKind::Placed { number: 1 } => (K::Placed, None),
        JobEventKind::Placed { .. } => (K::Restarted, None),
        JobEventKind::Started => (K::ShardStarted, None),
        JobEventKind::Exited { .. } => (K::ShardExited, None),
        JobEventKind::Checkpoint { .. } => (K::Checkpoint, None),
        JobEventKind::Stopping { reason } => (
            match reason {
                StopReason::Preempted { .. } => K::Preempted,
                StopReason::SpotInterruption => K::SpotNotice,
                StopReason::GpuFault => K::GpuFault,
                _ => K::ShardStopping,
            },
            Some(reason),
        ),
        JobEventKind::NodeLost => (K::NodeLost, None),
        JobEventKind::Requeued { why, .. } => (
            K::ShardRequeued,
            match why {
                Requeue::Stopped(r) => Some(r),
                Requeue::NodeLost | Requeue::NodeFault | Requeue::Retry => None,
            },
        ),
    };
    let node_name = node.and_then(|n| state.node(n)).map(|n| n.info.name.clone());
    let shown = node_name.clone().or_else(|| node.map(|n| n.to_string())).unwrap_or_else(|| "its node".into());
    v1::JobEvent {
        time_unix_ms: at.0,
        kind: wire as i32,
        shard_index: Some(*shard),
        attempt_id: attempt.map(|a| a.0),
        node_id: node.map(|n| n.0),
        stop_reason: stop.map_or(v1::StopReason::Unspecified, v1::StopReason::from) as i32,
        message: timeline::describe(e, &shown),
        sequence: seq + 2,
        node_name: node_name.unwrap_or_default(),
    }
}

/// The job's whole timeline on the wire (JobService.JobEvents): its submission, its stored
/// events numbered in order (a gap where some were dropped), and its end once it ended.
pub fn job_events_to_proto(job: &Job, state: &State) -> v1::JobEventsResponse {
    let mut events = Vec::with_capacity(job.events.len() + 2);
    for entry in timeline::timeline(job) {
        match entry {
            Entry::Submitted(at) => events.push(job_level_event(at, v1::JobEventKind::Submitted, 1, "submitted")),
            Entry::Event(e) => events.push(job_event_to_proto(e, state)),
            // The numbers of the events after them show the gap.
            Entry::Dropped(_) => {}
            Entry::Finished(..) => events.push(job_finished_event(job)),
        }
    }
    v1::JobEventsResponse { events, dropped: timeline::dropped(job) }
}

/// The FINISHED event of a job that just ended, numbered after its stored events.
pub fn job_finished_event(job: &Job) -> v1::JobEvent {
    let at = job.finished_at.unwrap_or(job.submitted_at);
    job_level_event(at, v1::JobEventKind::Finished, timeline::events_total(job) + 2, &timeline::finished_text(job))
}

fn job_level_event(at: tessera_core::Timestamp, kind: v1::JobEventKind, sequence: u64, message: &str) -> v1::JobEvent {
    v1::JobEvent {
        time_unix_ms: at.0,
        kind: kind as i32,
        shard_index: None,
        attempt_id: None,
        node_id: None,
        stop_reason: v1::StopReason::Unspecified as i32,
        message: message.to_string(),
        sequence,
        node_name: String::new(),
    }
}

/// A usage key on the wire.
pub fn usage_key_to_proto(k: tessera_core::usage::UsageKey) -> v1::UsageKey {
    use tessera_core::usage::UsageKey as K;
    match k {
        K::Tenant => v1::UsageKey::Tenant,
        K::User => v1::UsageKey::User,
        K::Cloud => v1::UsageKey::Cloud,
        K::Region => v1::UsageKey::Region,
        K::InstanceType => v1::UsageKey::InstanceType,
        K::Node => v1::UsageKey::Node,
        K::Job => v1::UsageKey::Job,
    }
}

/// A usage key from the wire; UNSPECIFIED and unknown numbers are refused naming `field`.
pub fn usage_key_from_proto(value: i32, field: &str) -> Result<tessera_core::usage::UsageKey, ConvertError> {
    use tessera_core::usage::UsageKey as K;
    Ok(match enum_from_proto::<v1::UsageKey>(value, field)? {
        v1::UsageKey::Unspecified => return Err(ConvertError::new(field, "must be given")),
        v1::UsageKey::Tenant => K::Tenant,
        v1::UsageKey::User => K::User,
        v1::UsageKey::Cloud => K::Cloud,
        v1::UsageKey::Region => K::Region,
        v1::UsageKey::InstanceType => K::InstanceType,
        v1::UsageKey::Node => K::Node,
        v1::UsageKey::Job => K::Job,
    })
}

/// A reason kind on the wire.
pub fn why_kind_to_proto(kind: WhyKind) -> v1::PendingReasonKind {
    use v1::PendingReasonKind as K;
    match kind {
        // Never sent as a reason: a job that is not pending has none.
        WhyKind::NotPending => K::Unspecified,
        WhyKind::Cancelling => K::Cancelling,
        WhyKind::ShardsStopping => K::ShardsStopping,
        WhyKind::Backoff => K::Backoff,
        WhyKind::GpuHoursQuota => K::GpuHoursQuota,
        WhyKind::Quota => K::GpuQuota,
        WhyKind::Constraint => K::Constraint,
        WhyKind::AwaitingPreemption => K::Preempting,
        WhyKind::Reserved => K::Reserved,
        WhyKind::Capacity => K::Capacity,
        WhyKind::PlanFull => K::PlanFull,
        WhyKind::NextRound => K::NextRound,
        WhyKind::Dependency => K::Dependency,
        WhyKind::Array => K::Array,
    }
}

/// The short reason a listing shows for `job` (see [`tessera_core::why::Briefs`]); None when
/// it is not waiting.
pub fn pending_reason<'a>(
    briefs: &mut tessera_core::why::Briefs<'a>,
    job: &'a Job,
    planned: Option<&tessera_core::planner::WaitReason>,
) -> Option<v1::PendingReason> {
    let (kind, message) = briefs.reason(job, planned)?;
    Some(v1::PendingReason { kind: why_kind_to_proto(kind) as i32, message })
}

/// The full diagnosis of a job on the wire (see [`tessera_core::why::explain`]).
pub fn why_to_proto(
    why: tessera_core::why::Why,
    job_state: tessera_core::model::JobState,
    planned: bool,
) -> v1::ExplainJobResponse {
    let waiting = why.kind != WhyKind::NotPending;
    v1::ExplainJobResponse {
        state: v1::JobState::from(job_state) as i32,
        reason: waiting
            .then(|| v1::PendingReason { kind: why_kind_to_proto(why.kind) as i32, message: why.reason.clone() }),
        funnel: why.funnel.into_iter().map(|s| v1::FunnelStep { label: s.label, nodes: s.nodes as u64 }).collect(),
        remedies: why.remedies,
        jobs_ahead: u32::try_from(why.ahead).unwrap_or(u32::MAX),
        planned,
        explanation: if waiting { String::new() } else { why.reason },
    }
}

// ---------------------------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------------------------

fn gpu_to_proto(gpu: &Gpu, state: &State) -> v1::Gpu {
    let Gpu { index, uuid, model, memory_mib, health, holder, faults } = gpu;
    let mut health = v1::GpuHealth::from(health);
    health.recent_faults = u32::try_from(faults.len()).unwrap_or(u32::MAX);
    let allocation = holder.map(|attempt| {
        // A holder is always a live attempt (a core invariant); job 0 would mean "unknown".
        let (job_id, shard_index) = state.attempt(attempt).map_or((0, 0), |(job, shard)| (job.id.0, shard.index));
        v1::GpuAllocation { job_id, shard_index, attempt_id: attempt.0 }
    });
    v1::Gpu {
        index: *index,
        uuid: uuid.clone(),
        model: model.clone(),
        memory_mib: *memory_mib,
        health: Some(health),
        allocation,
        // Telemetry is not in the core; the server fills it in.
        telemetry: None,
    }
}

/// A node on the wire, with its GPUs' health and holders (`state` names the job and shard of
/// each holder). Telemetry, last heartbeat, instance id and advertise address belong to the
/// agent's session, not to the core, and are left empty for the server to fill in.
pub fn node_to_proto(node: &Node, state: &State) -> v1::Node {
    // `registration` is a log index for fencing stale verdicts; it is not part of the API.
    let Node { id, info, gpus, state: node_state, cpu_used, memory_used, registered_at, registration: _ } = node;
    let NodeInfo {
        name,
        cloud,
        region,
        zone,
        instance_type,
        spot,
        price_micros_per_gpu_hour,
        cpu_millis,
        memory_mib,
        // The same GPUs as `node.gpus`, which also carry health and holder.
        gpus: _,
        labels,
        agent_version,
        simulated,
        // What the agent lets gangs use; the shards' own ports are in their attempts.
        rendezvous_ports: _,
    } = info;
    let (drain_reason, drain_deadline_unix_ms, down_since_unix_ms) = match node_state {
        NodeState::Ready => (v1::DrainReason::Unspecified, None, None),
        NodeState::Draining { reason, deadline } => ((*reason).into(), deadline.map(|t| t.0), None),
        NodeState::Down { since } => (v1::DrainReason::Unspecified, None, Some(since.0)),
    };
    v1::Node {
        id: id.0,
        name: name.clone(),
        cloud: v1::Cloud::from(*cloud) as i32,
        region: region.clone(),
        zone: zone.clone(),
        instance_type: instance_type.clone(),
        spot: *spot,
        price_per_gpu_hour_micros: *price_micros_per_gpu_hour,
        state: v1::NodeState::from(node_state) as i32,
        gpus: gpus.iter().map(|g| gpu_to_proto(g, state)).collect(),
        labels: labels.clone(),
        simulated: *simulated,
        last_heartbeat_unix_ms: 0,
        cpu_millis: *cpu_millis,
        memory_mib: *memory_mib,
        agent_version: agent_version.clone(),
        instance_id: String::new(),
        advertise_addr: String::new(),
        registered_unix_ms: registered_at.0,
        drain_reason: drain_reason as i32,
        drain_deadline_unix_ms,
        down_since_unix_ms,
        cpu_millis_used: *cpu_used,
        memory_mib_used: *memory_used,
    }
}

/// The node facts of an agent's `Register` (fields are named `register.*` in errors). String
/// bounds are checked by the core when it applies the registration; here the cloud must be
/// known and given, and the GPUs listed in index order.
impl TryFrom<&v1::Register> for NodeInfo {
    type Error = ConvertError;

    fn try_from(r: &v1::Register) -> Result<Self, ConvertError> {
        let v1::Register {
            name,
            cloud,
            region,
            zone,
            instance_type,
            spot,
            price_per_gpu_hour_micros,
            cpu_millis,
            memory_mib,
            gpus,
            labels,
            agent_version,
            simulated,
            // The session's, not the node's: reconciliation, identity and addressing.
            running_attempts: _,
            instance_id: _,
            advertise_addr: _,
            protocol_version: _,
            rendezvous_port_min,
            rendezvous_port_max,
        } = r;
        let rendezvous_ports = match (*rendezvous_port_min, *rendezvous_port_max) {
            (0, 0) => None,
            (lo, hi) => {
                let port = |p: u32, f: &str| {
                    u16::try_from(p)
                        .ok()
                        .filter(|p| *p >= 1024)
                        .ok_or_else(|| ConvertError::new(f, format!("{p} is not a port from 1024 to 65535")))
                };
                let (lo, hi) = (port(lo, "register.rendezvous_port_min")?, port(hi, "register.rendezvous_port_max")?);
                if lo > hi {
                    return Err(ConvertError::new(
                        "register.rendezvous_port_max",
                        format!("{hi} is below the minimum {lo}"),
                    ));
                }
                Some((lo, hi))
            }
        };
        let cloud = required_cloud(*cloud, "register.cloud")?;
        let gpus = gpus
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let v1::GpuInfo { index, uuid, model, memory_mib } = g;
                if usize::try_from(*index).ok() != Some(i) {
                    return Err(ConvertError::new(
                        format!("register.gpus[{i}].index"),
                        format!("is {index}, but GPUs must be listed in index order, so it must be {i}"),
                    ));
                }
                Ok(GpuInfo { uuid: uuid.clone(), model: model.clone(), memory_mib: *memory_mib })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(NodeInfo {
            name: name.clone(),
            cloud,
            region: region.clone(),
            zone: zone.clone(),
            instance_type: instance_type.clone(),
            spot: *spot,
            price_micros_per_gpu_hour: *price_per_gpu_hour_micros,
            cpu_millis: *cpu_millis,
            memory_mib: *memory_mib,
            gpus,
            labels: labels.clone(),
            agent_version: agent_version.clone(),
            simulated: *simulated,
            rendezvous_ports,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Status codes
// ---------------------------------------------------------------------------------------------

/// `INVALID_ARGUMENT` with every problem of the spec, each naming its wire field (`spec.…`;
/// errors that name core TOML paths, as the state machine's do, are renamed).
pub fn spec_error_to_status(e: &SpecError) -> Status {
    Status::invalid_argument(spec_error_to_wire(e).to_string())
}

/// A tenant with its usage at `now`: decayed GPU-hours (fair share) and GPU-hours within its
/// quota window, in all and by cloud.
pub fn tenant_to_proto(t: &tessera_core::model::Tenant, state: &State, now: tessera_core::Timestamp) -> v1::Tenant {
    let half_life = state.config().fair_share_half_life_ms;
    let clouds = t
        .usage_by_cloud(now, half_life)
        .into_iter()
        .map(|(cloud, u)| v1::CloudUsage {
            cloud: cloud.as_str().to_string(),
            decayed_gpu_hours: u.decayed_gpu_hours,
            window_gpu_hours: u.window_gpu_hours,
            gpus_in_use: u.gpus_in_use,
        })
        .collect();
    v1::Tenant {
        name: t.name.clone(),
        weight: t.weight,
        gpu_quota: t.gpu_quota,
        gpu_hours_quota: t.gpu_hours_quota,
        cloud_gpu_hours_quota: t.cloud_gpu_hours_quota.clone(),
        gpu_hours_window_seconds: t.gpu_hours_window_ms / 1000,
        max_priority: t.max_priority.map(u32::from),
        default_priority: t.default_priority.map(u32::from),
        gpus_in_use: t.gpus_in_use,
        decayed_gpu_hours: t.usage_at(now, half_life),
        window_gpu_hours: t.window_gpu_hours(now),
        clouds,
    }
}

/// The gRPC status for a command the core refused. The message is the rejection's text, which
/// names the field for the two invalid-argument cases; a priority above the tenant's cap is
/// PERMISSION_DENIED naming `spec.priority`, a tenant that exists (create) ALREADY_EXISTS, and
/// a missing one (update) NOT_FOUND.
pub fn rejection_to_status(r: &Rejection) -> Status {
    match r {
        Rejection::InvalidSpec(e) => spec_error_to_status(e),
        Rejection::InvalidArgument { .. } => Status::invalid_argument(r.to_string()),
        Rejection::UnknownJob(_)
        | Rejection::UnknownNode(_)
        | Rejection::UnknownGpu { .. }
        | Rejection::NotFound(_) => Status::not_found(r.to_string()),
        // FAILED_PRECONDITION, not ABORTED: ABORTED tells a client that retrying (the whole
        // read-modify-write) may succeed, but a report about a fenced attempt can never succeed;
        // the sender must drop it.
        Rejection::StaleAttempt(_) => Status::new(Code::FailedPrecondition, r.to_string()),
        Rejection::JobFinished { .. } | Rejection::FailedPrecondition(_) => {
            Status::new(Code::FailedPrecondition, r.to_string())
        }
        // The request is well formed; the tenant is not allowed that priority.
        Rejection::PriorityAboveCap { tenant, cap, asked } => Status::permission_denied(format!(
            "spec.priority: {asked} is above the highest priority tenant {tenant} may use ({cap})"
        )),
        Rejection::TenantExists(_) => Status::already_exists(r.to_string()),
        Rejection::UnknownTenant(_) => Status::not_found(r.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;
    use std::collections::BTreeMap;
    use tessera_core::model::{AttemptId, JobId, NodeId, Timestamp};
    use tessera_core::{ApplyContext, Command, PlanLimits, plan};

    /// A valid spec in which every field differs from its default.
    fn full_spec() -> JobSpec {
        JobSpec {
            name: "llama-sft".into(),
            tenant: "nlp".into(),
            command: ["python", "train.py", "--lr", "3e-4"].map(String::from).to_vec(),
            env: BTreeMap::from([("NCCL_DEBUG".into(), "INFO".into()), ("HF_HOME".into(), "/cache".into())]),
            shards: 4,
            resources: Resources {
                gpus: 8,
                gpu_model: Some("H100".into()),
                min_gpu_memory_mib: 80 * 1024,
                cpu_millis: 96_000,
                memory_mib: 1024 * 1024,
            },
            placement: Placement {
                clouds: vec![Cloud::Azure, Cloud::None],
                regions: vec!["us-east-1".into(), "eastus".into()],
                labels: BTreeMap::from([("fabric".into(), "efa".into()), ("rack".into(), "r7".into())]),
                spot: SpotPolicy::Prefer,
                span_regions: true,
                span_clouds: true,
            },
            priority: 750,
            max_runtime_secs: Some(9000),
            progress_timeout_secs: Some(600),
            launch: LaunchMode::PerGpu,
            checkpoint_dir: Some("s3://ckpt/llama".into()),
            retry: RetryPolicy { max_attempts: 5, backoff_secs: 0, never_retry_exit_codes: vec![2, 137] },
            stop: StopPolicy { signal: "SIGUSR2".into(), checkpoint_grace_secs: 120, term_grace_secs: 0 },
            array: Some(tessera_core::spec::ArraySpec::parse("1,3,8-20:4%2").unwrap()),
            after_ok: vec![7, 9],
            after_any: vec![8],
        }
    }

    /// A minimal valid wire spec: what a client must send.
    fn minimal_wire_spec() -> v1::JobSpec {
        v1::JobSpec {
            command: vec!["python".into(), "train.py".into()],
            shards: 2,
            resources: Some(v1::Resources { gpus: 8, ..Default::default() }),
            ..Default::default()
        }
    }

    fn fields(e: &SpecError) -> Vec<&str> {
        e.errors.iter().map(|fe| fe.field.as_str()).collect()
    }

    #[test]
    fn a_full_spec_round_trips_through_the_wire_unchanged() {
        let spec = full_spec();
        spec.validate().expect("the test spec is valid");
        let wire = v1::JobSpec::from(&spec);
        let decoded = v1::JobSpec::decode(wire.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, wire);
        assert_eq!(JobSpec::try_from(decoded).unwrap(), spec);
        // And the defaults of the core survive the trip too.
        let plain = JobSpec::new(vec!["/usr/bin/sleep".into(), "1".into()], 1, 1);
        assert_eq!(spec_from_proto(v1::JobSpec::from(&plain)).unwrap(), plain);
    }

    #[test]
    fn a_bad_array_names_its_wire_field() {
        let mut wire = minimal_wire_spec();
        wire.array = "5-1".into();
        wire.after_ok = vec![0];
        let err = spec_from_proto(wire).unwrap_err();
        assert_eq!(fields(&err), ["spec.array", "spec.after_ok"], "{err}");
    }

    #[test]
    fn unset_wire_fields_take_the_core_defaults() {
        let spec = spec_from_proto(minimal_wire_spec()).unwrap();
        assert_eq!(spec, JobSpec::new(vec!["python".into(), "train.py".into()], 2, 8));
        assert_eq!(spec.name, "train.py");
        assert_eq!(spec.tenant, "default");
        assert_eq!(spec.priority, 500);
        assert_eq!(spec.placement.spot, SpotPolicy::Allow);

        // Present but zero: max_attempts 0 is the default 3; explicit 0 durations stay 0.
        let mut wire = minimal_wire_spec();
        wire.priority = Some(0);
        wire.retry =
            Some(v1::RetryPolicy { max_attempts: 0, backoff_seconds: Some(0), never_retry_exit_codes: vec![] });
        wire.stop =
            Some(v1::StopPolicy { signal: String::new(), checkpoint_grace_seconds: None, term_grace_seconds: Some(0) });
        let spec = spec_from_proto(wire).unwrap();
        assert_eq!(spec.priority, 0);
        assert_eq!(spec.retry, RetryPolicy { max_attempts: 3, backoff_secs: 0, never_retry_exit_codes: vec![] });
        assert_eq!(spec.stop, StopPolicy { signal: "SIGUSR1".into(), checkpoint_grace_secs: 60, term_grace_secs: 0 });
    }

    #[test]
    fn zero_gpus_is_refused_naming_the_wire_field() {
        let mut wire = minimal_wire_spec();
        wire.resources = Some(v1::Resources { gpus: 0, ..Default::default() });
        let err = spec_from_proto(wire).unwrap_err();
        assert_eq!(fields(&err), ["spec.resources.gpus"], "{err}");
        assert!(err.to_string().contains("between 1 and 64"), "{err}");
    }

    #[test]
    fn unknown_enum_numbers_are_errors_naming_the_field() {
        let mut wire = minimal_wire_spec();
        wire.placement =
            Some(v1::Placement { spot: 99, clouds: vec![v1::Cloud::Aws as i32, 42, 0], ..Default::default() });
        let err = spec_from_proto(wire).unwrap_err();
        assert_eq!(fields(&err), ["spec.placement.clouds[1]", "spec.placement.clouds[2]", "spec.placement.spot"]);
        assert!(err.errors[0].message.contains("42 is not a known Cloud value"), "{err}");
        assert!(err.errors[1].message.contains("CLOUD_UNSPECIFIED"), "{err}");
        assert!(err.errors[2].message.contains("99 is not a known SpotPolicy value"), "{err}");
    }

    #[test]
    fn launch_modes_on_the_wire() {
        assert_eq!(spec_from_proto(minimal_wire_spec()).unwrap().launch, LaunchMode::Process);
        let mut wire = minimal_wire_spec();
        wire.launch = v1::LaunchMode::PerGpu as i32;
        assert_eq!(spec_from_proto(wire.clone()).unwrap().launch, LaunchMode::PerGpu);
        wire.launch = 7;
        let err = spec_from_proto(wire).unwrap_err();
        assert_eq!(fields(&err), ["spec.launch"], "{err}");
    }

    #[test]
    fn a_missing_resources_message_is_an_error_not_a_panic() {
        let mut wire = minimal_wire_spec();
        wire.resources = None;
        let err = spec_from_proto(wire).unwrap_err();
        assert_eq!(fields(&err), ["spec.resources"], "{err}");
    }

    #[test]
    fn every_problem_is_reported_under_its_wire_name() {
        let wire = v1::JobSpec {
            name: "bad name".into(),
            command: vec![],
            shards: 0,
            resources: Some(v1::Resources {
                gpus: 65,
                gpu_model: "--".into(),
                min_gpu_memory_mib: spec::limits::MAX_GPU_MEMORY_MIB + 1,
                cpu_millis: spec::limits::MAX_CPU_MILLIS + 1,
                memory_mib: spec::limits::MAX_MEMORY_MIB + 1,
            }),
            priority: Some(70_000),
            max_runtime_seconds: Some(0),
            retry: Some(v1::RetryPolicy {
                max_attempts: 101,
                backoff_seconds: Some(spec::limits::MAX_BACKOFF_SECS + 1),
                never_retry_exit_codes: vec![],
            }),
            stop: Some(v1::StopPolicy {
                signal: "SIGKILL".into(),
                checkpoint_grace_seconds: Some(3601),
                term_grace_seconds: Some(3601),
            }),
            ..Default::default()
        };
        let err = spec_from_proto(wire).unwrap_err();
        let mut got = fields(&err);
        got.sort_unstable();
        let mut want = vec![
            "spec.priority",
            "spec.name",
            "spec.command",
            "spec.shards",
            "spec.resources.gpus",
            "spec.resources.gpu_model",
            "spec.resources.min_gpu_memory_mib",
            "spec.resources.cpu_millis",
            "spec.resources.memory_mib",
            "spec.max_runtime_seconds",
            "spec.retry.max_attempts",
            "spec.retry.backoff_seconds",
            "spec.stop.signal",
            "spec.stop.checkpoint_grace_seconds",
            "spec.stop.term_grace_seconds",
        ];
        want.sort_unstable();
        assert_eq!(got, want, "{err}");
        // A priority that does not fit the core's integer is reported once, by the mapping.
        assert!(err.errors[0].message.contains("got 70000"), "{err}");
    }

    #[test]
    fn enums_map_one_to_one() {
        let states = [JobState::Pending, JobState::Running, JobState::Succeeded, JobState::Failed, JobState::Cancelled];
        let mut seen = std::collections::BTreeSet::new();
        for s in states {
            let wire = v1::JobState::from(s);
            assert!(seen.insert(wire as i32), "{s:?} shares a wire value");
            assert_eq!(job_state_from_proto(wire as i32, "states[0]").unwrap(), Some(s));
        }
        assert_eq!(job_state_from_proto(0, "states[0]").unwrap(), None);
        assert_eq!(job_state_from_proto(6, "states[0]").unwrap_err().field, "states[0]");

        for c in [Cloud::Aws, Cloud::Azure, Cloud::None] {
            assert_eq!(cloud_from_proto(v1::Cloud::from(c) as i32, "cloud").unwrap(), Some(c));
        }
        assert_eq!(v1::Cloud::from(Cloud::None), v1::Cloud::None);
        assert_eq!(cloud_from_proto(0, "cloud").unwrap(), None);
        for s in [SpotPolicy::Avoid, SpotPolicy::Allow, SpotPolicy::Prefer, SpotPolicy::Require] {
            assert_eq!(spot_policy_from_proto(v1::SpotPolicy::from(s) as i32, "spot").unwrap(), s);
        }
        assert_eq!(spot_policy_from_proto(0, "spot").unwrap(), SpotPolicy::Allow);

        let reasons = [
            StopReason::Cancelled,
            StopReason::Preempted { by: JobId(9) },
            StopReason::Drain,
            StopReason::SpotInterruption,
            StopReason::GpuFault,
            StopReason::GangRestart,
            StopReason::JobFailed,
        ];
        let wire: std::collections::BTreeSet<i32> = reasons.iter().map(|r| v1::StopReason::from(*r) as i32).collect();
        assert_eq!(wire.len(), reasons.len());
        assert!(!wire.contains(&(v1::StopReason::Unspecified as i32)));

        let shard_states = [
            ShardState::Pending,
            ShardState::Assigned,
            ShardState::Running,
            ShardState::Stopping(StopReason::Drain),
            ShardState::Succeeded,
            ShardState::Failed,
            ShardState::Cancelled,
        ];
        let wire: std::collections::BTreeSet<i32> =
            shard_states.iter().map(|s| v1::ShardState::from(*s) as i32).collect();
        assert_eq!(wire.len(), shard_states.len());

        let err = enum_from_proto::<v1::NodeState>(17, "states[3]").unwrap_err();
        assert_eq!(err.to_string(), "states[3]: 17 is not a known NodeState value");
        assert_eq!(enum_from_proto::<v1::NodeState>(2, "states[0]").unwrap(), v1::NodeState::Draining);
    }

    #[test]
    fn rejections_get_the_right_status_codes() {
        let spec_err = JobSpec::new(vec!["x".into()], 1, 0).validate().unwrap_err();
        let cases = [
            (Rejection::InvalidSpec(spec_err), Code::InvalidArgument, "spec.resources.gpus"),
            (
                Rejection::InvalidArgument { field: "reason", message: "too long".into() },
                Code::InvalidArgument,
                "reason",
            ),
            (Rejection::UnknownJob(JobId(4)), Code::NotFound, "job-4"),
            (Rejection::UnknownNode(NodeId(5)), Code::NotFound, "node-5"),
            (Rejection::UnknownGpu { node: NodeId(5), gpu: 9 }, Code::NotFound, "GPU 9"),
            (Rejection::StaleAttempt(AttemptId(6)), Code::FailedPrecondition, "attempt-6"),
            (Rejection::JobFinished { job: JobId(4), state: JobState::Succeeded }, Code::FailedPrecondition, "job-4"),
            (Rejection::FailedPrecondition("node-5 is down".into()), Code::FailedPrecondition, "node-5"),
            (
                Rejection::PriorityAboveCap { tenant: "nlp".into(), cap: 500, asked: 750 },
                Code::PermissionDenied,
                "spec.priority: 750",
            ),
            (Rejection::TenantExists("nlp".into()), Code::AlreadyExists, "nlp"),
            (Rejection::UnknownTenant("nlp".into()), Code::NotFound, "nlp"),
        ];
        for (rejection, code, mentions) in cases {
            let status = rejection_to_status(&rejection);
            assert_eq!(status.code(), code, "{rejection:?}");
            assert!(status.message().contains(mentions), "{rejection:?}: {}", status.message());
        }
        // A spec error already in wire names is not renamed again.
        let wire_err = spec_from_proto(v1::JobSpec::default()).unwrap_err();
        let status = spec_error_to_status(&wire_err);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("spec.resources:"), "{}", status.message());
        assert!(!status.message().contains("spec.spec."), "{}", status.message());
        let status = Status::from(ConvertError::new("register.cloud", "bad"));
        assert_eq!((status.code(), status.message()), (Code::InvalidArgument, "register.cloud: bad"));
    }

    fn register(name: &str) -> v1::Register {
        v1::Register {
            name: name.into(),
            cloud: v1::Cloud::Aws as i32,
            region: "us-east-1".into(),
            zone: "us-east-1a".into(),
            instance_type: "p5.48xlarge".into(),
            spot: true,
            price_per_gpu_hour_micros: 2_500_000,
            cpu_millis: 192_000,
            memory_mib: 2_048_000,
            gpus: (0..8)
                .map(|i| v1::GpuInfo {
                    index: i,
                    uuid: format!("GPU-{name}-{i}"),
                    model: "NVIDIA H100 80GB HBM3".into(),
                    memory_mib: 81_559,
                })
                .collect(),
            labels: BTreeMap::from([("fabric".into(), "efa".into())]),
            agent_version: "0.1.0".into(),
            simulated: true,
            running_attempts: vec![],
            instance_id: "i-0abc".into(),
            advertise_addr: "10.0.0.7".into(),
            protocol_version: 1,
            rendezvous_port_min: 0,
            rendezvous_port_max: 0,
        }
    }

    #[test]
    fn register_maps_to_node_info_and_refuses_bad_enums() {
        let info = NodeInfo::try_from(&register("gpu-1")).unwrap();
        assert_eq!(info.cloud, Cloud::Aws);
        assert_eq!(info.gpus.len(), 8);
        assert_eq!(
            info.gpus[3],
            GpuInfo { uuid: "GPU-gpu-1-3".into(), model: "NVIDIA H100 80GB HBM3".into(), memory_mib: 81_559 }
        );
        assert_eq!((info.cpu_millis, info.memory_mib, info.price_micros_per_gpu_hour), (192_000, 2_048_000, 2_500_000));
        assert!(info.spot && info.simulated);

        let mut r = register("gpu-1");
        r.cloud = 0;
        assert_eq!(NodeInfo::try_from(&r).unwrap_err().field, "register.cloud");
        r.cloud = 12;
        assert_eq!(NodeInfo::try_from(&r).unwrap_err().field, "register.cloud");
        r.cloud = v1::Cloud::None as i32;
        assert_eq!(NodeInfo::try_from(&r).unwrap().cloud, Cloud::None);
        r.gpus.swap(1, 2);
        assert_eq!(NodeInfo::try_from(&r).unwrap_err().field, "register.gpus[1].index");
    }

    /// Drive the real state machine: register a node, submit a job over the wire, place it,
    /// checkpoint, drain; check what the wire shows at each step.
    #[test]
    fn jobs_and_nodes_from_the_state_machine() {
        let mut state = State::new();
        let mut index = 0;
        let mut apply = |state: &mut State, cmd: Command, now: u64| {
            index += 1;
            state.apply(cmd, ApplyContext { index, now: Timestamp(now) }).unwrap()
        };
        let info = NodeInfo::try_from(&register("gpu-1")).unwrap();
        apply(&mut state, Command::RegisterNode { info }, 1_000);
        let mut wire = minimal_wire_spec();
        wire.shards = 1;
        wire.resources = Some(v1::Resources { gpus: 4, cpu_millis: 8_000, memory_mib: 1024, ..Default::default() });
        wire.placement = Some(v1::Placement { spot: v1::SpotPolicy::Require as i32, ..Default::default() });
        let spec = spec_from_proto(wire).unwrap();
        let submit = Command::SubmitJob { spec, idempotency_key: None, priority_defaulted: false, submitted_by: None };
        apply(&mut state, submit, 2_000);
        let (job_id, node_id) = (JobId(1), NodeId(1));

        let pending = job_to_proto(state.job(job_id).unwrap(), &state);
        assert_eq!(pending.state, v1::JobState::Pending as i32);
        assert_eq!(pending.shards[0].node_id, None);
        assert_eq!(pending.shards[0].cloud, v1::Cloud::Unspecified as i32);

        let out = plan(&state, Timestamp(3_000), &PlanLimits::default());
        assert_eq!(out.plan.shard_count(), 1, "{out:?}");
        apply(&mut state, Command::ApplyPlan { plan: out.plan }, 3_000);
        let attempt = *state.live_attempts().keys().next().unwrap();
        apply(&mut state, Command::ShardStarted { attempt }, 4_000);
        apply(&mut state, Command::RecordCheckpoint { attempt, step: 100, uri: "s3://c/100".into() }, 5_000);

        let job = job_to_proto(state.job(job_id).unwrap(), &state);
        assert_eq!(job.id, 1);
        assert_eq!(job.state, v1::JobState::Running as i32);
        assert_eq!(job.started_unix_ms, Some(3_000));
        assert_eq!(JobSpec::try_from(job.spec.clone().unwrap()).unwrap(), state.job(job_id).unwrap().spec);
        let shard = &job.shards[0];
        assert_eq!(shard.state, v1::ShardState::Running as i32);
        assert_eq!(shard.stop_reason, v1::StopReason::Unspecified as i32);
        assert_eq!((shard.node_id, shard.node_name.as_str(), shard.region.as_str()), (Some(1), "gpu-1", "us-east-1"));
        assert_eq!(shard.cloud, v1::Cloud::Aws as i32);
        assert_eq!((shard.attempt_id, shard.attempt, shard.attempts), (Some(attempt.0), 1, 1));
        assert_eq!(shard.gpus.len(), 4);
        assert_eq!((shard.assigned_unix_ms, shard.started_unix_ms), (Some(3_000), Some(4_000)));
        let ckpt = v1::Checkpoint { step: 100, uri: "s3://c/100".into(), time_unix_ms: 5_000, shard_index: 0 };
        assert_eq!(shard.last_checkpoint.as_ref(), Some(&ckpt));
        assert_eq!(job.latest_checkpoint.as_ref(), Some(&ckpt));

        let node = node_to_proto(state.node(node_id).unwrap(), &state);
        assert_eq!((node.id, node.name.as_str(), node.state), (1, "gpu-1", v1::NodeState::Ready as i32));
        assert_eq!((node.cpu_millis_used, node.memory_mib_used), (8_000, 1024));
        assert_eq!(node.registered_unix_ms, 1_000);
        let held: Vec<_> = node.gpus.iter().filter_map(|g| g.allocation).collect();
        assert_eq!(held.len(), 4);
        assert!(held.iter().all(|a| *a == v1::GpuAllocation { job_id: 1, shard_index: 0, attempt_id: attempt.0 }));
        assert!(node.gpus.iter().all(|g| g.health == Some(v1::GpuHealth { healthy: true, ..Default::default() })));

        apply(
            &mut state,
            Command::SetGpuHealth {
                node: node_id,
                gpu: 7,
                healthy: false,
                reason: "XID 79".into(),
                xid: None,
                cool_down: false,
            },
            5_500,
        );
        apply(
            &mut state,
            Command::DrainNode {
                node: node_id,
                reason: DrainReason::SpotInterruption,
                deadline: Some(Timestamp(9_000)),
            },
            6_000,
        );
        let node = node_to_proto(state.node(node_id).unwrap(), &state);
        assert_eq!(node.state, v1::NodeState::Draining as i32);
        assert_eq!(node.drain_reason, v1::DrainReason::SpotInterruption as i32);
        assert_eq!((node.drain_deadline_unix_ms, node.down_since_unix_ms), (Some(9_000), None));
        assert_eq!(
            node.gpus[7].health,
            Some(v1::GpuHealth {
                healthy: false,
                reason: "XID 79".into(),
                since_unix_ms: 5_500,
                // A first hardware fault: back after the ten-minute cool-down.
                until_unix_ms: Some(5_500 + 600_000),
                recent_faults: 1,
            })
        );
        let shard = &job_to_proto(state.job(job_id).unwrap(), &state).shards[0];
        assert_eq!(shard.state, v1::ShardState::Stopping as i32);
        assert_eq!(shard.stop_reason, v1::StopReason::Spot as i32);
        assert_eq!(shard.preempted_by_job_id, None);

        apply(&mut state, Command::MarkNodeDown { node: node_id, reason: "silent".into(), registration: None }, 7_000);
        let node = node_to_proto(state.node(node_id).unwrap(), &state);
        assert_eq!(node.state, v1::NodeState::Down as i32);
        assert_eq!((node.drain_reason, node.down_since_unix_ms), (v1::DrainReason::Unspecified as i32, Some(7_000)));
        assert!(node.gpus.iter().all(|g| g.allocation.is_none()));
        let job = job_to_proto(state.job(job_id).unwrap(), &state);
        assert_eq!(job.state, v1::JobState::Pending as i32);
        assert_eq!((job.shards[0].state, job.shards[0].restarts, job.restarts), (v1::ShardState::Pending as i32, 1, 1));
    }
}
