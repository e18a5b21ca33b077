//! `TenantService`: create, change, list and show tenants with their usage. Writes are admin
//! only; a submitter sees its own tenants.

use std::sync::Arc;

use std::collections::BTreeSet;
use tessera_core::acl::{Resource, Rpc};
use tessera_core::command::{Command, TenantWrite};

use tessera_core::Timestamp;
use tessera_core::usage::{UsageQuery, usage};
use tessera_proto::convert::{tenant_to_proto, usage_key_from_proto, usage_key_to_proto};
use tessera_proto::v1;
use tonic::{Request, Response, Status};

use crate::auth::note;
use crate::context::{Shared, now, principal};

/// `TenantService`.
pub struct Tenants(pub Arc<Shared>);

impl Tenants {
    async fn get(&self, name: String) -> Result<v1::Tenant, Status> {
        let n = name.clone();
        self.0
            .read(0, move |s| s.tenants().get(&n).map(|t| tenant_to_proto(t, s, now())))
            .await?
            .ok_or_else(|| Status::not_found(format!("no tenant {name}")))
    }
}

#[tonic::async_trait]
impl v1::tenant_service_server::TenantService for Tenants {
    async fn set_tenant(&self, req: Request<v1::SetTenantRequest>) -> Result<Response<v1::SetTenantResponse>, Status> {
        let r = req.get_ref().clone();
        note(&req, format!("tenant {}", r.name));
        let n = r.name.clone();
        let current = self.0.read(0, move |s| s.tenants().get(&n).cloned()).await?;
        let cmd = set_tenant_command(r.clone(), current.as_ref(), now())?;
        self.0.write(&cmd).await?;
        Ok(Response::new(v1::SetTenantResponse { tenant: Some(self.get(r.name).await?) }))
    }

    async fn list_tenants(
        &self,
        req: Request<v1::ListTenantsRequest>,
    ) -> Result<Response<v1::ListTenantsResponse>, Status> {
        let readable = principal(&req).readable_tenants().cloned();
        let tenants = self
            .0
            .read(0, move |s| {
                let t = now();
                s.tenants()
                    .values()
                    .filter(|x| readable.as_ref().is_none_or(|r| r.contains(&x.name)))
                    .map(|x| tenant_to_proto(x, s, t))
                    .collect()
            })
            .await?;
        Ok(Response::new(v1::ListTenantsResponse { tenants }))
    }

    async fn usage(&self, req: Request<v1::UsageRequest>) -> Result<Response<v1::UsageResponse>, Status> {
        let r = req.get_ref().clone();
        if r.since_unix_ms == 0 {
            return Err(Status::invalid_argument("since_unix_ms: required (non-zero)"));
        }
        let until = r.until_unix_ms.unwrap_or_else(|| now().0);
        if until <= r.since_unix_ms {
            return Err(Status::invalid_argument(format!(
                "until_unix_ms: {until} is not after since_unix_ms {}",
                r.since_unix_ms
            )));
        }
        let mut by = Vec::new();
        for (i, k) in r.group_by.iter().enumerate() {
            let field = format!("group_by[{i}]");
            let k = usage_key_from_proto(*k, &field).map_err(Status::from)?;
            if by.contains(&k) {
                return Err(Status::invalid_argument(format!("{field}: {} is given twice", k.name())));
            }
            by.push(k);
        }
        let readable = principal(&req).readable_tenants().cloned();
        let tenants: Option<BTreeSet<String>> = if r.tenant.is_empty() {
            self.0.authorize(&req, Rpc::Usage, Resource::Any)?;
            readable
        } else {
            self.0.authorize(&req, Rpc::Usage, Resource::Tenant(&r.tenant))?;
            Some(BTreeSet::from([r.tenant.clone()]))
        };
        // A copy of the state (it shares the jobs), so the walk over every job's timeline runs
        // off the Raft thread.
        let state = self.0.read(r.consistency, |s| s.snapshot_copy()).await?;
        let (since, until_t) = (Timestamp(r.since_unix_ms), Timestamp(until));
        let rows = tokio::task::spawn_blocking(move || {
            let q = UsageQuery { since, until: until_t, by: &by, tenants: tenants.as_ref() };
            (usage(&state, &q), by)
        })
        .await
        .map_err(|e| Status::internal(format!("usage: {e}")))?;
        let (rows, by) = rows;
        let total_gpu_hours = rows.iter().map(|r| r.gpu_hours).sum();
        let total_cost_micros = rows.iter().fold(0u64, |s, r| s.saturating_add(r.cost_micros));
        Ok(Response::new(v1::UsageResponse {
            since_unix_ms: r.since_unix_ms,
            until_unix_ms: until,
            group_by: by.iter().map(|k| usage_key_to_proto(*k) as i32).collect(),
            rows: rows
                .into_iter()
                .map(|x| v1::UsageRow {
                    keys: x.keys,
                    gpu_hours: x.gpu_hours,
                    cost_micros: x.cost_micros,
                    attempts: x.attempts,
                    jobs: x.jobs,
                })
                .collect(),
            total_gpu_hours,
            total_cost_micros,
        }))
    }

