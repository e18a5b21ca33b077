//! Tenant limits: the priority cap and default, who submitted a job, GPU-hours quotas over a
//! rolling window (overall and per cloud), create/update modes, validation, and that old log
//! entries and snapshots still decode.

use super::*;

const MINUTE: u64 = 60_000;

/// The settings of a tenant, as a test changes them from "no limits".
#[derive(Clone)]
struct Limits {
    max_priority: Option<u16>,
    default_priority: Option<u16>,
    gpu_hours_quota: Option<f64>,
    cloud_gpu_hours_quota: BTreeMap<String, f64>,
    gpu_hours_window_ms: u64,
    mode: TenantWrite,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_priority: None,
            default_priority: None,
            gpu_hours_quota: None,
            cloud_gpu_hours_quota: BTreeMap::new(),
            gpu_hours_window_ms: DEFAULT_GPU_HOURS_WINDOW_MS,
            mode: TenantWrite::Upsert,
        }
    }
}

fn set(name: &str, l: Limits) -> Command {
    Command::SetTenant {
        name: name.into(),
        weight: 1,
        gpu_quota: None,
        max_priority: l.max_priority,
        default_priority: l.default_priority,
        gpu_hours_quota: l.gpu_hours_quota,
        cloud_gpu_hours_quota: l.cloud_gpu_hours_quota,
        gpu_hours_window_ms: l.gpu_hours_window_ms,
        mode: l.mode,
    }
}

fn job_of(tenant: &str, shards: u32, gpus: u32) -> JobSpec {
    let mut s = spec(shards, gpus);
    s.tenant = tenant.into();
    s
}

fn submit_as(sim: &mut Sim, s: JobSpec, priority_defaulted: bool, who: Option<&str>) -> Result<JobId, Rejection> {
    let cmd =
        Command::SubmitJob { spec: s, idempotency_key: None, priority_defaulted, submitted_by: who.map(String::from) };
    match sim.apply(cmd)?[..] {
        [Event::JobSubmitted { job, .. }] => Ok(job),
        ref other => panic!("unexpected events {other:?}"),
    }
}

fn priority(sim: &Sim, j: JobId) -> u16 {
    sim.state.job(j).unwrap().spec.priority
}

fn azure(name: &'static str) -> NodeSpec {
    let mut s = n(name);
    s.cloud = Cloud::Azure;
    s.region = "eastus";
    s.zone = "eastus-1";
    s
}

#[test]
fn priority_above_the_cap_is_refused_and_at_the_cap_accepted() {
    let mut sim = Sim::new();
    sim.apply(set("team", Limits { max_priority: Some(600), ..Limits::default() })).unwrap();
    let mut s = job_of("team", 1, 1);
    s.priority = 601;
    let err = submit_as(&mut sim, s, false, None).unwrap_err();
    assert_eq!(err, Rejection::PriorityAboveCap { tenant: "team".into(), cap: 600, asked: 601 });
    assert!(err.to_string().starts_with("priority: "), "the message names the field: {err}");
    assert!(sim.state.jobs().is_empty(), "a refused submission changes nothing");

    let mut s = job_of("team", 1, 1);
    s.priority = 600;
    let j = submit_as(&mut sim, s, false, None).unwrap();
    assert_eq!(priority(&sim, j), 600);

    // Another tenant, and one created by its first submission, have no cap.
    for tenant in ["other", "new"] {
        let mut s = job_of(tenant, 1, 1);
        s.priority = 1000;
        assert!(submit_as(&mut sim, s, false, None).is_ok(), "{tenant}");
    }
}

