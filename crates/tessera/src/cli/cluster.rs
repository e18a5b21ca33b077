//! `tessera cluster`: the Raft cluster of scheduler servers: its members, membership changes,
//! and backups.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use tessera_proto::v1;
use tessera_proto::v1::cluster_service_client::ClusterServiceClient;

use super::connect::{RpcError, Servers, UNARY_TIMEOUT};
use super::output::{self, Format, MemberJson};
use super::{CliError, CliResult, ClientOpts};

/// A membership change waits for a new server to catch up (the servers allow two minutes).
const MEMBERSHIP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(150);

/// Flags and subcommand of `tessera cluster`.
#[derive(clap::Args, Debug)]
#[command(after_help = super::CLIENT_AFTER_HELP)]
pub struct ClusterArgs {
    #[command(flatten)]
    client: ClientOpts,
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Show the members, the leader, and each member's term, commit and applied index.
    ///
    /// JSON: {"leader_id", "responder_id", "members": [Member]}; Member: {"id", "address",
    /// "role": leader|follower|candidate|pre_candidate|unspecified, "kind":
    /// voter|learner|unspecified, "term", "commit_index", "applied_index", "match_index",
    /// "leader_id", "reachable", "version"}.
    #[command(after_help = super::CLIENT_AFTER_HELP)]
    Status,
    /// Add a server (started with --join) to the cluster; it becomes a voter once caught up.
    ///
    /// JSON: {"index", "members": [Member]} (see `tessera cluster status --help`).
    #[command(after_help = super::CLIENT_AFTER_HELP)]
    AddServer {
        /// The new server's Raft id.
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
        /// Its gRPC address, HOST:PORT.
        addr: String,
        /// Keep it a non-voting learner.
        #[arg(long)]
        learner: bool,
    },
    /// Remove a server from the cluster (leadership moves first if it leads).
    ///
    /// JSON: {"index", "members": [Member]} (see `tessera cluster status --help`).
    #[command(after_help = super::CLIENT_AFTER_HELP)]
    RemoveServer {
        /// The server's Raft id.
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
    },
    /// Back up the replicated state.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// Save a consistent snapshot of the whole state to FILE, verified against its size and
    /// CRC-32 before it replaces FILE (written as FILE.tmp, synced, then renamed).
    ///
    /// JSON: {"file", "index", "term", "size_bytes", "crc32", "server_id", "created_unix_ms",
    /// "format_version"}.
    #[command(after_help = super::CLIENT_AFTER_HELP)]
    Save {
        /// Where to write the snapshot.
        file: PathBuf,
    },
}

/// Run `tessera cluster ...`.
pub async fn run(args: ClusterArgs) -> CliResult {
    let servers = Servers::from_opts(&args.client)?;
    let out = args.client.output;
    match args.command {
        ClusterCommand::Status => status(&servers, out).await,
        ClusterCommand::AddServer { id, addr, learner } => {
            let r = servers
                .call(Some(MEMBERSHIP_TIMEOUT), |ch| {
                    let req = v1::AddServerRequest { id, address: addr.clone(), learner };
                    async move { Ok(ClusterServiceClient::new(ch).add_server(req).await?.into_inner()) }
                })
                .await?;
            membership(out, format!("server {id} ({addr}) added"), r.index, &r.members)
        }
        ClusterCommand::RemoveServer { id } => {
            let r = servers
                .call(Some(MEMBERSHIP_TIMEOUT), |ch| async move {
                    let req = v1::RemoveServerRequest { id };
                    Ok(ClusterServiceClient::new(ch).remove_server(req).await?.into_inner())
                })
                .await?;
            membership(out, format!("server {id} removed"), r.index, &r.members)
        }
        ClusterCommand::Snapshot(SnapshotCommand::Save { file }) => save(&servers, &file, out).await,
    }
}

#[derive(serde::Serialize)]
struct StatusJson {
    leader_id: Option<u64>,
    responder_id: u64,
    members: Vec<MemberJson>,
}

async fn status(servers: &Servers, out: Format) -> CliResult {
    let r = servers
        .call(Some(UNARY_TIMEOUT), |ch| async move {
            Ok(ClusterServiceClient::new(ch).status(v1::StatusRequest {}).await?.into_inner())
        })
        .await?;
    if out == Format::Json {
        output::json(&StatusJson {
            leader_id: r.leader_id,
            responder_id: r.responder_id,
            members: r.members.iter().map(MemberJson::from).collect(),
        })?;
        return Ok(0);
    }
    let leader = r.leader_id.map_or("none (an election is under way)".to_string(), |l| {
        let addr = r.members.iter().find(|m| m.id == l).map_or(String::new(), |m| format!(" at {}", m.address));
        format!("server {l}{addr}")
    });
    output::line(format!("leader: {leader} (answered by server {})\n", r.responder_id))?;
    members_table(&r.members)?;
    Ok(0)
}

