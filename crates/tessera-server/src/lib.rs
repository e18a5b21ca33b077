//! The Tessera scheduler server (`tessera server`).
//!
//! One gRPC port serves the job, node, cluster and Raft services (the agent stream arrives with
//! the agent), plus gRPC health and reflection; an optional HTTP port serves Prometheus
//! metrics. The replicated state is `tessera_core::State`, driven by `tessera_raft` over
//! raft-engine (or sled, in a data directory written before).
//! The leader runs the placement loop and proposes its plans through the log.
//!
//! [`run`] takes its listener and a shutdown future, so tests bind port 0.

pub mod agents;
pub mod api;
pub mod auth;
pub mod clock;
pub mod config;
pub mod context;
pub mod hub;
pub mod live;
pub mod logs;
pub mod raft_loop;
pub mod sm;
pub mod transport;
pub mod ui;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tessera_core::command::Command;
use tessera_core::planner::{PlanLimits, plan};
use tessera_proto::v1;
use tessera_raft::StateRole;
use tessera_raft::logging::tracing_logger;
use tessera_raft::node::{NodeConfig, RaftNode};
use tessera_raft::storage::server_store::ServerStore;
use tokio::net::TcpListener;
use tokio::sync::{Notify, broadcast};

pub use config::{ConfigError, ServerConfig};

use crate::context::Shared;
use crate::raft_loop::Request;
use crate::sm::{Members, ServerSm};
use crate::transport::{MAX_RAFT_MESSAGE, Transport};

/// Why a server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A configuration problem.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory could not be used.
    #[error("data directory {dir}: {source}")]
    Storage {
        /// Where.
        dir: String,
        /// What.
        source: tessera_raft::storage::StoreError,
    },
    /// Raft refused to start (for instance, a store that does not fit this server's id).
    #[error("raft: {0}")]
    Raft(String),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(String),
    /// The TLS files could not be used.
    #[error(transparent)]
    Tls(#[from] tessera_tls::TlsError),
    /// The metrics endpoint could not start.
    #[error("metrics endpoint {addr}: {message}")]
    Metrics {
        /// Address.
        addr: String,
        /// What.
        message: String,
    },
}

