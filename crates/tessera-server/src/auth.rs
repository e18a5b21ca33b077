//! Authentication and authorization of every request, in one tower layer.
//!
//! [`AuthLayer`] wraps all the services of a server. For each request it:
//! 1. names the rpc from the path ([`Rpc::from_path`]); a path no service serves is refused;
//! 2. finds the principal ([`Auth::authenticate`]): the identity in the client certificate
//!    (parsed once per connection by the acceptor), replaced by a bearer token's when a user
//!    certificate sends one, or the user a server forwards a request for;
//! 3. asks the pure [`tessera_core::acl::authorize`] whether that principal may call the rpc at
//!    all; handlers ask it again once they know the resource (a job's tenant, the node an agent
//!    registers), through `Shared::authorize`;
//! 4. puts the principal in the request's extensions, and after the response counts
//!    `tessera_rpc_total{rpc,outcome}` and writes an audit event (target `tessera::audit`) for
//!    every write and every refusal: who, what, resource, outcome.
//!
//! Tokens are found through an index of their secret hashes, refreshed by the state machine
//! whenever a token is created or revoked, so a check costs a hash and a map lookup, not a
//! trip through the Raft thread.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};

use tessera_core::acl::{Acl, Denied, Principal, Resource, Rpc, Token, authorize, secret_hash};
use tessera_tls::PeerInfo;
use tonic::Status;
use tonic::metadata::{MetadataMap, MetadataValue};

use crate::clock::now;

/// Header carrying the principal a server forwards a request for (JSON).
pub const ON_BEHALF: &str = "x-tessera-on-behalf";

/// Put `p` on a forwarded request.
pub fn set_on_behalf(meta: &mut MetadataMap, p: &Principal) {
    if let Ok(json) = serde_json::to_string(p)
        && let Ok(v) = MetadataValue::try_from(json.as_str())
    {
        meta.insert(ON_BEHALF, v);
    }
}

#[derive(Default)]
struct TokenIndex {
    bootstrapped: bool,
    by_hash: HashMap<String, Token>,
}

/// Who may do what on this server.
pub struct Auth {
    tls: bool,
    tokens: RwLock<TokenIndex>,
}

/// Where a handler notes the resource a request acted on, for the audit event.
#[derive(Clone, Default)]
pub struct AuditResource(Arc<Mutex<String>>);

impl AuditResource {
    /// Record the resource (`job 17`, `node aws-1`, `token <accessor>`).
    pub fn set(&self, what: impl Into<String>) {
        if let Ok(mut g) = self.0.lock() {
            *g = what.into();
        }
    }
}

/// Note the resource of `req` for the audit log.
pub fn note<T>(req: &tonic::Request<T>, what: impl Into<String>) {
    if let Some(r) = req.extensions().get::<AuditResource>() {
        r.set(what);
    }
}

fn denied(d: Denied) -> Status {
    match d {
        Denied::Unauthenticated(m) => Status::unauthenticated(m),
        Denied::PermissionDenied(m) => Status::permission_denied(m),
    }
}

impl Auth {
    /// `tls`: whether the server runs with TLS (then every connection carries a certificate).
    pub fn new(tls: bool) -> Auth {
        Auth { tls, tokens: RwLock::new(TokenIndex::default()) }
    }

    /// Rebuild the token index from the replicated ACL state.
    pub fn refresh(&self, acl: &Acl) {
        let index = TokenIndex {
            bootstrapped: acl.bootstrapped,
            by_hash: acl.tokens.values().map(|t| (t.secret_sha256.clone(), t.clone())).collect(),
        };
        match self.tokens.write() {
            Ok(mut g) => *g = index,
            Err(p) => *p.into_inner() = index,
        }
    }

    /// Whether ACLs are bootstrapped (tokens are then needed even without TLS).
    pub fn bootstrapped(&self) -> bool {
        self.tokens.read().map(|g| g.bootstrapped).unwrap_or(true)
    }

