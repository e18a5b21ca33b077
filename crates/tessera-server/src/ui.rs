//! The web dashboard (`--ui ADDR`): server-rendered pages of the cluster, jobs, queue, nodes
//! and tenants, with a little plain JavaScript that refreshes them. Nothing to install: the
//! pages, their style and script are in the binary.
//!
//! The dashboard is a client of the server's own API: each page calls the services in process
//! (`api::Jobs`, `api::Nodes`, ...) as the signed-in user, so it shows exactly what that user may
//! read through the CLI (the same authorization, the same redaction, reads passed to the leader
//! for live progress and telemetry).
//!
//! Signing in: with TLS, the dashboard is HTTPS with the server's certificate (browsers are not
//! asked for one) and asks for an ACL token (`tessera acl token create`); the token is kept in
//! an HttpOnly, Secure, SameSite=Strict cookie. `/ui/login?token=SECRET&next=/ui/jobs` signs in
//! from a link. A server started with `--insecure` serves plain HTTP and asks nobody, as its API
//! does. Every page only reads.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request as HttpRequest, Response as HttpResponse, StatusCode};
use hyper_util::rt::TokioIo;
use tessera_core::acl::{Principal, Resource, Rpc};
use tessera_proto::v1;
use tessera_proto::v1::cluster_service_server::ClusterService as _;
use tessera_proto::v1::job_service_server::JobService as _;
use tessera_proto::v1::node_service_server::NodeService as _;
use tessera_proto::v1::tenant_service_server::TenantService as _;
use tonic::Status;

use crate::api;
use crate::clock::now;
use crate::context::Shared;

/// The cookie that holds a signed-in user's token.
const COOKIE: &str = "tessera_ui";
const CSS: &str = include_str!("ui/style.css");
const JS: &str = include_str!("ui/app.js");

type Body = Full<Bytes>;

/// Serve the dashboard on `listener` until the task is dropped: HTTPS with the server's
/// certificate when it has TLS, plain HTTP with `--insecure`.
pub async fn serve(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    let tls = match &shared.security {
        tessera_tls::Security::Tls(t) => Some(t.clone()),
        tessera_tls::Security::Insecure => None,
    };
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let (shared, tls) = (shared.clone(), tls.clone());
        tokio::spawn(async move {
            let secure = tls.is_some();
            let service = hyper::service::service_fn(move |req: HttpRequest<Incoming>| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req, secure).await) }
            });
            let http = hyper::server::conn::http1::Builder::new();
            match tls {
                Some(t) => {
                    let accept = t.browser_acceptor().accept(tcp);
                    if let Ok(Ok(stream)) = tokio::time::timeout(std::time::Duration::from_secs(10), accept).await {
                        let _ = http.serve_connection(TokioIo::new(stream), service).await;
                    }
                }
                None => {
                    let _ = http.serve_connection(TokioIo::new(tcp), service).await;
                }
            }
        });
    }
}