/// Run a server until `shutdown` completes.
pub async fn run(
    cfg: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    cfg.validate()?;
    let security = match cfg.tls_files() {
        None => {
            tracing::warn!(
                "running WITHOUT TLS (--insecure): anyone who reaches this port can run any command on every GPU host"
            );
            tessera_tls::Security::Insecure
        }
        Some(files) => {
            let tls = tessera_tls::Tls::load(files)?;
            let me = tessera_core::acl::Principal::Server { id: cfg.id };
            if tls.identity() != me {
                return Err(ServerError::Config(ConfigError {
                    field: "tls_cert".into(),
                    message: format!("the certificate names {}, not server/{}", tls.identity().audit_name(), cfg.id),
                }));
            }
            // Reloaded on SIGHUP and when the files change; open connections are not dropped.
            tls.watch(Duration::from_secs(1));
            tessera_tls::Security::Tls(tls)
        }
    };
    let auth = Arc::new(auth::Auth::new(security.is_tls()));
    let dir = cfg.data_dir.join("raft");
    let storage_err = |source| ServerError::Storage { dir: dir.display().to_string(), source };
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| storage_err(tessera_raft::storage::StoreError::Engine(e.to_string())))?;
    let voters: Vec<u64> = cfg.initial_cluster.keys().copied().collect();
    let wanted = cfg.store_kind().map_err(ServerError::Config)?;
    let mut store = ServerStore::open(&dir, wanted).map_err(storage_err)?;
    let fresh = store.is_empty();
    if store.kind() != wanted {
        tracing::warn!(
            dir = %dir.display(),
            holds = store.kind().name(),
            log_store = wanted.name(),
            "the data directory holds a log of another engine; keeping it"
        );
    }
    let seed = match (&cfg.restore_from, fresh) {
        (Some(path), true) => restore_seed(&cfg, path)?,
        (Some(path), false) => {
            tracing::warn!(file = %path.display(), "the data directory already holds a cluster: not restoring");
            Vec::new()
        }
        (None, _) => Vec::new(),
    };
    tessera_raft::storage::bootstrap_cluster_from(&mut store, &voters, seed).map_err(storage_err)?;

    if let Some(addr) = cfg.http {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| ServerError::Metrics { addr: addr.to_string(), message: e.to_string() })?;
    }

    let (events, _) = broadcast::channel(16_384);
    let mut members = Members { addresses: cfg.initial_cluster.clone() };
    members.addresses.insert(cfg.id, cfg.advertise_addr());
    let (agent_feed, agent_events) = tokio::sync::mpsc::unbounded_channel();
    let sm = ServerSm::new(members, events.clone()).with_agent_feed(agent_feed).with_auth(auth.clone());
    if fresh && voters.is_empty() && cfg.join.is_none() {
        return Err(ServerError::Config(ConfigError {
            field: "initial_cluster".into(),
            message: format!(
                "the data directory {} is empty: give initial_cluster (a new cluster) or join (an existing one)",
                cfg.data_dir.display()
            ),
        }));
    }
    let id_seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    let node_cfg = NodeConfig { snapshot_every: cfg.snapshot_every, id_seed, ..NodeConfig::new(cfg.id) };
    let node = RaftNode::new(node_cfg, store, sm, &tracing_logger()).map_err(|e| ServerError::Raft(e.to_string()))?;
    let known = node.state_machine().members.addresses.clone();

    let transport = Arc::new(Transport::new(cfg.id, tokio::runtime::Handle::current(), security.clone()));
    let (raft, raft_tx, raft_thread) = raft_loop::spawn(node, transport.clone(), Duration::from_millis(cfg.tick_ms));
    transport.set_raft(raft_tx.clone());
    for (id, addr) in known.into_iter().chain(cfg.initial_cluster.clone()) {
        transport.set_peer(id, addr);
    }

    let shared = Arc::new(Shared {
        id: cfg.id,
        raft: raft.clone(),
        transport: transport.clone(),
        events,
        plan_now: Arc::new(Notify::new()),
        agents: agents::AgentHub::new(cfg.agent_timeouts()),
        logs: logs::LogStore::default(),
        live: live::LiveView::default(),
        leader_read_channel: std::sync::Mutex::new(None),
        security: security.clone(),
        auth: auth.clone(),
        waiting: std::sync::Mutex::new(Arc::default()),
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<v1::job_service_server::JobServiceServer<api::Jobs>>().await;
    if let Some(file) = cfg.acl_bootstrap_token_file.clone() {
        tokio::spawn(api::acl::bootstrap_from_file(shared.clone(), file));
    }
    // Reflection as v1 and as v1alpha: Python's grpcio-reflection and older grpcurl builds
    // speak only v1alpha.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tessera_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Grpc(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tessera_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServerError::Grpc(e.to_string()))?;

    let tasks = vec![
        tokio::spawn(placement_loop(shared.clone(), Duration::from_millis(cfg.plan_interval_ms))),
        tokio::spawn(metrics_loop(raft.clone())),
        tokio::spawn(agents::liveness_loop(shared.clone())),
        tokio::spawn(agents::route_loop(shared.clone(), agent_events)),
    ];
    let mut tasks = tasks;
    if let Some(addr) = cfg.ui {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| ServerError::Metrics { addr: addr.to_string(), message: format!("dashboard: {e}") })?;
        tracing::info!(%addr, tls = shared.security.is_tls(), "web dashboard listening");
        tasks.push(tokio::spawn(ui::serve(shared.clone(), listener)));
    }
    if let (Some(join), true) = (cfg.join.clone(), fresh) {
        tokio::spawn(join_cluster(shared.clone(), join, cfg.advertise_addr()));
    }

    tracing::info!(id = cfg.id, listen = %cfg.listen, data_dir = %cfg.data_dir.display(), "server started");
    let result = tonic::transport::Server::builder()
        .layer(auth::AuthLayer(auth.clone()))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(v1::job_service_server::JobServiceServer::new(api::Jobs(shared.clone())))
        .add_service(v1::node_service_server::NodeServiceServer::new(api::Nodes(shared.clone())))
        .add_service(v1::cluster_service_server::ClusterServiceServer::new(api::Cluster(shared.clone())))
        .add_service(v1::agent_service_server::AgentServiceServer::new(api::Agents(shared.clone())))
        .add_service(v1::acl_service_server::AclServiceServer::new(api::AclRpc(shared.clone())))
        .add_service(v1::tenant_service_server::TenantServiceServer::new(api::Tenants(shared.clone())))
        .add_service(
            v1::raft_service_server::RaftServiceServer::new(api::RaftRpc(shared.clone()))
                .max_decoding_message_size(MAX_RAFT_MESSAGE)
                .max_encoding_message_size(MAX_RAFT_MESSAGE),
        )
        .serve_with_incoming_shutdown(security.incoming(listener), shutdown)
        .await
        .map_err(|e| ServerError::Grpc(e.to_string()));
    for t in tasks {
        t.abort();
    }
    let _ = raft_tx.send(Request::Shutdown);
    let _ = tokio::task::spawn_blocking(move || raft_thread.join()).await;
    tracing::info!(id = cfg.id, "server stopped");
    result
}

/// A planning round this long is logged (the Raft thread waits meanwhile).
const SLOW_PLAN: Duration = Duration::from_millis(100);

