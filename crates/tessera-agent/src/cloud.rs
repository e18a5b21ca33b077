//! Cloud metadata: what the AWS and Azure instance metadata services (IMDS) say about this host
//! (region, zone, instance type, spot or not, instance id), and their interruption notices (AWS
//! spot instance-action, Azure Scheduled Events of type Preempt or Terminate).
//!
//! The link-local IMDS address appears only in [`DEFAULT_ENDPOINT`], which [`MetadataClient::new`]
//! uses when the operator gives no endpoint, that is, on a real cloud host. Tests and examples
//! always pass the address of a [`fake`] server on 127.0.0.1, and unit-test builds of this crate
//! refuse to connect to anything but loopback.
//!
//! Every request is one HTTP/1.1 exchange on a fresh connection, with a deadline of
//! [`REQUEST_TIMEOUT`] over connect, request and the whole body, and bodies of at most
//! [`MAX_BODY_BYTES`]. A malformed or hostile answer is a [`CloudError`] naming the path and the
//! field, never a panic.

mod date;
pub mod fake;
mod http;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper::Method;
use hyper::body::Bytes;
use serde_json::Value;

/// The real IMDS address of both clouds. Used only when no endpoint is configured; nothing in
/// tests or examples may use it.
pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
/// Deadline of one metadata request: connect, send, and read the whole answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest answer body read; a longer one is an error.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Longest metadata value kept (region, zone, instance type, ids, event ids).
pub const MAX_VALUE_BYTES: usize = 128;
/// Notice given for an Azure Preempt event whose NotBefore is empty (Azure's minimum for Spot).
pub const AZURE_PREEMPT_DEFAULT_NOTICE: Duration = Duration::from_secs(30);

/// AWS IMDSv2 session token: path, the header asking for a lifetime, and the header carrying it.
pub const AWS_TOKEN_PATH: &str = "/latest/api/token";
/// Header of the token request naming its lifetime in seconds (also echoed in the answer).
pub const AWS_TOKEN_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// Header carrying the token on every metadata request.
pub const AWS_TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// Token lifetime asked for: the maximum, six hours.
pub const AWS_TOKEN_TTL_SECS: u64 = 21_600;
/// AWS metadata paths read by [`MetadataClient::discover`].
pub const AWS_INSTANCE_TYPE: &str = "/latest/meta-data/instance-type";
/// Region, like `us-east-1`.
pub const AWS_REGION: &str = "/latest/meta-data/placement/region";
/// Availability zone, like `us-east-1a`.
pub const AWS_ZONE: &str = "/latest/meta-data/placement/availability-zone";
/// Instance id, like `i-0123456789abcdef0`.
pub const AWS_INSTANCE_ID: &str = "/latest/meta-data/instance-id";
/// Purchasing option: `spot`, `on-demand`, ...
pub const AWS_LIFE_CYCLE: &str = "/latest/meta-data/instance-life-cycle";
/// Spot interruption notice: 404 while there is none.
pub const AWS_INSTANCE_ACTION: &str = "/latest/meta-data/spot/instance-action";

/// Azure instance metadata document.
pub const AZURE_INSTANCE: &str = "/metadata/instance?api-version=2021-02-01";
/// Azure Scheduled Events document (GET) and approvals (POST).
pub const AZURE_EVENTS: &str = "/metadata/scheduledevents?api-version=2020-07-01";

/// Which metadata service the agent asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloudKind {
    /// No cloud: no metadata service, no notices.
    None,
    /// AWS EC2 IMDSv2.
    Aws,
    /// Azure IMDS and Scheduled Events.
    Azure,
}

impl CloudKind {
    /// The name used on the command line: `none`, `aws` or `azure`.
    pub fn as_str(self) -> &'static str {
        match self {
            CloudKind::None => "none",
            CloudKind::Aws => "aws",
            CloudKind::Azure => "azure",
        }
    }
}

impl fmt::Display for CloudKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CloudKind {
    type Err = CloudError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(CloudKind::None),
            "aws" => Ok(CloudKind::Aws),
            "azure" => Ok(CloudKind::Azure),
            other => Err(CloudError::UnknownKind(other.chars().take(64).collect())),
        }
    }
}

