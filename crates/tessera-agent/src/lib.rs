//! The Tessera node agent (`tessera agent`): runs on every GPU host.
//!
//! - [`gpu`]: inventory and telemetry from NVML, or simulated GPUs that say so.
//! - [`shard`]: one process group per attempt, its launch environment, size-capped logs, the
//!   stop ladder, and the progress protocol.
//! - [`protocol`]: the stream protocol as a pure state machine (no IO, no clock): the outbox,
//!   sequence numbers and acks, the fence, heartbeat timing, reconnect waits, the stop ladder's
//!   timing. It answers with actions.
//! - [`checkpoint`]: checkpoints in object stores (S3, Azure Blob, GCS): copied from the
//!   attempt's local directory in the background and reported only once durable; downloaded
//!   before a resumed attempt starts; old steps pruned.
//! - [`agent`]: the IO loop that drives [`protocol`]: the stream to the leader, registration,
//!   heartbeats with telemetry and progress, assignments and stops, self-fencing.

pub mod agent;
pub mod checkpoint;
pub mod cloud;
pub mod gpu;
pub mod protocol;
pub mod shard;

#[cfg(test)]
mod tests {
    #[test]
    fn faults_parse_and_name_bad_parameters() {
        assert_eq!(super::parse_fault("/simulate/xid?gpu=1&xid=79").unwrap(), (1, super::gpu::GpuEventKind::Xid(79)));
        assert_eq!(super::parse_fault("/simulate/ecc?gpu=0").unwrap(), (0, super::gpu::GpuEventKind::EccUncorrectable));
        assert!(super::parse_fault("/simulate/xid?gpu=x&xid=79").unwrap_err().contains("gpu"));
        assert!(super::parse_fault("/simulate/xid?gpu=1").unwrap_err().contains("xid"));
        assert!(super::parse_fault("/simulate/melt?gpu=1").is_err());
    }
}

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

/// Where the agent learns its cloud placement and watches for spot notices.
#[derive(Debug, Clone)]
pub struct CloudOptions {
    /// none, aws or azure.
    pub kind: cloud::CloudKind,
    /// Instance metadata endpoint (`http://host:port`); default the cloud's own. Tests point it
    /// at a fake on 127.0.0.1.
    pub endpoint: Option<String>,
    /// How often spot notices are polled.
    pub poll: std::time::Duration,
}

/// Run an agent until `shutdown` fires. Without NVIDIA's driver (and without
/// `simulate_gpus`) it starts anyway, with no GPUs, and says so. On aws or azure the cloud,
/// region, zone, instance type and spot status come from the instance metadata service.
pub async fn run(
    mut cfg: agent::AgentConfig,
    simulate_gpus: Option<String>,
    http: Option<SocketAddr>,
    cloud_opts: CloudOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    // New certificates (SIGHUP, or the files changing) apply to the next connection; the open
    // stream and the running shards carry on.
    let _watch = match &cfg.security {
        tessera_tls::Security::Tls(tls) => Some(tls.watch(std::time::Duration::from_secs(1))),
        tessera_tls::Security::Insecure => None,
    };
    let metadata = match cloud_opts.kind {
        cloud::CloudKind::None => None,
        kind => {
            let client = cloud::MetadataClient::new(kind, cloud_opts.endpoint.as_deref())
                .map_err(|e| AgentError::Config { field: "metadata_endpoint", message: e.to_string() })?;
            let mut tries = 0;
            let info = loop {
                match client.discover().await {
                    Ok(info) => break info,
                    Err(e) if tries < 5 => {
                        tries += 1;
                        tracing::warn!(error = %e, "instance metadata not available yet; retrying");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                    Err(e) => {
                        return Err(AgentError::Config { field: "cloud", message: format!("instance metadata: {e}") });
                    }
                }
            };
            tracing::info!(cloud = %kind, region = %info.region, zone = %info.zone, instance_type = %info.instance_type, spot = info.spot, "cloud placement discovered");
            cfg.cloud = match kind {
                cloud::CloudKind::Aws => tessera_proto::v1::Cloud::Aws,
                _ => tessera_proto::v1::Cloud::Azure,
            };
            cfg.region = info.region;
            cfg.zone = info.zone;
            cfg.instance_type = info.instance_type;
            cfg.spot = info.spot;
            Some(client)
        }
    };
    if cfg.servers.is_empty() {
        return Err(AgentError::Config { field: "servers", message: "give at least one server address".into() });
    }
    std::fs::create_dir_all(&cfg.work_dir)
        .map_err(|e| AgentError::Config { field: "work_dir", message: format!("{}: {e}", cfg.work_dir.display()) })?;
    // Shards of an earlier agent on this host are unknown to this one: none may run twice.
    let leftovers = shard::kill_leftovers(&cfg.work_dir);
    if leftovers > 0 {
        tracing::warn!(leftovers, "killed the shards an earlier agent left running");
    }
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
    let simulated = gpus.simulated();
    let mut agent = agent::Agent::new(cfg, gpus);
    if let Some(client) = metadata {
        let acks = agent.acknowledgements();
        tokio::spawn(watch_notices(client, cloud_opts.poll, agent.notice_sender(), acks));
    }
    if let Some(addr) = http {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| AgentError::Metrics { addr, message: e.to_string() })?;
        let faults = simulated.then(|| agent.fault_injector());
        tokio::spawn(serve_metrics(listener, agent.metrics.clone(), faults));
    }
    agent.run(shutdown).await;
    Ok(())
}