/// One page or redirect.
async fn handle(shared: &Arc<Shared>, req: HttpRequest<Incoming>, secure: bool) -> HttpResponse<Body> {
    let path = req.uri().path().to_string();
    let mut query = parse_query(req.uri().query().unwrap_or(""));
    if req.method() == hyper::Method::POST && path == "/ui/login" {
        // The sign-in form posts the token (kept out of the address bar and history).
        use http_body_util::BodyExt as _;
        let body = http_body_util::Limited::new(req.into_body(), 16 * 1024);
        let Ok(body) = body.collect().await else { return plain(StatusCode::PAYLOAD_TOO_LARGE, "form too large") };
        query.extend(parse_query(&String::from_utf8_lossy(&body.to_bytes())));
        return login(shared, &query, secure);
    }
    if req.method() != hyper::Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "the dashboard only reads: GET");
    }
    match path.as_str() {
        "/" | "/ui" | "/ui/" => return redirect("/ui/cluster", None),
        "/ui/login" => return login(shared, &query, secure),
        "/ui/logout" => {
            return redirect("/ui/login", Some(format!("{COOKIE}=; Path=/ui; Max-Age=0; HttpOnly; SameSite=Strict")));
        }
        "/ui/style.css" => return asset("text/css; charset=utf-8", CSS),
        "/ui/app.js" => return asset("text/javascript; charset=utf-8", JS),
        _ => {}
    }
    let who = match signed_in(shared, req.headers()) {
        Ok(p) => p,
        Err(_) => return redirect(&format!("/ui/login?next={}", encode(&path)), None),
    };
    let page = match path.as_str() {
        "/ui/cluster" => cluster_page(shared, &who).await,
        "/ui/jobs" => jobs_page(shared, &who, &query).await,
        "/ui/queue" => queue_page(shared, &who).await,
        "/ui/nodes" => nodes_page(shared, &who).await,
        "/ui/tenants" => tenants_page(shared, &who).await,
        p => match p.strip_prefix("/ui/jobs/").and_then(|id| id.parse::<u64>().ok()) {
            Some(id) => job_page(shared, &who, id).await,
            None => return plain(StatusCode::NOT_FOUND, "no such page"),
        },
    };
    match page {
        Ok((title, body)) => html(StatusCode::OK, &layout(shared, &who, &title, &body)),
        Err(s) => {
            let code = match s.code() {
                tonic::Code::NotFound => StatusCode::NOT_FOUND,
                tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            let body = format!("<p class=error>{}</p>", esc(s.message()));
            html(code, &layout(shared, &who, "Error", &body))
        }
    }
}

/// The principal of a request: its token cookie, or nobody needed on an insecure server.
fn signed_in(shared: &Shared, headers: &hyper::HeaderMap) -> Result<Principal, Status> {
    let token = headers
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| decode(v));
    match token {
        Some(t) if !t.is_empty() => shared.auth.token_principal(&t),
        _ if shared.security.is_tls() || shared.auth.bootstrapped() => {
            Err(Status::unauthenticated("sign in with a token"))
        }
        _ => Ok(Principal::Insecure),
    }
}

fn login(shared: &Shared, query: &BTreeMap<String, String>, secure: bool) -> HttpResponse<Body> {
    // Only a page of the dashboard is a place to go back to.
    let next = query.get("next").filter(|n| n.starts_with("/ui/") && !n.starts_with("/ui/login")).cloned();
    let next = next.unwrap_or_else(|| "/ui/cluster".into());
    let mut note = String::new();
    if let Some(token) = query.get("token").filter(|t| !t.is_empty()) {
        match shared.auth.token_principal(token) {
            Ok(_) => {
                let secure = if secure { "; Secure" } else { "" };
                let cookie = format!("{COOKIE}={}; Path=/ui; HttpOnly; SameSite=Strict{secure}", encode(token));
                return redirect(&next, Some(cookie));
            }
            Err(s) => note = format!("<p class=error>{}</p>", esc(s.message())),
        }
    }
    let body = format!(
        "<main class=login><h1>Tessera</h1>{note}<form method=post action=/ui/login>\
         <label>ACL token <input name=token type=password autocomplete=off autofocus></label>\
         <input type=hidden name=next value=\"{}\"><button>Sign in</button></form>\
         <p class=muted>Create one with <code>tessera acl token create</code>.</p></main>",
        esc(&next)
    );
    html(
        StatusCode::OK,
        &format!(
            "<!doctype html><html lang=en><head><meta charset=utf-8><title>Tessera: sign in</title>\
             <link rel=stylesheet href=/ui/style.css></head><body>{body}</body></html>"
        ),
    )
}

// ----- calling the API as the user ---------------------------------------------------------

fn req<T>(who: &Principal, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.extensions_mut().insert(who.clone());
    r
}

/// The rpc-wide check the gRPC layer makes; handlers check the resource themselves.
fn may(shared: &Shared, who: &Principal, rpc: Rpc) -> Result<(), Status> {
    shared.auth.authorize(who, rpc, Resource::Any)
}

async fn list_jobs(shared: &Arc<Shared>, who: &Principal, r: v1::ListJobsRequest) -> Result<Vec<v1::Job>, Status> {
    may(shared, who, Rpc::ListJobs)?;
    let resp = api::Jobs(shared.clone()).list_jobs(req(who, r)).await?;
    Ok(resp.into_inner().jobs)
}

