//! The few gRPC calls `tessera dev` makes against its own servers, trying each in turn.

use std::time::Duration;

use tessera_proto::v1;
use tonic::transport::Channel;

/// Clients of the dev cluster's servers.
#[derive(Clone)]
pub(crate) struct Api {
    servers: Vec<(String, Channel)>,
}

impl Api {
    /// Lazy connections to `addrs` (no traffic until the first call).
    pub fn new(addrs: &[String], security: &tessera_tls::Security) -> Result<Api, String> {
        let mut servers = Vec::new();
        for a in addrs {
            let ep = security
                .endpoint(a)
                .map_err(|e| format!("{a}: {e}"))?
                .connect_timeout(Duration::from_secs(1))
                .timeout(Duration::from_secs(10));
            let ch = security.connect_lazy(&ep);
            servers.push((a.clone(), ch));
        }
        Ok(Api { servers })
    }

    /// The cluster's status from the first server that answers.
    pub async fn status(&self) -> Result<v1::StatusResponse, String> {
        let mut last = String::from("no servers");
        for (addr, ch) in &self.servers {
            let mut c = v1::cluster_service_client::ClusterServiceClient::new(ch.clone());
            match c.status(v1::StatusRequest {}).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(e) => last = format!("{addr}: {}", e.message()),
            }
        }
        Err(last)
    }

    /// Every node.
    pub async fn nodes(&self) -> Result<Vec<v1::Node>, String> {
        let mut last = String::from("no servers");
        for (addr, ch) in &self.servers {
            let mut c = v1::node_service_client::NodeServiceClient::new(ch.clone());
            match c.list_nodes(v1::ListNodesRequest { page_size: 1000, ..Default::default() }).await {
                Ok(r) => return Ok(r.into_inner().nodes),
                Err(e) => last = format!("{addr}: {}", e.message()),
            }
        }
        Err(last)
    }

    /// One job, with its shards.
    pub async fn job(&self, id: u64) -> Result<v1::Job, String> {
        let mut last = String::from("no servers");
        for (addr, ch) in &self.servers {
            let mut c = v1::job_service_client::JobServiceClient::new(ch.clone());
            match c.get_job(v1::GetJobRequest { job_id: id, consistency: 0 }).await {
                Ok(r) => match r.into_inner().job {
                    Some(j) => return Ok(j),
                    None => last = format!("{addr}: the answer held no job"),
                },
                Err(e) => last = format!("{addr}: {}", e.message()),
            }
        }
        Err(last)
    }

    /// Submit a job, trying every server until one accepts it or `patience` has passed. The
    /// idempotency key in `req` makes the retries safe.
    pub async fn submit(&self, req: v1::SubmitJobRequest, patience: Duration) -> Result<u64, String> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let mut last = String::from("no servers");
            for (addr, ch) in &self.servers {
                let mut c = v1::job_service_client::JobServiceClient::new(ch.clone());
                match c.submit_job(req.clone()).await {
                    Ok(r) => return Ok(r.into_inner().job_id),
                    Err(e) if e.code() == tonic::Code::InvalidArgument => {
                        return Err(format!("the job was refused: {}", e.message()));
                    }
                    Err(e) => last = format!("{addr}: {}", e.message()),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("no server accepted the job within {} s: {last}", patience.as_secs()));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// What one attempt of a shard has written to stdout so far (as the leader keeps it).
    pub async fn stdout(&self, job: u64, shard: u32, attempt: u32) -> Result<String, String> {
        let mut last = String::from("no servers");
        for (addr, ch) in &self.servers {
            let mut c = v1::job_service_client::JobServiceClient::new(ch.clone());
            let req = v1::JobLogsRequest {
                job_id: job,
                shard_index: Some(shard),
                streams: v1::LogSelection::Stdout as i32,
                follow: false,
                tail_bytes: None,
                attempt: Some(attempt),
            };
            let mut stream = match c.job_logs(req).await {
                Ok(r) => r.into_inner(),
                Err(e) => {
                    last = format!("{addr}: {}", e.message());
                    continue;
                }
            };
            let mut out = Vec::new();
            loop {
                match stream.message().await {
                    Ok(Some(chunk)) => out.extend_from_slice(&chunk.data),
                    Ok(None) => return Ok(String::from_utf8_lossy(&out).into_owned()),
                    Err(e) => {
                        last = format!("{addr}: {}", e.message());
                        break;
                    }
                }
            }
        }
        Err(last)
    }
}

/// "aws", "azure", "none".
pub(crate) fn cloud_name(cloud: i32) -> &'static str {
    match v1::Cloud::try_from(cloud) {
        Ok(v1::Cloud::Aws) => "aws",
        Ok(v1::Cloud::Azure) => "azure",
        Ok(v1::Cloud::None) => "none",
        _ => "?",
    }
}