#[test]
fn default_priority_applies_only_when_the_user_gave_none() {
    let mut sim = Sim::new();
    sim.apply(set("team", Limits { max_priority: Some(600), default_priority: Some(300), ..Limits::default() }))
        .unwrap();
    let given = submit_as(&mut sim, job_of("team", 1, 1), false, None).unwrap();
    assert_eq!(priority(&sim, given), 500, "a priority the user gave (500) stands");
    let defaulted = submit_as(&mut sim, job_of("team", 1, 1), true, None).unwrap();
    assert_eq!(priority(&sim, defaulted), 300, "the tenant's default replaces the spec's");

    // No default but a cap below the spec default: lowered to the cap, not refused.
    sim.apply(set("capped", Limits { max_priority: Some(250), ..Limits::default() })).unwrap();
    let lowered = submit_as(&mut sim, job_of("capped", 1, 1), true, None).unwrap();
    assert_eq!(priority(&sim, lowered), 250);
    let err = submit_as(&mut sim, job_of("capped", 1, 1), false, None).unwrap_err();
    assert!(matches!(err, Rejection::PriorityAboveCap { cap: 250, asked: 500, .. }), "{err}");

    // Neither: the spec's priority stands.
    let plain = submit_as(&mut sim, job_of("plain", 1, 1), true, None).unwrap();
    assert_eq!(priority(&sim, plain), 500);
}

#[test]
fn the_submitter_is_recorded_and_validated() {
    let mut sim = Sim::new();
    let j = submit_as(&mut sim, job_of("team", 1, 1), false, Some("user/alice")).unwrap();
    assert_eq!(sim.state.job(j).unwrap().submitted_by.as_deref(), Some("user/alice"));
    let anon = submit_as(&mut sim, job_of("team", 1, 1), false, None).unwrap();
    assert_eq!(sim.state.job(anon).unwrap().submitted_by, None);
    for bad in ["", "user/\nalice", &"x".repeat(300)] {
        let err = submit_as(&mut sim, job_of("team", 1, 1), false, Some(bad)).unwrap_err();
        assert!(matches!(err, Rejection::InvalidArgument { field: "submitted_by", .. }), "{bad:?}: {err}");
    }
    assert_eq!(sim.state.jobs().len(), 2);
}

#[test]
fn gpu_hours_quota_blocks_placement_once_used_and_frees_after_the_window() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    sim.node(n("b"));
    // 4 GPU-hours per hour; the window is kept as 24 buckets of 150 s.
    let limits = Limits { gpu_hours_quota: Some(4.0), gpu_hours_window_ms: HOUR, ..Limits::default() };
    sim.apply(set("team", limits.clone())).unwrap();
    assert_eq!(sim.state.tenants()["team"].gpu_hours_bucket_ms(), 150_000);
    let t0 = sim.now;
    let first = sim.submit(job_of("team", 1, 8));
    sim.round();
    assert_eq!(sim.job_state(first), JobState::Running);

    // An hour of 8 GPUs: 8 GPU-hours, counted without any command since the start.
    sim.now = t0 + HOUR;
    let t = &sim.state.tenants()["team"];
    assert_eq!(t.window_gpu_hours(Timestamp(sim.now)), 8.0);
    assert!(t.gpu_hours_exhausted(Timestamp(sim.now)));
    let second = sim.submit(job_of("team", 1, 8));
    let other = sim.submit(job_of("other", 1, 8));
    let (out, _) = sim.round();
    assert_eq!(out.waiting.get(&second), Some(&WaitReason::GpuHoursQuota));
    assert_eq!(sim.job_state(second), JobState::Pending);
    assert_eq!(sim.job_state(first), JobState::Running, "running work is not stopped");
    assert_eq!(sim.job_state(other), JobState::Running, "its pending job does not hold up other tenants");
    assert!(out.reservation.is_none(), "a blocked tenant takes no backfill reservation");
    sim.exit(first, 0, 0).unwrap();
    sim.exit(other, 0, 0).unwrap();

    // 25 minutes later, 35 or more of those 60 minutes are still in the window: 4.7 GPU-hours.
    sim.now = t0 + HOUR + 25 * MINUTE;
    let (out, _) = sim.round();
    assert_eq!(out.waiting.get(&second), Some(&WaitReason::GpuHoursQuota));
    let used = sim.state.tenants()["team"].window_gpu_hours(Timestamp(sim.now));
    assert!((4.0..5.0).contains(&used), "{used}");

    // A window after the first job ended, only the bucket holding its last 100 s is left;
    // one bucket later, nothing.
    sim.now = t0 + 2 * HOUR;
    let used = sim.state.tenants()["team"].window_gpu_hours(Timestamp(sim.now));
    assert!((used - 8.0 * 100.0 / 3600.0).abs() < 1e-9, "{used}");
    assert_eq!(sim.state.tenants()["team"].window_gpu_hours(Timestamp(sim.now + 150_000)), 0.0);

    // A plan made while the tenant was free is refused on apply once it is over again.
    let out = plan(&sim.state, Timestamp(sim.now), &PlanLimits::default());
    assert_eq!(out.plan.placements.len(), 1);
    sim.apply(set("team", Limits { gpu_hours_quota: Some(0.1), ..limits.clone() })).unwrap();
    let ev = sim.apply(Command::ApplyPlan { plan: out.plan }).unwrap();
    assert!(
        matches!(&ev[..], [Event::PlacementRejected { job, reason }] if *job == second && reason.contains("GPU-hours")),
        "{ev:?}"
    );
    sim.apply(set("team", limits)).unwrap();
    sim.round();
    assert_eq!(sim.job_state(second), JobState::Running);
    sim.state.check_invariants().unwrap();
}

