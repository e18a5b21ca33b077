//! `AclService`: bootstrap, create, list and revoke tokens. The secret is made here (a random
//! UUIDv4, as Nomad's), returned once, and only its SHA-256 enters the log.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tessera_core::acl::{AclChange, Role, Token, secret_hash};
use tessera_core::command::Command;
use tessera_proto::v1;
use tonic::{Request, Response, Status};

use crate::auth::note;
use crate::context::{Shared, now, principal};

/// `AclService`.
pub struct AclRpc(pub Arc<Shared>);

fn token_to_proto(t: &Token) -> v1::AclToken {
    v1::AclToken {
        accessor: t.accessor.clone(),
        name: t.name.clone(),
        role: t.role.to_string(),
        tenants: t.tenants.iter().cloned().collect(),
        created_unix_ms: t.created.0,
        expires_unix_ms: t.expires.map(|e| e.0),
        created_by: t.created_by.clone(),
    }
}

/// The token a `CreateTokenRequest` asks for, with a fresh secret (returned beside it; only its
/// hash goes into the token). The rest is checked at apply, naming the field.
pub fn token_from_request(
    r: v1::CreateTokenRequest,
    created_by: String,
    now: tessera_core::Timestamp,
) -> Result<(Token, String), Status> {
    let role: Role = r.role.parse().map_err(|m: String| Status::invalid_argument(format!("role: {m}")))?;
    Ok(new_token(r.name, role, r.tenants, r.ttl_seconds, created_by, now))
}

/// A new token with a fresh secret; returns it and the secret.
fn new_token(
    name: String,
    role: Role,
    tenants: Vec<String>,
    ttl_seconds: u64,
    created_by: String,
    created: tessera_core::Timestamp,
) -> (Token, String) {
    let secret = uuid::Uuid::new_v4().to_string();
    let token = Token {
        accessor: uuid::Uuid::new_v4().to_string(),
        name,
        role,
        tenants: tenants.into_iter().collect(),
        secret_sha256: secret_hash(&secret),
        created,
        expires: (ttl_seconds > 0).then(|| created.plus_secs(ttl_seconds)),
        created_by,
    };
    (token, secret)
}

impl AclRpc {
    async fn create(&self, token: Token, secret: String, bootstrap: bool) -> Result<v1::CreateTokenResponse, Status> {
        let proto = token_to_proto(&token);
        let change = if bootstrap { AclChange::Bootstrap { token } } else { AclChange::CreateToken { token } };
        self.0.write(&Command::Acl { change }).await?;
        Ok(v1::CreateTokenResponse { token: Some(proto), secret })
    }
}

#[tonic::async_trait]
impl v1::acl_service_server::AclService for AclRpc {
    async fn bootstrap(
        &self,
        req: Request<v1::AclBootstrapRequest>,
    ) -> Result<Response<v1::CreateTokenResponse>, Status> {
        let who = principal(&req).audit_name();
        let name = if req.get_ref().name.is_empty() { "bootstrap".to_string() } else { req.get_ref().name.clone() };
        let (token, secret) = new_token(name, Role::Admin, Vec::new(), 0, who, now());
        note(&req, format!("token {}", token.accessor));
        Ok(Response::new(self.create(token, secret, true).await?))
    }

    async fn create_token(
        &self,
        req: Request<v1::CreateTokenRequest>,
    ) -> Result<Response<v1::CreateTokenResponse>, Status> {
        let who = principal(&req).audit_name();
        let (token, secret) = token_from_request(req.get_ref().clone(), who, now())?;
        note(&req, format!("token {}", token.accessor));
        Ok(Response::new(self.create(token, secret, false).await?))
    }

    async fn list_tokens(
        &self,
        req: Request<v1::ListTokensRequest>,
    ) -> Result<Response<v1::ListTokensResponse>, Status> {
        let _ = req;
        let tokens = self.0.read(0, |s| s.acl().tokens.values().map(token_to_proto).collect()).await?;
        Ok(Response::new(v1::ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        req: Request<v1::RevokeTokenRequest>,
    ) -> Result<Response<v1::RevokeTokenResponse>, Status> {
        let accessor = req.get_ref().accessor.trim().to_string();
        note(&req, format!("token {accessor}"));
        if accessor.is_empty() {
            return Err(Status::invalid_argument("accessor: required"));
        }
        self.0.write(&Command::Acl { change: AclChange::RevokeToken { accessor } }).await?;
        Ok(Response::new(v1::RevokeTokenResponse { index: self.0.raft.status().applied }))
    }
}

/// Bootstrap ACLs with the secret in `file` (given to the founding servers), once: whichever
/// server leads first proposes it, the others' proposals are refused as already bootstrapped.
pub async fn bootstrap_from_file(shared: Arc<Shared>, file: PathBuf) {
    let secret = match std::fs::read_to_string(&file) {
        Ok(s) => s.trim().to_string(),
        Err(e) => {
            tracing::error!(file = %file.display(), error = %e, "acl_bootstrap_token_file: cannot read it; ACLs not bootstrapped");
            return;
        }
    };
    if secret.len() < 16 || secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
        tracing::error!(file = %file.display(), "acl_bootstrap_token_file: the secret must be at least 16 characters without spaces");
        return;
    }
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if shared.raft.status().role != tessera_raft::StateRole::Leader {
            if shared.read(v1::ReadConsistency::Stale as i32, |s| s.acl().bootstrapped).await.unwrap_or(false) {
                return;
            }
            continue;
        }
        if shared.read(0, |s| s.acl().bootstrapped).await.unwrap_or(false) {
            return;
        }
        let mut token =
            new_token("bootstrap".into(), Role::Admin, Vec::new(), 0, "config/acl_bootstrap_token_file".into(), now())
                .0;
        token.secret_sha256 = secret_hash(&secret);
        match shared.write(&Command::Acl { change: AclChange::Bootstrap { token } }).await {
            Ok(_) => {
                tracing::info!(file = %file.display(), "ACLs bootstrapped from the token file");
                return;
            }
            Err(e) if e.code() == tonic::Code::FailedPrecondition => return,
            Err(e) => tracing::warn!(error = %e.message(), "bootstrapping ACLs from the token file failed; retrying"),
        }
    }
}
