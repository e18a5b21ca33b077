//! Who may do what: principals, roles, tokens, and [`authorize`], the one function that
//! decides every request.
//!
//! A request arrives with a [`Principal`]: what its TLS certificate says (a server, the agent
//! of one node, a user with a role), or what its bearer token says. [`authorize`] is a pure
//! function of (principal, rpc, resource, whether ACLs are bootstrapped) to allow or deny,
//! denying by default. The server calls it once per request in one layer (rpc level, with
//! [`Resource::Any`]) and again in a handler once it knows the resource (the tenant of a job,
//! the node an agent registers); handlers never decide on their own.
//!
//! Tokens live in the replicated state ([`Acl`]): an accessor id (a UUID that may be listed
//! and revoked), the SHA-256 of the secret (the secret itself is shown once, to its creator,
//! and never stored), a role, tenants, and an optional expiry. Revoking removes the record, so
//! every server refuses the secret as soon as it has applied the revocation.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::command::{Event, Rejection};
use crate::model::Timestamp;

/// What a role allows (see [`authorize`] for the exact table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything a person may do.
    Admin,
    /// Nodes (drain, clear-gpu), cluster membership, and reading jobs without their env.
    Operator,
    /// Submit, cancel and read the jobs and logs of its tenants.
    Submitter,
    /// Read jobs (without env values), nodes, tenants and the cluster.
    Viewer,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [Role::Admin, Role::Operator, Role::Submitter, Role::Viewer];

    /// The name used in certificates, tokens and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Submitter => "submitter",
            Role::Viewer => "viewer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| format!("'{s}' is not a role: use admin, operator, submitter or viewer"))
    }
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Principal {
    /// A scheduler server, by its certificate.
    Server {
        /// Server id.
        id: u64,
    },
    /// The agent of one node, by its certificate.
    Agent {
        /// The node name the certificate names.
        node: String,
    },
    /// A person or a program: a user certificate, or a bearer token.
    User {
        /// User name (certificate) or token name.
        name: String,
        /// Role; None for a certificate that names no role (it needs a token).
        role: Option<Role>,
        /// Tenants a submitter acts for.
        tenants: BTreeSet<String>,
        /// The token's accessor when a token authenticated the request.
        token: Option<String>,
    },
    /// A server started with `--insecure` and a request that carried no token.
    Insecure,
}

impl Principal {
    /// How the audit log names the principal: `server/3`, `agent/aws-1`, `user/alice`,
    /// `token/ci(<accessor>)`, `insecure`.
    pub fn audit_name(&self) -> String {
        match self {
            Principal::Server { id } => format!("server/{id}"),
            Principal::Agent { node } => format!("agent/{node}"),
            Principal::User { name, token: Some(a), .. } => format!("token/{name}({a})"),
            Principal::User { name, .. } => format!("user/{name}"),
            Principal::Insecure => "insecure".into(),
        }
    }

    fn has_tenant(&self, tenant: &str) -> bool {
        matches!(self, Principal::User { tenants, .. } if tenants.contains(tenant))
    }

    /// The tenants whose jobs this principal may read; None: every tenant.
    pub fn readable_tenants(&self) -> Option<&BTreeSet<String>> {
        match self {
            Principal::User { role: Some(Role::Submitter), tenants, .. } => Some(tenants),
            _ => None,
        }
    }

    /// May this principal see the values of a job's environment? Only admins and the job's
    /// own tenant's submitters (env often carries credentials).
    pub fn may_see_env(&self, tenant: &str) -> bool {
        match self {
            Principal::Insecure => true,
            Principal::User { role: Some(Role::Admin), .. } => true,
            Principal::User { role: Some(Role::Submitter), .. } => self.has_tenant(tenant),
            _ => false,
        }
    }
}