#[test]
fn a_cloud_gpu_hours_quota_blocks_only_that_cloud() {
    let mut sim = Sim::new();
    let aws = sim.node(n("a"));
    let az = sim.node(azure("z"));
    let limits = Limits {
        cloud_gpu_hours_quota: BTreeMap::from([("aws".to_string(), 1.0)]),
        gpu_hours_window_ms: HOUR,
        ..Limits::default()
    };
    sim.apply(set("team", limits)).unwrap();
    let mut on_aws = job_of("team", 1, 8);
    on_aws.placement.clouds = vec![Cloud::Aws];
    let first = sim.submit(on_aws.clone());
    sim.round();
    assert_eq!(sim.nodes_of(first), vec![aws]);
    sim.now += HOUR;
    sim.exit(first, 0, 0).unwrap();

    let usage =
        sim.state.tenants()["team"].usage_by_cloud(Timestamp(sim.now), sim.state.config().fair_share_half_life_ms);
    assert_eq!(usage.keys().copied().collect::<Vec<_>>(), vec![Cloud::Aws]);
    assert_eq!(usage[&Cloud::Aws].window_gpu_hours, 8.0);
    assert_eq!(usage[&Cloud::Aws].gpus_in_use, 0);
    assert!((usage[&Cloud::Aws].decayed_gpu_hours - 8.0).abs() < 0.01, "{:?}", usage[&Cloud::Aws]);

    let only_aws = sim.submit(on_aws);
    let anywhere = sim.submit(job_of("team", 1, 8));
    let (out, _) = sim.round();
    assert_eq!(out.waiting.get(&only_aws), Some(&WaitReason::GpuHoursQuota));
    // With both nodes free the tie would go to the aws node (lower id); it goes to azure.
    assert_eq!(sim.nodes_of(anywhere), vec![az]);
    let t = &sim.state.tenants()["team"];
    assert!(!t.gpu_hours_exhausted(Timestamp(sim.now)));
    assert!(t.gpu_hours_exhausted_on(Cloud::Aws, Timestamp(sim.now)));
    assert!(!t.gpu_hours_exhausted_on(Cloud::Azure, Timestamp(sim.now)));
    assert_eq!(t.cloud_gpus_in_use, BTreeMap::from([(Cloud::Azure, 8)]));
}

