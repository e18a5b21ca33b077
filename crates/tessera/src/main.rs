//! The `tessera` binary: one executable for servers, agents, researchers and operators, like
//! `nomad` or `consul`: `server`, `agent`, `spec check`, `dev`, the client commands `job`,
//! `node` and `cluster` (in [`cli`], which documents their JSON output), and `completions`.
//!
//! Exit codes scripts can rely on: 0 success, 1 an operation failed, 2 invalid input (a bad
//! flag or an invalid spec), 3 not found (a job, node, GPU or server that does not exist).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

mod cli;
mod dev;

/// Tessera: a multi-cloud GPU job scheduler.
#[derive(Parser, Debug)]
#[command(name = "tessera", version, about, long_about = None, propagate_version = true, after_help = cli::EXIT_CODES_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a scheduler server (one member of the Raft cluster).
    Server(ServerArgs),
    /// Run the node agent on a GPU host.
    Agent(AgentArgs),
    /// Work with job spec files.
    #[command(subcommand)]
    Spec(SpecCommand),
    /// Run three servers and three agents with simulated GPUs in this process, for trying
    /// Tessera out (`--demo` also runs a job through an agent failure).
    Dev(dev::DevArgs),
    /// Submit, list, inspect, follow, read the output of, and cancel jobs.
    Job(cli::job::JobArgs),
    /// List and inspect GPU nodes, drain and undrain them, return GPUs to service.
    Node(cli::node::NodeArgs),
    /// Inspect the scheduler servers, change membership, save a snapshot.
    Cluster(cli::cluster::ClusterArgs),
    /// Create a CA and issue server, agent and user certificates (mutual TLS).
    Certs(cli::certs::CertsArgs),
    /// Bootstrap ACLs; create, list and revoke tokens.
    Acl(cli::acl::AclArgs),
    /// Create, change and list tenants; their quotas, priority caps and usage.
    Tenant(cli::tenant::TenantArgs),
    /// GPU-hours and cost over a time range, by tenant, user, cloud, region, instance type,
    /// node or job: `tessera usage --since 7d --by tenant,cloud,instance-type`.
    ///
    /// Counted from the jobs' timelines: an attempt uses its GPUs from its placement to its end
    /// (up to now while it runs), at its node's price per GPU-hour. A submitter sees its own
    /// tenants. JSON: {"since_unix_ms", "until_unix_ms", "group_by": [..], "rows": [{"keys":
    /// [..], "gpu_hours", "cost", "attempts", "jobs"}], "total_gpu_hours", "total_cost"}; cost in
    /// the currency of the nodes' prices (dollars). --csv: a header, then a line per group.
    Usage(cli::usage::UsageArgs),
    /// Print a shell completion script: `tessera completions bash > /etc/bash_completion.d/tessera`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(clap::Args, Debug)]