async fn tenants(shared: &Arc<Shared>, who: &Principal) -> Result<Vec<v1::Tenant>, Status> {
    may(shared, who, Rpc::ListTenants)?;
    Ok(api::Tenants(shared.clone()).list_tenants(req(who, v1::ListTenantsRequest {})).await?.into_inner().tenants)
}

// ----- pages -------------------------------------------------------------------------------

type Page = Result<(String, String), Status>;

async fn cluster_page(shared: &Arc<Shared>, who: &Principal) -> Page {
    may(shared, who, Rpc::ClusterStatus)?;
    let s = api::Cluster(shared.clone()).status(req(who, v1::StatusRequest {})).await?.into_inner();
    let mut b = String::new();
    let leader = s.leader_id.map_or("none".to_string(), |l| format!("server {l}"));
    let term = s.members.iter().map(|m| m.term).max().unwrap_or(0);
    let _ = write!(
        b,
        "<h1>Cluster</h1><p class=summary>Leader: <b id=leader>{leader}</b> · term {term} · {} members · \
         answered by server {}</p>",
        s.members.len(),
        s.responder_id
    );
    b.push_str(
        "<table id=members><thead><tr><th>Server</th><th>Address</th><th>Role</th><th>Kind</th><th>Term</th>\
         <th>Commit</th><th>Applied</th><th>Match</th><th>Health</th><th>Version</th></tr></thead><tbody>",
    );
    for m in &s.members {
        let role = name(v1::MemberRole::try_from(m.role).map(|r| r.as_str_name()), "MEMBER_ROLE_");
        let kind = name(v1::MemberKind::try_from(m.kind).map(|k| k.as_str_name()), "MEMBER_KIND_");
        let health = if m.reachable { "<span class=ok>reachable</span>" } else { "<span class=bad>unreachable</span>" };
        let _ = write!(
            b,
            "<tr class=\"{role}\"><td>{}</td><td>{}</td><td>{role}</td><td>{kind}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{health}</td><td>{}</td></tr>",
            m.id,
            esc(&m.address),
            m.term,
            m.commit_index,
            m.applied_index,
            m.match_index.map_or("-".into(), |x| x.to_string()),
            esc(&m.version)
        );
    }
    b.push_str("</tbody></table>");
    Ok(("Cluster".into(), b))
}

const STATES: [(&str, v1::JobState); 5] = [
    ("pending", v1::JobState::Pending),
    ("running", v1::JobState::Running),
    ("succeeded", v1::JobState::Succeeded),
    ("failed", v1::JobState::Failed),
    ("cancelled", v1::JobState::Cancelled),
];

async fn jobs_page(shared: &Arc<Shared>, who: &Principal, q: &BTreeMap<String, String>) -> Page {
    let state = q.get("state").map(String::as_str).unwrap_or("live");
    let tenant = q.get("tenant").cloned().unwrap_or_default();
    let states: Vec<i32> = STATES.iter().filter(|(n, _)| *n == state).map(|(_, s)| *s as i32).collect();
    let r = v1::ListJobsRequest {
        states,
        tenant: tenant.clone(),
        include_finished: state == "all",
        include_shards: true,
        page_size: 500,
        ..Default::default()
    };
    let jobs = list_jobs(shared, who, r).await?;
    let mut b =
        String::from("<h1>Jobs</h1><form class=filters method=get action=/ui/jobs><label>State <select name=state>");
    for s in ["live", "all"].into_iter().chain(STATES.iter().map(|(n, _)| *n)) {
        let sel = if s == state { " selected" } else { "" };
        let _ = write!(b, "<option{sel}>{s}</option>");
    }
    let _ = write!(
        b,
        "</select></label> <label>Tenant <input name=tenant value=\"{}\"></label> <button>Show</button></form>",
        esc(&tenant)
    );
    if jobs.is_empty() {
        b.push_str("<p class=muted>No jobs.</p>");
        return Ok(("Jobs".into(), b));
    }
    b.push_str(
        "<table id=jobs><thead><tr><th>ID</th><th>Name</th><th>Tenant</th><th>State</th><th>Shards</th><th>GPUs</th>\
         <th>Progress</th><th>Restarts</th><th>Submitted</th><th>Reason or message</th></tr></thead><tbody>",
    );
    for j in &jobs {
        job_row(&mut b, j);
    }
    b.push_str("</tbody></table>");
    Ok(("Jobs".into(), b))
}

