//! Security end to end, the way Kubernetes tests RBAC (test/integration/auth/rbac_test.go): three
//! real servers over mutual TLS, certificates made by `tessera certs`, tokens made through the
//! API, and one table of (identity, rpc, expected code) rows covering every rpc and role.

use std::path::Path;
use std::time::{Duration, Instant};

use tessera_proto::v1;
use tessera_tests::{ServerProc, certs, free_port, tls_channel};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Conn = InterceptedService<Channel, Bearer>;

#[derive(Clone)]
struct Bearer(Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().expect("ascii"));
        }
        Ok(req)
    }
}

fn code<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// One identity of the table: a certificate, maybe a token.
struct Who {
    name: &'static str,
    conn: Conn,
}

const IDS: [&str; 11] = [
    "admin",
    "operator",
    "viewer",
    "sub_ml",
    "bare",
    "tok_admin",
    "tok_ml",
    "tok_expired",
    "tok_revoked",
    "agent",
    "server",
];

use Code::{InvalidArgument as IA, NotFound as NF, Ok as OK, PermissionDenied as PD, Unauthenticated as UA};

/// The rows: an rpc (with the resource it touches) and the code each identity of `IDS` gets.
/// An allowed call on something absent answers NOT_FOUND or INVALID_ARGUMENT, which shows that
/// authorization let it through without changing anything.
const TABLE: &[(&str, [Code; 11])] = &[
    //                       admin oper view subml bare tadm  tml  texp trev agent server
    ("SubmitJob ml", [OK, PD, PD, OK, UA, OK, OK, UA, UA, PD, PD]),
    ("SubmitJob vision", [OK, PD, PD, PD, UA, OK, PD, UA, UA, PD, PD]),
    ("SubmitJob capped p900", [PD, PD, PD, PD, UA, PD, PD, UA, UA, PD, PD]),
    ("GetJob ml", [OK, OK, OK, OK, UA, OK, OK, UA, UA, PD, PD]),
    ("GetJob vision", [OK, OK, OK, PD, UA, OK, PD, UA, UA, PD, PD]),
    ("ExplainJob ml", [OK, OK, OK, OK, UA, OK, OK, UA, UA, PD, PD]),
    ("ExplainJob vision", [OK, OK, OK, PD, UA, OK, PD, UA, UA, PD, PD]),
    ("JobEvents ml", [OK, OK, OK, OK, UA, OK, OK, UA, UA, PD, PD]),
    ("JobEvents vision", [OK, OK, OK, PD, UA, OK, PD, UA, UA, PD, PD]),
    ("ListJobs", [OK, OK, OK, OK, UA, OK, OK, UA, UA, PD, PD]),
    ("ListJobs tenant vision", [OK, OK, OK, PD, UA, OK, PD, UA, UA, PD, PD]),
    ("WatchJob ml", [OK, OK, OK, OK, UA, OK, OK, UA, UA, PD, PD]),
    ("WatchJob vision", [OK, OK, OK, PD, UA, OK, PD, UA, UA, PD, PD]),
    ("JobLogs ml", [OK, PD, PD, OK, UA, OK, OK, UA, UA, PD, PD]),
    ("JobLogs vision", [OK, PD, PD, PD, UA, OK, PD, UA, UA, PD, PD]),
    ("CancelJob vision", [OK, PD, PD, PD, UA, OK, PD, UA, UA, PD, PD]),
    ("CancelJob ml", [OK, PD, PD, OK, UA, OK, OK, UA, UA, PD, PD]),
    ("ListNodes", [OK, OK, OK, OK, UA, OK, OK, UA, UA, PD, PD]),
    ("GetNode ghost", [NF, NF, NF, NF, UA, NF, NF, UA, UA, PD, PD]),
    ("DrainNode ghost", [NF, NF, PD, PD, UA, NF, PD, UA, UA, PD, PD]),
    ("UndrainNode ghost", [NF, NF, PD, PD, UA, NF, PD, UA, UA, PD, PD]),
    ("ClearGpuHealth ghost", [NF, NF, PD, PD, UA, NF, PD, UA, UA, PD, PD]),
    ("ClusterStatus", [OK, OK, OK, OK, UA, OK, OK, UA, UA, PD, OK]),
    ("AddServer id 0", [IA, IA, PD, PD, UA, IA, PD, UA, UA, PD, IA]),
    ("RemoveServer 99", [NF, NF, PD, PD, UA, NF, PD, UA, UA, PD, PD]),
    ("Snapshot", [OK, PD, PD, PD, UA, OK, PD, UA, UA, PD, PD]),
    ("AgentSession as node-a", [PD, PD, PD, PD, PD, PD, PD, UA, UA, OK, PD]),
    ("AgentSession as node-b", [PD, PD, PD, PD, PD, PD, PD, UA, UA, PD, PD]),
    ("RaftSend from 2", [PD, PD, PD, PD, PD, PD, PD, UA, UA, PD, OK]),
    ("RaftSend from 3", [PD, PD, PD, PD, PD, PD, PD, UA, UA, PD, PD]),
    ("AclBootstrap", [PD, PD, PD, PD, PD, PD, PD, UA, UA, PD, PD]),
    ("CreateToken viewer", [OK, PD, PD, PD, UA, OK, PD, UA, UA, PD, PD]),
    ("ListTokens", [OK, PD, PD, PD, UA, OK, PD, UA, UA, PD, PD]),
    ("RevokeToken unknown", [NF, PD, PD, PD, UA, NF, PD, UA, UA, PD, PD]),
    ("SetTenant ml", [OK, PD, PD, PD, UA, OK, PD, UA, UA, PD, PD]),
    ("ListTenants", [OK, OK, OK, OK, UA, OK, OK, UA, UA, PD, PD]),
    ("GetTenant vision", [OK, OK, OK, PD, UA, OK, PD, UA, UA, PD, PD]),
    ("Usage", [OK, OK, OK, OK, UA, OK, OK, UA, UA, PD, PD]),
    ("Usage vision", [OK, OK, OK, PD, UA, OK, PD, UA, UA, PD, PD]),
    ("Health", [OK, OK, OK, OK, OK, OK, OK, UA, UA, OK, OK]),
    ("Reflection", [OK, OK, OK, OK, UA, OK, OK, UA, UA, PD, PD]),
];