/// Poll the cloud for spot interruption notices and hand each new one to the agent once; send
/// the acknowledgements the agent asks for (Azure events, once its shards stopped).
async fn watch_notices(
    client: cloud::MetadataClient,
    every: std::time::Duration,
    tx: tokio::sync::mpsc::UnboundedSender<cloud::Notice>,
    mut acks: tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let mut seen = std::collections::BTreeSet::new();
    loop {
        while let Ok(id) = acks.try_recv() {
            match client.acknowledge(&id).await {
                Ok(()) => tracing::info!(event = %id, "scheduled event acknowledged"),
                Err(e) => tracing::warn!(event = %id, error = %e, "acknowledging the scheduled event failed"),
            }
        }
        match client.poll_notice().await {
            Ok(Some(n)) if seen.insert(n.event_id.clone()) => {
                tracing::warn!(kind = ?n.kind, deadline = n.deadline_unix_ms, "spot interruption notice");
                if tx.send(n).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "polling for spot notices failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            Some(id) = acks.recv() => {
                match client.acknowledge(&id).await {
                    Ok(()) => tracing::info!(event = %id, "scheduled event acknowledged"),
                    Err(e) => tracing::warn!(event = %id, error = %e, "acknowledging the scheduled event failed"),
                }
            }
        }
    }
}

/// Parse `/simulate/xid?gpu=1&xid=79` or `/simulate/ecc?gpu=1` into a fault to inject.
fn parse_fault(path: &str) -> Result<(u32, gpu::GpuEventKind), String> {
    let (what, query) = path
        .strip_prefix("/simulate/")
        .and_then(|p| p.split_once('?'))
        .ok_or("expected /simulate/xid?gpu=N&xid=X or /simulate/ecc?gpu=N")?;
    let mut gpu = None;
    let mut xid = None;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("gpu", v)) => gpu = Some(v.parse::<u32>().map_err(|_| format!("gpu: '{v}' is not a GPU index"))?),
            Some(("xid", v)) => xid = Some(v.parse::<u64>().map_err(|_| format!("xid: '{v}' is not an XID number"))?),
            _ => return Err(format!("unknown parameter '{pair}'")),
        }
    }
    let gpu = gpu.ok_or("gpu: required")?;
    match what {
        "xid" => Ok((gpu, gpu::GpuEventKind::Xid(xid.ok_or("xid: required")?))),
        "ecc" => Ok((gpu, gpu::GpuEventKind::EccUncorrectable)),
        other => Err(format!("'{other}' is not a fault (xid or ecc)")),
    }
}

/// A minimal HTTP/1.x responder: any GET gets the Prometheus exposition; with simulated GPUs,
/// `GET /simulate/xid?gpu=N&xid=X` and `GET /simulate/ecc?gpu=N` raise a fault (for tests and
/// demos; real GPUs never accept it).
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<agent::AgentMetrics>,
    faults: Option<tokio::sync::mpsc::UnboundedSender<(u32, gpu::GpuEventKind)>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut conn, _)) = listener.accept().await else { continue };
        let metrics = metrics.clone();
        let faults = faults.clone();
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
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = if !head.starts_with("GET ") {
                ("405 Method Not Allowed", "only GET is served\n".to_string())
            } else if path.starts_with("/simulate/") {
                match (&faults, parse_fault(path)) {
                    (None, _) => ("404 Not Found", "faults can be injected only into simulated GPUs\n".to_string()),
                    (Some(_), Err(e)) => ("400 Bad Request", format!("{e}\n")),
                    (Some(tx), Ok(fault)) => {
                        let _ = tx.send(fault);
                        ("200 OK", format!("injected {:?} on GPU {}\n", fault.1, fault.0))
                    }
                }
            } else {
                ("200 OK", metrics.render())
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