#[test]
fn snapshots_keep_tenant_settings_usage_and_rebuild_the_cloud_counters() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    sim.node(azure("z"));
    let limits = Limits {
        max_priority: Some(900),
        default_priority: Some(400),
        gpu_hours_quota: Some(100.0),
        cloud_gpu_hours_quota: BTreeMap::from([("azure".to_string(), 50.5)]),
        gpu_hours_window_ms: 2 * HOUR,
        mode: TenantWrite::Create,
    };
    sim.apply(set("team", limits)).unwrap();
    let mut s = job_of("team", 2, 8);
    s.placement.span_clouds = true;
    let j = submit_as(&mut sim, s, true, Some("token/ci")).unwrap();
    sim.round();
    assert_eq!(sim.job_state(j), JobState::Running);
    sim.now += 30 * MINUTE;
    sim.exit(j, 0, 0).unwrap();
    sim.exit(j, 1, 0).unwrap();
    let still = submit_as(&mut sim, job_of("team", 1, 4), false, None).unwrap();
    sim.round();
    sim.now += 10 * MINUTE;

    let t = &sim.state.tenants()["team"];
    assert_eq!(t.gpus_in_use, 4);
    assert_eq!(t.cloud_gpus_in_use.values().sum::<u64>(), 4);
    assert_eq!(t.clouds.len(), 2, "usage accrued on both clouds");

    let restored = State::restore(&sim.state.snapshot()).unwrap();
    restored.check_invariants().unwrap();
    assert_eq!(restored, sim.state, "settings, accounts and derived counters survive");
    let (a, b) = (&restored.tenants()["team"], &sim.state.tenants()["team"]);
    assert_eq!(a.cloud_gpus_in_use, b.cloud_gpus_in_use);
    assert_eq!(a.max_priority, Some(900));
    assert_eq!(a.cloud_gpu_hours_quota["azure"], 50.5);
    let now = Timestamp(sim.now);
    assert_eq!(a.window_gpu_hours(now), b.window_gpu_hours(now));
    assert_eq!(restored.job(j).unwrap().submitted_by.as_deref(), Some("token/ci"));
    assert_eq!(restored.job(j).unwrap().spec.priority, 400);
    assert_eq!(sim.job_state(still), JobState::Running);

    // A snapshot whose tenant settings are out of range is refused, not served.
    let mut v: serde_json::Value = serde_json::from_slice(&sim.state.snapshot()).unwrap();
    v["state"]["tenants"]["team"]["gpu_hours_window_ms"] = 0.into();
    let err = State::restore(&serde_json::to_vec(&v).unwrap()).unwrap_err();
    assert!(err.to_string().contains("window"), "{err}");
}

#[test]
fn a_node_that_comes_back_in_another_cloud_moves_its_tenants_gpus() {
    let mut sim = Sim::new();
    let mut s = n("a");
    let node = sim.node(n("a"));
    let j = sim.submit(job_of("team", 1, 8));
    sim.round();
    assert_eq!(sim.nodes_of(j), vec![node]);
    s.cloud = Cloud::Azure;
    sim.now += HOUR;
    sim.node(s);
    assert_eq!(sim.job_state(j), JobState::Running, "same GPUs: the attempt is kept");
    let t = &sim.state.tenants()["team"];
    assert_eq!(t.cloud_gpus_in_use, BTreeMap::from([(Cloud::Azure, 8)]));
    assert_eq!(t.cloud_window_gpu_hours(Cloud::Aws, Timestamp(sim.now)), 8.0, "the hour on aws stays on aws");
    sim.state.check_invariants().unwrap();
}

