//! `tessera tenant`: tenants as objects: fair-share weight, quotas (GPUs at once, GPU-hours per
//! rolling window, per cloud), the priority cap and default, and usage.

use std::collections::BTreeMap;

use clap::Subcommand;
use serde::Serialize;
use tessera_proto::v1;
use tessera_proto::v1::tenant_service_client::TenantServiceClient;

use super::connect::{Servers, UNARY_TIMEOUT, about};
use super::output::{self, Format};
use super::{CliError, CliResult, ClientOpts};

#[derive(clap::Args, Debug)]
#[command(after_help = super::CLIENT_AFTER_HELP)]
pub struct TenantArgs {
    #[command(flatten)]
    client: ClientOpts,
    #[command(subcommand)]
    command: TenantCommand,
}

#[derive(clap::Args, Debug, Clone, Default)]
struct TenantFields {
    /// Fair-share weight, 1 to 10000.
    #[arg(long)]
    weight: Option<u32>,
    /// Most GPUs held at once (0 clears it).
    #[arg(long)]
    gpu_quota: Option<u64>,
    /// Most GPU-hours within the window, all clouds (0 clears it).
    #[arg(long)]
    gpu_hours_quota: Option<f64>,
    /// Per-cloud GPU-hour quota, CLOUD=HOURS (repeatable; HOURS 0 clears that cloud's).
    #[arg(long = "cloud-gpu-hours-quota", value_name = "CLOUD=HOURS")]
    cloud_quota: Vec<String>,
    /// The GPU-hour window, like 7d or 24h.
    #[arg(long)]
    window: Option<String>,
    /// Highest priority its jobs may ask for (name or 0..1000).
    #[arg(long)]
    max_priority: Option<String>,
    /// Priority of its jobs that give none (name or 0..1000).
    #[arg(long)]
    default_priority: Option<String>,
}

#[derive(Subcommand, Debug)]
enum TenantCommand {
    /// Create a tenant (fails if it exists).
    Create {
        /// Name.
        name: String,
        #[command(flatten)]
        fields: TenantFields,
    },
    /// Change a tenant (fails if it does not exist); unset flags keep their value.
    Set {
        /// Name.
        name: String,
        #[command(flatten)]
        fields: TenantFields,
    },
    /// List tenants with their usage.
    List,
    /// One tenant with its usage by cloud.
    Show {
        /// Name.
        name: String,
    },
    /// GPU-hours per tenant and cloud: decayed (fair share) and within the quota window.
    Usage,
}

fn request(name: String, mode: v1::TenantWriteMode, f: TenantFields) -> Result<v1::SetTenantRequest, CliError> {
    let prio = |flag: &str, v: Option<String>| -> Result<Option<u32>, CliError> {
        v.map(|p| {
            tessera_core::spec::parse_priority(&p)
                .map(u32::from)
                .map_err(|m| CliError::Invalid(format!("--{flag}: {m}")))
        })
        .transpose()
    };
    let mut cloud = BTreeMap::new();
    for c in &f.cloud_quota {
        let (k, v) = c
            .split_once('=')
            .ok_or_else(|| CliError::Invalid(format!("--cloud-gpu-hours-quota: '{c}' is not CLOUD=HOURS")))?;
        let h: f64 = v
            .parse()
            .ok()
            .filter(|h: &f64| h.is_finite() && *h >= 0.0)
            .ok_or_else(|| CliError::Invalid(format!("--cloud-gpu-hours-quota: '{v}' is not a number of hours")))?;
        cloud.insert(k.to_string(), h);
    }
    let window = f
        .window
        .map(|w| tessera_core::spec::parse_duration_secs(&w).map_err(|m| CliError::Invalid(format!("--window: {m}"))))
        .transpose()?;
    Ok(v1::SetTenantRequest {
        name,
        mode: mode as i32,
        weight: f.weight,
        gpu_quota: f.gpu_quota,
        gpu_hours_quota: f.gpu_hours_quota,
        replace_cloud_gpu_hours_quota: false,
        cloud_gpu_hours_quota: cloud,
        gpu_hours_window_seconds: window,
        max_priority: prio("max-priority", f.max_priority)?,
        default_priority: prio("default-priority", f.default_priority)?,
    })
}

#[derive(Serialize)]
struct TenantJson {
    name: String,
    weight: u32,
    gpu_quota: Option<u64>,
    gpu_hours_quota: Option<f64>,
    cloud_gpu_hours_quota: BTreeMap<String, f64>,
    gpu_hours_window_seconds: u64,
    max_priority: Option<u32>,
    default_priority: Option<u32>,
    gpus_in_use: u64,
    decayed_gpu_hours: f64,
    window_gpu_hours: f64,
    clouds: Vec<CloudJson>,
}

#[derive(Serialize)]
struct CloudJson {
    cloud: String,
    decayed_gpu_hours: f64,
    window_gpu_hours: f64,
    gpus_in_use: u64,
}