fn job_row(b: &mut String, j: &v1::Job) {
    let spec = j.spec.clone().unwrap_or_default();
    let gpus = spec.resources.as_ref().map_or(0, |r| r.gpus) * spec.shards;
    let running = j.shards.iter().filter(|s| s.state == v1::ShardState::Running as i32).count();
    let note = j.pending_reason.as_ref().map(|r| r.message.clone()).unwrap_or_else(|| j.message.clone());
    let st = job_state(j.state);
    let _ = write!(
        b,
        "<tr data-job=\"{id}\"><td><a href=/ui/jobs/{id}>{id}</a></td><td>{}</td><td>{}</td><td class=\"state {st}\">{st}</td>\
         <td>{running}/{}</td><td>{gpus}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        esc(&spec.name),
        esc(&spec.tenant),
        spec.shards,
        progress(&j.shards),
        j.restarts,
        ago(j.submitted_unix_ms),
        esc(&note),
        id = j.id,
    );
}

/// The shards' mean progress as a bar, when they report their total steps.
fn progress(shards: &[v1::Shard]) -> String {
    let with_total: Vec<(u64, u64)> =
        shards.iter().filter_map(|s| s.total_steps.filter(|t| *t > 0).map(|t| (s.step.min(t), t))).collect();
    if with_total.is_empty() {
        let step = shards.iter().map(|s| s.step).max().unwrap_or(0);
        return if step > 0 { format!("step {step}") } else { "-".into() };
    }
    let pct = with_total.iter().map(|(s, t)| *s as f64 / *t as f64).sum::<f64>() / with_total.len() as f64 * 100.0;
    format!("<progress max=100 value=\"{pct:.0}\"></progress> {pct:.0}%")
}