/// What the metadata service says about this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudInfo {
    /// Region: `us-east-1`, `eastus`.
    pub region: String,
    /// Availability zone: AWS's own name (`us-east-1a`); on Azure `<location>-<zone>`
    /// (`eastus-2`), and `<location>-0` for a VM placed in no zone (Azure zones are 1, 2, 3).
    pub zone: String,
    /// Instance type: `p5.48xlarge`, `Standard_ND96isr_H100_v5`.
    pub instance_type: String,
    /// Spot (preemptible) capacity: AWS life cycle `spot`; Azure priority `Spot` or `Low`.
    pub spot: bool,
    /// Instance id: AWS `i-...`; Azure `vmId`.
    pub instance_id: String,
}

/// What kind of interruption is coming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NoticeKind {
    /// AWS spot instance-action (terminate, stop or hibernate; the action is in the detail).
    AwsInstanceAction,
    /// Azure Scheduled Event `Preempt` (Spot eviction).
    AzurePreempt,
    /// Azure Scheduled Event `Terminate`.
    AzureTerminate,
}

/// An interruption notice: the host goes away at (or after) the deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// Kind of interruption.
    pub kind: NoticeKind,
    /// When the interruption may start, in Unix milliseconds.
    pub deadline_unix_ms: u64,
    /// Stable id of the notice across polls: Azure's EventId; on AWS `aws:<action>:<time>`.
    pub event_id: String,
    /// Human-readable detail: AWS's action; Azure's type, status and description.
    pub detail: String,
}