/// The leader plans whenever something changed (or every `interval`) and proposes the plan.
async fn placement_loop(shared: Arc<Shared>, interval: Duration) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shared.plan_now.notified() => {}
        }
        if shared.raft.status().role != StateRole::Leader {
            if !shared.waiting().is_empty() {
                shared.set_waiting(Default::default());
            }
            continue;
        }
        // Planning runs on the Raft thread. Planning on a copy elsewhere was tried and measured
        // slower here (docs/performance.md, "Planning on a copy"): making and freeing the copy
        // cost more than the plan it moved.
        let planned = shared
            .raft
            .local(|n| {
                let state = &n.state_machine().state;
                metrics::gauge!("tessera_jobs_pending").set(state.pending_jobs().len() as f64);
                metrics::gauge!("tessera_attempts_live").set(state.live_attempts().len() as f64);
                let started = std::time::Instant::now();
                let out = plan(state, clock::now(), &PlanLimits::default());
                let took = started.elapsed();
                let p = out.plan;
                metrics::histogram!("tessera_plan_seconds").record(took.as_secs_f64());
                if took >= SLOW_PLAN {
                    tracing::warn!(plan_ms = took.as_millis() as u64, shards = p.shard_count(), "slow planning round");
                }
                (p, out.waiting)
            })
            .await;
        let Ok((p, waiting)) = planned else { return };
        shared.set_waiting(waiting);
        if p.is_empty() {
            continue;
        }
        let shards = p.shard_count();
        match shared.write(&Command::ApplyPlan { plan: p }).await {
            Ok(events) => {
                let rejected =
                    events.iter().filter(|e| matches!(e, tessera_core::Event::PlacementRejected { .. })).count();
                metrics::counter!("tessera_shards_placed_total").increment(shards as u64);
                if rejected > 0 {
                    tracing::warn!(rejected, "plan placements went stale before they applied");
                }
            }
            Err(e) => tracing::debug!(error = %e.message(), "plan not applied"),
        }
    }
}

async fn metrics_loop(raft: raft_loop::RaftHandle) {
    let mut status = raft.watch_status();
    loop {
        {
            let s = status.borrow_and_update();
            metrics::gauge!("tessera_raft_term").set(s.term as f64);
            metrics::gauge!("tessera_raft_commit_index").set(s.commit as f64);
            metrics::gauge!("tessera_raft_applied_index").set(s.applied as f64);
            metrics::gauge!("tessera_raft_is_leader").set(if s.role == StateRole::Leader { 1.0 } else { 0.0 });
            metrics::gauge!("tessera_raft_log_entries").set(s.last_index.saturating_sub(s.first_index) as f64);
            metrics::gauge!("tessera_raft_waiting_requests").set(s.waiting as f64);
        }
        if status.changed().await.is_err() {
            return;
        }
    }
}

/// The initial snapshot of a cluster restored from a `cluster snapshot save` file: the saved
/// state, with the members this cluster is configured with.
fn restore_seed(cfg: &ServerConfig, path: &std::path::Path) -> Result<Vec<u8>, ServerError> {
    let bad = |message: String| ServerError::Config(ConfigError { field: "restore_from".into(), message });
    let data = std::fs::read(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    let state = tessera_core::State::restore(&data)
        .map_err(|e| bad(format!("{} is not a Tessera snapshot: {e}", path.display())))?;
    let mut members = Members { addresses: cfg.initial_cluster.clone() };
    members.addresses.insert(cfg.id, cfg.advertise_addr());
    let mut sm = ServerSm::new(members, broadcast::channel(1).0);
    tracing::info!(file = %path.display(), jobs = state.jobs().len(), nodes = state.nodes().len(), "restoring from snapshot");
    sm.state = state;
    Ok(tessera_raft::node::StateMachine::snapshot(&sm))
}

/// A server started empty with `--join`: learn the members from a running server, then ask
/// the cluster to add this server.
async fn join_cluster(shared: Arc<Shared>, join: String, me: String) {
    let mut delay = Duration::from_millis(200);
    loop {
        match try_join(&shared, &join, &me).await {
            Ok(()) => {
                tracing::info!(%join, "joined the cluster");
                return;
            }
            Err(e) => {
                tracing::warn!(%join, error = %e, "joining the cluster failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn try_join(shared: &Shared, join: &str, me: &str) -> Result<(), String> {
    let ep = shared.security.endpoint(join).map_err(|e| e.to_string())?;
    let ch = shared.security.connect(&ep).await.map_err(|e| e.to_string())?;
    let mut client = v1::cluster_service_client::ClusterServiceClient::new(ch);
    let status = client.status(v1::StatusRequest {}).await.map_err(|e| e.message().to_string())?.into_inner();
    for m in &status.members {
        if m.id != shared.id && !m.address.is_empty() {
            shared.transport.set_peer(m.id, m.address.clone());
        }
    }
    client
        .add_server(v1::AddServerRequest { id: shared.id, address: me.to_string(), learner: false })
        .await
        .map_err(|e| e.message().to_string())?;
    Ok(())
}
