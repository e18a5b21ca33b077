//! `tessera node`: the GPU hosts, their GPUs, and draining them.

use clap::Subcommand;
use tessera_proto::v1;
use tessera_proto::v1::node_service_client::NodeServiceClient;

use super::connect::{RpcError, Servers, UNARY_TIMEOUT, about};
use super::output::{self, Format, NodeJson};
use super::{CliError, CliResult, ClientOpts};

/// Flags and subcommand of `tessera node`.
#[derive(clap::Args, Debug)]
#[command(after_help = super::CLIENT_AFTER_HELP)]
pub struct NodeArgs {
    #[command(flatten)]
    client: ClientOpts,
    #[command(subcommand)]
    command: NodeCommand,
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// List nodes: cloud, region, instance type, GPUs free/used/unhealthy, utilisation.
    ///
    /// JSON: {"nodes": [Node]}, each Node as `tessera node show --help` describes it.
    #[command(after_help = super::CLIENT_AFTER_HELP)]
    List,
    /// Show one node and every GPU's health, holder and telemetry.
    ///
    /// JSON (a Node): {"id", "name", "state": ready|draining|down, "cloud", "region", "zone",
    /// "instance_type", "spot", "price_per_gpu_hour_micros", "simulated", "gpus_total",
    /// "gpus_free", "gpus_used", "gpus_unhealthy", "utilization_percent" (mean of the GPUs
    /// with telemetry, or null), "cpu_millis", "cpu_millis_used", "memory_mib",
    /// "memory_mib_used", "labels", "agent_version", "last_heartbeat_unix_ms", "drain_reason":
    /// null|operator|spot_interruption, "drain_deadline_unix_ms", "down_since_unix_ms",
    /// "gpus": [Gpu]}; Gpu: {"index", "uuid", "model", "memory_mib", "healthy",
    /// "health_reason", "unhealthy_since_unix_ms", "back_unix_ms" (when an unhealthy GPU returns
    /// by itself; null: when cleared), "recent_faults", "allocation": {"job_id", "shard_index",
    /// "attempt_id"}|null, "telemetry": {"sample_unix_ms", "utilization_percent",
    /// "memory_used_mib", "memory_total_mib", "temperature_c", "power_w", "power_limit_w",
    /// "sm_clock_mhz", "ecc_corrected_volatile", "ecc_uncorrected_volatile", "retired_pages",
    /// "remapped_rows", "xid_errors"}|null}. Telemetry comes from the server the agent
    /// reports to (the leader). A free GPU is healthy and held by no shard.
    #[command(after_help = super::CLIENT_AFTER_HELP)]
    Show {
        /// Node name.
        name: String,
    },
    /// Drain a node: no new shards; its shards checkpoint, stop and move elsewhere.
    ///
    /// With --deadline, shards whose declared max runtime ends before it may finish there.
    /// Prints the node afterwards (JSON: a Node, see `tessera node show --help`).
    #[command(after_help = super::CLIENT_AFTER_HELP)]
    Drain {
        /// Node name.
        name: String,
        /// When the node goes away, from now: seconds or 90s, 15m, 2h, 1h30m, 7d (at most 30d).
        #[arg(long, value_name = "DURATION")]
        deadline: Option<String>,
        /// Why, for the servers' log.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Return a draining node to service.
    ///
    /// Prints the node afterwards (JSON: a Node, see `tessera node show --help`).
    #[command(after_help = super::CLIENT_AFTER_HELP)]
    Undrain {
        /// Node name.
        name: String,
    },
    /// Mark GPUs of a node healthy again (after an operator reset one that raised an XID).
    ///
    /// Prints the node afterwards (JSON: a Node, see `tessera node show --help`).
    #[command(after_help = super::CLIENT_AFTER_HELP)]
    ClearGpu {
        /// Node name.
        name: String,
        /// GPU indices, as `node show` lists them.
        #[arg(required = true, value_name = "GPU")]
        gpus: Vec<u32>,
        /// Why, for the servers' log.
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Run `tessera node ...`.
pub async fn run(args: NodeArgs) -> CliResult {
    let servers = Servers::from_opts(&args.client)?;
    let out = args.client.output;
    match args.command {
        NodeCommand::List => list(&servers, out).await,
        NodeCommand::Show { name } => {
            let node = servers
                .call(Some(UNARY_TIMEOUT), |ch| {
                    let req = v1::GetNodeRequest { node: Some(by_name(&name)), consistency: 0 };
                    let name = name.clone();
                    async move {
                        let r =
                            NodeServiceClient::new(ch).get_node(req).await.map_err(about(format!("node {name}")))?;
                        r.into_inner().node.ok_or_else(|| no_node(&name))
                    }
                })
                .await?;
            show(&node, out)
        }
        NodeCommand::Drain { name, deadline, reason } => {
            let deadline_seconds = match deadline {
                None => None,
                Some(d) => Some(
                    tessera_core::spec::parse_duration_secs(&d)
                        .map_err(|m| CliError::Invalid(format!("--deadline: {m}")))?,
                ),
            };
            let node = servers
                .call(Some(UNARY_TIMEOUT), |ch| {
                    let req = v1::DrainNodeRequest {
                        node: Some(by_name(&name)),
                        deadline_seconds,
                        reason: reason.clone().unwrap_or_default(),
                    };
                    let name = name.clone();
                    async move {
                        let r =
                            NodeServiceClient::new(ch).drain_node(req).await.map_err(about(format!("node {name}")))?;
                        r.into_inner().node.ok_or_else(|| no_node(&name))
                    }
                })
                .await?;
            changed(&node, out)
        }
        NodeCommand::Undrain { name } => {
            let node = servers
                .call(Some(UNARY_TIMEOUT), |ch| {
                    let req = v1::UndrainNodeRequest { node: Some(by_name(&name)) };
                    let name = name.clone();
                    async move {
                        let r = NodeServiceClient::new(ch)
                            .undrain_node(req)
                            .await
                            .map_err(about(format!("node {name}")))?;
                        r.into_inner().node.ok_or_else(|| no_node(&name))
                    }
                })
                .await?;
            changed(&node, out)
        }
        NodeCommand::ClearGpu { name, gpus, reason } => {
            let node = servers
                .call(Some(UNARY_TIMEOUT), |ch| {
                    let req = v1::ClearGpuHealthRequest {
                        node: Some(by_name(&name)),
                        gpu_indices: gpus.clone(),
                        reason: reason.clone().unwrap_or_default(),
                    };
                    // NOT_FOUND names the node or the GPU: keep the server's words.
                    async move { Ok(NodeServiceClient::new(ch).clear_gpu_health(req).await?.into_inner().node) }
                })
                .await?
                .ok_or_else(|| CliError::Failed(format!("the server sent no node {name}")))?;
            changed(&node, out)
        }
    }
}

fn by_name(name: &str) -> v1::NodeRef {
    v1::NodeRef { node: Some(v1::node_ref::Node::Name(name.to_string())) }
}

fn no_node(name: &str) -> RpcError {
    RpcError::Fatal(CliError::Failed(format!("the server sent no node {name}")))
}

#[derive(serde::Serialize)]
struct ListJson {
    nodes: Vec<NodeJson>,
}

async fn list(servers: &Servers, out: Format) -> CliResult {
    let nodes = servers
        .call(Some(UNARY_TIMEOUT), |ch| async move {
            let mut c = NodeServiceClient::new(ch);
            let mut nodes = Vec::new();
            let mut token = String::new();
            loop {
                let req = v1::ListNodesRequest {
                    include_telemetry: true,
                    page_size: 1000,
                    page_token: token.clone(),
                    ..Default::default()
                };
                let page = c.list_nodes(req).await?.into_inner();
                nodes.extend(page.nodes);
                if page.next_page_token.is_empty() || page.next_page_token == token {
                    return Ok(nodes);
                }
                token = page.next_page_token;
            }
        })
        .await?;
    if out == Format::Json {
        output::json(&ListJson { nodes: nodes.iter().map(NodeJson::from).collect() })?;
        return Ok(0);
    }
    if nodes.is_empty() {
        output::line("no nodes (start an agent: tessera agent --servers ...)")?;
        return Ok(0);
    }
    let mut t = output::table(&[
        "NAME",
        "STATE",
        "CLOUD",
        "REGION",
        "INSTANCE",
        "SPOT",
        "GPUS",
        "FREE",
        "USED",
        "UNHEALTHY",
        "UTIL",
    ]);
    for n in &nodes {
        let (_, free, used, unhealthy) = output::gpu_counts(n);
        t.add_row(vec![
            n.name.clone(),
            node_state_text(n),
            output::cloud(n.cloud).unwrap_or_else(|| "-".into()),
            dash(&n.region),
            dash(&n.instance_type),
            if n.spot { "spot".into() } else { "on-demand".into() },
            output::gpu_models(n),
            free.to_string(),
            used.to_string(),
            unhealthy.to_string(),
            output::utilization(n).map_or("-".into(), |u| format!("{u:.0}%")),
        ]);
    }
    output::print_table(&t)?;
    Ok(0)
}

fn dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.to_string() }
}

fn node_state_text(n: &v1::Node) -> String {
    let mut s = output::node_state(n.state);
    if let Some(r) = output::drain_reason(n.drain_reason) {
        s.push_str(&format!(" ({r})"));
    }
    if n.simulated {
        s.push_str(", simulated");
    }
    s
}

/// After a drain, undrain or clear: a line in text, the node in JSON.
fn changed(node: &v1::Node, out: Format) -> CliResult {
    if out == Format::Json {
        output::json(&NodeJson::from(node))?;
        return Ok(0);
    }
    let (total, free, used, unhealthy) = output::gpu_counts(node);
    let mut line = format!("node {}: {}", node.name, node_state_text(node));
    if node.drain_deadline_unix_ms.is_some() {
        line.push_str(&format!(", goes away {}", output::when(node.drain_deadline_unix_ms)));
    }
    line.push_str(&format!("; GPUs: {total} in all, {free} free, {used} used, {unhealthy} unhealthy"));
    output::line(line)?;
    Ok(0)
}

fn show(n: &v1::Node, out: Format) -> CliResult {
    if out == Format::Json {
        output::json(&NodeJson::from(n))?;
        return Ok(0);
    }
    let (total, free, used, unhealthy) = output::gpu_counts(n);
    let mut lines = vec![
        format!("node:          {} (id {})", n.name, n.id),
        format!("state:         {}", node_state_text(n)),
        format!(
            "where:         {} {} {}",
            output::cloud(n.cloud).unwrap_or_else(|| "-".into()),
            dash(&n.region),
            dash(&n.zone)
        ),
        format!(
            "instance:      {} ({}, ${:.2}/GPU-hour)",
            dash(&n.instance_type),
            if n.spot { "spot" } else { "on-demand" },
            n.price_per_gpu_hour_micros as f64 / 1e6
        ),
        format!("gpus:          {total} in all, {free} free, {used} used, {unhealthy} unhealthy"),
        format!("cpu:           {} of {} cores used", n.cpu_millis_used as f64 / 1000.0, n.cpu_millis as f64 / 1000.0),
        format!("memory:        {} of {} used", output::mib(n.memory_mib_used), output::mib(n.memory_mib)),
    ];
    if !n.labels.is_empty() {
        let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        lines.push(format!("labels:        {}", labels.join(", ")));
    }
    lines.push(format!("agent:         {}", dash(&n.agent_version)));
    lines.push(format!(
        "heartbeat:     {}",
        output::when((n.last_heartbeat_unix_ms != 0).then_some(n.last_heartbeat_unix_ms))
    ));
    if n.drain_deadline_unix_ms.is_some() {
        lines.push(format!("goes away:     {}", output::when(n.drain_deadline_unix_ms)));
    }
    if n.down_since_unix_ms.is_some() {
        lines.push(format!("down since:    {}", output::when(n.down_since_unix_ms)));
    }
    output::line(lines.join("\n"))?;
    if n.gpus.is_empty() {
        return Ok(0);
    }
    output::line("")?;
    let mut t = output::table(&[
        "GPU", "MODEL", "MEMORY", "HEALTH", "HELD BY", "UTIL", "MEM USED", "TEMP", "POWER", "SM CLOCK", "ECC C/U",
        "XID",
    ]);
    for g in &n.gpus {
        let health = match &g.health {
            Some(h) if !h.healthy => {
                let back = match h.until_unix_ms {
                    Some(t) => format!(", back {}", output::when(Some(t))),
                    None => ", out until cleared".into(),
                };
                format!("unhealthy: {}{back}", if h.reason.is_empty() { "?" } else { &h.reason })
            }
            _ => "healthy".into(),
        };
        let held = g.allocation.as_ref().map_or("-".into(), |a| format!("job {} shard {}", a.job_id, a.shard_index));
        let tel = g.telemetry.clone().unwrap_or_default();
        let has = g.telemetry.is_some();
        let ecc = if tel.ecc_corrected_volatile.is_some() || tel.ecc_uncorrected_volatile.is_some() {
            format!("{}/{}", output::opt(tel.ecc_corrected_volatile), output::opt(tel.ecc_uncorrected_volatile))
        } else {
            "-".into()
        };
        t.add_row(vec![
            g.index.to_string(),
            g.model.clone(),
            output::mib(g.memory_mib),
            health,
            held,
            output::opt(tel.utilization_percent.map(|u| format!("{u}%"))),
            output::opt(tel.memory_used_mib.map(output::mib)),
            output::opt(tel.temperature_c.map(|c| format!("{c} C"))),
            match (tel.power_w, tel.power_limit_w) {
                (Some(p), Some(l)) => format!("{p:.0}/{l:.0} W"),
                (Some(p), None) => format!("{p:.0} W"),
                _ => "-".into(),
            },
            output::opt(tel.sm_clock_mhz.map(|c| format!("{c} MHz"))),
            ecc,
            if !has || tel.xid_errors.is_empty() {
                "-".into()
            } else {
                tel.xid_errors.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
            },
        ]);
    }
    output::print_table(&t)?;
    Ok(0)
}