struct AgentArgs {
    /// Scheduler servers, comma-separated HOST:PORT; tried in turn, leader hints followed.
    #[arg(long, env = "TESSERA_SERVER", value_delimiter = ',', required = true)]
    servers: Vec<String>,
    /// This host's name, unique in the fleet (default: the hostname).
    #[arg(long)]
    name: Option<String>,
    /// Address other hosts reach this one at, for MASTER_ADDR (default: the name).
    #[arg(long)]
    advertise: Option<String>,
    /// Simulate GPUs instead of using NVML, like 8xH100-80GB or 4xA100-40GB,4xA100-80GB.
    #[arg(long)]
    simulate_gpus: Option<String>,
    /// Where shard attempts get their working directories.
    #[arg(long, default_value = "/var/lib/tessera/agent")]
    work_dir: PathBuf,
    /// Prometheus metrics address, HOST:PORT.
    #[arg(long)]
    http: Option<std::net::SocketAddr>,
    /// Cloud: none (default), aws or azure. On aws and azure, region, zone, instance type and
    /// spot status come from the instance metadata service, and spot notices are watched.
    #[arg(long, default_value = "none")]
    cloud: String,
    /// Instance metadata endpoint, http://HOST:PORT (default: the cloud's own).
    #[arg(long)]
    metadata_endpoint: Option<String>,
    /// Region (for --cloud none).
    #[arg(long, default_value = "local")]
    region: String,
    /// Zone (for --cloud none).
    #[arg(long, default_value = "local-a")]
    zone: String,
    /// Instance type (for --cloud none).
    #[arg(long, default_value = "unknown")]
    instance_type: String,
    /// Spot capacity (for --cloud none).
    #[arg(long)]
    spot: bool,
    /// Price per GPU-hour in dollars (for --cloud none).
    #[arg(long, default_value_t = 0.0)]
    price: f64,
    /// Node label KEY=VALUE, repeatable.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Cap per log stream of one attempt, MiB: past half of it the stream rotates, keeping its
    /// latest output.
    #[arg(long, default_value_t = 256)]
    log_cap_mib: u64,
    /// How long the output of attempts that no longer run stays on this host's disk, like 7d
    /// (`job logs` reads it from here once the leader no longer holds it).
    #[arg(long, default_value = "7d")]
    log_retention: String,
    /// Ports gangs whose rank 0 runs on this host may use for their rendezvous (MASTER_PORT),
    /// LOW-HIGH; each live gang gets one of its own [default: 29500-30499].
    #[arg(long, value_name = "LOW-HIGH")]
    rendezvous_ports: Option<String>,
    /// CA bundle (PEM) the servers' certificates must chain to.
    #[arg(long, env = "TESSERA_CA")]
    ca: Option<PathBuf>,
    /// This agent's certificate (PEM, from `tessera certs agent NODE`); names its node.
    #[arg(long, env = "TESSERA_CERT")]
    cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "TESSERA_KEY")]
    key: Option<PathBuf>,
    /// Connect without TLS, to servers started with --insecure.
    #[arg(long)]
    insecure: bool,
    /// Steps of each shard's checkpoints kept in the object store when a job's checkpoint_dir
    /// is an s3://, az:// or gs:// URL; older ones are deleted after each upload. Credentials
    /// and endpoints come from the standard environment (AWS_*, with AWS_ENDPOINT_URL for an
    /// S3-compatible store; AZURE_*; GOOGLE_*).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    checkpoint_keep: u32,
}

