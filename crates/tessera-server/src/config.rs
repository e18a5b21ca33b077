//! Server configuration: a TOML file, overridden by flags (the binary maps flags onto
//! [`ServerConfig`]), validated once at start with errors that name the field.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// Which setting.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn err(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError { field: field.into(), message: message.into() }
}

/// Everything a server needs to start.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Raft id of this server, unique in the cluster, not 0.
    pub id: u64,
    /// Address the gRPC port listens on ("host:port"). Other servers and clients use
    /// `advertise` (default: this) to reach it.
    pub listen: SocketAddr,
    /// Address other servers and clients use, when it differs from `listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Directory of the Raft log and snapshots. Restarting with the same directory resumes.
    pub data_dir: PathBuf,
    /// Members of a new cluster, id -> address, including this server. Used only the first
    /// time (empty data directory); ignored afterwards.
    #[serde(default)]
    pub initial_cluster: BTreeMap<u64, String>,
    /// Address of a running server: a server started empty with `join` asks the cluster to
    /// add it (as a learner, then a voter).
    #[serde(default)]
    pub join: Option<String>,
    /// Address of the Prometheus metrics endpoint, if any.
    #[serde(default)]
    pub http: Option<SocketAddr>,
    /// Address of the web dashboard, if any: HTTPS with the server's certificate (sign in with
    /// an ACL token), or plain HTTP with `--insecure`.
    #[serde(default)]
    pub ui: Option<SocketAddr>,
    /// Raft tick in milliseconds: heartbeats every 2 ticks, elections after 10 to 20 ticks
    /// without a leader (0.5 to 1 s at the default 50 ms).
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// Where a new data directory keeps the Raft log: "raft-engine" (the default) or "sled".
    /// A directory that already holds a log keeps the engine it was written with.
    #[serde(default = "default_log_store")]
    pub log_store: String,
    /// Take a snapshot and compact the log every this many entries.
    #[serde(default = "default_snapshot_every")]
    pub snapshot_every: u64,
    /// How often the leader runs the placement loop when nothing triggers it, milliseconds.
    #[serde(default = "default_plan_interval_ms")]
    pub plan_interval_ms: u64,
    /// Interval of agent heartbeats, milliseconds.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Agents stop their shards when no message of theirs was acknowledged for this long,
    /// milliseconds. Must be at least three heartbeats.
    #[serde(default = "default_fence_ms")]
    pub fence_ms: u64,
    /// The leader marks a node down after hearing nothing from it for this long, milliseconds.
    /// Must exceed `fence_ms`, so a cut-off agent has stopped its shards before they move.
    #[serde(default = "default_node_down_ms")]
    pub node_down_ms: u64,
    /// Start a new cluster from this snapshot file (written by `tessera cluster snapshot save`)
    /// instead of an empty state. Only with `initial_cluster` and an empty data directory; give
    /// every founding member the same file. Ignored, with a warning, once the data directory
    /// holds a cluster.
    #[serde(default)]
    pub restore_from: Option<PathBuf>,
    /// CA bundle (PEM) that client, agent and peer certificates must chain to; may hold two
    /// CAs while one replaces the other.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// This server's certificate (PEM), naming `tessera://server/<id>`.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Run without TLS: nobody is authenticated. Only for a laptop or a benchmark.
    #[serde(default)]
    pub insecure: bool,
    /// A file holding the secret of the first admin token. Founding servers given it
    /// bootstrap ACLs with it once (the same file on each), instead of `tessera acl bootstrap`.
    #[serde(default)]
    pub acl_bootstrap_token_file: Option<PathBuf>,
}

fn default_heartbeat_ms() -> u64 {
    1000
}
fn default_fence_ms() -> u64 {
    3000
}
fn default_node_down_ms() -> u64 {
    4000
}

fn default_log_store() -> String {
    tessera_raft::storage::server_store::StoreKind::default().name().to_string()
}

fn default_tick_ms() -> u64 {
    50
}
fn default_snapshot_every() -> u64 {
    // As etcd: a snapshot serialises the whole state on the Raft thread, so not too often.
    100_000
}
fn default_plan_interval_ms() -> u64 {
    500
}

impl ServerConfig {
    /// A configuration with defaults for everything but the essentials.
    pub fn new(id: u64, listen: SocketAddr, data_dir: PathBuf) -> ServerConfig {
        ServerConfig {
            id,
            listen,
            advertise: None,
            data_dir,
            initial_cluster: BTreeMap::new(),
            join: None,
            http: None,
            ui: None,
            tick_ms: default_tick_ms(),
            log_store: default_log_store(),
            snapshot_every: default_snapshot_every(),
            plan_interval_ms: default_plan_interval_ms(),
            heartbeat_ms: default_heartbeat_ms(),
            fence_ms: default_fence_ms(),
            node_down_ms: default_node_down_ms(),
            restore_from: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            insecure: false,
            acl_bootstrap_token_file: None,
        }
    }

    /// The agent protocol's timing.
    pub fn agent_timeouts(&self) -> crate::hub::AgentTimeouts {
        crate::hub::AgentTimeouts {
            heartbeat: std::time::Duration::from_millis(self.heartbeat_ms),
            fence: std::time::Duration::from_millis(self.fence_ms),
            node_down: std::time::Duration::from_millis(self.node_down_ms),
            reconnect_grace: std::time::Duration::from_millis(self.heartbeat_ms),
        }
    }