/// Why a metadata request failed. Every variant names the path asked, and the field when a
/// value is at fault.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// `--cloud` named something else.
    #[error("cloud '{0}' is not none, aws or azure")]
    UnknownKind(String),
    /// The configured endpoint is not `http://host[:port]`.
    #[error("metadata endpoint '{endpoint}': {message}")]
    Endpoint {
        /// The endpoint as given (at most 64 characters).
        endpoint: String,
        /// What is wrong with it.
        message: String,
    },
    /// Cloud kind `none`: there is no metadata service to ask.
    #[error("cloud is none: there is no metadata service to ask")]
    NoCloud,
    /// Connecting, sending or receiving failed.
    #[error("{path}: {message}")]
    Transport {
        /// Path asked.
        path: String,
        /// What failed.
        message: String,
    },
    /// No complete answer in time.
    #[error("{path}: no complete answer within {ms} ms")]
    Timeout {
        /// Path asked.
        path: String,
        /// The deadline.
        ms: u64,
    },
    /// An HTTP status other than the ones expected.
    #[error("{path}: unexpected HTTP status {status}")]
    Status {
        /// Path asked.
        path: String,
        /// The status.
        status: u16,
    },
    /// The answer body is over [`MAX_BODY_BYTES`].
    #[error("{path}: answer over {limit} bytes")]
    TooLarge {
        /// Path asked.
        path: String,
        /// The limit.
        limit: usize,
    },
    /// The answer is not what the service documents.
    #[error("{path}: {field}: {message}")]
    Malformed {
        /// Path asked.
        path: String,
        /// Field at fault, like `compute.vmSize` or `Events[0].NotBefore`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

fn malformed(path: &str, field: impl Into<String>, message: impl Into<String>) -> CloudError {
    CloudError::Malformed { path: path.to_string(), field: field.into(), message: message.into() }
}

/// A cached IMDSv2 token and when to stop using it.
#[derive(Debug, Clone)]
struct AwsToken {
    value: String,
    renew_at: Instant,
}

impl AwsToken {
    /// A token granted for `ttl_secs` at `now`, renewed a minute before it expires (or halfway
    /// through a lifetime of two minutes or less).
    fn new(value: String, ttl_secs: u64, now: Instant) -> AwsToken {
        let usable = if ttl_secs > 120 { ttl_secs - 60 } else { ttl_secs / 2 };
        AwsToken { value, renew_at: now + Duration::from_secs(usable) }
    }

    fn fresh(&self, now: Instant) -> bool {
        now < self.renew_at
    }
}

/// Client of one cloud's metadata service.
pub struct MetadataClient {
    kind: CloudKind,
    endpoint: String,
    target: http::Target,
    timeout: Duration,
    token: tokio::sync::Mutex<Option<AwsToken>>,
}

impl fmt::Debug for MetadataClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetadataClient")
            .field("kind", &self.kind)
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl MetadataClient {
    /// A client of `kind`'s metadata service at `endpoint` (`http://host[:port]`), or at
    /// [`DEFAULT_ENDPOINT`] when none is given: only a real cloud host should rely on that.
    pub fn new(kind: CloudKind, endpoint: Option<&str>) -> Result<MetadataClient, CloudError> {
        let endpoint = endpoint.unwrap_or(DEFAULT_ENDPOINT);
        let target = http::Target::parse(endpoint)
            .map_err(|message| CloudError::Endpoint { endpoint: endpoint.chars().take(64).collect(), message })?;
        Ok(MetadataClient {
            kind,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            target,
            timeout: REQUEST_TIMEOUT,
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// The same client with another per-request deadline (default [`REQUEST_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> MetadataClient {
        self.timeout = timeout;
        self
    }

    /// Which cloud.
    pub fn kind(&self) -> CloudKind {
        self.kind
    }

    /// The endpoint asked, without a trailing slash.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Region, zone, instance type, spot and instance id of this host.
    /// Cloud kind `none` has nothing to discover: [`CloudError::NoCloud`].
    pub async fn discover(&self) -> Result<CloudInfo, CloudError> {
        match self.kind {
            CloudKind::None => Err(CloudError::NoCloud),
            CloudKind::Aws => self.aws_discover().await,
            CloudKind::Azure => self.azure_discover().await,
        }
    }

    /// The pending interruption notice, if any: AWS's spot instance-action, or Azure's first
    /// Preempt or Terminate Scheduled Event (other event types are ignored). Cloud kind `none`
    /// never has one.
    pub async fn poll_notice(&self) -> Result<Option<Notice>, CloudError> {
        match self.kind {
            CloudKind::None => Ok(None),
            CloudKind::Aws => self.aws_notice().await,
            CloudKind::Azure => self.azure_notice().await,
        }
    }

    /// Tell Azure the host is ready for event `event_id` (checkpoint taken), so it may start
    /// before its NotBefore. AWS and `none` have nothing to approve: a no-op.
    pub async fn acknowledge(&self, event_id: &str) -> Result<(), CloudError> {
        if self.kind != CloudKind::Azure {
            return Ok(());
        }
        let event_id = value(AZURE_EVENTS, "StartRequests[0].EventId", event_id)?;
        let body = serde_json::json!({ "StartRequests": [{ "EventId": event_id }] }).to_string();
        let reply = self
            .send(
                Method::POST,
                AZURE_EVENTS,
                &[("metadata", "true"), ("content-type", "application/json")],
                Some(Bytes::from(body)),
            )
            .await?;
        if !(200..300).contains(&reply.status) {
            return Err(CloudError::Status { path: AZURE_EVENTS.into(), status: reply.status });
        }
        Ok(())
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
    ) -> Result<http::Reply, CloudError> {
        http::request(&self.target, method, path, headers, body, self.timeout).await
    }

    // ---- AWS ----

    /// The cached token, or a new one. The lock is held while fetching so concurrent requests
    /// share one token request.
    async fn aws_token(&self) -> Result<String, CloudError> {
        let mut slot = self.token.lock().await;
        if let Some(t) = slot.as_ref()
            && t.fresh(Instant::now())
        {
            return Ok(t.value.clone());
        }
        let ttl = AWS_TOKEN_TTL_SECS.to_string();
        let reply = self.send(Method::PUT, AWS_TOKEN_PATH, &[(AWS_TOKEN_TTL_HEADER, &ttl)], None).await?;
        if reply.status != 200 {
            return Err(CloudError::Status { path: AWS_TOKEN_PATH.into(), status: reply.status });
        }
        let ttl = reply.headers.get(AWS_TOKEN_TTL_HEADER).map(|v| v.as_bytes());
        let (token, granted) = parse_aws_token(&reply.body, ttl)?;
        *slot = Some(AwsToken::new(token.clone(), granted, Instant::now()));
        Ok(token)
    }

    /// Forget `token` if it is still the cached one (a 401 said it is no longer valid).
    async fn aws_forget(&self, token: &str) {
        let mut slot = self.token.lock().await;
        if slot.as_ref().is_some_and(|t| t.value == token) {
            *slot = None;
        }
    }

    /// GET with the token; on 401 (expired or revoked token) get a new token and retry once.
    async fn aws_get(&self, path: &str) -> Result<http::Reply, CloudError> {
        let token = self.aws_token().await?;
        let reply = self.send(Method::GET, path, &[(AWS_TOKEN_HEADER, &token)], None).await?;
        if reply.status != 401 {
            return Ok(reply);
        }
        self.aws_forget(&token).await;
        let token = self.aws_token().await?;
        self.send(Method::GET, path, &[(AWS_TOKEN_HEADER, &token)], None).await
    }

    /// A plain-text metadata value.
    async fn aws_value(&self, path: &str) -> Result<String, CloudError> {
        let reply = self.aws_get(path).await?;
        if reply.status != 200 {
            return Err(CloudError::Status { path: path.into(), status: reply.status });
        }
        parse_aws_value(path, &reply.body)
    }

    async fn aws_discover(&self) -> Result<CloudInfo, CloudError> {
        let (instance_type, region, zone, instance_id, life_cycle) = tokio::try_join!(
            self.aws_value(AWS_INSTANCE_TYPE),
            self.aws_value(AWS_REGION),
            self.aws_value(AWS_ZONE),
            self.aws_value(AWS_INSTANCE_ID),
            self.aws_value(AWS_LIFE_CYCLE),
        )?;
        // "spot" is spot; "on-demand", "scheduled", "capacity-block" and whatever AWS adds are not.
        Ok(CloudInfo { region, zone, instance_type, spot: life_cycle == "spot", instance_id })
    }

    async fn aws_notice(&self) -> Result<Option<Notice>, CloudError> {
        let path = AWS_INSTANCE_ACTION;
        let reply = self.aws_get(path).await?;
        match reply.status {
            404 => return Ok(None),
            200 => {}
            status => return Err(CloudError::Status { path: path.into(), status }),
        }
        parse_aws_instance_action(&reply.body).map(Some)
    }

    // ---- Azure ----

    async fn azure_get(&self, path: &str) -> Result<Bytes, CloudError> {
        let reply = self.send(Method::GET, path, &[("metadata", "true")], None).await?;
        if reply.status != 200 {
            return Err(CloudError::Status { path: path.into(), status: reply.status });
        }
        Ok(reply.body)
    }

    async fn azure_discover(&self) -> Result<CloudInfo, CloudError> {
        parse_azure_instance(&self.azure_get(AZURE_INSTANCE).await?)
    }

    async fn azure_notice(&self) -> Result<Option<Notice>, CloudError> {
        parse_azure_events(&self.azure_get(AZURE_EVENTS).await?, now_unix_ms())
    }
}

// ---- The answers' parsers: pure, bytes in, so the fuzz targets (crates/tessera-fuzz) and the
// tests reach every check without a server.

/// The IMDSv2 token from the body of a 200 answer to `PUT` [`AWS_TOKEN_PATH`], and the lifetime
/// to use it for: the [`AWS_TOKEN_TTL_HEADER`] the service echoed (`ttl_header`), trusted only to
/// shorten [`AWS_TOKEN_TTL_SECS`].
pub fn parse_aws_token(body: &[u8], ttl_header: Option<&[u8]>) -> Result<(String, u64), CloudError> {
    let token = text(AWS_TOKEN_PATH, "token", body, 4096)?;
    let granted = match ttl_header {
        None => AWS_TOKEN_TTL_SECS,
        Some(v) => std::str::from_utf8(v)
            .ok()
            .filter(|v| v.is_ascii())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| malformed(AWS_TOKEN_PATH, AWS_TOKEN_TTL_HEADER, "is not a number of seconds"))?
            .min(AWS_TOKEN_TTL_SECS),
    };
    Ok((token, granted))
}

/// A plain-text AWS metadata value (instance type, region, zone, id, life cycle) from the body of
/// a 200 answer to `path`; errors name the last segment of the path as the field.
pub fn parse_aws_value(path: &str, body: &[u8]) -> Result<String, CloudError> {
    let field = path.rsplit('/').next().unwrap_or(path);
    text(path, field, body, MAX_VALUE_BYTES)
}

/// The spot interruption notice in the body of a 200 answer to [`AWS_INSTANCE_ACTION`]:
/// `{"action": "terminate", "time": "2026-11-26T12:34:56Z"}`.
pub fn parse_aws_instance_action(body: &[u8]) -> Result<Notice, CloudError> {
    let path = AWS_INSTANCE_ACTION;
    let doc = json(path, body)?;
    if !doc.is_object() {
        return Err(malformed(path, "body", "is not a JSON object"));
    }
    let action = str_field(path, &doc, "action", "action")?.ok_or_else(|| malformed(path, "action", "is missing"))?;
    let action = value(path, "action", action)?;
    let time = str_field(path, &doc, "time", "time")?.ok_or_else(|| malformed(path, "time", "is missing"))?;
    let deadline = date::parse_rfc3339_utc(time).map_err(|m| malformed(path, "time", m))?;
    Ok(Notice {
        kind: NoticeKind::AwsInstanceAction,
        deadline_unix_ms: deadline,
        event_id: format!("aws:{action}:{time}"),
        detail: action,
    })
}

/// The host's placement from the Azure instance metadata document ([`AZURE_INSTANCE`]).
pub fn parse_azure_instance(body: &[u8]) -> Result<CloudInfo, CloudError> {
    let path = AZURE_INSTANCE;
    let doc = json(path, body)?;
    let compute = match doc.get("compute") {
        Some(c) if c.is_object() => c,
        Some(_) => return Err(malformed(path, "compute", "is not an object")),
        None => return Err(malformed(path, "compute", "is missing")),
    };
    let required = |key: &str| -> Result<String, CloudError> {
        let field = format!("compute.{key}");
        let v = str_field(path, compute, key, &field)?.ok_or_else(|| malformed(path, &field, "is missing"))?;
        value(path, &field, v)
    };
    let instance_type = required("vmSize")?;
    let region = required("location")?;
    let instance_id = required("vmId")?;
    let zone = match str_field(path, compute, "zone", "compute.zone")?.unwrap_or("") {
        "" => format!("{region}-0"),
        z => format!("{region}-{}", value(path, "compute.zone", z)?),
    };
    let zone = value(path, "compute.zone", &zone)?;
    let priority = str_field(path, compute, "priority", "compute.priority")?.unwrap_or("");
    let spot = match priority.to_ascii_lowercase().as_str() {
        "spot" | "low" => true,
        "" | "regular" => false,
        _ => {
            return Err(malformed(
                path,
                "compute.priority",
                format!("'{}' is not Spot, Low, Regular or empty", shown(priority)),
            ));
        }
    };
    Ok(CloudInfo { region, zone, instance_type, spot, instance_id })
}

/// The first Preempt or Terminate event of an Azure Scheduled Events document ([`AZURE_EVENTS`]);
/// other event types are ignored. An event with a blank NotBefore has started: its deadline is
/// `now_unix_ms` (plus Azure's minimum notice for a Spot eviction).
pub fn parse_azure_events(body: &[u8], now_unix_ms: u64) -> Result<Option<Notice>, CloudError> {
    let path = AZURE_EVENTS;
    let doc = json(path, body)?;
    if !doc.is_object() {
        return Err(malformed(path, "body", "is not a JSON object"));
    }
    let events = match doc.get("Events") {
        Some(Value::Array(events)) => events,
        Some(_) => return Err(malformed(path, "Events", "is not an array")),
        None => return Err(malformed(path, "Events", "is missing")),
    };
    for (i, event) in events.iter().enumerate() {
        let at = |key: &str| format!("Events[{i}].{key}");
        if !event.is_object() {
            return Err(malformed(path, format!("Events[{i}]"), "is not an object"));
        }
        let event_type = str_field(path, event, "EventType", &at("EventType"))?
            .ok_or_else(|| malformed(path, at("EventType"), "is missing"))?;
        let kind = match event_type {
            "Preempt" => NoticeKind::AzurePreempt,
            "Terminate" => NoticeKind::AzureTerminate,
            _ => continue,
        };
        let event_id = str_field(path, event, "EventId", &at("EventId"))?
            .ok_or_else(|| malformed(path, at("EventId"), "is missing"))?;
        let event_id = value(path, &at("EventId"), event_id)?;
        let not_before = str_field(path, event, "NotBefore", &at("NotBefore"))?.unwrap_or("");
        let deadline_unix_ms = if not_before.is_empty() {
            // Blank NotBefore: the event has started. A Spot eviction still leaves Azure's minimum notice.
            match kind {
                NoticeKind::AzurePreempt => now_unix_ms + AZURE_PREEMPT_DEFAULT_NOTICE.as_millis() as u64,
                _ => now_unix_ms,
            }
        } else {
            date::parse_rfc1123(not_before).map_err(|m| malformed(path, at("NotBefore"), m))?
        };
        let status = str_field(path, event, "EventStatus", &at("EventStatus"))?.unwrap_or("");
        let description = str_field(path, event, "Description", &at("Description"))?.unwrap_or("");
        let mut detail = event_type.to_string();
        if !status.is_empty() {
            detail = format!("{detail} ({})", shown(status));
        }
        if !description.is_empty() {
            detail = format!("{detail}: {}", shown_long(description));
        }
        return Ok(Some(Notice { kind, deadline_unix_ms, event_id, detail }));
    }
    Ok(None)
}

fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Parse a JSON body (serde_json bounds nesting depth, so hostile nesting is an error too).
fn json(path: &str, body: &[u8]) -> Result<Value, CloudError> {
    serde_json::from_slice(body).map_err(|e| malformed(path, "body", format!("is not valid JSON: {e}")))
}

/// `obj[key]` as a string: `None` when absent or null, an error naming `field` when not a string.
fn str_field<'a>(path: &str, obj: &'a Value, key: &str, field: &str) -> Result<Option<&'a str>, CloudError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(malformed(path, field, "is not a string")),
    }
}