    /// The principal of a request from `peer` with these headers.
    pub fn authenticate(&self, peer: Option<&PeerInfo>, meta: &http::HeaderMap) -> Result<Principal, Status> {
        let cert = match peer.and_then(|p| p.identity.as_ref()) {
            None if self.tls => return Err(Status::unauthenticated("a client certificate is required")),
            None => None,
            Some(Ok(p)) => Some(p.clone()),
            Some(Err(m)) => return Err(Status::unauthenticated(format!("client certificate: {m}"))),
        };
        let on_behalf = meta.get(ON_BEHALF).map(|v| v.to_str().unwrap_or(""));
        if let (Some(Principal::Server { .. }), Some(json)) = (&cert, on_behalf) {
            let p: Principal = serde_json::from_str(json)
                .map_err(|e| Status::invalid_argument(format!("{ON_BEHALF}: not a principal: {e}")))?;
            if matches!(p, Principal::Server { .. } | Principal::Agent { .. }) {
                return Err(Status::permission_denied("servers forward requests of users only"));
            }
            return Ok(p);
        }
        let token = match meta.get("authorization") {
            None => None,
            Some(v) => {
                let v = v.to_str().map_err(|_| Status::unauthenticated("authorization: not ASCII"))?;
                let secret = v
                    .strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
                    .ok_or_else(|| Status::unauthenticated("authorization: expected 'Bearer <token secret>'"))?;
                Some(secret.trim().to_string())
            }
        };
        match (cert, token) {
            (Some(c @ (Principal::Server { .. } | Principal::Agent { .. })), _) => Ok(c),
            (_, Some(secret)) => self.token_principal(&secret),
            (Some(c), None) => Ok(c),
            (None, None) => Ok(Principal::Insecure),
        }
    }

    /// Whom a bearer token's secret stands for: UNAUTHENTICATED if it is unknown, revoked or
    /// expired.
    pub fn token_principal(&self, secret: &str) -> Result<Principal, Status> {
        let hash = secret_hash(secret.trim());
        let g = self.tokens.read().map_err(|_| Status::internal("token index poisoned"))?;
        let t = g.by_hash.get(&hash).ok_or_else(|| Status::unauthenticated("token not found or revoked"))?;
        if t.expired(now()) {
            return Err(Status::unauthenticated(format!("token {} expired", t.accessor)));
        }
        Ok(t.principal())
    }

    /// The decision, as a status.
    pub fn authorize(&self, p: &Principal, rpc: Rpc, res: Resource<'_>) -> Result<(), Status> {
        authorize(p, rpc, res, self.bootstrapped()).map_err(denied)
    }
}

/// The tower layer that runs [`Auth`] before every service.
#[derive(Clone)]
pub struct AuthLayer(pub Arc<Auth>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService { auth: self.0.clone(), inner }
    }
}

/// See [`AuthLayer`].
#[derive(Clone)]
pub struct AuthService<S> {
    auth: Arc<Auth>,
    inner: S,
}

type Body = tonic::body::Body;

fn outcome_of(resp: &http::Response<Body>) -> tonic::Code {
    resp.headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32)
}

/// The outcome label of a gRPC code (static, so counting allocates nothing).
fn outcome_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}

fn record(who: &str, rpc: Option<Rpc>, path: &str, resource: &str, code: tonic::Code) {
    let name = rpc.map_or("unknown", Rpc::name);
    let outcome = outcome_name(code);
    metrics::counter!("tessera_rpc_total", "rpc" => name, "outcome" => outcome).increment(1);
    if rpc.is_none_or(Rpc::is_write) || matches!(code, tonic::Code::PermissionDenied | tonic::Code::Unauthenticated) {
        tracing::info!(target: "tessera::audit", who, rpc = name, path, resource, outcome, "audit");
    }
}