    /// Read a TOML file; parse errors name the line.
    pub fn from_file(path: &Path) -> Result<ServerConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| err("config", format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1);
            err(
                &format!("{}{}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default()),
                e.message().trim().to_string(),
            )
        })
    }

    /// The address others reach this server at.
    pub fn advertise_addr(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.to_string())
    }

    /// The TLS files, when all three are given.
    pub fn tls_files(&self) -> Option<tessera_tls::TlsFiles> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => {
                Some(tessera_tls::TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() })
            }
            _ => None,
        }
    }

    /// The log store a new data directory gets.
    pub fn store_kind(&self) -> Result<tessera_raft::storage::server_store::StoreKind, ConfigError> {
        tessera_raft::storage::server_store::StoreKind::parse(&self.log_store).map_err(|m| err("log_store", m))
    }

    /// Check every setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(err("id", "must not be 0"));
        }
        let tls_given = [&self.tls_ca, &self.tls_cert, &self.tls_key].iter().filter(|f| f.is_some()).count();
        if self.insecure && tls_given > 0 {
            return Err(err("insecure", "give either the TLS files or insecure, not both"));
        }
        if !self.insecure && tls_given < 3 {
            let missing = [("tls_ca", &self.tls_ca), ("tls_cert", &self.tls_cert), ("tls_key", &self.tls_key)]
                .into_iter()
                .find(|(_, f)| f.is_none())
                .map_or("tls_ca", |(n, _)| n);
            return Err(err(
                missing,
                "a server runs with mutual TLS: give tls_ca, tls_cert and tls_key (`tessera certs` makes them), \
                 or run with --insecure (no authentication at all)",
            ));
        }
        if self.tick_ms == 0 || self.tick_ms > 10_000 {
            return Err(err("tick_ms", "must be 1 to 10000"));
        }
        self.store_kind()?;
        if self.snapshot_every < 10 {
            return Err(err("snapshot_every", "must be at least 10"));
        }
        if self.plan_interval_ms == 0 {
            return Err(err("plan_interval_ms", "must not be 0"));
        }
        if !(100..=60_000).contains(&self.heartbeat_ms) {
            return Err(err("heartbeat_ms", "must be 100 to 60000"));
        }
        if self.fence_ms < 3 * self.heartbeat_ms {
            return Err(err("fence_ms", "must be at least three heartbeat intervals"));
        }
        if self.node_down_ms <= self.fence_ms {
            return Err(err("node_down_ms", "must be longer than fence_ms, or a cut-off shard could run twice"));
        }
        if self.restore_from.is_some() && self.initial_cluster.is_empty() {
            return Err(err(
                "restore_from",
                "a snapshot seeds a new cluster: give initial_cluster too (and the same file to every founding member)",
            ));
        }
        if !self.initial_cluster.is_empty() {
            if self.join.is_some() {
                return Err(err(
                    "join",
                    "give either initial_cluster (a new cluster) or join (an existing one), not both",
                ));
            }
            if !self.initial_cluster.contains_key(&self.id) {
                return Err(err("initial_cluster", format!("does not list this server's id {}", self.id)));
            }
            if self.initial_cluster.contains_key(&0) {
                return Err(err("initial_cluster", "server ids must not be 0"));
            }
        }
        Ok(())
    }
}

/// Parse `1=127.0.0.1:7001,2=127.0.0.1:7002` into id -> address.
pub fn parse_initial_cluster(s: &str) -> Result<BTreeMap<u64, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) =
            part.split_once('=').ok_or_else(|| err("initial_cluster", format!("'{part}' is not ID=HOST:PORT")))?;
        let id: u64 = id.trim().parse().map_err(|_| err("initial_cluster", format!("'{id}' is not a server id")))?;
        if addr.trim().is_empty() || !addr.contains(':') {
            return Err(err("initial_cluster", format!("'{addr}' is not HOST:PORT")));
        }
        if out.insert(id, addr.trim().to_string()).is_some() {
            return Err(err("initial_cluster", format!("server id {id} listed twice")));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_cluster_parses_and_names_bad_parts() {
        let m = parse_initial_cluster("1=127.0.0.1:7001, 2=127.0.0.1:7002").unwrap();
        assert_eq!(m.len(), 2);
        assert!(parse_initial_cluster("1=a:1,1=b:2").unwrap_err().to_string().contains("twice"));
        assert!(parse_initial_cluster("x=a:1").unwrap_err().to_string().contains("'x'"));
        assert!(parse_initial_cluster("1").unwrap_err().to_string().contains("ID=HOST:PORT"));
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = ServerConfig::new(1, "127.0.0.1:7001".parse().unwrap(), "d".into());
        assert_eq!(c.validate().unwrap_err().field, "tls_ca", "TLS is the default");
        c.tls_ca = Some("ca.pem".into());
        assert_eq!(c.validate().unwrap_err().field, "tls_cert");
        c.insecure = true;
        assert_eq!(c.validate().unwrap_err().field, "insecure");
        c.tls_ca = None;
        c.validate().unwrap();
        c.initial_cluster = parse_initial_cluster("2=127.0.0.1:7002").unwrap();
        assert_eq!(c.validate().unwrap_err().field, "initial_cluster");
        c.id = 0;
        assert_eq!(c.validate().unwrap_err().field, "id");
    }

    #[test]
    fn config_files_report_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s.toml");
        std::fs::write(&f, "id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"d\"\nbogus = 3\n").unwrap();
        let e = ServerConfig::from_file(&f).unwrap_err();
        assert!(e.field.ends_with("line 4"), "{e}");
        std::fs::write(
            &f,
            "id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"d\"\ninsecure = true\n[initial_cluster]\n1 = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        let c = ServerConfig::from_file(&f).unwrap();
        assert_eq!(c.initial_cluster[&1], "127.0.0.1:1");
    }
}