/// Every rpc a server serves, for authorization and the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rpc {
    /// JobService.SubmitJob
    SubmitJob,
    /// JobService.GetJob
    GetJob,
    /// JobService.ListJobs
    ListJobs,
    /// JobService.CancelJob
    CancelJob,
    /// JobService.WatchJob
    WatchJob,
    /// JobService.JobLogs
    JobLogs,
    /// JobService.ExplainJob
    ExplainJob,
    /// JobService.JobEvents
    JobEvents,
    /// TenantService.Usage
    Usage,
    /// NodeService.ListNodes
    ListNodes,
    /// NodeService.GetNode
    GetNode,
    /// NodeService.DrainNode
    DrainNode,
    /// NodeService.UndrainNode
    UndrainNode,
    /// NodeService.ClearGpuHealth
    ClearGpuHealth,
    /// ClusterService.Status
    ClusterStatus,
    /// ClusterService.AddServer
    AddServer,
    /// ClusterService.RemoveServer
    RemoveServer,
    /// ClusterService.Snapshot
    Snapshot,
    /// AgentService.Session
    AgentSession,
    /// RaftService.Send
    RaftSend,
    /// AclService.Bootstrap
    AclBootstrap,
    /// AclService.CreateToken
    CreateToken,
    /// AclService.ListTokens
    ListTokens,
    /// AclService.RevokeToken
    RevokeToken,
    /// TenantService.SetTenant
    SetTenant,
    /// TenantService.ListTenants
    ListTenants,
    /// TenantService.GetTenant
    GetTenant,
    /// gRPC health checking
    Health,
    /// gRPC server reflection
    Reflection,
}

impl Rpc {
    /// Every rpc.
    pub const ALL: [Rpc; 29] = [
        Rpc::SubmitJob,
        Rpc::GetJob,
        Rpc::ListJobs,
        Rpc::CancelJob,
        Rpc::WatchJob,
        Rpc::JobLogs,
        Rpc::ExplainJob,
        Rpc::JobEvents,
        Rpc::Usage,
        Rpc::ListNodes,
        Rpc::GetNode,
        Rpc::DrainNode,
        Rpc::UndrainNode,
        Rpc::ClearGpuHealth,
        Rpc::ClusterStatus,
        Rpc::AddServer,
        Rpc::RemoveServer,
        Rpc::Snapshot,
        Rpc::AgentSession,
        Rpc::RaftSend,
        Rpc::AclBootstrap,
        Rpc::CreateToken,
        Rpc::ListTokens,
        Rpc::RevokeToken,
        Rpc::SetTenant,
        Rpc::ListTenants,
        Rpc::GetTenant,
        Rpc::Health,
        Rpc::Reflection,
    ];

    /// The gRPC path (`/package.Service/Method`).
    pub fn path(self) -> &'static str {
        match self {
            Rpc::SubmitJob => "/tessera.v1.JobService/SubmitJob",
            Rpc::GetJob => "/tessera.v1.JobService/GetJob",
            Rpc::ListJobs => "/tessera.v1.JobService/ListJobs",
            Rpc::CancelJob => "/tessera.v1.JobService/CancelJob",
            Rpc::WatchJob => "/tessera.v1.JobService/WatchJob",
            Rpc::JobLogs => "/tessera.v1.JobService/JobLogs",
            Rpc::ExplainJob => "/tessera.v1.JobService/ExplainJob",
            Rpc::JobEvents => "/tessera.v1.JobService/JobEvents",
            Rpc::Usage => "/tessera.v1.TenantService/Usage",
            Rpc::ListNodes => "/tessera.v1.NodeService/ListNodes",
            Rpc::GetNode => "/tessera.v1.NodeService/GetNode",
            Rpc::DrainNode => "/tessera.v1.NodeService/DrainNode",
            Rpc::UndrainNode => "/tessera.v1.NodeService/UndrainNode",
            Rpc::ClearGpuHealth => "/tessera.v1.NodeService/ClearGpuHealth",
            Rpc::ClusterStatus => "/tessera.v1.ClusterService/Status",
            Rpc::AddServer => "/tessera.v1.ClusterService/AddServer",
            Rpc::RemoveServer => "/tessera.v1.ClusterService/RemoveServer",
            Rpc::Snapshot => "/tessera.v1.ClusterService/Snapshot",
            Rpc::AgentSession => "/tessera.v1.AgentService/Session",
            Rpc::RaftSend => "/tessera.v1.RaftService/Send",
            Rpc::AclBootstrap => "/tessera.v1.AclService/Bootstrap",
            Rpc::CreateToken => "/tessera.v1.AclService/CreateToken",
            Rpc::ListTokens => "/tessera.v1.AclService/ListTokens",
            Rpc::RevokeToken => "/tessera.v1.AclService/RevokeToken",
            Rpc::SetTenant => "/tessera.v1.TenantService/SetTenant",
            Rpc::ListTenants => "/tessera.v1.TenantService/ListTenants",
            Rpc::GetTenant => "/tessera.v1.TenantService/GetTenant",
            Rpc::Health => "/grpc.health.v1.Health/",
            Rpc::Reflection => "/grpc.reflection.",
        }
    }

    /// The rpc a request path names; None for a path no service serves.
    pub fn from_path(path: &str) -> Option<Rpc> {
        if path.starts_with(Rpc::Health.path()) {
            return Some(Rpc::Health);
        }
        if path.starts_with(Rpc::Reflection.path()) {
            return Some(Rpc::Reflection);
        }
        Rpc::ALL.into_iter().find(|r| r.path() == path)
    }

    /// A short name for logs and metrics: the method name.
    pub fn name(self) -> &'static str {
        match self {
            Rpc::Health => "Health",
            Rpc::Reflection => "Reflection",
            r => r.path().rsplit('/').next().unwrap_or("?"),
        }
    }

    /// Does it change the state, or open an agent's session (which then reports starts, exits
    /// and checkpoints for its node), and so belong in the audit log?
    pub fn is_write(self) -> bool {
        matches!(
            self,
            Rpc::AgentSession
                | Rpc::SubmitJob
                | Rpc::CancelJob
                | Rpc::DrainNode
                | Rpc::UndrainNode
                | Rpc::ClearGpuHealth
                | Rpc::AddServer
                | Rpc::RemoveServer
                | Rpc::Snapshot
                | Rpc::AclBootstrap
                | Rpc::CreateToken
                | Rpc::RevokeToken
                | Rpc::SetTenant
        )
    }
}