/// A UTF-8 body of at most `limit` bytes, surrounding whitespace removed.
fn text(path: &str, field: &str, body: &[u8], limit: usize) -> Result<String, CloudError> {
    let s = std::str::from_utf8(body).map_err(|_| malformed(path, field, "is not UTF-8"))?.trim();
    if s.len() > limit {
        return Err(malformed(path, field, format!("is {} bytes; at most {limit} allowed", s.len())));
    }
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(malformed(path, field, format!("'{}' is empty or has spaces or control characters", shown(s))));
    }
    Ok(s.to_string())
}

/// A short identifier-like value (region, zone, type, id): 1..=128 printable ASCII, no spaces.
fn value(path: &str, field: &str, v: &str) -> Result<String, CloudError> {
    if v.len() > MAX_VALUE_BYTES {
        return Err(malformed(path, field, format!("is {} bytes; at most {MAX_VALUE_BYTES} allowed", v.len())));
    }
    if v.is_empty() || !v.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(malformed(path, field, format!("'{}' is empty or has spaces or control characters", shown(v))));
    }
    Ok(v.to_string())
}

/// At most 64 characters of an untrusted string, control characters blanked.
fn shown(s: &str) -> String {
    clip(s, 64)
}

/// At most 200 characters of an untrusted description, control characters blanked.
fn shown_long(s: &str) -> String {
    clip(s, 200)
}

fn clip(s: &str, n: usize) -> String {
    s.chars().take(n).map(|c| if c.is_control() { ' ' } else { c }).collect()
}