/// Flags override the config file; the config file overrides defaults.
#[derive(clap::Args, Debug)]
struct ServerArgs {
    /// TOML config file (fields as the flags, with initial_cluster as a table).
    #[arg(long, env = "TESSERA_SERVER_CONFIG")]
    config: Option<PathBuf>,
    /// This server's Raft id (not 0, unique in the cluster).
    #[arg(long)]
    id: Option<u64>,
    /// gRPC listen address, HOST:PORT.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Address others use to reach this server, when it differs from --listen.
    #[arg(long)]
    advertise: Option<String>,
    /// Directory of the Raft log and snapshots; restart with the same one to resume.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Members of a new cluster: 1=HOST:PORT,2=HOST:PORT,3=HOST:PORT (this server included).
    #[arg(long)]
    initial_cluster: Option<String>,
    /// Address of a running server of the cluster to join (for a server added later).
    #[arg(long)]
    join: Option<String>,
    /// Prometheus metrics address, HOST:PORT.
    #[arg(long)]
    http: Option<std::net::SocketAddr>,
    /// Web dashboard address, HOST:PORT: HTTPS with the server's certificate (sign in with an
    /// ACL token), plain HTTP with --insecure.
    #[arg(long)]
    ui: Option<std::net::SocketAddr>,
    /// Raft tick in milliseconds.
    #[arg(long)]
    tick_ms: Option<u64>,
    /// Snapshot and compact the log every this many entries.
    #[arg(long)]
    snapshot_every: Option<u64>,
    /// Log store of a new data directory: raft-engine (default) or sled. A directory that
    /// holds a log keeps its engine.
    #[arg(long)]
    log_store: Option<String>,
    /// Start a new cluster from a file written by `tessera cluster snapshot save`, instead of
    /// an empty state. Needs --initial-cluster and an empty --data-dir; give every founding
    /// server the same file.
    #[arg(long)]
    restore_from: Option<PathBuf>,
    /// CA bundle (PEM) that client, agent and peer certificates must chain to.
    #[arg(long, env = "TESSERA_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// This server's certificate (PEM, from `tessera certs server ID`).
    #[arg(long, env = "TESSERA_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "TESSERA_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Run WITHOUT TLS: nobody is authenticated (a laptop, a benchmark). Logs a warning.
    #[arg(long)]
    insecure: bool,
    /// A file holding the first admin token's secret: founding servers bootstrap ACLs with it.
    #[arg(long)]
    acl_bootstrap_token_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum SpecCommand {
    /// Check a TOML job spec and print it with every default filled in.
    ///
    /// Problems are printed with the field and line they concern; the exit code is 2.
    Check {
        /// The spec file.
        file: PathBuf,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Output {
    /// Readable text.
    Table,
    /// JSON, one document.
    Json,
}

const EXIT_FAILED: u8 = 1;
const EXIT_INVALID: u8 = 2;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("TESSERA_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Server(args) => server(args),
        Command::Agent(args) => agent(args),
        Command::Spec(SpecCommand::Check { file, output }) => spec_check(&file, output),
        Command::Dev(args) => dev::run(args),
        Command::Job(args) => cli::run(cli::job::run(args)),
        Command::Node(args) => cli::run(cli::node::run(args)),
        Command::Cluster(args) => cli::run(cli::cluster::run(args)),
        Command::Certs(args) => cli::certs::run(args),
        Command::Acl(args) => cli::run(cli::acl::run(args)),
        Command::Tenant(args) => cli::run(cli::tenant::run(args)),
        Command::Usage(args) => cli::run(cli::usage::run(args)),
        Command::Completions { shell } => cli::completions(shell, Cli::command()),
    }
}

fn server_config(a: ServerArgs) -> Result<tessera_server::ServerConfig, String> {
    let mut cfg = match &a.config {
        Some(path) => tessera_server::ServerConfig::from_file(path).map_err(|e| e.to_string())?,
        None => {
            let id = a.id.ok_or("--id is required (or a --config file)")?;
            let listen = a.listen.ok_or("--listen is required (or a --config file)")?;
            let dir = a.data_dir.clone().ok_or("--data-dir is required (or a --config file)")?;
            tessera_server::ServerConfig::new(id, listen, dir)
        }
    };
    if let Some(v) = a.id {
        cfg.id = v;
    }
    if let Some(v) = a.listen {
        cfg.listen = v;
    }
    if let Some(v) = a.data_dir {
        cfg.data_dir = v;
    }
    if let Some(v) = a.advertise {
        cfg.advertise = Some(v);
    }
    if let Some(v) = &a.initial_cluster {
        cfg.initial_cluster = tessera_server::config::parse_initial_cluster(v).map_err(|e| format!("--{e}"))?;
    }
    if let Some(v) = a.join {
        cfg.join = Some(v);
    }
    if let Some(v) = a.http {
        cfg.http = Some(v);
    }
    if let Some(v) = a.ui {
        cfg.ui = Some(v);
    }
    if let Some(v) = a.tick_ms {
        cfg.tick_ms = v;
    }
    if let Some(v) = a.snapshot_every {
        cfg.snapshot_every = v;
    }
    if let Some(v) = a.log_store {
        cfg.log_store = v;
    }
    if let Some(v) = a.restore_from {
        cfg.restore_from = Some(v);
    }
    if let Some(v) = a.tls_ca {
        cfg.tls_ca = Some(v);
    }
    if let Some(v) = a.tls_cert {
        cfg.tls_cert = Some(v);
    }
    if let Some(v) = a.tls_key {
        cfg.tls_key = Some(v);
    }
    if a.insecure {
        cfg.insecure = true;
    }
    if let Some(v) = a.acl_bootstrap_token_file {
        cfg.acl_bootstrap_token_file = Some(v);
    }
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

fn agent(a: AgentArgs) -> ExitCode {
    let kind: tessera_agent::cloud::CloudKind = match a.cloud.parse() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: --cloud: {e}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let cloud_opts = tessera_agent::CloudOptions {
        kind,
        endpoint: a.metadata_endpoint.clone(),
        poll: std::time::Duration::from_secs(1),
    };
    let mut labels = std::collections::BTreeMap::new();
    for l in &a.labels {
        match l.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                labels.insert(k.to_string(), v.to_string());
            }
            _ => {
                eprintln!("error: --label: '{l}' is not KEY=VALUE");
                return ExitCode::from(EXIT_INVALID);
            }
        }
    }
    let max_price = tessera_core::state::MAX_PRICE_MICROS_PER_GPU_HOUR / 1_000_000;
    if !(a.price.is_finite() && a.price >= 0.0 && a.price <= max_price as f64) {
        eprintln!("error: --price: must be a number of dollars from 0 to {max_price}");
        return ExitCode::from(EXIT_INVALID);
    }
    let security = match (&a.ca, &a.cert, &a.key, a.insecure) {
        (None, None, None, true) => tessera_tls::Security::Insecure,
        (Some(ca), Some(cert), Some(key), false) => {
            let files = tessera_tls::TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() };
            match tessera_tls::Tls::load(files) {
                Ok(t) => tessera_tls::Security::Tls(t),
                Err(e) => {
                    eprintln!("error: --ca/--cert/--key: {e}");
                    return ExitCode::from(EXIT_INVALID);
                }
            }
        }
        (_, _, _, true) => {
            eprintln!("error: --insecure: give either it or --ca/--cert/--key, not both");
            return ExitCode::from(EXIT_INVALID);
        }
        _ => {
            eprintln!(
                "error: an agent connects with mutual TLS: give --ca, --cert and --key (tessera certs agent NODE makes \
                 them), or --insecure for servers started with --insecure"
            );
            return ExitCode::from(EXIT_INVALID);
        }
    };
    // The certificate names the node; --name, if given, must agree.
    let cert_node = match &security {
        tessera_tls::Security::Tls(t) => match t.identity() {
            tessera_core::acl::Principal::Agent { node } => Some(node),
            other => {
                eprintln!(
                    "error: --cert: {} is not an agent certificate (tessera certs agent NODE)",
                    other.audit_name()
                );
                return ExitCode::from(EXIT_INVALID);
            }
        },
        tessera_tls::Security::Insecure => None,
    };
    if let (Some(n), Some(c)) = (&a.name, &cert_node)
        && n != c
    {
        eprintln!("error: --name {n}: the certificate is for node {c}");
        return ExitCode::from(EXIT_INVALID);
    }
    let name = a.name.clone().or(cert_node).unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into())
    });
    let log_retention = match tessera_core::spec::parse_duration_secs(&a.log_retention) {
        Ok(s) => std::time::Duration::from_secs(s),
        Err(m) => {
            eprintln!("error: --log-retention: {m}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let rendezvous_ports = match a.rendezvous_ports.as_deref().map(parse_port_range).transpose() {
        Ok(r) => r,
        Err(m) => {
            eprintln!("error: --rendezvous-ports: {m}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let cfg = tessera_agent::agent::AgentConfig {
        advertise: a.advertise.clone().unwrap_or_else(|| name.clone()),
        name,
        servers: a.servers,
        cloud: tessera_proto::v1::Cloud::None,
        region: a.region,
        zone: a.zone,
        instance_type: a.instance_type,
        spot: a.spot,
        price_micros: (a.price * 1_000_000.0).round() as u64,
        labels,
        work_dir: a.work_dir,
        log_cap_bytes: a.log_cap_mib.saturating_mul(1024 * 1024),
        log_retention,
        rendezvous_ports,
        security,
        checkpoint_stores: tessera_agent::checkpoint::Stores::new(a.metadata_endpoint.clone()),
        checkpoint_keep: a.checkpoint_keep as usize,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let result = runtime.block_on(tessera_agent::run(cfg, a.simulate_gpus, a.http, cloud_opts, shutdown_signal()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

fn server(args: ServerArgs) -> ExitCode {
    let cfg = match server_config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| (EXIT_FAILED, format!("cannot listen on {}: {e}", cfg.listen)))?;
        tessera_server::run(cfg, listener, shutdown_signal()).await.map_err(|e| match e {
            // A configuration found wanting only at start (a bad restore file) is bad input.
            tessera_server::ServerError::Config(c) => (EXIT_INVALID, c.to_string()),
            e => (EXIT_FAILED, e.to_string()),
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, e)) => {
            eprintln!("error: {e}");
            ExitCode::from(code)
        }
    }
}

fn spec_check(file: &PathBuf, output: Output) -> ExitCode {
    let src = match std::fs::read_to_string(file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", file.display());
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match tessera_core::spec::parse_toml(&src) {
        Ok(spec) => {
            match output {
                Output::Json => match serde_json::to_string_pretty(&spec) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(EXIT_FAILED);
                    }
                },
                Output::Table => print_spec(&spec),
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {}: {err}", file.display());
            ExitCode::from(EXIT_INVALID)
        }
    }
}

fn print_spec(s: &tessera_core::JobSpec) {
    let r = &s.resources;
    let p = &s.placement;
    let list = |v: &[String]| if v.is_empty() { "any".to_string() } else { v.join(",") };
    println!("name:           {}", s.name);
    println!("tenant:         {}", s.tenant);
    println!("command:        {}", s.command.join(" "));
    println!("shards:         {} x {} GPU ({} GPUs in all)", s.shards, r.gpus, s.total_gpus());
    println!("gpu model:      {}", r.gpu_model.as_deref().unwrap_or("any"));
    println!("gpu memory:     >= {} GiB", r.min_gpu_memory_mib / 1024);
    println!("cpu / memory:   {} cores / {} GiB per shard", r.cpu_millis as f64 / 1000.0, r.memory_mib / 1024);
    println!("clouds:         {}", list(&p.clouds.iter().map(|c| c.to_string()).collect::<Vec<_>>()));
    println!("regions:        {}", list(&p.regions));
    println!("spot:           {}", p.spot.as_str());
    println!("span:           regions {}, clouds {}", p.span_regions, p.span_clouds);
    println!("priority:       {}", s.priority);
    println!("max runtime:    {}", s.max_runtime_secs.map_or("none".into(), |r| format!("{r} s")));
    println!("checkpoint dir: {}", s.checkpoint_dir.as_deref().unwrap_or("none"));
    if let Some(a) = &s.array {
        println!("array:          {a} ({} elements)", a.len());
    }
    let ids = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
    if !s.after_ok.is_empty() {
        println!("after ok:       {}", ids(&s.after_ok));
    }
    if !s.after_any.is_empty() {
        println!("after any:      {}", ids(&s.after_any));
    }
    println!(
        "retry:          {} attempts, {} s backoff, never on {:?}",
        s.retry.max_attempts, s.retry.backoff_secs, s.retry.never_retry_exit_codes
    );
    println!(
        "stop:           {}, {} s, SIGTERM, {} s, SIGKILL",
        s.stop.signal, s.stop.checkpoint_grace_secs, s.stop.term_grace_secs
    );
}

/// "29500-30499" as an inclusive range of ports from 1024 up.
fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("'{s}' is not a range of ports like 29500-30499 (from 1024 up, the lowest first)");
    let (lo, hi) = s.trim().split_once('-').ok_or_else(bad)?;
    let (lo, hi): (u16, u16) = (lo.trim().parse().map_err(|_| bad())?, hi.trim().parse().map_err(|_| bad())?);
    if lo < 1024 || lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    #[test]
    fn port_ranges_are_low_high_from_1024() {
        assert_eq!(super::parse_port_range("29500-30499"), Ok((29_500, 30_499)));
        assert_eq!(super::parse_port_range(" 40000 - 40000 "), Ok((40_000, 40_000)));
        for bad in ["80-90", "30000-29000", "29500", "a-b", "29500-70000"] {
            assert!(super::parse_port_range(bad).unwrap_err().contains(bad), "{bad}");
        }
    }

    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
