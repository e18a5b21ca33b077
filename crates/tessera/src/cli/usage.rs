//! `tessera usage`: GPU-hours and cost over a time range, grouped (like Slurm's sacct), as a
//! table, JSON or CSV.

use serde::Serialize;
use tessera_core::usage::UsageKey;
use tessera_proto::v1;
use tessera_proto::v1::tenant_service_client::TenantServiceClient;

use super::connect::{Servers, UNARY_TIMEOUT, about};
use super::output::{self, Format};
use super::{CliError, CliResult, ClientOpts};

/// `tessera usage`.
#[derive(clap::Args, Debug)]
#[command(after_help = super::CLIENT_AFTER_HELP)]
pub struct UsageArgs {
    #[command(flatten)]
    client: ClientOpts,
    /// Start of the range: a duration back from now (7d, 24h, 90m) or a UTC date or time
    /// (2026-11-01, 2026-11-01T08:00:00Z).
    #[arg(long, default_value = "7d")]
    since: String,
    /// End of the range, in the same forms [default: now].
    #[arg(long)]
    until: Option<String>,
    /// Group by these, comma-separated, in order: tenant, user, cloud, region, instance-type,
    /// node, job. "none" gives one row.
    #[arg(long, default_value = "tenant", value_delimiter = ',')]
    by: Vec<String>,
    /// Only this tenant's jobs [default: every tenant you may read].
    #[arg(long)]
    tenant: Option<String>,
    /// Print CSV (a header line, then one line per group) instead of a table.
    #[arg(long, conflicts_with = "output")]
    csv: bool,
}

/// `tessera usage -o json`.
#[derive(Serialize)]
struct UsageJson {
    since_unix_ms: u64,
    until_unix_ms: u64,
    group_by: Vec<String>,
    rows: Vec<RowJson>,
    total_gpu_hours: f64,
    total_cost: f64,
}

#[derive(Serialize)]
struct RowJson {
    keys: Vec<String>,
    gpu_hours: f64,
    cost: f64,
    attempts: u64,
    jobs: u64,
}

/// Run `tessera usage`.
pub async fn run(args: UsageArgs) -> CliResult {
    let servers = Servers::from_opts(&args.client)?;
    let now = output::now_ms();
    let since = when(&args.since, now).map_err(|m| CliError::Invalid(format!("--since: {m}")))?;
    let until = match &args.until {
        Some(u) => Some(when(u, now).map_err(|m| CliError::Invalid(format!("--until: {m}")))?),
        None => None,
    };
    if until.is_some_and(|u| u <= since) {
        return Err(CliError::Invalid("--until: must be after --since".into()));
    }
    let mut by = Vec::new();
    for name in args.by.iter().map(|s| s.trim()).filter(|s| !s.is_empty() && *s != "none") {
        let k = UsageKey::parse(name).ok_or_else(|| {
            let known: Vec<&str> = UsageKey::ALL.iter().map(|k| k.name()).collect();
            CliError::Invalid(format!("--by: unknown key {name:?} (one of {})", known.join(", ")))
        })?;
        if by.contains(&k) {
            return Err(CliError::Invalid(format!("--by: {} is given twice", k.name())));
        }
        by.push(k);
    }
    let req = v1::UsageRequest {
        since_unix_ms: since,
        until_unix_ms: until,
        group_by: by.iter().map(|k| tessera_proto::convert::usage_key_to_proto(*k) as i32).collect(),
        tenant: args.tenant.clone().unwrap_or_default(),
        consistency: 0,
    };
    let r = servers
        .call_repeatable(Some(UNARY_TIMEOUT), |ch| {
            let req = req.clone();
            async move {
                let r = TenantServiceClient::new(ch).usage(req).await.map_err(about("usage".to_string()))?;
                Ok(r.into_inner())
            }
        })
        .await?;
    let names: Vec<String> = by.iter().map(|k| k.name().to_string()).collect();
    let money = |micros: u64| micros as f64 / 1e6;
    if args.client.output == Format::Json {
        return output::json(&UsageJson {
            since_unix_ms: r.since_unix_ms,
            until_unix_ms: r.until_unix_ms,
            group_by: names,
            rows: r
                .rows
                .iter()
                .map(|x| RowJson {
                    keys: x.keys.clone(),
                    gpu_hours: x.gpu_hours,
                    cost: money(x.cost_micros),
                    attempts: x.attempts,
                    jobs: x.jobs,
                })
                .collect(),
            total_gpu_hours: r.total_gpu_hours,
            total_cost: money(r.total_cost_micros),
        })
        .map(|()| 0);
    }
    let header: Vec<String> = names
        .iter()
        .map(|n| n.to_string())
        .chain(["gpu_hours", "cost", "attempts", "jobs"].map(String::from))
        .collect();
    if args.csv {
        let mut lines = vec![header.join(",")];
        for x in &r.rows {
            let mut cells: Vec<String> = x.keys.iter().map(|k| csv_cell(k)).collect();
            cells.push(format!("{:.4}", x.gpu_hours));
            cells.push(format!("{:.2}", money(x.cost_micros)));
            cells.push(x.attempts.to_string());
            cells.push(x.jobs.to_string());
            lines.push(cells.join(","));
        }
        return output::line(lines.join("\n")).map(|()| 0);
    }
    let upper: Vec<String> = header.iter().map(|h| h.replace('_', " ").to_uppercase()).collect();
    let upper: Vec<&str> = upper.iter().map(String::as_str).collect();
    let mut t = output::table(&upper);
    for x in &r.rows {
        let mut cells = x.keys.clone();
        cells.push(format!("{:.2}", x.gpu_hours));
        cells.push(format!("${:.2}", money(x.cost_micros)));
        cells.push(x.attempts.to_string());
        cells.push(x.jobs.to_string());
        t.add_row(cells);
    }
    let mut total = vec![String::new(); names.len()];
    if let Some(first) = total.first_mut() {
        *first = "TOTAL".into();
    }
    total.push(format!("{:.2}", r.total_gpu_hours));
    total.push(format!("${:.2}", money(r.total_cost_micros)));
    total.push(r.rows.iter().map(|x| x.attempts).sum::<u64>().to_string());
    total.push(String::new());
    if !names.is_empty() {
        t.add_row(total);
    }
    output::line(format!("GPU usage from {} to {} (UTC)", output::utc(r.since_unix_ms), output::utc(r.until_unix_ms)))?;
    output::print_table(&t)?;
    Ok(0)
}

