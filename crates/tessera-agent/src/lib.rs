//! The Tessera node agent (`tessera agent`): runs on every GPU host.
//!
//! - [`gpu`]: inventory and telemetry from NVML, or simulated GPUs that say so.
//! - [`shard`]: one process group per attempt, its launch environment, size-capped logs, the
//!   stop ladder, and the progress protocol.
//! - [`agent`]: the stream to the leader: registration, heartbeats with telemetry and progress,
//!   assignments and stops, acknowledged reports, reconnects and self-fencing.

pub mod agent;
pub mod gpu;
pub mod shard;

use std::net::SocketAddr;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Bad configuration.
    #[error("{field}: {message}")]
    Config {
        /// Which setting.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The metrics endpoint could not start.
    #[error("metrics endpoint {addr}: {message}")]
    Metrics {
        /// Address.
        addr: SocketAddr,
        /// What.
        message: String,
    },
}

/// Run an agent until `shutdown` fires. Without NVIDIA's driver (and without
/// `simulate_gpus`) it starts anyway, with no GPUs, and says so.
pub async fn run(
    cfg: agent::AgentConfig,
    simulate_gpus: Option<String>,
    http: Option<SocketAddr>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    if cfg.servers.is_empty() {
        return Err(AgentError::Config { field: "servers", message: "give at least one server address".into() });
    }
    std::fs::create_dir_all(&cfg.work_dir)
        .map_err(|e| AgentError::Config { field: "work_dir", message: format!("{}: {e}", cfg.work_dir.display()) })?;
    let gpus = match gpu::open(simulate_gpus.as_deref(), &cfg.name) {
        Ok(g) => g,
        Err(gpu::GpuError::NoDriver(why)) => {
            tracing::warn!(%why, "no NVIDIA driver: running with no GPUs (use --simulate-gpus to simulate some)");
            gpu::none()
        }
        Err(e) => return Err(AgentError::Config { field: "simulate_gpus", message: e.to_string() }),
    };
    if gpus.simulated() {
        tracing::warn!(
            gpus = gpus.inventory().len(),
            "GPUs are SIMULATED: telemetry follows the shards' load, not hardware"
        );
    }
    let agent = agent::Agent::new(cfg, gpus);
    if let Some(addr) = http {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| AgentError::Metrics { addr, message: e.to_string() })?;
        tokio::spawn(serve_metrics(listener, agent.metrics.clone()));
    }
    agent.run(shutdown).await;
    Ok(())
}

/// A minimal HTTP/1.x responder for Prometheus scrapes: any GET gets the exposition.
async fn serve_metrics(listener: tokio::net::TcpListener, metrics: std::sync::Arc<agent::AgentMetrics>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut conn, _)) = listener.accept().await else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // Read the request head (bounded); the body of a GET is empty.
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            while n < buf.len() {
                match tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf[n..])).await {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(k)) => {
                        n += k;
                        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                }
            }
            let (status, body) = if buf[..n].starts_with(b"GET ") {
                ("200 OK", metrics.render())
            } else {
                ("405 Method Not Allowed", "only GET is served\n".to_string())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
        });
    }
}