impl<S> tower::Service<http::Request<Body>> for AuthService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let path = req.uri().path().to_string();
        let rpc = Rpc::from_path(&path);
        let decided = self.auth.authenticate(req.extensions().get::<PeerInfo>(), req.headers()).and_then(|p| {
            let rpc = rpc.ok_or_else(|| Status::unimplemented(format!("no rpc {path}")))?;
            self.auth.authorize(&p, rpc, Resource::Any)?;
            Ok(p)
        });
        let principal = match decided {
            Ok(p) => p,
            Err(status) => {
                let who = self
                    .auth
                    .authenticate(req.extensions().get::<PeerInfo>(), req.headers())
                    .map_or_else(|_| "unauthenticated".to_string(), |p| p.audit_name());
                record(&who, rpc, &path, "", status.code());
                return Box::pin(async move { Ok(status.into_http()) });
            }
        };
        let who = principal.audit_name();
        let resource = AuditResource::default();
        req.extensions_mut().insert(principal);
        req.extensions_mut().insert(resource.clone());
        // Take the service that was made ready, leave a fresh clone behind (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let resp = inner.call(req).await?;
            let res = resource.0.lock().map(|g| g.clone()).unwrap_or_default();
            record(&who, rpc, &path, &res, outcome_of(&resp));
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_core::Timestamp;
    use tessera_core::acl::Role;

    fn peer(p: Principal) -> PeerInfo {
        PeerInfo { remote: None, identity: Some(Ok(p)) }
    }

    fn bearer(secret: &str) -> http::HeaderMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", MetadataValue::try_from(format!("Bearer {secret}")).unwrap());
        m.into_headers()
    }

    fn none() -> http::HeaderMap {
        http::HeaderMap::new()
    }

    fn acl_with(secret: &str, expires: Option<Timestamp>) -> Acl {
        let mut acl = Acl { bootstrapped: true, ..Acl::default() };
        acl.tokens.insert(
            "a".into(),
            Token {
                accessor: "a".into(),
                name: "ci".into(),
                role: Role::Viewer,
                tenants: Default::default(),
                secret_sha256: secret_hash(secret),
                created: Timestamp(0),
                expires,
                created_by: String::new(),
            },
        );
        acl
    }

    #[test]
    fn certificates_tokens_and_forwarding_decide_the_principal() {
        let auth = Auth::new(true);
        auth.refresh(&acl_with("s3cret", None));
        let user = Principal::User { name: "bob".into(), role: None, tenants: Default::default(), token: None };
        // A user certificate alone, and with a token.
        assert_eq!(auth.authenticate(Some(&peer(user.clone())), &none()).unwrap(), user);
        let p = auth.authenticate(Some(&peer(user.clone())), &bearer("s3cret")).unwrap();
        assert!(matches!(p, Principal::User { role: Some(Role::Viewer), token: Some(_), .. }));
        // Unknown tokens and no certificate at all are refused.
        let e = auth.authenticate(Some(&peer(user.clone())), &bearer("nope")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert_eq!(auth.authenticate(None, &none()).unwrap_err().code(), tonic::Code::Unauthenticated);
        let bad = PeerInfo { remote: None, identity: Some(Err("no identity".into())) };
        assert_eq!(auth.authenticate(Some(&bad), &none()).unwrap_err().code(), tonic::Code::Unauthenticated);
        // Only a server's word about whom it forwards for is taken.
        let mut fwd = MetadataMap::new();
        let admin =
            Principal::User { name: "root".into(), role: Some(Role::Admin), tenants: Default::default(), token: None };
        set_on_behalf(&mut fwd, &admin);
        let fwd = fwd.into_headers();
        assert_eq!(auth.authenticate(Some(&peer(Principal::Server { id: 2 })), &fwd).unwrap(), admin);
        assert_eq!(auth.authenticate(Some(&peer(user.clone())), &fwd).unwrap(), user);
        // Expired tokens are refused; revoking (a refresh without it) ends a token at once.
        auth.refresh(&acl_with("old", Some(Timestamp(1))));
        assert_eq!(
            auth.authenticate(Some(&peer(user.clone())), &bearer("old")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        auth.refresh(&Acl::default());
        assert!(auth.authenticate(Some(&peer(user)), &bearer("s3cret")).is_err());
    }

    #[test]
    fn every_rpc_of_the_api_is_known_to_the_decision() {
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(tessera_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut n = 0;
        for file in &set.file {
            for service in &file.service {
                for m in &service.method {
                    let path = format!("/tessera.v1.{}/{}", service.name(), m.name());
                    assert!(Rpc::from_path(&path).is_some(), "{path} has no acl::Rpc: every request to it is refused");
                    n += 1;
                }
            }
        }
        assert_eq!(n + 2, Rpc::ALL.len(), "acl::Rpc lists an rpc the API does not have");
    }

    #[test]
    fn insecure_servers_take_plain_connections() {
        let auth = Auth::new(false);
        assert_eq!(auth.authenticate(None, &none()).unwrap(), Principal::Insecure);
        assert!(auth.authorize(&Principal::Insecure, Rpc::SubmitJob, Resource::Any).is_ok());
        auth.refresh(&acl_with("s", None));
        assert_eq!(
            auth.authorize(&Principal::Insecure, Rpc::SubmitJob, Resource::Any).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