fn members_table(members: &[v1::Member]) -> Result<(), CliError> {
    let mut t =
        output::table(&["ID", "ADDRESS", "ROLE", "KIND", "TERM", "COMMIT", "APPLIED", "MATCH", "REACHABLE", "VERSION"]);
    for m in members {
        let unknown = |v: u64| if m.reachable { v.to_string() } else { "-".into() };
        t.add_row(vec![
            m.id.to_string(),
            m.address.clone(),
            output::member_role(m.role),
            output::member_kind(m.kind),
            unknown(m.term),
            unknown(m.commit_index),
            unknown(m.applied_index),
            output::opt(m.match_index),
            if m.reachable { "yes".into() } else { "no".into() },
            if m.version.is_empty() { "-".into() } else { m.version.clone() },
        ]);
    }
    output::print_table(&t)
}

#[derive(serde::Serialize)]
struct MembershipJson {
    index: u64,
    members: Vec<MemberJson>,
}

fn membership(out: Format, what: String, index: u64, members: &[v1::Member]) -> CliResult {
    if out == Format::Json {
        output::json(&MembershipJson { index, members: members.iter().map(MemberJson::from).collect() })?;
        return Ok(0);
    }
    output::line(format!("{what} (committed at index {index}); members now:\n"))?;
    members_table(members)?;
    Ok(0)
}

// ---------------------------------------------------------------------------------------------
// snapshot save
// ---------------------------------------------------------------------------------------------

#[derive(serde::Serialize)]
struct SnapshotJson {
    file: String,
    index: u64,
    term: u64,
    size_bytes: u64,
    crc32: u32,
    server_id: u64,
    created_unix_ms: u64,
    format_version: u32,
}

/// `FILE.tmp` beside `FILE`.
fn tmp_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    file.with_file_name(name)
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> RpcError {
    RpcError::Fatal(CliError::Failed(format!("cannot {what} {}: {e}", path.display())))
}

fn bad_snapshot(m: String) -> RpcError {
    RpcError::Fatal(CliError::Failed(m))
}

/// Stream the snapshot from one server into `tmp`, checking it as it comes.
async fn download(ch: super::connect::Conn, tmp: &Path) -> Result<v1::SnapshotHeader, RpcError> {
    let mut stream = ClusterServiceClient::new(ch).snapshot(v1::SnapshotRequest {}).await?.into_inner();
    let header = match stream.message().await? {
        Some(v1::SnapshotResponse { chunk: Some(v1::snapshot_response::Chunk::Header(h)) }) => h,
        Some(_) => return Err(bad_snapshot("the snapshot stream did not start with its header".into())),
        None => return Err(bad_snapshot("the snapshot stream was empty".into())),
    };
    let mut f = std::fs::File::create(tmp).map_err(|e| io_error("create", tmp, e))?;
    let mut crc = crc32fast::Hasher::new();
    let mut size = 0u64;
    while let Some(msg) = stream.message().await? {
        match msg.chunk {
            Some(v1::snapshot_response::Chunk::Data(d)) => {
                size += d.len() as u64;
                if size > header.size_bytes {
                    return Err(bad_snapshot(format!(
                        "the snapshot is larger than its header says ({} bytes)",
                        header.size_bytes
                    )));
                }
                crc.update(&d);
                f.write_all(&d).map_err(|e| io_error("write", tmp, e))?;
            }
            Some(v1::snapshot_response::Chunk::Header(_)) => {
                return Err(bad_snapshot("the snapshot stream sent a second header".into()));
            }
            None => return Err(bad_snapshot("the snapshot stream sent an empty message".into())),
        }
    }
    if size != header.size_bytes {
        return Err(bad_snapshot(format!(
            "the snapshot is {size} bytes but its header says {}; nothing saved",
            header.size_bytes
        )));
    }
    let got = crc.finalize();
    if got != header.crc32 {
        return Err(bad_snapshot(format!(
            "the snapshot's CRC-32 is {got:08x} but its header says {:08x}; nothing saved",
            header.crc32
        )));
    }
    f.sync_all().map_err(|e| io_error("sync", tmp, e))?;
    Ok(header)
}

async fn save(servers: &Servers, file: &Path, out: Format) -> CliResult {
    let tmp = tmp_path(file);
    let result = servers.call(None, |ch| download(ch, &tmp)).await;
    let header = match result {
        Ok(h) => h,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if let Err(e) = std::fs::rename(&tmp, file) {
        let _ = std::fs::remove_file(&tmp);
        return Err(CliError::Failed(format!("cannot rename {} to {}: {e}", tmp.display(), file.display())));
    }
    // Make the rename itself durable.
    let dir = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    if out == Format::Json {
        output::json(&SnapshotJson {
            file: file.display().to_string(),
            index: header.index,
            term: header.term,
            size_bytes: header.size_bytes,
            crc32: header.crc32,
            server_id: header.server_id,
            created_unix_ms: header.created_unix_ms,
            format_version: header.format_version,
        })?;
    } else {
        output::line(format!(
            "saved snapshot to {}: index {}, term {}, {} bytes, crc32 {:08x}, from server {}",
            file.display(),
            header.index,
            header.term,
            header.size_bytes,
            header.crc32,
            header.server_id
        ))?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_temporary_file_sits_beside_the_target() {
        assert_eq!(tmp_path(Path::new("/b/state.snap")), PathBuf::from("/b/state.snap.tmp"));
        assert_eq!(tmp_path(Path::new("s")), PathBuf::from("s.tmp"));
    }
}