#[test]
fn changing_the_window_keeps_the_usage_it_still_covers() {
    let mut sim = Sim::new();
    sim.node(n("a"));
    let j = sim.submit(job_of("team", 1, 8));
    sim.round();
    sim.now += HOUR;
    sim.exit(j, 0, 0).unwrap();
    let now = Timestamp(sim.now);
    assert_eq!(sim.state.tenants()["team"].window_gpu_hours(now), 8.0);
    sim.apply(set("team", Limits { gpu_hours_window_ms: HOUR, ..Limits::default() })).unwrap();
    let t = &sim.state.tenants()["team"];
    assert_eq!(t.window_gpu_hours(now), 8.0, "moved to the new bucket of its last millisecond: not forgotten early");
    assert_eq!(t.window_gpu_hours(now.plus_ms(HOUR + 150_000)), 0.0);
    sim.state.check_invariants().unwrap();
}

#[test]
fn create_and_update_modes() {
    let mut sim = Sim::new();
    let mode = |mode| Limits { mode, ..Limits::default() };
    assert_eq!(sim.apply(set("t", mode(TenantWrite::Update))).unwrap_err(), Rejection::UnknownTenant("t".into()));
    assert!(sim.state.tenants().is_empty());
    sim.apply(set("t", mode(TenantWrite::Create))).unwrap();
    let err = sim.apply(set("t", Limits { max_priority: Some(1), ..mode(TenantWrite::Create) })).unwrap_err();
    assert_eq!(err, Rejection::TenantExists("t".into()));
    assert_eq!(sim.state.tenants()["t"].max_priority, None, "the refused create changed nothing");
    sim.apply(set("t", Limits { max_priority: Some(1), ..mode(TenantWrite::Update) })).unwrap();
    assert_eq!(sim.state.tenants()["t"].max_priority, Some(1));
    sim.apply(set("t", mode(TenantWrite::Upsert))).unwrap();
    sim.apply(set("u", mode(TenantWrite::Upsert))).unwrap();
    assert_eq!(sim.state.tenants().len(), 2);
    assert_eq!(sim.state.tenants()["t"].max_priority, None, "a write replaces every setting");
    // A tenant created by a submission exists for `create`.
    sim.submit(job_of("auto", 1, 1));
    assert!(matches!(sim.apply(set("auto", mode(TenantWrite::Create))), Err(Rejection::TenantExists(_))));
}

#[test]
fn tenant_settings_are_validated_and_errors_name_the_field() {
    let mut sim = Sim::new();
    let cloud = |name: &str, q: f64| BTreeMap::from([(name.to_string(), q)]);
    let cases = [
        (Limits { max_priority: Some(1001), ..Limits::default() }, "max_priority"),
        (Limits { default_priority: Some(1001), ..Limits::default() }, "default_priority"),
        (Limits { max_priority: Some(100), default_priority: Some(200), ..Limits::default() }, "default_priority"),
        (Limits { gpu_hours_quota: Some(0.0), ..Limits::default() }, "gpu_hours_quota"),
        (Limits { gpu_hours_quota: Some(-1.0), ..Limits::default() }, "gpu_hours_quota"),
        (Limits { gpu_hours_quota: Some(f64::NAN), ..Limits::default() }, "gpu_hours_quota"),
        (Limits { gpu_hours_quota: Some(f64::INFINITY), ..Limits::default() }, "gpu_hours_quota"),
        (Limits { cloud_gpu_hours_quota: cloud("gcp", 1.0), ..Limits::default() }, "cloud_gpu_hours_quota"),
        (Limits { cloud_gpu_hours_quota: cloud("AWS", 1.0), ..Limits::default() }, "cloud_gpu_hours_quota"),
        (Limits { cloud_gpu_hours_quota: cloud("aws", 0.0), ..Limits::default() }, "cloud_gpu_hours_quota"),
        (Limits { gpu_hours_window_ms: MINUTE - 1, ..Limits::default() }, "gpu_hours_window_ms"),
        (Limits { gpu_hours_window_ms: 366 * 24 * HOUR + 1, ..Limits::default() }, "gpu_hours_window_ms"),
    ];
    for (limits, field) in cases {
        let err = sim.apply(set("t", limits)).unwrap_err();
        assert!(
            matches!(&err, Rejection::InvalidArgument { field: f, .. } if *f == field),
            "expected {field}, got {err}"
        );
        assert!(err.to_string().starts_with(field), "{err}");
    }
    assert!(sim.state.tenants().is_empty());
    let edges = Limits {
        max_priority: Some(1000),
        default_priority: Some(1000),
        gpu_hours_window_ms: MINUTE,
        cloud_gpu_hours_quota: cloud("none", 1e-3),
        ..Limits::default()
    };
    sim.apply(set("t", edges)).unwrap();
    sim.apply(set("t", Limits { gpu_hours_window_ms: 366 * 24 * HOUR, ..Limits::default() })).unwrap();
}