/// What an rpc acts on, once a handler knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    /// Not known yet (the rpc-level check): allowed if the principal may call the rpc on
    /// some resource.
    Any,
    /// A job, a log, a submission or a tenant record: the tenant it belongs to.
    Tenant(&'a str),
    /// The node an agent registers as.
    Node(&'a str),
    /// The server that sent a Raft batch (its `from_id`).
    Server(u64),
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No acceptable credentials (maps to UNAUTHENTICATED).
    #[error("{0}")]
    Unauthenticated(String),
    /// Credentials fine, action not allowed (maps to PERMISSION_DENIED).
    #[error("{0}")]
    PermissionDenied(String),
}

/// Reads of jobs, nodes, tenants and the cluster that every role may make.
fn viewer_may(rpc: Rpc) -> bool {
    matches!(
        rpc,
        Rpc::GetJob
            | Rpc::ListJobs
            | Rpc::WatchJob
            | Rpc::ExplainJob
            | Rpc::JobEvents
            | Rpc::Usage
            | Rpc::ListNodes
            | Rpc::GetNode
            | Rpc::ClusterStatus
            | Rpc::ListTenants
            | Rpc::GetTenant
            | Rpc::Health
            | Rpc::Reflection
    )
}

/// Decide one request. `acl_bootstrapped` says whether `tessera acl bootstrap` has run.
///
/// - A server may speak Raft (as itself), check health, read the cluster status and ask to
///   join (AddServer); nothing else without a user on whose behalf it forwards.
/// - An agent may open its session, for its own node only, and check health.
/// - A user's role decides: admin everything a person may do; operator nodes, membership
///   and read-only jobs; submitter its tenants' jobs and logs plus reads; viewer reads. No
///   user may speak Raft or act as an agent. Only an admin downloads the snapshot.
/// - `Insecure` (a server running with `--insecure`, no token given) may do everything until
///   ACLs are bootstrapped; after that only the transport rpcs (Raft, agent sessions, health,
///   status), so people need a token.
pub fn authorize(p: &Principal, rpc: Rpc, res: Resource<'_>, acl_bootstrapped: bool) -> Result<(), Denied> {
    let deny =
        |why: String| Err(Denied::PermissionDenied(format!("{} may not call {}: {why}", p.audit_name(), rpc.name())));
    if rpc == Rpc::AclBootstrap {
        if acl_bootstrapped {
            return Err(Denied::PermissionDenied("ACLs are already bootstrapped".into()));
        }
        return match p {
            Principal::User { .. } | Principal::Insecure => Ok(()),
            _ => deny("only a person bootstraps ACLs".into()),
        };
    }
    match p {
        Principal::Server { id } => match (rpc, res) {
            (Rpc::RaftSend, Resource::Any) => Ok(()),
            (Rpc::RaftSend, Resource::Server(from)) if from == *id => Ok(()),
            (Rpc::RaftSend, _) => deny(format!("its certificate is server {id}'s")),
            (Rpc::Health | Rpc::ClusterStatus | Rpc::AddServer, _) => Ok(()),
            _ => deny("servers only speak Raft and forward on behalf of a user".into()),
        },
        Principal::Agent { node } => match (rpc, res) {
            (Rpc::AgentSession, Resource::Any) => Ok(()),
            (Rpc::AgentSession, Resource::Node(n)) if n == node => Ok(()),
            (Rpc::AgentSession, _) => deny(format!("its certificate is for node {node}")),
            (Rpc::Health, _) => Ok(()),
            _ => deny("agents only open their session".into()),
        },
        Principal::Insecure => {
            if !acl_bootstrapped || matches!(rpc, Rpc::RaftSend | Rpc::AgentSession | Rpc::Health | Rpc::ClusterStatus)
            {
                Ok(())
            } else {
                Err(Denied::Unauthenticated(format!("{} needs a token: ACLs are bootstrapped", rpc.name())))
            }
        }
        Principal::User { role, .. } => {
            if matches!(rpc, Rpc::RaftSend | Rpc::AgentSession) {
                return deny("only servers and agents use it".into());
            }
            let Some(role) = role else {
                return if rpc == Rpc::Health {
                    Ok(())
                } else {
                    Err(Denied::Unauthenticated(format!(
                        "{} has no role: give a token (--token or TESSERA_TOKEN)",
                        p.audit_name()
                    )))
                };
            };
            match role {
                Role::Admin => Ok(()),
                Role::Operator => {
                    let ok = viewer_may(rpc)
                        || matches!(
                            rpc,
                            Rpc::DrainNode
                                | Rpc::UndrainNode
                                | Rpc::ClearGpuHealth
                                | Rpc::AddServer
                                | Rpc::RemoveServer
                        );
                    if ok { Ok(()) } else { deny("the operator role does not include it".into()) }
                }
                Role::Viewer => {
                    if viewer_may(rpc) {
                        Ok(())
                    } else {
                        deny("the viewer role only reads".into())
                    }
                }
                Role::Submitter => {
                    let tenant_scoped = matches!(
                        rpc,
                        Rpc::SubmitJob
                            | Rpc::CancelJob
                            | Rpc::GetJob
                            | Rpc::ExplainJob
                            | Rpc::JobEvents
                            | Rpc::Usage
                            | Rpc::WatchJob
                            | Rpc::JobLogs
                            | Rpc::GetTenant
                    );
                    if tenant_scoped {
                        match res {
                            Resource::Any => Ok(()),
                            Resource::Tenant(t) if p.has_tenant(t) => Ok(()),
                            Resource::Tenant(t) => deny(format!("tenant {t} is not one of its tenants")),
                            _ => deny("not a tenant's resource".into()),
                        }
                    } else if matches!(
                        rpc,
                        Rpc::ListJobs
                            | Rpc::ListNodes
                            | Rpc::GetNode
                            | Rpc::ClusterStatus
                            | Rpc::ListTenants
                            | Rpc::Health
                            | Rpc::Reflection
                    ) {
                        Ok(())
                    } else {
                        deny("the submitter role does not include it".into())
                    }
                }
            }
        }
    }
}

/// The SHA-256 of a token secret, in lowercase hex: what the state keeps instead of the secret.
pub fn secret_hash(secret: &str) -> String {
    let digest = sha2::Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// One ACL token, as the replicated state keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Public id: a UUID, listed and used to revoke.
    pub accessor: String,
    /// Name, for people and the audit log.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Tenants a submitter acts for (empty for other roles).
    #[serde(default)]
    pub tenants: BTreeSet<String>,
    /// SHA-256 of the secret, lowercase hex ([`secret_hash`]).
    pub secret_sha256: String,
    /// When it was created (the proposer's clock).
    pub created: Timestamp,
    /// When it stops working; None: never.
    #[serde(default)]
    pub expires: Option<Timestamp>,
    /// Who created it (`Principal::audit_name`).
    #[serde(default)]
    pub created_by: String,
}

impl Token {
    /// Has it expired at `now`?
    pub fn expired(&self, now: Timestamp) -> bool {
        self.expires.is_some_and(|e| now >= e)
    }

    /// The principal a request carrying this token acts as.
    pub fn principal(&self) -> Principal {
        Principal::User {
            name: self.name.clone(),
            role: Some(self.role),
            tenants: self.tenants.clone(),
            token: Some(self.accessor.clone()),
        }
    }
}

/// A change to the ACL state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AclChange {
    /// The first admin token; refused once ACLs are bootstrapped.
    Bootstrap {
        /// The token (role admin).
        token: Token,
    },
    /// A new token.
    CreateToken {
        /// The token.
        token: Token,
    },
    /// Remove a token: its secret stops working on every server that has applied this.
    RevokeToken {
        /// Its accessor.
        accessor: String,
    },
}