fn tenant_json(t: &v1::Tenant) -> TenantJson {
    TenantJson {
        name: t.name.clone(),
        weight: t.weight,
        gpu_quota: t.gpu_quota,
        gpu_hours_quota: t.gpu_hours_quota,
        cloud_gpu_hours_quota: t.cloud_gpu_hours_quota.clone(),
        gpu_hours_window_seconds: t.gpu_hours_window_seconds,
        max_priority: t.max_priority,
        default_priority: t.default_priority,
        gpus_in_use: t.gpus_in_use,
        decayed_gpu_hours: t.decayed_gpu_hours,
        window_gpu_hours: t.window_gpu_hours,
        clouds: t
            .clouds
            .iter()
            .map(|c| CloudJson {
                cloud: c.cloud.clone(),
                decayed_gpu_hours: c.decayed_gpu_hours,
                window_gpu_hours: c.window_gpu_hours,
                gpus_in_use: c.gpus_in_use,
            })
            .collect(),
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

fn show(t: &v1::Tenant, out: Format) -> CliResult {
    if out == Format::Json {
        output::json(&tenant_json(t))?;
        return Ok(0);
    }
    output::line(format!("Tenant:            {}", t.name))?;
    output::line(format!("Weight:            {}", t.weight))?;
    output::line(format!("GPU quota:         {}", opt(t.gpu_quota)))?;
    output::line(format!(
        "GPU-hours quota:   {} per {}",
        opt(t.gpu_hours_quota.map(|h| format!("{h:.1}"))),
        output::span(t.gpu_hours_window_seconds * 1000)
    ))?;
    for (c, h) in &t.cloud_gpu_hours_quota {
        output::line(format!("  on {c}:  {h:.1}"))?;
    }
    output::line(format!("Max priority:      {}", opt(t.max_priority.map(output::priority))))?;
    output::line(format!("Default priority:  {}", opt(t.default_priority.map(output::priority))))?;
    output::line(format!("GPUs in use:       {}", t.gpus_in_use))?;
    output::line(format!(
        "GPU-hours:         {:.2} decayed, {:.2} in the window",
        t.decayed_gpu_hours, t.window_gpu_hours
    ))?;
    usage_table(std::slice::from_ref(t))
}

fn usage_table(tenants: &[v1::Tenant]) -> CliResult {
    let mut table = output::table(&["TENANT", "CLOUD", "GPUS", "GPU-HOURS (DECAYED)", "GPU-HOURS (WINDOW)"]);
    for t in tenants {
        table.add_row(vec![
            t.name.clone(),
            "all".into(),
            t.gpus_in_use.to_string(),
            format!("{:.2}", t.decayed_gpu_hours),
            format!("{:.2}", t.window_gpu_hours),
        ]);
        for c in &t.clouds {
            table.add_row(vec![
                t.name.clone(),
                c.cloud.clone(),
                c.gpus_in_use.to_string(),
                format!("{:.2}", c.decayed_gpu_hours),
                format!("{:.2}", c.window_gpu_hours),
            ]);
        }
    }
    output::print_table(&table)?;
    Ok(0)
}

/// Run `tessera tenant`.
pub async fn run(args: TenantArgs) -> CliResult {
    let servers = Servers::from_opts(&args.client)?;
    let out = args.client.output;
    let (name, mode, fields) = match args.command {
        TenantCommand::Create { name, fields } => (name, v1::TenantWriteMode::Create, fields),
        TenantCommand::Set { name, fields } => (name, v1::TenantWriteMode::Update, fields),
        TenantCommand::Show { name } => {
            let t = servers
                .call(Some(UNARY_TIMEOUT), |ch| {
                    let name = name.clone();
                    async move {
                        let r = TenantServiceClient::new(ch)
                            .get_tenant(v1::GetTenantRequest { name: name.clone() })
                            .await
                            .map_err(about(format!("tenant {name}")))?;
                        Ok(r.into_inner().tenant.unwrap_or_default())
                    }
                })
                .await?;
            return show(&t, out);
        }
        cmd @ (TenantCommand::List | TenantCommand::Usage) => {
            let tenants = servers
                .call(Some(UNARY_TIMEOUT), |ch| async move {
                    Ok(TenantServiceClient::new(ch).list_tenants(v1::ListTenantsRequest {}).await?.into_inner().tenants)
                })
                .await?;
            if out == Format::Json {
                output::json(&tenants.iter().map(tenant_json).collect::<Vec<_>>())?;
                return Ok(0);
            }
            if matches!(cmd, TenantCommand::Usage) {
                return usage_table(&tenants);
            }
            let mut table =
                output::table(&["TENANT", "WEIGHT", "GPU QUOTA", "GPU-HOURS QUOTA", "MAX PRIO", "GPUS", "GPU-HOURS"]);
            for t in &tenants {
                table.add_row(vec![
                    t.name.clone(),
                    t.weight.to_string(),
                    opt(t.gpu_quota),
                    opt(t.gpu_hours_quota.map(|h| format!("{h:.1}"))),
                    opt(t.max_priority.map(output::priority)),
                    t.gpus_in_use.to_string(),
                    format!("{:.2}", t.decayed_gpu_hours),
                ]);
            }
            output::print_table(&table)?;
            return Ok(0);
        }
    };
    let req = request(name, mode, fields)?;
    let t = servers
        .call(Some(UNARY_TIMEOUT), |ch| {
            let req = req.clone();
            let name = req.name.clone();
            async move {
                let r = TenantServiceClient::new(ch).set_tenant(req).await.map_err(about(format!("tenant {name}")))?;
                Ok(r.into_inner().tenant.unwrap_or_default())
            }
        })
        .await?;
    show(&t, out)
}