async fn job_page(shared: &Arc<Shared>, who: &Principal, id: u64) -> Page {
    let get = v1::GetJobRequest { job_id: id, consistency: 0 };
    let j = api::Jobs(shared.clone()).get_job(req(who, get)).await?.into_inner().job;
    let j = j.ok_or_else(|| Status::not_found(format!("no job {id}")))?;
    let ev = v1::JobEventsRequest { job_id: id, consistency: 0 };
    let events = api::Jobs(shared.clone()).job_events(req(who, ev)).await?.into_inner();
    let spec = j.spec.clone().unwrap_or_default();
    let res = spec.resources.clone().unwrap_or_default();
    let st = job_state(j.state);
    let mut b = format!(
        "<h1>Job {id}: {}</h1><dl class=facts><dt>State</dt><dd class=\"state {st}\" id=job-state>{st}</dd>\
         <dt>Tenant</dt><dd>{}</dd><dt>Submitted by</dt><dd>{}</dd><dt>Priority</dt><dd>{}</dd>\
         <dt>Shards</dt><dd>{} × {} GPU {}</dd><dt>Command</dt><dd><code>{}</code></dd>\
         <dt>Submitted</dt><dd>{}</dd><dt>Restarts</dt><dd>{}</dd>",
        esc(&spec.name),
        esc(&spec.tenant),
        esc(&j.submitted_by),
        spec.priority.unwrap_or(500),
        spec.shards,
        res.gpus,
        esc(&res.gpu_model),
        esc(&spec.command.join(" ")),
        ago(j.submitted_unix_ms),
        j.restarts
    );
    if let Some(r) = &j.pending_reason {
        let _ = write!(b, "<dt>Waiting</dt><dd>{}</dd>", esc(&r.message));
    }
    if !j.message.is_empty() {
        let _ = write!(b, "<dt>Message</dt><dd>{}</dd>", esc(&j.message));
    }
    b.push_str(
        "</dl><h2>Shards</h2><table id=shards><thead><tr><th>Shard</th><th>State</th><th>Node</th><th>Cloud</th>\
         <th>Attempt</th><th>GPUs</th><th>Step</th><th>Last checkpoint</th><th>Restarts</th></tr></thead><tbody>",
    );
    for s in &j.shards {
        let ss = name(v1::ShardState::try_from(s.state).map(|x| x.as_str_name()), "SHARD_STATE_");
        let step = match s.total_steps {
            Some(t) if t > 0 => {
                format!("<progress max=\"{t}\" value=\"{}\"></progress> {} of {t}", s.step.min(t), s.step)
            }
            _ if s.step > 0 => s.step.to_string(),
            _ => "-".into(),
        };
        let ckpt =
            s.last_checkpoint.as_ref().map_or("-".into(), |c| format!("step {}, {}", c.step, ago(c.time_unix_ms)));
        let cloud = name(v1::Cloud::try_from(s.cloud).map(|c| c.as_str_name()), "CLOUD_");
        let gpus: Vec<String> = s.gpus.iter().map(u32::to_string).collect();
        let _ = write!(
            b,
            "<tr><td>{}</td><td class=\"state {ss}\">{ss}</td><td><a href=/ui/nodes#node-{node}>{node}</a></td>\
             <td>{cloud}/{}</td><td>{}</td><td>{}</td><td>{step}</td><td>{ckpt}</td><td>{}</td></tr>",
            s.index,
            esc(&s.region),
            s.attempt,
            gpus.join(", "),
            s.restarts,
            node = esc(&s.node_name),
        );
    }
    b.push_str("</tbody></table><h2>Events</h2>");
    if events.dropped > 0 {
        let _ = write!(
            b,
            "<p class=muted>{} events in the middle were dropped to keep the history bounded.</p>",
            events.dropped
        );
    }
    b.push_str(
        "<table id=events><thead><tr><th>Time (UTC)</th><th>Shard</th><th>Event</th><th>Message</th></tr></thead><tbody>",
    );
    for e in &events.events {
        let kind = name(v1::JobEventKind::try_from(e.kind).map(|k| k.as_str_name()), "JOB_EVENT_KIND_");
        let _ = write!(
            b,
            "<tr class=\"ev {kind}\"><td>{}</td><td>{}</td><td>{kind}</td><td>{}</td></tr>",
            utc(e.time_unix_ms),
            e.shard_index.map_or("-".into(), |s| s.to_string()),
            esc(&e.message)
        );
    }
    b.push_str("</tbody></table>");
    Ok((format!("Job {id}"), b))
}

async fn queue_page(shared: &Arc<Shared>, who: &Principal) -> Page {
    let r = v1::ListJobsRequest { states: vec![v1::JobState::Pending as i32], page_size: 500, ..Default::default() };
    let mut jobs = list_jobs(shared, who, r).await?;
    // The planner's order: priority, then the tenants' fair share (usage over weight, least
    // first), then submission.
    let share: BTreeMap<String, f64> = tenants(shared, who)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|t| (t.name.clone(), (t.decayed_gpu_hours + t.gpus_in_use as f64) / f64::from(t.weight.max(1))))
        .collect();
    let key = |j: &v1::Job| {
        let spec = j.spec.clone().unwrap_or_default();
        let s = share.get(&spec.tenant).copied().unwrap_or(0.0);
        (std::cmp::Reverse(spec.priority.unwrap_or(500)), (s * 1e9) as u64, j.id)
    };
    jobs.sort_by_key(key);
    let mut b = format!(
        "<h1>Queue</h1><p class=summary>{} jobs waiting, in the order the planner considers them.</p>",
        jobs.len()
    );
    if jobs.is_empty() {
        return Ok(("Queue".into(), b));
    }
    b.push_str(
        "<table id=queue><thead><tr><th>#</th><th>ID</th><th>Name</th><th>Tenant</th><th>Priority</th><th>GPUs</th>\
         <th>Waiting</th><th>Reason</th></tr></thead><tbody>",
    );
    for (i, j) in jobs.iter().enumerate() {
        let spec = j.spec.clone().unwrap_or_default();
        let gpus = spec.resources.as_ref().map_or(0, |r| r.gpus) * spec.shards;
        let (kind, msg) = j.pending_reason.as_ref().map_or(("-".to_string(), String::new()), |r| {
            (
                name(v1::PendingReasonKind::try_from(r.kind).map(|k| k.as_str_name()), "PENDING_REASON_KIND_"),
                r.message.clone(),
            )
        });
        let _ = write!(
            b,
            "<tr data-job=\"{id}\"><td>{}</td><td><a href=/ui/jobs/{id}>{id}</a></td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{gpus}</td><td>{}</td><td><b>{kind}</b> {}</td></tr>",
            i + 1,
            esc(&spec.name),
            esc(&spec.tenant),
            spec.priority.unwrap_or(500),
            ago(j.submitted_unix_ms),
            esc(&msg),
            id = j.id,
        );
    }
    b.push_str("</tbody></table>");
    Ok(("Queue".into(), b))
}

