//! Fake AWS and Azure metadata services: a test fixture, compiled always so that integration
//! tests and local fleets can use it. Each serves HTTP/1.1 on 127.0.0.1 at an ephemeral port,
//! answers with the shapes of the real documents, enforces what the real service enforces (AWS:
//! an IMDSv2 token on every request, else 401; Azure: the `Metadata: true` header, else 400),
//! and stops serving when dropped. Start one inside a Tokio runtime.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;

use super::{AWS_TOKEN_HEADER, AWS_TOKEN_PATH, AWS_TOKEN_TTL_HEADER};

/// Largest request body the fakes read.
const MAX_REQUEST_BODY: usize = 64 * 1024;

/// A request, read whole.
struct FakeRequest {
    method: Method,
    path: String,
    query: String,
    headers: HeaderMap,
    body: Bytes,
}

impl FakeRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

type Handler = Arc<dyn Fn(&FakeRequest) -> Response<Full<Bytes>> + Send + Sync>;

/// The accept loop; aborting it drops the listener and every connection.
struct Server {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(handler: Handler) -> std::io::Result<Server> {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let handler = handler.clone();
                    conns.spawn(async move {
                        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                            let handler = handler.clone();
                            async move { Ok::<_, Infallible>(answer(&handler, req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    });
    Ok(Server { addr, task })
}

async fn answer(handler: &Handler, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let Ok(body) = Limited::new(body, MAX_REQUEST_BODY).collect().await else {
        return reply(413, "text/plain", "request body too large\n");
    };
    let req = FakeRequest {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or("").to_string(),
        headers: parts.headers,
        body: body.to_bytes(),
    };
    handler(&req)
}

fn reply(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Raw answers that replace a path's normal one (after the token or header check).
type Overrides = HashMap<String, (u16, Bytes)>;

// ---------------------------------------------------------------- AWS

/// What the fake AWS host says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsIdentity {
    /// `instance-type`.
    pub instance_type: String,
    /// `placement/region`.
    pub region: String,
    /// `placement/availability-zone`.
    pub zone: String,
    /// `instance-id`.
    pub instance_id: String,
    /// `instance-life-cycle`: `spot` or `on-demand`.
    pub life_cycle: String,
}

impl Default for AwsIdentity {
    fn default() -> Self {
        AwsIdentity {
            instance_type: "p5.48xlarge".into(),
            region: "us-east-1".into(),
            zone: "us-east-1a".into(),
            instance_id: "i-0fa4e1c0ffee12345".into(),
            life_cycle: "spot".into(),
        }
    }
}

#[derive(Default)]
struct AwsState {
    identity: AwsIdentity,
    /// (action, time) of the posted spot instance-action.
    action: Option<(String, String)>,
    tokens: HashMap<String, Instant>,
    token_requests: usize,
    unauthorized: usize,
    overrides: Overrides,
}

/// Fake AWS IMDSv2 on 127.0.0.1.
pub struct FakeAws {
    state: Arc<Mutex<AwsState>>,
    server: Server,
}

impl FakeAws {
    /// Start serving on 127.0.0.1 at an ephemeral port, with [`AwsIdentity::default`].
    pub async fn start() -> std::io::Result<FakeAws> {
        let state = Arc::new(Mutex::new(AwsState::default()));
        let s = state.clone();
        let server = serve(Arc::new(move |req: &FakeRequest| aws_answer(&mut lock(&s), req))).await?;
        Ok(FakeAws { state, server })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    /// Replace what the host says about itself.
    pub fn set_identity(&self, identity: AwsIdentity) {
        lock(&self.state).identity = identity;
    }

    /// Post a spot interruption: `action` (`terminate`, `stop`, `hibernate`) at `time`
    /// (`YYYY-MM-DDTHH:MM:SSZ`; any string, to test malformed ones).
    pub fn post_instance_action(&self, action: &str, time: &str) {
        lock(&self.state).action = Some((action.to_string(), time.to_string()));
    }

    /// Withdraw the spot interruption: `spot/instance-action` is 404 again.
    pub fn clear_instance_action(&self) {
        lock(&self.state).action = None;
    }

    /// Invalidate every token issued so far, as if they had expired.
    pub fn expire_tokens(&self) {
        lock(&self.state).tokens.clear();
    }

    /// How many tokens were issued.
    pub fn token_requests(&self) -> usize {
        lock(&self.state).token_requests
    }

    /// How many requests were refused with 401 (no, unknown or expired token).
    pub fn unauthorized_requests(&self) -> usize {
        lock(&self.state).unauthorized
    }

    /// Answer `path` (no query) with `status` and `body` instead, to a request with a valid token.
    pub fn override_path(&self, path: &str, status: u16, body: impl Into<Bytes>) {
        lock(&self.state).overrides.insert(path.to_string(), (status, body.into()));
    }
}

fn aws_answer(st: &mut AwsState, req: &FakeRequest) -> Response<Full<Bytes>> {
    let now = Instant::now();
    st.tokens.retain(|_, expiry| *expiry > now);
    if req.path == AWS_TOKEN_PATH {
        if req.method != Method::PUT {
            return reply(405, "text/plain", "");
        }
        let ttl = req.header(AWS_TOKEN_TTL_HEADER).and_then(|v| v.parse::<u64>().ok());
        let Some(ttl) = ttl.filter(|t| (1..=21_600).contains(t)) else {
            return reply(400, "text/plain", "");
        };
        st.token_requests += 1;
        let token = format!("fake-imdsv2-token-{}", st.token_requests);
        st.tokens.insert(token.clone(), now + Duration::from_secs(ttl));
        let mut resp = reply(200, "text/plain", token);
        resp.headers_mut().insert(AWS_TOKEN_TTL_HEADER, ttl.into());
        return resp;
    }
    if req.method != Method::GET {
        return reply(405, "text/plain", "");
    }
    if !req.header(AWS_TOKEN_HEADER).is_some_and(|t| st.tokens.contains_key(t)) {
        st.unauthorized += 1;
        return reply(401, "text/plain", "");
    }
    if let Some((status, body)) = st.overrides.get(&req.path) {
        return reply(*status, "text/plain", body.clone());
    }
    let id = &st.identity;
    let value = match req.path.as_str() {
        super::AWS_INSTANCE_TYPE => &id.instance_type,
        super::AWS_REGION => &id.region,
        super::AWS_ZONE => &id.zone,
        super::AWS_INSTANCE_ID => &id.instance_id,
        super::AWS_LIFE_CYCLE => &id.life_cycle,
        super::AWS_INSTANCE_ACTION => {
            return match &st.action {
                Some((action, time)) => reply(200, "text/plain", json!({ "action": action, "time": time }).to_string()),
                None => reply(404, "text/html", "<html><body><h1>404 - Not Found</h1></body></html>"),
            };
        }
        _ => return reply(404, "text/html", "<html><body><h1>404 - Not Found</h1></body></html>"),
    };
    reply(200, "text/plain", value.clone())
}

// ---------------------------------------------------------------- Azure

/// What the fake Azure VM says about itself (`compute.*` of the instance document).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzureIdentity {
    /// `compute.name`.
    pub name: String,
    /// `compute.vmSize`.
    pub vm_size: String,
    /// `compute.location`.
    pub location: String,
    /// `compute.zone`: `1`, `2`, `3` or empty.
    pub zone: String,
    /// `compute.vmId`.
    pub vm_id: String,
    /// `compute.priority`: `Spot`, `Low`, `Regular` or empty.
    pub priority: String,
}

impl Default for AzureIdentity {
    fn default() -> Self {
        AzureIdentity {
            name: "tessera-gpu-0".into(),
            vm_size: "Standard_ND96isr_H100_v5".into(),
            location: "eastus".into(),
            zone: "2".into(),
            vm_id: "02aab8a4-74ef-476e-8182-f6d2ba4166a6".into(),
            priority: "Spot".into(),
        }
    }
}

/// A scheduled event as the fake holds it.
#[derive(Debug, Clone)]
struct FakeEvent {
    id: String,
    event_type: String,
    status: &'static str,
    not_before: String,
}

#[derive(Default)]
struct AzureState {
    identity: AzureIdentity,
    incarnation: u64,
    events: Vec<FakeEvent>,
    acknowledged: Vec<String>,
    rejected: usize,
    overrides: Overrides,
}

/// Fake Azure IMDS and Scheduled Events on 127.0.0.1.
pub struct FakeAzure {
    state: Arc<Mutex<AzureState>>,
    server: Server,
}

impl FakeAzure {
    /// Start serving on 127.0.0.1 at an ephemeral port, with [`AzureIdentity::default`].
    pub async fn start() -> std::io::Result<FakeAzure> {
        let state = Arc::new(Mutex::new(AzureState::default()));
        let s = state.clone();
        let server = serve(Arc::new(move |req: &FakeRequest| azure_answer(&mut lock(&s), req))).await?;
        Ok(FakeAzure { state, server })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    /// Replace what the VM says about itself.
    pub fn set_identity(&self, identity: AzureIdentity) {
        lock(&self.state).identity = identity;
    }

    /// Schedule an event of any type (`Preempt`, `Terminate`, `Reboot`, `Redeploy`, `Freeze`)
    /// not before `not_before` (RFC 1123, or empty for one already started; any string, to test
    /// malformed ones).
    pub fn post_event(&self, event_id: &str, event_type: &str, not_before: &str) {
        let mut st = lock(&self.state);
        st.incarnation += 1;
        let status = if not_before.is_empty() { "Started" } else { "Scheduled" };
        st.events.push(FakeEvent {
            id: event_id.to_string(),
            event_type: event_type.to_string(),
            status,
            not_before: not_before.to_string(),
        });
    }

    /// Schedule a Spot eviction.
    pub fn post_preempt(&self, event_id: &str, not_before: &str) {
        self.post_event(event_id, "Preempt", not_before);
    }

    /// Schedule a termination.
    pub fn post_terminate(&self, event_id: &str, not_before: &str) {
        self.post_event(event_id, "Terminate", not_before);
    }

    /// Remove every event.
    pub fn clear_events(&self) {
        let mut st = lock(&self.state);
        st.incarnation += 1;
        st.events.clear();
    }

    /// Event ids approved through `StartRequests`, in order.
    pub fn acknowledged(&self) -> Vec<String> {
        lock(&self.state).acknowledged.clone()
    }

    /// How many requests were refused with 400 for lacking `Metadata: true` or an api-version.
    pub fn rejected_requests(&self) -> usize {
        lock(&self.state).rejected
    }

    /// Answer `path` (no query) with `status` and `body` instead, to a well-formed request.
    pub fn override_path(&self, path: &str, status: u16, body: impl Into<Bytes>) {
        lock(&self.state).overrides.insert(path.to_string(), (status, body.into()));
    }
}

const INSTANCE_PATH: &str = "/metadata/instance";
const EVENTS_PATH: &str = "/metadata/scheduledevents";

fn azure_answer(st: &mut AzureState, req: &FakeRequest) -> Response<Full<Bytes>> {
    let bad = |st: &mut AzureState, why: &str| {
        st.rejected += 1;
        reply(400, "application/json", json!({ "error": why }).to_string())
    };
    if req.header("metadata") != Some("true") {
        return bad(st, "Bad request. Required metadata header not specified");
    }
    if !req.query.split('&').any(|kv| kv.strip_prefix("api-version=").is_some_and(|v| !v.is_empty())) {
        return bad(st, "Bad request. api-version was not specified in the request");
    }
    if let Some((status, body)) = st.overrides.get(&req.path) {
        return reply(*status, "application/json", body.clone());
    }
    match (req.path.as_str(), &req.method) {
        (INSTANCE_PATH, &Method::GET) => {
            let id = &st.identity;
            let doc = json!({
                "compute": {
                    "azEnvironment": "AzurePublicCloud",
                    "location": id.location,
                    "name": id.name,
                    "osType": "Linux",
                    "priority": id.priority,
                    "provider": "Microsoft.Compute",
                    "vmId": id.vm_id,
                    "vmSize": id.vm_size,
                    "zone": id.zone,
                },
                "network": { "interface": [] },
            });
            reply(200, "application/json", doc.to_string())
        }
        (EVENTS_PATH, &Method::GET) => {
            let events: Vec<_> = st
                .events
                .iter()
                .map(|e| {
                    json!({
                        "EventId": e.id,
                        "EventStatus": e.status,
                        "EventType": e.event_type,
                        "ResourceType": "VirtualMachine",
                        "Resources": [st.identity.name],
                        "NotBefore": e.not_before,
                        "Description": format!("{} scheduled by the fake", e.event_type),
                        "EventSource": "Platform",
                        "DurationInSeconds": -1,
                    })
                })
                .collect();
            let doc = json!({ "DocumentIncarnation": st.incarnation, "Events": events });
            reply(200, "application/json", doc.to_string())
        }
        (EVENTS_PATH, &Method::POST) => {
            let ids: Option<Vec<String>> = serde_json::from_slice::<serde_json::Value>(&req.body)
                .ok()
                .and_then(|v| v.get("StartRequests")?.as_array().cloned())
                .and_then(|reqs| reqs.iter().map(|r| Some(r.get("EventId")?.as_str()?.to_string())).collect());
            let Some(ids) = ids else {
                return bad(st, "Bad request. StartRequests is malformed");
            };
            for id in ids {
                if let Some(e) = st.events.iter_mut().find(|e| e.id == id) {
                    e.status = "Started";
                    e.not_before.clear();
                }
                st.acknowledged.push(id);
            }
            st.incarnation += 1;
            reply(200, "application/json", "")
        }
        (INSTANCE_PATH | EVENTS_PATH, _) => reply(405, "application/json", ""),
        _ => reply(404, "application/json", json!({ "error": "Not found" }).to_string()),
    }
}