/// A CSV cell: quoted when it holds a comma, a quote or a line break.
fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

/// Unix milliseconds of "7d" (back from `now`), "2026-11-01" or "2026-11-01T08:00:00Z" (UTC).
fn when(s: &str, now: u64) -> Result<u64, String> {
    let t = s.trim();
    if t.contains('-') {
        return utc_time(t).ok_or_else(|| {
            format!("'{s}' is neither a duration (7d, 24h) nor a UTC date or time (2026-11-01, 2026-11-01T08:00:00Z)")
        });
    }
    let secs = tessera_core::spec::parse_duration_secs(t)?;
    now.checked_sub(secs.saturating_mul(1000)).ok_or_else(|| format!("'{s}' reaches back before 1970"))
}

fn utc_time(s: &str) -> Option<u64> {
    let (date, clock) = match s.split_once(['T', ' ']) {
        Some((d, c)) => (d, Some(c.trim_end_matches('Z'))),
        None => (s, None),
    };
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i32>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let month = time::Month::try_from(u8::try_from(m).ok()?).ok()?;
    let date = time::Date::from_calendar_date(y, month, u8::try_from(day).ok()?).ok()?;
    let (mut h, mut min, mut sec) = (0u8, 0u8, 0u8);
    if let Some(c) = clock {
        let mut parts = c.splitn(3, ':').map(|p| p.parse::<u8>().ok());
        h = parts.next()??;
        min = parts.next()??;
        sec = parts.next().flatten().unwrap_or(0);
    }
    let t = date.with_hms(h, min, sec).ok()?.assume_utc();
    u64::try_from(t.unix_timestamp()).ok()?.checked_mul(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_durations_or_utc_dates() {
        let now = 1_800_000_000_000;
        assert_eq!(when("7d", now), Ok(now - 7 * 86_400_000));
        assert_eq!(when("90m", now), Ok(now - 5_400_000));
        assert_eq!(when("2026-11-01", now), Ok(1_793_491_200_000));
        assert_eq!(when("2026-11-01T08:30:00Z", now), Ok(1_793_491_200_000 + 8 * 3_600_000 + 30 * 60_000));
        assert_eq!(when("2026-11-01 08:30", now), Ok(1_793_491_200_000 + 8 * 3_600_000 + 30 * 60_000));
        assert!(when("2026-13-01", now).unwrap_err().contains("2026-13-01"));
        assert!(when("yesterday", now).is_err());
        assert!(when("100000000d", 1000).unwrap_err().contains("before 1970"));
    }

    #[test]
    fn csv_cells_are_quoted_when_needed() {
        assert_eq!(csv_cell("ml"), "ml");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