async fn nodes_page(shared: &Arc<Shared>, who: &Principal) -> Page {
    may(shared, who, Rpc::ListNodes)?;
    let r = v1::ListNodesRequest { include_telemetry: true, page_size: 1000, ..Default::default() };
    let nodes = api::Nodes(shared.clone()).list_nodes(req(who, r)).await?.into_inner().nodes;
    let mut groups: BTreeMap<(String, String), Vec<&v1::Node>> = BTreeMap::new();
    for n in &nodes {
        let cloud = name(v1::Cloud::try_from(n.cloud).map(|c| c.as_str_name()), "CLOUD_");
        groups.entry((cloud, n.region.clone())).or_default().push(n);
    }
    let gpus: usize = nodes.iter().map(|n| n.gpus.len()).sum();
    let bad: usize = nodes.iter().map(|n| n.gpus.iter().filter(|g| !healthy(g)).count()).sum();
    let mut b = format!(
        "<h1>Nodes</h1><p class=summary>{} nodes, {gpus} GPUs, {bad} unhealthy. Each cell is a GPU, coloured by \
         utilisation; a cross marks an unhealthy one.</p>",
        nodes.len()
    );
    for ns in groups.values_mut() {
        ns.sort_by(|a, b| a.name.cmp(&b.name));
    }
    for ((cloud, region), ns) in &groups {
        let _ = write!(
            b,
            "<h2>{} / {}</h2><table class=nodes><thead><tr><th>Node</th><th>State</th><th>Instance</th><th>GPUs</th><th>Heat map</th></tr></thead><tbody>",
            esc(cloud),
            esc(region)
        );
        for n in ns {
            let st = name(v1::NodeState::try_from(n.state).map(|s| s.as_str_name()), "NODE_STATE_");
            let used = n.gpus.iter().filter(|g| g.allocation.is_some()).count();
            let spot = if n.spot { " spot" } else { "" };
            let sim = if n.simulated { " <span class=muted>(simulated)</span>" } else { "" };
            let _ = write!(
                b,
                "<tr id=\"node-{nm}\" class=\"node {st}\" data-node=\"{nm}\"><td>{nm}{sim}</td><td class=\"state {st}\">{st}</td>\
                 <td>{}{spot}</td><td>{used}/{} used</td><td class=heat>",
                esc(&n.instance_type),
                n.gpus.len(),
                nm = esc(&n.name),
            );
            for g in &n.gpus {
                gpu_cell(&mut b, g);
            }
            b.push_str("</td></tr>");
            for g in n.gpus.iter().filter(|g| !healthy(g)) {
                let reason = g.health.as_ref().map_or("", |h| h.reason.as_str());
                let _ = write!(
                    b,
                    "<tr class=gpu-fault><td></td><td colspan=4 class=bad data-gpu=\"{}\">GPU {}: {} (since {})</td></tr>",
                    g.index,
                    g.index,
                    esc(reason),
                    ago(g.health.as_ref().map_or(0, |h| h.since_unix_ms))
                );
            }
        }
        b.push_str("</tbody></table>");
    }
    Ok(("Nodes".into(), b))
}

fn healthy(g: &v1::Gpu) -> bool {
    g.health.as_ref().is_none_or(|h| h.healthy)
}