struct Ctx {
    ml_job: u64,
    vision_job: u64,
}

fn job_spec(tenant: &str, priority: Option<u32>) -> v1::JobSpec {
    let mut s = tessera_tests::spec("sec");
    s.tenant = tenant.into();
    s.priority = priority;
    s.env.insert("API_KEY".into(), "hunter2".into());
    s
}

async fn call(rpc: &str, ch: Conn, ctx: &Ctx) -> Code {
    use v1::acl_service_client::AclServiceClient as Acl;
    use v1::agent_service_client::AgentServiceClient as Agents;
    use v1::cluster_service_client::ClusterServiceClient as Cluster;
    use v1::job_service_client::JobServiceClient as Jobs;
    use v1::node_service_client::NodeServiceClient as Nodes;
    use v1::raft_service_client::RaftServiceClient as Raft;
    use v1::tenant_service_client::TenantServiceClient as Tenants;
    let ghost = Some(v1::NodeRef { node: Some(v1::node_ref::Node::Name("ghost".into())) });
    let submit = |tenant: &str, p: Option<u32>| v1::SubmitJobRequest {
        spec: Some(job_spec(tenant, p)),
        idempotency_key: String::new(),
    };
    match rpc {
        "SubmitJob ml" => code(Jobs::new(ch).submit_job(submit("ml", None)).await),
        "SubmitJob vision" => code(Jobs::new(ch).submit_job(submit("vision", None)).await),
        "SubmitJob capped p900" => code(Jobs::new(ch).submit_job(submit("capped", Some(900))).await),
        "GetJob ml" => code(Jobs::new(ch).get_job(v1::GetJobRequest { job_id: ctx.ml_job, consistency: 0 }).await),
        "GetJob vision" => {
            code(Jobs::new(ch).get_job(v1::GetJobRequest { job_id: ctx.vision_job, consistency: 0 }).await)
        }
        "ExplainJob ml" | "ExplainJob vision" => {
            let job_id = if rpc.ends_with("ml") { ctx.ml_job } else { ctx.vision_job };
            code(Jobs::new(ch).explain_job(v1::ExplainJobRequest { job_id, consistency: 0 }).await)
        }
        "JobEvents ml" | "JobEvents vision" => {
            let job_id = if rpc.ends_with("ml") { ctx.ml_job } else { ctx.vision_job };
            code(Jobs::new(ch).job_events(v1::JobEventsRequest { job_id, consistency: 0 }).await)
        }
        "ListJobs" => code(Jobs::new(ch).list_jobs(v1::ListJobsRequest::default()).await),
        "ListJobs tenant vision" => {
            code(Jobs::new(ch).list_jobs(v1::ListJobsRequest { tenant: "vision".into(), ..Default::default() }).await)
        }
        "WatchJob ml" | "WatchJob vision" => {
            let job_id = if rpc.ends_with("ml") { ctx.ml_job } else { ctx.vision_job };
            match Jobs::new(ch).watch_job(v1::WatchJobRequest { job_id }).await {
                Ok(mut s) => code(s.get_mut().message().await),
                Err(s) => s.code(),
            }
        }
        "JobLogs ml" | "JobLogs vision" => {
            let job_id = if rpc.ends_with("ml") { ctx.ml_job } else { ctx.vision_job };
            match Jobs::new(ch).job_logs(v1::JobLogsRequest { job_id, ..Default::default() }).await {
                Ok(mut s) => code(s.get_mut().message().await),
                Err(s) => s.code(),
            }
        }
        "CancelJob vision" | "CancelJob ml" => {
            let job_id = if rpc.ends_with("ml") { ctx.ml_job } else { ctx.vision_job };
            code(Jobs::new(ch).cancel_job(v1::CancelJobRequest { job_id, reason: String::new() }).await)
        }
        "ListNodes" => code(Nodes::new(ch).list_nodes(v1::ListNodesRequest::default()).await),
        "GetNode ghost" => code(Nodes::new(ch).get_node(v1::GetNodeRequest { node: ghost, consistency: 0 }).await),
        "DrainNode ghost" => {
            code(Nodes::new(ch).drain_node(v1::DrainNodeRequest { node: ghost, ..Default::default() }).await)
        }
        "UndrainNode ghost" => code(Nodes::new(ch).undrain_node(v1::UndrainNodeRequest { node: ghost }).await),
        "ClearGpuHealth ghost" => {
            code(Nodes::new(ch).clear_gpu_health(v1::ClearGpuHealthRequest { node: ghost, ..Default::default() }).await)
        }
        "ClusterStatus" => code(Cluster::new(ch).status(v1::StatusRequest {}).await),
        "AddServer id 0" => code(Cluster::new(ch).add_server(v1::AddServerRequest::default()).await),
        "RemoveServer 99" => code(Cluster::new(ch).remove_server(v1::RemoveServerRequest { id: 99 }).await),
        "Snapshot" => match Cluster::new(ch).snapshot(v1::SnapshotRequest {}).await {
            Ok(mut s) => code(s.get_mut().message().await),
            Err(s) => s.code(),
        },
        "AgentSession as node-a" | "AgentSession as node-b" => {
            let name = if rpc.ends_with("node-a") { "node-a" } else { "node-b" };
            let first = v1::AgentMessage {
                seq: 1,
                payload: Some(v1::agent_message::Payload::Register(tessera_tests::sim_register(name))),
            };
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let _ = tx.send(first).await;
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            // OK only for a registration the leader accepted (not a redirect to the leader).
            let r = match Agents::new(ch).session(stream).await {
                Ok(mut s) => match s.get_mut().message().await {
                    Ok(Some(v1::ServerMessage { payload: Some(v1::server_message::Payload::Registered(_)) })) => {
                        Code::Ok
                    }
                    Ok(_) => Code::Unavailable,
                    Err(e) => e.code(),
                },
                Err(s) => s.code(),
            };
            drop(tx);
            r
        }
        "RaftSend from 2" | "RaftSend from 3" => {
            let from_id = if rpc.ends_with('2') { 2 } else { 3 };
            code(Raft::new(ch).send(v1::RaftBatch { from_id, to_id: 1, messages: Vec::new() }).await)
        }
        "AclBootstrap" => code(Acl::new(ch).bootstrap(v1::AclBootstrapRequest::default()).await),
        "CreateToken viewer" => code(
            Acl::new(ch)
                .create_token(v1::CreateTokenRequest { name: "t".into(), role: "viewer".into(), ..Default::default() })
                .await,
        ),
        "ListTokens" => code(Acl::new(ch).list_tokens(v1::ListTokensRequest {}).await),
        "RevokeToken unknown" => code(
            Acl::new(ch)
                .revoke_token(v1::RevokeTokenRequest { accessor: "00000000-0000-4000-8000-00000000dead".into() })
                .await,
        ),
        "SetTenant ml" => code(
            Tenants::new(ch)
                .set_tenant(v1::SetTenantRequest { name: "ml".into(), weight: Some(2), ..Default::default() })
                .await,
        ),
        "ListTenants" => code(Tenants::new(ch).list_tenants(v1::ListTenantsRequest {}).await),
        "GetTenant vision" => code(Tenants::new(ch).get_tenant(v1::GetTenantRequest { name: "vision".into() }).await),
        "Usage" | "Usage vision" => {
            let tenant = if rpc == "Usage" { String::new() } else { "vision".into() };
            let req = v1::UsageRequest { since_unix_ms: 1, tenant, ..Default::default() };
            code(Tenants::new(ch).usage(req).await)
        }
        "Health" => {
            let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
            code(h.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await)
        }
        "Reflection" => {
            use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_request::MessageRequest};
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            match ServerReflectionClient::new(ch).server_reflection_info(tokio_stream::iter(vec![req])).await {
                Ok(mut s) => code(s.get_mut().message().await),
                Err(s) => s.code(),
            }
        }
        other => panic!("no call for row {other}"),
    }
}