/// Tokens and the bootstrap flag: part of the replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acl {
    /// Has `acl bootstrap` run?
    #[serde(default)]
    pub bootstrapped: bool,
    /// Tokens by accessor.
    #[serde(default)]
    pub tokens: BTreeMap<String, Token>,
}

fn invalid(field: &'static str, message: impl Into<String>) -> Rejection {
    Rejection::InvalidArgument { field, message: message.into() }
}

fn valid_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
}

impl Acl {
    /// The token whose secret hashes to `hash`.
    pub fn by_hash(&self, hash: &str) -> Option<&Token> {
        self.tokens.values().find(|t| t.secret_sha256 == hash)
    }

    fn check(&self, t: &Token) -> Result<(), Rejection> {
        let uuid_like = t.accessor.len() == 36
            && t.accessor.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
            && !t.accessor.is_empty();
        if !uuid_like {
            return Err(invalid("accessor", "must be a UUID"));
        }
        if !valid_label(&t.name, 64) {
            return Err(invalid("name", "must be 1 to 64 letters, digits, '.', '_', '-' or '@'"));
        }
        if t.secret_sha256.len() != 64 || !t.secret_sha256.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')) {
            return Err(invalid("secret_sha256", "must be 64 lowercase hex digits"));
        }
        match t.role {
            Role::Submitter if t.tenants.is_empty() => {
                return Err(invalid("tenants", "a submitter token needs at least one tenant"));
            }
            Role::Submitter => {}
            _ if !t.tenants.is_empty() => {
                return Err(invalid("tenants", format!("only submitter tokens name tenants, not {}", t.role)));
            }
            _ => {}
        }
        if t.tenants.len() > 64 || t.tenants.iter().any(|n| !valid_label(n, 64)) {
            return Err(invalid("tenants", "at most 64 tenant names of 1 to 64 letters, digits, '.', '_' or '-'"));
        }
        if t.expires.is_some_and(|e| e <= t.created) {
            return Err(invalid("expires", "must be after the token's creation"));
        }
        if self.tokens.contains_key(&t.accessor) {
            return Err(Rejection::FailedPrecondition(format!("a token with accessor {} exists", t.accessor)));
        }
        if self.by_hash(&t.secret_sha256).is_some() {
            return Err(Rejection::FailedPrecondition("a token with that secret exists".into()));
        }
        Ok(())
    }

    /// Apply one change (called by `State::apply`).
    pub(crate) fn apply(&mut self, change: AclChange, ev: &mut Vec<Event>) -> Result<(), Rejection> {
        match change {
            AclChange::Bootstrap { token } => {
                if self.bootstrapped {
                    return Err(Rejection::FailedPrecondition("ACLs are already bootstrapped".into()));
                }
                if token.role != Role::Admin {
                    return Err(invalid("role", "the bootstrap token is an admin token"));
                }
                self.check(&token)?;
                self.bootstrapped = true;
                ev.push(Event::AclChanged { accessor: token.accessor.clone() });
                self.tokens.insert(token.accessor.clone(), token);
            }
            AclChange::CreateToken { token } => {
                self.check(&token)?;
                ev.push(Event::AclChanged { accessor: token.accessor.clone() });
                self.tokens.insert(token.accessor.clone(), token);
            }
            AclChange::RevokeToken { accessor } => {
                if self.tokens.remove(&accessor).is_none() {
                    return Err(Rejection::NotFound(format!("no token with accessor {accessor}")));
                }
                ev.push(Event::AclChanged { accessor });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(role: Option<Role>, tenants: &[&str]) -> Principal {
        Principal::User {
            name: "alice".into(),
            role,
            tenants: tenants.iter().map(|t| t.to_string()).collect(),
            token: None,
        }
    }

    fn allowed(p: &Principal, rpc: Rpc, res: Resource<'_>) -> bool {
        authorize(p, rpc, res, true).is_ok()
    }

    #[test]
    fn every_rpc_has_a_path_that_maps_back() {
        for rpc in Rpc::ALL {
            let path = match rpc {
                Rpc::Health => "/grpc.health.v1.Health/Check".to_string(),
                Rpc::Reflection => "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo".to_string(),
                r => r.path().to_string(),
            };
            assert_eq!(Rpc::from_path(&path), Some(rpc), "{path}");
        }
        assert_eq!(
            Rpc::from_path("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Some(Rpc::Reflection)
        );
        assert_eq!(Rpc::from_path("/tessera.v1.JobService/Nope"), None);
        assert_eq!(Rpc::SubmitJob.name(), "SubmitJob");
    }

    #[test]
    fn admin_may_do_everything_a_person_may() {
        let admin = user(Some(Role::Admin), &[]);
        for rpc in Rpc::ALL {
            let want = !matches!(rpc, Rpc::RaftSend | Rpc::AgentSession | Rpc::AclBootstrap);
            assert_eq!(allowed(&admin, rpc, Resource::Tenant("any")), want, "{rpc:?}");
        }
    }

    #[test]
    fn submitters_act_only_for_their_tenants() {
        let sub = user(Some(Role::Submitter), &["ml"]);
        assert!(allowed(&sub, Rpc::SubmitJob, Resource::Any));
        assert!(allowed(&sub, Rpc::SubmitJob, Resource::Tenant("ml")));
        assert!(!allowed(&sub, Rpc::SubmitJob, Resource::Tenant("vision")));
        assert!(!allowed(&sub, Rpc::CancelJob, Resource::Tenant("vision")));
        assert!(allowed(&sub, Rpc::JobLogs, Resource::Tenant("ml")));
        assert!(allowed(&sub, Rpc::ListJobs, Resource::Any));
        for rpc in [Rpc::DrainNode, Rpc::Snapshot, Rpc::CreateToken, Rpc::SetTenant, Rpc::RemoveServer] {
            assert!(!allowed(&sub, rpc, Resource::Any), "{rpc:?}");
        }
        assert_eq!(sub.readable_tenants().map(|t| t.len()), Some(1));
        assert!(sub.may_see_env("ml") && !sub.may_see_env("vision"));
    }

    #[test]
    fn operators_and_viewers_have_their_tables() {
        let op = user(Some(Role::Operator), &[]);
        let viewer = user(Some(Role::Viewer), &[]);
        for rpc in [Rpc::DrainNode, Rpc::UndrainNode, Rpc::ClearGpuHealth, Rpc::AddServer, Rpc::RemoveServer] {
            assert!(allowed(&op, rpc, Resource::Any), "{rpc:?}");
            assert!(!allowed(&viewer, rpc, Resource::Any), "{rpc:?}");
        }
        for rpc in [Rpc::Snapshot, Rpc::SubmitJob, Rpc::CancelJob, Rpc::JobLogs, Rpc::CreateToken, Rpc::SetTenant] {
            assert!(!allowed(&op, rpc, Resource::Any), "{rpc:?}");
            assert!(!allowed(&viewer, rpc, Resource::Any), "{rpc:?}");
        }
        assert!(allowed(&viewer, Rpc::GetJob, Resource::Tenant("ml")));
        assert!(!viewer.may_see_env("ml") && !op.may_see_env("ml"));
        assert!(user(Some(Role::Admin), &[]).may_see_env("ml"));
    }

    #[test]
    fn servers_and_agents_keep_to_their_own_rpcs() {
        let server = Principal::Server { id: 2 };
        assert!(allowed(&server, Rpc::RaftSend, Resource::Server(2)));
        assert!(!allowed(&server, Rpc::RaftSend, Resource::Server(3)));
        assert!(!allowed(&server, Rpc::SubmitJob, Resource::Any));
        let agent = Principal::Agent { node: "aws-1".into() };
        assert!(allowed(&agent, Rpc::AgentSession, Resource::Node("aws-1")));
        assert!(!allowed(&agent, Rpc::AgentSession, Resource::Node("aws-2")));
        assert!(!allowed(&agent, Rpc::SubmitJob, Resource::Any));
        assert!(!allowed(&agent, Rpc::RaftSend, Resource::Any));
        assert!(!allowed(&user(Some(Role::Admin), &[]), Rpc::RaftSend, Resource::Any));
    }

    #[test]
    fn no_role_needs_a_token_and_insecure_ends_at_bootstrap() {
        let bare = user(None, &[]);
        assert!(matches!(authorize(&bare, Rpc::GetJob, Resource::Any, true), Err(Denied::Unauthenticated(_))));
        assert!(allowed(&bare, Rpc::Health, Resource::Any));
        assert!(authorize(&bare, Rpc::AclBootstrap, Resource::Any, false).is_ok());
        assert!(authorize(&bare, Rpc::AclBootstrap, Resource::Any, true).is_err());
        assert!(authorize(&Principal::Insecure, Rpc::SubmitJob, Resource::Any, false).is_ok());
        assert!(matches!(
            authorize(&Principal::Insecure, Rpc::SubmitJob, Resource::Any, true),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(authorize(&Principal::Insecure, Rpc::RaftSend, Resource::Any, true).is_ok());
    }

    fn token(accessor: &str, secret: &str, role: Role, tenants: &[&str]) -> Token {
        Token {
            accessor: accessor.into(),
            name: "ci".into(),
            role,
            tenants: tenants.iter().map(|t| t.to_string()).collect(),
            secret_sha256: secret_hash(secret),
            created: Timestamp(1_000),
            expires: Some(Timestamp(2_000)),
            created_by: "user/root".into(),
        }
    }

    const A1: &str = "00000000-0000-4000-8000-000000000001";
    const A2: &str = "00000000-0000-4000-8000-000000000002";

    #[test]
    fn tokens_are_created_found_by_hash_expired_and_revoked() {
        let mut acl = Acl::default();
        let mut ev = Vec::new();
        assert!(acl.apply(AclChange::Bootstrap { token: token(A1, "s1", Role::Viewer, &[]) }, &mut ev).is_err());
        acl.apply(AclChange::Bootstrap { token: token(A1, "s1", Role::Admin, &[]) }, &mut ev).unwrap();
        assert!(acl.bootstrapped);
        assert!(acl.apply(AclChange::Bootstrap { token: token(A2, "s2", Role::Admin, &[]) }, &mut ev).is_err());
        assert!(acl.apply(AclChange::CreateToken { token: token(A2, "s2", Role::Submitter, &[]) }, &mut ev).is_err());
        assert!(acl.apply(AclChange::CreateToken { token: token(A2, "s1", Role::Viewer, &[]) }, &mut ev).is_err());
        acl.apply(AclChange::CreateToken { token: token(A2, "s2", Role::Submitter, &["ml"]) }, &mut ev).unwrap();
        let t = acl.by_hash(&secret_hash("s2")).unwrap();
        assert_eq!(t.accessor, A2);
        assert!(!t.expired(Timestamp(1_999)) && t.expired(Timestamp(2_000)));
        assert_eq!(t.principal().readable_tenants().map(|t| t.len()), Some(1));
        acl.apply(AclChange::RevokeToken { accessor: A2.into() }, &mut ev).unwrap();
        assert!(acl.by_hash(&secret_hash("s2")).is_none());
        assert!(matches!(
            acl.apply(AclChange::RevokeToken { accessor: A2.into() }, &mut ev),
            Err(Rejection::NotFound(_))
        ));
        assert_eq!(ev.len(), 3);
    }

    #[test]
    fn bad_tokens_name_the_field() {
        let mut acl = Acl::default();
        let mut ev = Vec::new();
        let mut t = token("nope", "s", Role::Admin, &[]);
        assert!(matches!(
            acl.apply(AclChange::CreateToken { token: t.clone() }, &mut ev),
            Err(Rejection::InvalidArgument { field: "accessor", .. })
        ));
        t.accessor = A1.into();
        t.secret_sha256 = "abc".into();
        assert!(matches!(
            acl.apply(AclChange::CreateToken { token: t.clone() }, &mut ev),
            Err(Rejection::InvalidArgument { field: "secret_sha256", .. })
        ));
        t.secret_sha256 = secret_hash("s");
        t.expires = Some(Timestamp(10));
        assert!(matches!(
            acl.apply(AclChange::CreateToken { token: t }, &mut ev),
            Err(Rejection::InvalidArgument { field: "expires", .. })
        ));
        assert_eq!(secret_hash("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
