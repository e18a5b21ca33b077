//! Reaching the servers: every address in turn, skipping those that are down or have no leader,
//! and turning gRPC statuses into errors a person understands.

use std::future::Future;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::CliError;

/// The servers tried when neither `--server` nor `TESSERA_SERVER` names any: the README's
/// three-server cluster on this machine.
pub const DEFAULT_SERVERS: [&str; 3] = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"];

/// How long to wait for a TCP connection to one server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a unary call may take on one server before the next is tried. The servers give up
/// on a write after about ten seconds themselves.
pub const UNARY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`Servers::call_repeatable`] keeps trying while the servers answer UNAVAILABLE:
/// an election takes about a second, a few under load.
pub const FAILOVER_WAIT: Duration = Duration::from_secs(15);

/// What a call on one server can end in, besides success.
#[derive(Debug)]
pub enum RpcError {
    /// The server answered with this status; UNAVAILABLE moves on to the next server.
    Status(Status),
    /// A failure that another server would not fix (a bad file, a not-found, a bad answer).
    Fatal(CliError),
}

impl From<Status> for RpcError {
    fn from(s: Status) -> Self {
        RpcError::Status(s)
    }
}

impl From<CliError> for RpcError {
    fn from(e: CliError) -> Self {
        RpcError::Fatal(e)
    }
}

/// A mapper for call results: NOT_FOUND becomes "`what` not found" (exit 3); other statuses
/// pass through.
pub fn about(what: impl Into<String>) -> impl FnOnce(Status) -> RpcError {
    let what = what.into();
    move |s| {
        if s.code() == Code::NotFound {
            RpcError::Fatal(CliError::NotFound(format!("{what} not found")))
        } else {
            RpcError::Status(s)
        }
    }
}