fn conn(addr: &str, dir: &Path, stem: &str, token: Option<&str>) -> Conn {
    InterceptedService::new(tls_channel(addr, dir, stem), Bearer(token.map(str::to_string)))
}

async fn create_token(admin: Conn, name: &str, role: &str, tenants: &[&str], ttl: u64) -> v1::CreateTokenResponse {
    v1::acl_service_client::AclServiceClient::new(admin)
        .create_token(v1::CreateTokenRequest {
            name: name.into(),
            role: role.into(),
            tenants: tenants.iter().map(|t| t.to_string()).collect(),
            ttl_seconds: ttl,
        })
        .await
        .unwrap_or_else(|e| panic!("create token {name}: {e}"))
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_and_role_over_mutual_tls() {
    let dir = tempfile::tempdir().expect("temp dir");
    let c = dir.path().join("certs");
    certs(&c, &["ca"]);
    for id in ["1", "2", "3"] {
        certs(&c, &["server", id, "--host", "127.0.0.1"]);
    }
    certs(&c, &["agent", "node-a"]);
    certs(&c, &["user", "admin", "--role", "admin"]);
    certs(&c, &["user", "operator", "--role", "operator"]);
    certs(&c, &["user", "viewer", "--role", "viewer"]);
    certs(&c, &["user", "sub-ml", "--role", "submitter", "--tenant", "ml"]);
    certs(&c, &["user", "bare"]);
    // Keys are private; a second CA stands for anyone else's.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(c.join("user-admin-key.pem")).expect("key").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let rogue = dir.path().join("rogue");
    certs(&rogue, &["ca"]);
    certs(&rogue, &["user", "admin", "--role", "admin"]);
    std::fs::copy(c.join("ca.pem"), rogue.join("trusted-ca.pem")).expect("copy");

    let addrs: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let initial = addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>().join(",");
    let mut servers = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let id = i as u64 + 1;
        let f = |n: String| c.join(n).display().to_string();
        let args = vec![
            "--initial-cluster".to_string(),
            initial.clone(),
            "--tls-ca".into(),
            f("ca.pem".into()),
            "--tls-cert".into(),
            f(format!("server-{id}.pem")),
            "--tls-key".into(),
            f(format!("server-{id}-key.pem")),
        ];
        servers.push(ServerProc::start(id, addr, &dir.path().join(format!("s{id}")), &args));
    }
    let logs = |servers: &[ServerProc]| servers.iter().map(|s| s.log_tail()).collect::<Vec<_>>().join("\n---\n");

    // A leader, reached over TLS with the admin certificate (Raft between servers is TLS too).
    let admin = || conn(&addrs[0], &c, "user-admin", None);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = v1::cluster_service_client::ClusterServiceClient::new(admin()).status(v1::StatusRequest {}).await;
        if s.as_ref().is_ok_and(|s| s.get_ref().leader_id.is_some()) {
            break;
        }
        assert!(Instant::now() < deadline, "no leader over TLS: {s:?}\n{}", logs(&servers));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Handshakes that must fail: no client certificate, another CA's certificate, plaintext.
    let ca_pem = std::fs::read_to_string(c.join("ca.pem")).expect("ca");
    let no_cert = tonic::transport::Endpoint::from_shared(format!("https://{}", addrs[0]))
        .expect("uri")
        .tls_config(
            tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(&ca_pem)),
        )
        .expect("tls config")
        .connect_timeout(Duration::from_secs(2));
    let r = match no_cert.connect().await {
        Ok(ch) => code(v1::cluster_service_client::ClusterServiceClient::new(ch).status(v1::StatusRequest {}).await),
        Err(_) => Code::Unavailable,
    };
    assert_ne!(r, Code::Ok, "a client without a certificate got through");
    let rogue_files = tessera_tls::TlsFiles {
        ca: rogue.join("trusted-ca.pem"),
        cert: rogue.join("user-admin.pem"),
        key: rogue.join("user-admin-key.pem"),
    };
    let sec = tessera_tls::Security::Tls(tessera_tls::Tls::load(rogue_files).expect("rogue files"));
    let ep = sec.endpoint(&addrs[0]).expect("endpoint").connect_timeout(Duration::from_secs(2));
    let r = match sec.connect(&ep).await {
        Ok(ch) => code(v1::cluster_service_client::ClusterServiceClient::new(ch).status(v1::StatusRequest {}).await),
        Err(_) => Code::Unavailable,
    };
    assert_ne!(r, Code::Ok, "a certificate from another CA got through");
    let plain = tessera_tests::channel(&addrs[0]);
    let r = code(v1::cluster_service_client::ClusterServiceClient::new(plain).status(v1::StatusRequest {}).await);
    assert_ne!(r, Code::Ok, "a plaintext client got through");

    // Bootstrap ACLs from the role-less certificate, then the tokens of the table.
    let boot = v1::acl_service_client::AclServiceClient::new(conn(&addrs[1], &c, "user-bare", None))
        .bootstrap(v1::AclBootstrapRequest::default())
        .await
        .expect("bootstrap")
        .into_inner();
    let root = boot.secret.clone();
    let tok = |t: &str| conn(&addrs[0], &c, "user-bare", Some(t));
    let ml = create_token(tok(&root), "ml-ci", "submitter", &["ml"], 0).await.secret;
    let expired = create_token(tok(&root), "short", "admin", &[], 1).await.secret;
    let revoked = create_token(tok(&root), "gone", "admin", &[], 0).await;
    v1::acl_service_client::AclServiceClient::new(tok(&root))
        .revoke_token(v1::RevokeTokenRequest { accessor: revoked.token.expect("token").accessor })
        .await
        .expect("revoke");
    // Tenants, and one job in each (an admin submits; the table's own submissions add more).
    let mut tenants = v1::tenant_service_client::TenantServiceClient::new(admin());
    for (name, max) in [("ml", None), ("vision", None), ("capped", Some(100))] {
        tenants
            .set_tenant(v1::SetTenantRequest { name: name.into(), max_priority: max, ..Default::default() })
            .await
            .unwrap_or_else(|e| panic!("tenant {name}: {e}"));
    }
    let mut jobs = v1::job_service_client::JobServiceClient::new(admin());
    let mut submit = async |tenant: &str| {
        let r = jobs
            .submit_job(v1::SubmitJobRequest { spec: Some(job_spec(tenant, None)), idempotency_key: String::new() });
        r.await.expect("submit").into_inner().job_id
    };
    let ctx = Ctx { ml_job: submit("ml").await, vision_job: submit("vision").await };
    tokio::time::sleep(Duration::from_millis(1100)).await; // the short token expires

    // Every identity against every server in turn (followers forward to the leader on the
    // caller's behalf, so the table holds wherever a request lands).
    let status = v1::cluster_service_client::ClusterServiceClient::new(admin()).status(v1::StatusRequest {}).await;
    let leader = status.expect("status").into_inner().leader_id.expect("a leader");
    let leader_addr = addrs[leader as usize - 1].clone();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (row, (rpc, want)) in TABLE.iter().enumerate() {
        // Agent sessions are the leader's (a follower only redirects); the rest go round.
        let addr = if rpc.starts_with("AgentSession") { &leader_addr } else { &addrs[row % addrs.len()] };
        let who: Vec<Who> = IDS
            .iter()
            .map(|name| {
                let conn = match *name {
                    "admin" => conn(addr, &c, "user-admin", None),
                    "operator" => conn(addr, &c, "user-operator", None),
                    "viewer" => conn(addr, &c, "user-viewer", None),
                    "sub_ml" => conn(addr, &c, "user-sub-ml", None),
                    "bare" => conn(addr, &c, "user-bare", None),
                    "tok_admin" => conn(addr, &c, "user-bare", Some(&root)),
                    "tok_ml" => conn(addr, &c, "user-bare", Some(&ml)),
                    "tok_expired" => conn(addr, &c, "user-bare", Some(&expired)),
                    "tok_revoked" => conn(addr, &c, "user-bare", Some(&revoked.secret)),
                    "agent" => conn(addr, &c, "agent-node-a", None),
                    // Raft rows go to server 1 from server 2's certificate.
                    "server" => conn(&addrs[0], &c, "server-2", None),
                    other => panic!("{other}"),
                };
                Who { name, conn }
            })
            .collect();
        for (w, expected) in who.into_iter().zip(want.iter()) {
            let got = call(rpc, w.conn, &ctx).await;
            checked += 1;
            if got != *expected {
                failures.push(format!("{rpc} as {}: expected {expected:?}, got {got:?}", w.name));
            }
        }
    }
    println!("RBAC table: {} rows x {} identities = {checked} checks", TABLE.len(), IDS.len());
    assert!(
        failures.is_empty(),
        "{} of {checked} checks failed:\n{}\n{}",
        failures.len(),
        failures.join("\n"),
        logs(&servers)
    );

    // What each may see: a submitter lists only its tenants' jobs; env values only for admins
    // and the job's own tenant; every job names who submitted it.
    let list = |conn: Conn| async move {
        v1::job_service_client::JobServiceClient::new(conn)
            .list_jobs(v1::ListJobsRequest { include_finished: true, page_size: 1000, ..Default::default() })
            .await
            .expect("list")
            .into_inner()
            .jobs
    };
    let env = |j: &v1::Job| j.spec.as_ref().and_then(|s| s.env.get("API_KEY").cloned()).unwrap_or_default();
    let mine = list(conn(&addrs[2], &c, "user-sub-ml", None)).await;
    assert!(!mine.is_empty() && mine.iter().all(|j| j.spec.as_ref().is_some_and(|s| s.tenant == "ml")));
    assert!(mine.iter().all(|j| env(j) == "hunter2"));
    let seen = list(conn(&addrs[2], &c, "user-viewer", None)).await;
    assert!(seen.iter().any(|j| j.id == ctx.vision_job) && seen.iter().all(|j| env(j) == "(redacted)"));
    let all = list(admin()).await;
    assert!(all.iter().all(|j| env(j) == "hunter2"));
    let first = all.iter().find(|j| j.id == ctx.ml_job).expect("ml job");
    assert_eq!(first.submitted_by, "user/admin");
    assert!(all.iter().any(|j| j.submitted_by.starts_with("token/ml-ci(")), "no job names the ml-ci token");

    // Revocation reaches every server: a fresh token works everywhere, then fails everywhere.
    let t = create_token(tok(&root), "brief", "viewer", &[], 0).await;
    let accessor = t.token.expect("token").accessor;
    v1::acl_service_client::AclServiceClient::new(tok(&root))
        .revoke_token(v1::RevokeTokenRequest { accessor })
        .await
        .expect("revoke");
    let revoked_at = Instant::now();
    for addr in &addrs {
        loop {
            let r = v1::cluster_service_client::ClusterServiceClient::new(conn(addr, &c, "user-bare", Some(&t.secret)))
                .status(v1::StatusRequest {})
                .await;
            if code(r) == Code::Unauthenticated {
                break;
            }
            assert!(revoked_at.elapsed() < Duration::from_secs(10), "{addr} still takes a revoked token");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    println!("revocation refused on all 3 servers {} ms after it was acknowledged", revoked_at.elapsed().as_millis());

    // The CLI over mutual TLS, with and without tokens.
    let cli = |args: &[&str], token: Option<&str>| {
        let mut cmd = std::process::Command::new(tessera_tests::tessera_bin());
        cmd.args(args)
            .env("TESSERA_SERVER", addrs.join(","))
            .env("TESSERA_CA", c.join("ca.pem"))
            .env("TESSERA_CERT", c.join("user-bare.pem"))
            .env("TESSERA_KEY", c.join("user-bare-key.pem"))
            .env_remove("TESSERA_INSECURE")
            .env_remove("TESSERA_TOKEN");
        if let Some(t) = token {
            cmd.env("TESSERA_TOKEN", t);
        }
        let out = cmd.output().expect("run tessera");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code_, out, err) =
        cli(&["tenant", "create", "nlp", "--weight", "3", "--max-priority", "high", "-o", "json"], Some(&root));
    assert_eq!(code_, Some(0), "{err}");
    let t: serde_json::Value = serde_json::from_str(&out).expect("tenant json");
    assert_eq!((t["weight"].as_u64(), t["max_priority"].as_u64()), (Some(3), Some(750)), "{out}");
    let (code_, _, err) = cli(&["tenant", "create", "nlp"], Some(&root));
    assert_ne!(code_, Some(0), "a second create of one tenant succeeded: {err}");
    let (code_, _, err) = cli(&["job", "submit", "--tenant", "nlp", "--gpus", "1", "--", "true"], Some(&ml));
    assert_eq!(code_, Some(1), "{err}");
    assert!(err.contains("permission denied"), "{err}");
    let (code_, out, err) =
        cli(&["job", "submit", "--tenant", "ml", "--gpus", "1", "-o", "json", "--", "true"], Some(&ml));
    assert_eq!(code_, Some(0), "{err}");
    assert!(out.contains("\"job_id\""), "{out}");
    let (code_, out, err) = cli(&["acl", "token", "list", "-o", "json"], Some(&root));
    assert_eq!(code_, Some(0), "{err}");
    assert!(out.contains("ml-ci") && !out.contains("secret"), "{out}");
    let (code_, out, err) = cli(&["tenant", "usage", "-o", "json"], Some(&ml));
    assert_eq!(code_, Some(0), "{err}");
    let usage: Vec<serde_json::Value> = serde_json::from_str(&out).expect("usage json");
    assert_eq!(usage.iter().map(|t| t["name"].as_str().unwrap_or("")).collect::<Vec<_>>(), vec!["ml"], "{out}");
    let (code_, _, err) = cli(&["cluster", "status"], None);
    assert_eq!(code_, Some(1), "{err}");
    assert!(err.contains("not authenticated"), "{err}");
    let (code_, _, err) = cli(&["cluster", "status"], Some("not-a-token"));
    assert!(code_ == Some(1) && err.contains("not authenticated"), "{err}");
    // A dependency reveals another job's end: only on a job the submitter may read.
    let (code_, out, err) =
        cli(&["job", "submit", "--tenant", "nlp", "--gpus", "1", "-o", "json", "--", "true"], Some(&root));
    assert_eq!(code_, Some(0), "{err}");
    let nlp_job = serde_json::from_str::<serde_json::Value>(&out).expect("json")["job_id"].to_string();
    let (code_, _, err) =
        cli(&["job", "submit", "--tenant", "ml", "--after-ok", &nlp_job, "--gpus", "1", "--", "true"], Some(&ml));
    assert!(code_ == Some(1) && err.contains("permission denied"), "{code_:?} {err}");
    let (code_, out, err) =
        cli(&["job", "submit", "--tenant", "ml", "--gpus", "1", "-o", "json", "--", "true"], Some(&ml));
    assert_eq!(code_, Some(0), "{err}");
    let ml_job = serde_json::from_str::<serde_json::Value>(&out).expect("json")["job_id"].to_string();
    let (code_, _, err) =
        cli(&["job", "submit", "--tenant", "ml", "--after-any", &ml_job, "--gpus", "1", "--", "true"], Some(&ml));
    assert_eq!(code_, Some(0), "a dependency on its own tenant's job: {err}");
    for s in &mut servers {
        s.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn founding_servers_bootstrap_acls_from_a_token_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let c = dir.path().join("certs");
    certs(&c, &["ca"]);
    certs(&c, &["server", "1", "--host", "127.0.0.1"]);
    certs(&c, &["user", "ops"]);
    let secret = "bootstrap-secret-0123456789abcdef";
    let file = dir.path().join("root.token");
    std::fs::write(&file, format!("{secret}\n")).expect("token file");
    let addr = format!("127.0.0.1:{}", free_port());
    let f = |n: &str| c.join(n).display().to_string();
    let args = vec![
        "--initial-cluster".to_string(),
        format!("1={addr}"),
        "--tls-ca".into(),
        f("ca.pem"),
        "--tls-cert".into(),
        f("server-1.pem"),
        "--tls-key".into(),
        f("server-1-key.pem"),
        "--acl-bootstrap-token-file".into(),
        file.display().to_string(),
    ];
    let server = ServerProc::start(1, &addr, &dir.path().join("s1"), &args);
    // The file's secret becomes the first admin token; a second bootstrap is refused.
    let deadline = Instant::now() + Duration::from_secs(30);
    let tokens = loop {
        let r = v1::acl_service_client::AclServiceClient::new(conn(&addr, &c, "user-ops", Some(secret)))
            .list_tokens(v1::ListTokensRequest {})
            .await;
        if let Ok(r) = r {
            break r.into_inner().tokens;
        }
        assert!(Instant::now() < deadline, "the token file's secret never worked: {r:?}\n{}", server.log_tail());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    assert_eq!((tokens[0].role.as_str(), tokens[0].created_by.as_str()), ("admin", "config/acl_bootstrap_token_file"));
    let again = v1::acl_service_client::AclServiceClient::new(conn(&addr, &c, "user-ops", None))
        .bootstrap(v1::AclBootstrapRequest::default())
        .await;
    assert_eq!(code(again), Code::PermissionDenied);
}

/// The helpers the load generator runs its TLS passes with: `Cluster::start_tls` (each server
/// its own certificate files), a client with a certificate from memory (`Tls::from_pem`) through
/// `secure_channel`, and a simulated agent with its own in-memory agent certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_start_tls_with_clients_and_agents_from_memory() {
    use tessera_core::acl::Principal;
    use tessera_tls::issue::{Ca, write_pair};
    use tessera_tls::{Security, Tls};

    let certs = tempfile::tempdir().expect("temp dir");
    let (ca, files) = Ca::create("test CA", 1).expect("ca");
    write_pair(certs.path(), "ca", &files).expect("write ca");
    for id in 1..=3 {
        let issued = ca.issue(&Principal::Server { id }, &["127.0.0.1".into()], 1).expect("server");
        write_pair(certs.path(), &format!("server-{id}"), &issued).expect("write server");
    }
    let from_memory = |who: Principal| {
        let issued = ca.issue(&who, &[], 1).expect("issue");
        Security::Tls(Tls::from_pem(ca.cert_pem(), &issued.cert_pem, &issued.key_pem).expect("from memory"))
    };
    let admin = from_memory(Principal::User {
        name: "admin".into(),
        role: Some(tessera_core::acl::Role::Admin),
        tenants: Default::default(),
        token: None,
    });
    let c = tessera_tests::Cluster::start_tls(3, certs.path(), &[]);
    let addrs = c.running_addrs();
    let leader = tessera_tests::wait_for_leader_with(&admin, &addrs, Duration::from_secs(30)).await;
    let leader = leader.unwrap_or_else(|| panic!("no leader over TLS\n{}", c.logs()));
    assert!(
        tessera_tests::wait_for_leader(&addrs, Duration::from_millis(500)).await.is_none(),
        "a plaintext client got an answer from a TLS server"
    );
    let mut jobs = v1::job_service_client::JobServiceClient::new(tessera_tests::secure_channel(&admin, &addrs[0]));
    let req = v1::SubmitJobRequest { spec: Some(tessera_tests::spec("tls")), idempotency_key: "tls-1".into() };
    jobs.submit_job(req).await.expect("the admin certificate submits");

    // An agent certificate from memory registers its node with the leader.
    let agent = from_memory(Principal::Agent { node: "sim-00000".into() });
    let ch = tessera_tests::secure_channel(&agent, &c.servers[&leader].addr);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let register = v1::agent_message::Payload::Register(tessera_tests::sim_register("sim-00000"));
    tx.send(v1::AgentMessage { seq: 1, payload: Some(register) }).await.expect("queue");
    let mut stream = v1::agent_service_client::AgentServiceClient::new(ch)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("session")
        .into_inner();
    let first = stream.message().await.expect("first message");
    assert!(
        matches!(first, Some(v1::ServerMessage { payload: Some(v1::server_message::Payload::Registered(_)) })),
        "{first:?}"
    );
}