fn gpu_cell(b: &mut String, g: &v1::Gpu) {
    let t = g.telemetry.clone().unwrap_or_default();
    let util = t.utilization_percent.unwrap_or(0).min(100);
    let mem = match (t.memory_used_mib, t.memory_total_mib) {
        (Some(u), Some(total)) => format!("{u}/{total} MiB"),
        _ => "-".into(),
    };
    let temp = t.temperature_c.map_or("-".into(), |c| format!("{c} °C"));
    let job = g.allocation.as_ref().map_or(String::new(), |a| format!(", job {} shard {}", a.job_id, a.shard_index));
    let (class, text) = if healthy(g) { ("gpu", format!("{util}")) } else { ("gpu unhealthy", "✕".to_string()) };
    let reason = g.health.as_ref().filter(|h| !h.healthy).map_or(String::new(), |h| format!(", {}", h.reason));
    // Light to dark orange with utilisation.
    let light = 92 - (util as i32 * 50 / 100);
    let _ = write!(
        b,
        "<span class=\"{class}\" data-gpu=\"{}\" style=\"--l:{light}%\" title=\"GPU {}: {}, {util}% busy, {temp}, {mem}{job}{}\">{text}</span>",
        g.index,
        g.index,
        esc(&g.model),
        esc(&reason)
    );
}

async fn tenants_page(shared: &Arc<Shared>, who: &Principal) -> Page {
    let ts = tenants(shared, who).await?;
    let week = 7 * 24 * 3600 * 1000;
    let usage = match may(shared, who, Rpc::Usage) {
        Ok(()) => {
            let r = v1::UsageRequest {
                since_unix_ms: now().0.saturating_sub(week).max(1),
                group_by: vec![v1::UsageKey::Tenant as i32, v1::UsageKey::Cloud as i32],
                ..Default::default()
            };
            api::Tenants(shared.clone()).usage(req(who, r)).await.map(|r| r.into_inner().rows).unwrap_or_default()
        }
        Err(_) => Vec::new(),
    };
    let weights: u64 = ts.iter().map(|t| u64::from(t.weight)).sum::<u64>().max(1);
    let mut b = String::from(
        "<h1>Tenants</h1><table id=tenants><thead><tr><th>Tenant</th><th>Weight</th><th>Share</th><th>GPUs in use</th>\
         <th>GPU quota</th><th>GPU-hours (decayed)</th><th>GPU-hours in window / quota</th><th>Last 7 days by cloud</th>\
         </tr></thead><tbody>",
    );
    for t in &ts {
        let mine: Vec<String> = usage
            .iter()
            .filter(|r| r.keys.first() == Some(&t.name))
            .map(|r| {
                format!(
                    "{}: {:.2} GPU-h, ${:.2}",
                    r.keys.get(1).map_or("-", String::as_str),
                    r.gpu_hours,
                    r.cost_micros as f64 / 1e6
                )
            })
            .collect();
        let _ = write!(
            b,
            "<tr data-tenant=\"{nm}\"><td>{nm}</td><td>{}</td><td>{:.0}%</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.2} / {}</td><td>{}</td></tr>",
            t.weight,
            f64::from(t.weight) * 100.0 / weights as f64,
            t.gpus_in_use,
            t.gpu_quota.map_or("none".into(), |q| q.to_string()),
            t.decayed_gpu_hours,
            t.window_gpu_hours,
            t.gpu_hours_quota.map_or("none".into(), |q| format!("{q:.0}")),
            if mine.is_empty() { "-".into() } else { esc(&mine.join("; ")) },
            nm = esc(&t.name),
        );
    }
    b.push_str("</tbody></table>");
    Ok(("Tenants".into(), b))
}

// ----- HTML --------------------------------------------------------------------------------