#[test]
fn old_log_entries_and_snapshots_without_the_new_fields_still_decode() {
    let old = br#"{"v":1,"type":"set_tenant","name":"team","weight":3,"gpu_quota":16}"#;
    assert_eq!(Command::decode(old).unwrap(), tenant_cmd("team", 3, Some(16)));

    let spec = serde_json::to_string(&JobSpec::new(vec!["train".into()], 1, 1)).unwrap();
    let old = format!(r#"{{"v":1,"type":"submit_job","spec":{spec},"idempotency_key":"k"}}"#);
    let cmd = Command::decode(old.as_bytes()).unwrap();
    assert_eq!(cmd, submit_cmd(JobSpec::new(vec!["train".into()], 1, 1), Some("k".into())));
    // ... and commands that leave the new fields at their defaults encode as before.
    assert_eq!(String::from_utf8(cmd.encode()).unwrap(), old);
    let set_old = String::from_utf8(tenant_cmd("team", 3, Some(16)).encode()).unwrap();
    assert_eq!(
        set_old,
        std::str::from_utf8(br#"{"v":1,"type":"set_tenant","name":"team","weight":3,"gpu_quota":16}"#).unwrap()
    );

    // A snapshot written before tenants had limits and per-cloud accounts, or jobs a submitter.
    let mut sim = Sim::new();
    sim.node(n("a"));
    sim.apply(tenant_cmd("team", 2, None)).unwrap();
    let j = submit_as(&mut sim, job_of("team", 1, 8), false, Some("user/alice")).unwrap();
    sim.round();
    sim.now += HOUR;
    sim.exit(j, 0, 0).unwrap();
    let j2 = sim.submit(job_of("team", 1, 8));
    sim.round();
    let mut v: serde_json::Value = serde_json::from_slice(&sim.state.snapshot()).unwrap();
    let tenant = v["state"]["tenants"]["team"].as_object_mut().unwrap();
    for field in [
        "max_priority",
        "default_priority",
        "gpu_hours_quota",
        "cloud_gpu_hours_quota",
        "gpu_hours_window_ms",
        "clouds",
    ] {
        assert!(tenant.remove(field).is_some(), "{field} is written");
    }
    let jobs = v["state"]["jobs"].as_object_mut().unwrap();
    assert!(jobs.get_mut("1").unwrap().as_object_mut().unwrap().remove("submitted_by").is_some());
    let restored = State::restore(&serde_json::to_vec(&v).unwrap()).unwrap();
    let t = &restored.tenants()["team"];
    assert_eq!((t.weight, t.max_priority, t.gpu_hours_quota), (2, None, None));
    assert_eq!(t.gpu_hours_window_ms, DEFAULT_GPU_HOURS_WINDOW_MS);
    assert_eq!(t.cloud_gpus_in_use, BTreeMap::from([(Cloud::Aws, 8)]), "derived counters rebuilt");
    assert!(t.clouds.is_empty(), "no per-cloud history before it was kept");
    assert_eq!(restored.job(j).unwrap().submitted_by, None);
    assert_eq!(restored.job(j2).unwrap().state, JobState::Running);
    restored.check_invariants().unwrap();
}