/// A connection to one server, with the token (if any) on every call.
pub type Conn = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <secret>` to every request.
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The addresses to try, in order, and how to talk to them.
#[derive(Debug, Clone)]
pub struct Servers {
    addrs: Vec<(String, Endpoint)>,
    security: tessera_tls::Security,
    bearer: Bearer,
}

/// TLS (or not) from the client options: all of --ca/--cert/--key, or --insecure.
pub fn security(o: &super::ClientOpts) -> Result<tessera_tls::Security, CliError> {
    match (&o.ca, &o.cert, &o.key, o.insecure) {
        (None, None, None, true) => Ok(tessera_tls::Security::Insecure),
        (_, _, _, true) => Err(CliError::Invalid("--insecure: give either it or --ca/--cert/--key, not both".into())),
        (Some(ca), Some(cert), Some(key), false) => {
            let files = tessera_tls::TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() };
            tessera_tls::Tls::load(files)
                .map(tessera_tls::Security::Tls)
                .map_err(|e| CliError::Invalid(format!("--ca/--cert/--key: {e}")))
        }
        _ => Err(CliError::Invalid(
            "the servers use mutual TLS: give --ca, --cert and --key (or $TESSERA_CA, $TESSERA_CERT, \
             $TESSERA_KEY; `tessera dev` prints them), or --insecure for servers started with --insecure"
                .into(),
        )),
    }
}

impl Servers {
    /// The servers, TLS and token the client options name.
    pub fn from_opts(o: &super::ClientOpts) -> Result<Servers, CliError> {
        let mut s = Servers::new(&o.server)?;
        s.security = security(o)?;
        if let Some(t) = o.token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
            let v = format!("Bearer {t}")
                .parse()
                .map_err(|_| CliError::Invalid("--token: not a token secret (printable ASCII)".into()))?;
            s.bearer = Bearer(Some(v));
        }
        Ok(s)
    }

    /// Check the addresses (`HOST:PORT`, or `http://HOST:PORT`); empty means the defaults.
    pub fn new(list: &[String]) -> Result<Servers, CliError> {
        let given: Vec<String> = list.iter().map(|a| a.trim().to_string()).filter(|a| !a.is_empty()).collect();
        let list: Vec<String> =
            if given.is_empty() { DEFAULT_SERVERS.iter().map(|s| s.to_string()).collect() } else { given };
        let mut addrs = Vec::new();
        for a in list {
            let uri = if a.contains("://") { a.clone() } else { format!("http://{a}") };
            let bad = || CliError::Invalid(format!("--server: '{a}' is not an address like 127.0.0.1:7001"));
            let parsed: tonic::codegen::http::Uri = uri.parse().map_err(|_| bad())?;
            if parsed.host().is_none_or(str::is_empty) || parsed.port_u16().is_none() {
                return Err(bad());
            }
            let ep = Endpoint::from_shared(uri).map_err(|_| bad())?.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true);
            addrs.push((a, ep));
        }
        Ok(Servers { addrs, security: tessera_tls::Security::Insecure, bearer: Bearer::default() })
    }

    /// The addresses, as given.
    #[cfg(test)]
    pub fn addresses(&self) -> Vec<&str> {
        self.addrs.iter().map(|(a, _)| a.as_str()).collect()
    }

    /// Run `f` against the first server that answers. A server that cannot be connected to,
    /// that does not answer within `timeout`, or that answers UNAVAILABLE is skipped for the
    /// next; any other status ends the call with the matching error.
    pub async fn call<T, F, Fut>(&self, timeout: Option<Duration>, mut f: F) -> Result<T, CliError>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = Result<T, RpcError>>,
    {
        self.round(timeout, &mut f, false).await.map_err(|(e, _)| e)
    }

    /// Like [`Servers::call`], for calls that may safely run twice (reads, and writes with an
    /// idempotency key): while some server answered UNAVAILABLE (an election is running, or a
    /// write's leader died before it applied), every server is tried again, for up to
    /// [`FAILOVER_WAIT`]. A connection that breaks during the call (the server died) also
    /// moves on to the next server. Where no server could be reached at all, it fails at once.
    pub async fn call_repeatable<T, F, Fut>(&self, timeout: Option<Duration>, mut f: F) -> Result<T, CliError>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = Result<T, RpcError>>,
    {
        let deadline = std::time::Instant::now() + FAILOVER_WAIT;
        let mut pause = Duration::from_millis(50);
        loop {
            match self.round(timeout, &mut f, true).await {
                Ok(v) => return Ok(v),
                Err((e, true)) if std::time::Instant::now() + pause < deadline => {
                    tracing::debug!(error = %e, "no server could answer; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(250));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// One pass over the servers; on failure, the error and whether a server answered (so a
    /// later pass may succeed). `repeatable`: a broken connection moves on too.
    async fn round<T, F, Fut>(
        &self,
        timeout: Option<Duration>,
        f: &mut F,
        repeatable: bool,
    ) -> Result<T, (CliError, bool)>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = Result<T, RpcError>>,
    {
        let mut failures = Vec::new();
        let mut all_connect = true;
        for (addr, ep) in &self.addrs {
            let channel = match self.security.connect(ep).await {
                Ok(c) => Conn::new(c, self.bearer.clone()),
                Err(e) => {
                    failures.push(format!("{addr} ({})", describe_transport(&e)));
                    continue;
                }
            };
            let fut = f(channel);
            let result = match timeout {
                Some(t) => match tokio::time::timeout(t, fut).await {
                    Ok(r) => r,
                    Err(_) => {
                        all_connect = false;
                        failures.push(format!("{addr} (no answer within {} s)", t.as_secs()));
                        continue;
                    }
                },
                None => fut.await,
            };
            match result {
                Ok(v) => return Ok(v),
                Err(RpcError::Status(s)) if retryable(&s) || (repeatable && broken(&s)) => {
                    all_connect = false;
                    failures.push(format!("{addr} ({})", describe_status(&s)));
                }
                Err(RpcError::Status(s)) => return Err((status_error(&s), false)),
                Err(RpcError::Fatal(e)) => return Err((e, false)),
            }
        }
        let what = if all_connect { "could not reach any server" } else { "no server could answer" };
        Err((CliError::Failed(format!("{what}: {}", failures.join(", "))), !all_connect))
    }
}

/// Is this a status another server may answer differently?
pub fn retryable(s: &Status) -> bool {
    s.code() == Code::Unavailable
}

/// Did the connection break during the call (tonic's "transport error": the server died or
/// reset it)? Whether the call took effect is unknown, so only a repeatable call moves on.
pub fn broken(s: &Status) -> bool {
    matches!(s.code(), Code::Unknown | Code::Cancelled) && s.message().contains("transport error")
        || s.code() == Code::Cancelled && s.message().contains("h2 protocol error")
}

/// A short description of a status, for lists of failures.
pub fn describe_status(s: &Status) -> String {
    let m = s.message().trim();
    if m.is_empty() { code_name(s.code()).to_string() } else { format!("{}: {m}", code_name(s.code())) }
}

/// The error a status means, for a status that another server would not change.
pub fn status_error(s: &Status) -> CliError {
    let m = s.message().trim().to_string();
    match s.code() {
        Code::InvalidArgument => CliError::Invalid(format!("the servers refused the request: {m}")),
        Code::NotFound => CliError::NotFound(if m.is_empty() { "not found".into() } else { m }),
        Code::FailedPrecondition => CliError::Failed(m),
        Code::DeadlineExceeded => CliError::Failed(format!("timed out: {m}")),
        Code::PermissionDenied => CliError::Failed(format!("permission denied: {m}")),
        Code::Unauthenticated => {
            CliError::Failed(format!("not authenticated: {m} (give --token, or a user certificate)"))
        }
        code => CliError::Failed(format!("server error ({}): {m}", code_name(code))),
    }
}

fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// Why a connection failed, in a few words: "connection refused", "timed out", ...
fn describe_transport(e: &tonic::transport::Error) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    let mut deepest = e.to_string();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return match io.kind() {
                ConnectionRefused => "connection refused".into(),
                TimedOut => "timed out".into(),
                ConnectionReset => "connection reset".into(),
                HostUnreachable => "host unreachable".into(),
                NetworkUnreachable => "network unreachable".into(),
                AddrNotAvailable => "address not available".into(),
                _ => io.to_string(),
            };
        }
        deepest = s.to_string();
        source = s.source();
    }
    if deepest.contains("timed out") || deepest.contains("elapsed") { "timed out".into() } else { deepest }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked_and_default_to_the_readme_cluster() {
        let s = Servers::new(&[]).unwrap();
        assert_eq!(s.addresses(), DEFAULT_SERVERS.to_vec());
        let s = Servers::new(&["127.0.0.1:1".into(), " localhost:7002 ".into(), "http://[::1]:9".into()]).unwrap();
        assert_eq!(s.addresses(), vec!["127.0.0.1:1", "localhost:7002", "http://[::1]:9"]);
        for bad in ["127.0.0.1", "not an address:1", ":7001"] {
            assert!(matches!(Servers::new(&[bad.into()]), Err(CliError::Invalid(_))), "{bad}");
        }
    }

    #[test]
    fn statuses_map_to_the_documented_errors() {
        assert!(
            matches!(status_error(&Status::invalid_argument("spec.shards: bad")), CliError::Invalid(m) if m.contains("spec.shards"))
        );
        assert!(matches!(status_error(&Status::not_found("no job 4")), CliError::NotFound(_)));
        assert!(
            matches!(status_error(&Status::internal("boom")), CliError::Failed(m) if m == "server error (internal): boom")
        );
        assert!(retryable(&Status::unavailable("no leader")));
        assert!(!retryable(&Status::internal("x")));
        assert!(broken(&Status::unknown("transport error")));
        assert!(!broken(&Status::unknown("the handler failed")));
        assert!(!broken(&Status::unavailable("transport error")), "UNAVAILABLE is retryable anyway");
        match about("job 7")(Status::not_found("no job 7")) {
            RpcError::Fatal(CliError::NotFound(m)) => assert_eq!(m, "job 7 not found"),
            other => panic!("{other:?}"),
        }
    }

    /// A call that may run twice goes round the servers again while they answer UNAVAILABLE
    /// (an election); one that may not gives up after one round.
    #[tokio::test]
    async fn repeatable_calls_go_round_again_while_servers_are_unavailable() {
        // A server that accepts connections; the calls below answer for it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        let s = Servers::new(std::slice::from_ref(&addr)).unwrap();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let answer = || {
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { if n < 2 { Err(RpcError::Status(Status::unavailable("no leader"))) } else { Ok(n) } }
        };
        let once: Result<usize, CliError> = s.call(None, |_ch| answer()).await;
        assert!(matches!(&once, Err(CliError::Failed(m)) if m.contains("no server could answer")), "{once:?}");
        calls.store(0, std::sync::atomic::Ordering::SeqCst);
        let again = s.call_repeatable(None, |_ch| answer()).await;
        assert_eq!(again.unwrap(), 2, "answered on the third round");
        // Other statuses are final at once.
        let refused: Result<(), CliError> =
            s.call_repeatable(None, |_ch| async { Err(RpcError::Status(Status::not_found("no job"))) }).await;
        assert!(matches!(refused, Err(CliError::NotFound(_))));
        server.abort();
    }

    #[tokio::test]
    async fn a_dead_address_is_skipped_and_named() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
        let s = Servers::new(std::slice::from_ref(&dead)).unwrap();
        let r: Result<(), CliError> = s.call(None, |_ch| async { Ok(()) }).await;
        match r {
            Err(CliError::Failed(m)) => {
                assert_eq!(m, format!("could not reach any server: {dead} (connection refused)"));
            }
            other => panic!("{other:?}"),
        }
    }
}