    async fn get_tenant(&self, req: Request<v1::GetTenantRequest>) -> Result<Response<v1::GetTenantResponse>, Status> {
        let name = req.get_ref().name.clone();
        self.0.authorize(&req, Rpc::GetTenant, Resource::Tenant(&name))?;
        Ok(Response::new(v1::GetTenantResponse { tenant: Some(self.get(name).await?) }))
    }
}

/// The `SetTenant` command a request makes of the tenant as it is (`current`, or the defaults
/// for a new one): the fields the request gives replace the tenant's, 0 clears a quota, and the
/// rest stay. Create and Update are checked again at apply.
pub fn set_tenant_command(
    r: v1::SetTenantRequest,
    current: Option<&tessera_core::model::Tenant>,
    now: tessera_core::Timestamp,
) -> Result<Command, Status> {
    let mode = match v1::TenantWriteMode::try_from(r.mode) {
        Ok(v1::TenantWriteMode::Upsert) => TenantWrite::Upsert,
        Ok(v1::TenantWriteMode::Create) => TenantWrite::Create,
        Ok(v1::TenantWriteMode::Update) => TenantWrite::Update,
        Err(_) => return Err(Status::invalid_argument(format!("mode: {} is not a TenantWriteMode", r.mode))),
    };
    // The log's JSON has no NaN or infinity (it would carry NaN as "no quota"): refuse them here.
    // Apply checks that a quota is above 0.
    let finite = |field: String, q: f64| {
        if q.is_finite() {
            Ok(())
        } else {
            Err(Status::invalid_argument(format!("{field}: {q} is not a number of GPU-hours")))
        }
    };
    if let Some(q) = r.gpu_hours_quota {
        finite("gpu_hours_quota".into(), q)?;
    }
    for (cloud, q) in &r.cloud_gpu_hours_quota {
        let shown: String = cloud.chars().take(64).collect();
        finite(format!("cloud_gpu_hours_quota.{shown}"), *q)?;
    }
    let base = current.cloned().unwrap_or_else(|| tessera_core::model::Tenant::new(&r.name, now));
    let prio = |field: &str, v: Option<u32>| -> Result<Option<u16>, Status> {
        v.map(|p| u16::try_from(p).map_err(|_| Status::invalid_argument(format!("{field}: {p} is above 1000"))))
            .transpose()
    };
    let zero_clears_u = |v: Option<u64>, old: Option<u64>| match v {
        Some(0) => None,
        Some(q) => Some(q),
        None => old,
    };
    let zero_clears_f = |v: Option<f64>, old: Option<f64>| match v {
        Some(0.0) => None,
        Some(q) => Some(q),
        None => old,
    };
    let mut cloud =
        if r.replace_cloud_gpu_hours_quota { Default::default() } else { base.cloud_gpu_hours_quota.clone() };
    for (k, v) in r.cloud_gpu_hours_quota {
        if v == 0.0 {
            cloud.remove(&k);
        } else {
            cloud.insert(k, v);
        }
    }
    let cmd = Command::SetTenant {
        name: r.name.clone(),
        weight: r.weight.unwrap_or(base.weight),
        gpu_quota: zero_clears_u(r.gpu_quota, base.gpu_quota),
        max_priority: prio("max_priority", r.max_priority)?.or(base.max_priority),
        default_priority: prio("default_priority", r.default_priority)?.or(base.default_priority),
        gpu_hours_quota: zero_clears_f(r.gpu_hours_quota, base.gpu_hours_quota),
        cloud_gpu_hours_quota: cloud,
        gpu_hours_window_ms: r.gpu_hours_window_seconds.map_or(base.gpu_hours_window_ms, |s| s.saturating_mul(1000)),
        mode,
    };
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the grpc_requests fuzz target: a quota of NaN went into the log, whose JSON
    /// carries it as null, so the tenant got no quota at all instead of an error.
    #[test]
    fn a_quota_that_is_not_a_number_is_refused_naming_the_field() {
        let now = tessera_core::Timestamp(1_000);
        for (field, req) in [
            (
                "gpu_hours_quota",
                v1::SetTenantRequest { name: "nlp".into(), gpu_hours_quota: Some(f64::NAN), ..Default::default() },
            ),
            (
                "cloud_gpu_hours_quota.aws",
                v1::SetTenantRequest {
                    name: "nlp".into(),
                    cloud_gpu_hours_quota: [("aws".to_string(), f64::INFINITY)].into(),
                    ..Default::default()
                },
            ),
        ] {
            let err = set_tenant_command(req, None, now).expect_err("refused");
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().starts_with(field), "{}", err.message());
        }
        let ok = v1::SetTenantRequest { name: "nlp".into(), gpu_hours_quota: Some(12.5), ..Default::default() };
        assert!(set_tenant_command(ok, None, now).is_ok());
    }
}