fn layout(shared: &Shared, who: &Principal, title: &str, body: &str) -> String {
    let nav: String = [
        ("Cluster", "/ui/cluster"),
        ("Jobs", "/ui/jobs"),
        ("Queue", "/ui/queue"),
        ("Nodes", "/ui/nodes"),
        ("Tenants", "/ui/tenants"),
    ]
    .iter()
    .map(|(n, href)| format!("<a href={href}>{n}</a>"))
    .collect();
    let me = match who {
        Principal::Insecure => "no sign-in (insecure server)".to_string(),
        p => format!("{} · <a href=/ui/logout>sign out</a>", esc(&p.audit_name())),
    };
    format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport content=\"width=device-width\">\
         <title>Tessera: {t}</title><link rel=stylesheet href=/ui/style.css></head><body data-refresh=5>\
         <header><b class=brand>Tessera</b><nav>{nav}</nav><span class=who>{me}</span></header><main>{body}</main>\
         <footer>server {id} · {at} UTC · <span id=refresh>refreshes every 5 s</span></footer>\
         <script src=/ui/app.js></script></body></html>",
        t = esc(title),
        id = shared.raft.status().id,
        at = utc(now().0),
    )
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// "running" for JOB_STATE_RUNNING (a name this build does not know: "unknown").
fn name(n: Result<&str, impl Sized>, prefix: &str) -> String {
    n.map_or("unknown".into(), |n| n.strip_prefix(prefix).unwrap_or(n).to_ascii_lowercase())
}

fn job_state(v: i32) -> String {
    name(v1::JobState::try_from(v).map(|s| s.as_str_name()), "JOB_STATE_")
}

fn ago(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let s = now().0.saturating_sub(ms) / 1000;
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86_400 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

fn utc(ms: u64) -> String {
    match time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => ms.to_string(),
    }
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn html(code: StatusCode, page: &str) -> HttpResponse<Body> {
    respond(code, "text/html; charset=utf-8", Bytes::from(page.to_string()), None)
}

fn plain(code: StatusCode, text: &str) -> HttpResponse<Body> {
    respond(code, "text/plain; charset=utf-8", Bytes::from(text.to_string()), None)
}

fn asset(kind: &str, text: &'static str) -> HttpResponse<Body> {
    respond(StatusCode::OK, kind, Bytes::from_static(text.as_bytes()), None)
}

fn redirect(to: &str, cookie: Option<String>) -> HttpResponse<Body> {
    let mut r = respond(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", Bytes::new(), cookie);
    if let Ok(v) = hyper::header::HeaderValue::from_str(to) {
        r.headers_mut().insert(hyper::header::LOCATION, v);
    }
    r
}

fn respond(code: StatusCode, kind: &str, body: Bytes, cookie: Option<String>) -> HttpResponse<Body> {
    let mut r = HttpResponse::new(Full::new(body));
    *r.status_mut() = code;
    let h = r.headers_mut();
    if let Ok(v) = hyper::header::HeaderValue::from_str(kind) {
        h.insert(hyper::header::CONTENT_TYPE, v);
    }
    // No framing by other sites, no sniffing, nothing cached: the pages carry a user's view.
    h.insert("x-frame-options", hyper::header::HeaderValue::from_static("DENY"));
    h.insert("x-content-type-options", hyper::header::HeaderValue::from_static("nosniff"));
    h.insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("no-store"));
    h.insert(
        "content-security-policy",
        hyper::header::HeaderValue::from_static("default-src 'self'; style-src 'self' 'unsafe-inline'"),
    );
    if let Some(c) = cookie.and_then(|c| hyper::header::HeaderValue::from_str(&c).ok()) {
        h.insert(hyper::header::SET_COOKIE, c);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_queries_decoded() {
        assert_eq!(esc("<b a=\"x\">&'"), "&lt;b a=&quot;x&quot;&gt;&amp;&#39;");
        let q = parse_query("state=running&tenant=ml%2Fx+y&next=%2Fui%2Fjobs&bad=%zz&empty");
        assert_eq!(q["state"], "running");
        assert_eq!(q["tenant"], "ml/x y");
        assert_eq!(q["next"], "/ui/jobs");
        assert_eq!(q["bad"], "%zz");
        assert_eq!(q["empty"], "");
        assert_eq!(decode(&encode("a b/ü?&")), "a b/ü?&");
        assert_eq!(utc(1_793_491_200_000 + 3_723_000), "2026-11-01 01:02:03");
        assert_eq!(utc(0), "1970-01-01 00:00:00");
    }
}
