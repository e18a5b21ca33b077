//! Checkpoints that outlive their host: a job whose `checkpoint_dir` is an object-store URL
//! (`s3://bucket/prefix`, `az://container/prefix`, `gs://bucket/prefix`) writes its checkpoints
//! into a fast local directory of the attempt, and the agent copies each one it is told about
//! to the store in the background. Only a copy that is complete is reported to the servers,
//! with the store's URI, so the servers never hold a checkpoint that is not durable. Before an
//! attempt that resumes from such a URI starts, the agent downloads it into the attempt's
//! directory and hands the process the local path.
//!
//! Layout in the store, under the job's prefix:
//! `job-<job>/shard-<shard>/<step, 12 digits>-<attempt>/<name>`, where `<name>` is the
//! checkpoint's path relative to the attempt's local checkpoint directory (a file, or a
//! directory uploaded file by file; its URI then ends with `/`). Each time the servers accept one, the
//! shard's steps older than the newest `keep` that the servers have accepted are deleted (never one they
//! may resume from: an agent cut off from them keeps uploading, but prunes nothing).
//!
//! Clients come from the `object_store` crate with the standard environment: `AWS_*`
//! (`AWS_ENDPOINT_URL` for an S3-compatible store; plain HTTP is allowed only when that endpoint
//! says `http://`), `AZURE_*`, `GOOGLE_*`. Nothing here reads a clock for decisions: the retry
//! waits are a fixed schedule.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use object_store::path::Path as Key;
use object_store::{ObjectStore, PutPayload, WriteMultipart};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Files up to this size go in one PUT; larger ones in parts of this size.
const PART_BYTES: usize = 8 * 1024 * 1024;
/// Tries per checkpoint before the agent gives up on it (a newer one supersedes it sooner).
pub const UPLOAD_TRIES: u32 = 8;
/// Waits between tries: 0.5 s doubling to this cap.
const BACKOFF_CAP: Duration = Duration::from_secs(20);

/// Why a checkpoint could not be copied.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The checkpoint directory or resume URI is not one this agent can use.
    #[error("{0}")]
    Url(String),
    /// The object store refused or failed.
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

/// An object-store location: `scheme://bucket/prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// `s3`, `az` or `gs`.
    pub scheme: &'static str,
    /// Bucket (S3, GCS) or container (Azure).
    pub bucket: String,
    /// Key prefix without leading or trailing `/` (may be empty).
    pub prefix: String,
}

impl Remote {
    /// The location a checkpoint directory or URI names, if it is an object store's; `None` for a
    /// path (local or shared) or a `file://` URI. An object-store URL without a bucket is an
    /// error.
    pub fn parse(uri: &str) -> Result<Option<Remote>, CheckpointError> {
        let Some((scheme, rest)) = uri.split_once("://") else { return Ok(None) };
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "s3" | "s3a" => "s3",
            "az" | "azure" | "abfs" | "abfss" => "az",
            "gs" | "gcs" => "gs",
            "file" => return Ok(None),
            other => {
                return Err(CheckpointError::Url(format!(
                    "checkpoint_dir: unknown scheme {other:?} in {uri:?} (use s3://, az://, gs:// or a path)"
                )));
            }
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(CheckpointError::Url(format!("checkpoint_dir: {uri:?} names no bucket")));
        }
        Ok(Some(Remote { scheme, bucket: bucket.to_string(), prefix: prefix.trim_matches('/').to_string() }))
    }

    /// The key `name` under the prefix.
    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() { name.to_string() } else { format!("{}/{name}", self.prefix) }
    }

    /// `scheme://bucket/key`.
    pub fn uri(&self, key: &str) -> String {
        format!("{}://{}/{key}", self.scheme, self.bucket)
    }

    /// Where one shard's checkpoints go.
    fn shard_prefix(&self, job: u64, shard: u32) -> String {
        self.key(&format!("job-{job}/shard-{shard}"))
    }
}

/// Clients by (scheme, bucket).
type ByBucket = BTreeMap<(&'static str, String), Arc<dyn ObjectStore>>;

/// The clients, one per bucket, made on first use from the environment.
#[derive(Clone, Default)]
pub struct Stores {
    made: Arc<Mutex<ByBucket>>,
    /// Instance metadata endpoint for cloud credentials (`--metadata-endpoint`: tests point it
    /// at a fake so that nothing reaches the real one).
    metadata_endpoint: Option<String>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").field("metadata_endpoint", &self.metadata_endpoint).finish()
    }
}

impl Stores {
    /// Clients that take credentials from the environment, and from this instance metadata
    /// endpoint instead of the cloud's own when given.
    pub fn new(metadata_endpoint: Option<String>) -> Stores {
        Stores { made: Arc::default(), metadata_endpoint }
    }

    /// The client for `remote`'s bucket.
    pub fn get(&self, remote: &Remote) -> Result<Arc<dyn ObjectStore>, CheckpointError> {
        let id = (remote.scheme, remote.bucket.clone());
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = made.get(&id) {
            return Ok(s.clone());
        }
        let url = format!("{}://{}", remote.scheme, remote.bucket);
        let store: Arc<dyn ObjectStore> = match remote.scheme {
            "s3" => {
                let mut b = object_store::aws::AmazonS3Builder::from_env().with_url(&url);
                // The standard variable of the AWS tools; object_store's own names work too.
                if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL")
                    && !endpoint.is_empty()
                {
                    b = b.with_allow_http(endpoint.starts_with("http://")).with_endpoint(endpoint);
                }
                if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
                    b = b.with_region("us-east-1");
                }
                if let Some(m) = &self.metadata_endpoint {
                    b = b.with_metadata_endpoint(m);
                }
                Arc::new(b.build()?)
            }
            "az" => Arc::new(object_store::azure::MicrosoftAzureBuilder::from_env().with_url(&url).build()?),
            "gs" => Arc::new(object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(&url).build()?),
            other => return Err(CheckpointError::Url(format!("no client for {other}://"))),
        };
        made.insert(id, store.clone());
        Ok(store)
    }
}

/// A local path from what a process reported: a path, or a `file://` URI.
pub fn local_path(reported: &str) -> PathBuf {
    PathBuf::from(reported.strip_prefix("file://").unwrap_or(reported))
}

/// Copy the checkpoint of `step` at `local` (a file or a directory) into the store for
/// `target`. It keeps its path relative to the attempt's local checkpoint directory (its file
/// name when it lies elsewhere). Returns its URI (a directory's ends with `/`) and the bytes
/// copied.
pub async fn upload(
    store: &dyn ObjectStore,
    target: &Target,
    local: &Path,
    step: u64,
) -> Result<(String, u64), CheckpointError> {
    let Target { remote, base, job, shard, attempt, .. } = target;
    let (job, shard, attempt) = (*job, *shard, *attempt);
    let rel = match local.strip_prefix(base) {
        Ok(r) if !r.as_os_str().is_empty() => r.to_path_buf(),
        _ => PathBuf::from(
            local.file_name().ok_or_else(|| CheckpointError::Url(format!("{}: no file name", local.display())))?,
        ),
    };
    let rel = rel.to_string_lossy().replace('\\', "/");
    let dir = format!("{}/{step:012}-{attempt}", remote.shard_prefix(job, shard));
    let meta = tokio::fs::metadata(local).await.map_err(io(local))?;
    if meta.is_file() {
        let key = format!("{dir}/{rel}");
        let n = put_file(store, &key, local).await?;
        return Ok((remote.uri(&key), n));
    }
    // A directory: every file under it, then its URI with a trailing '/'.
    let mut total = 0;
    let mut todo = vec![local.to_path_buf()];
    while let Some(d) = todo.pop() {
        let mut entries = tokio::fs::read_dir(&d).await.map_err(io(&d))?;
        while let Some(e) = entries.next_entry().await.map_err(io(&d))? {
            let p = e.path();
            let t = e.file_type().await.map_err(io(&p))?;
            if t.is_dir() {
                todo.push(p);
            } else if t.is_file() {
                let inner = p.strip_prefix(local).unwrap_or(&p).to_string_lossy().replace('\\', "/");
                total += put_file(store, &format!("{dir}/{rel}/{inner}"), &p).await?;
            }
        }
    }
    Ok((remote.uri(&format!("{dir}/{rel}/")), total))
}

async fn put_file(store: &dyn ObjectStore, key: &str, path: &Path) -> Result<u64, CheckpointError> {
    let key = Key::parse(key).map_err(|e| CheckpointError::Url(format!("{key}: {e}")))?;
    let mut f = tokio::fs::File::open(path).await.map_err(io(path))?;
    let len = f.metadata().await.map_err(io(path))?.len();
    if len <= PART_BYTES as u64 {
        let mut buf = Vec::with_capacity(len as usize);
        f.read_to_end(&mut buf).await.map_err(io(path))?;
        let n = buf.len() as u64;
        store.put(&key, PutPayload::from(buf)).await?;
        return Ok(n);
    }
    let upload = store.put_multipart(&key).await?;
    let mut w = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
    let mut buf = vec![0u8; PART_BYTES];
    let mut n = 0u64;
    loop {
        let read = match f.read(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                let _ = w.abort().await;
                return Err(CheckpointError::Io { path: path.to_path_buf(), source: e });
            }
        };
        if read == 0 {
            break;
        }
        // At most two parts in flight: memory stays at a few parts whatever the file's size.
        if let Err(e) = w.wait_for_capacity(2).await {
            return Err(e.into());
        }
        w.write(&buf[..read]);
        n += read as u64;
    }
    w.finish().await?;
    Ok(n)
}

/// Delete the shard's checkpoints older than the newest `keep` of those at or below
/// `acked_step`, the newest step the servers accepted: they may resume from that one (or, for
/// a gang, an older one), never from a copy they were not told of. Everything above it stays:
/// an agent cut off from the servers keeps uploading, and must not delete what they hold.
/// Returns how many objects went.
pub async fn prune(
    store: &dyn ObjectStore,
    remote: &Remote,
    job: u64,
    shard: u32,
    keep: usize,
    acked_step: u64,
) -> Result<usize, CheckpointError> {
    use futures::TryStreamExt;
    let prefix = remote.shard_prefix(job, shard);
    let key = Key::parse(&prefix).map_err(|e| CheckpointError::Url(format!("{prefix}: {e}")))?;
    let listed = store.list_with_delimiter(Some(&key)).await?;
    let mut steps: Vec<((u64, u64), Key)> = listed
        .common_prefixes
        .into_iter()
        .filter_map(|p| {
            let name = p.filename()?.to_string();
            let (s, a) = name.split_once('-')?;
            Some(((s.parse().ok()?, a.parse().ok()?), p))
        })
        .collect();
    steps.retain(|((step, _), _)| *step <= acked_step);
    steps.sort_by_key(|(k, _)| *k);
    let old = steps.len().saturating_sub(keep.max(1));
    let mut removed = 0;
    for (_, p) in steps.into_iter().take(old) {
        let objects: Vec<_> = store.list(Some(&p)).try_collect().await?;
        for o in objects {
            store.delete(&o.location).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Download the checkpoint at `uri` into `dest` (created); returns the local path to hand the
/// process: the file, or the directory holding the checkpoint's files.
pub async fn download(
    store: &dyn ObjectStore,
    remote: &Remote,
    dest: &Path,
) -> Result<(PathBuf, u64), CheckpointError> {
    use futures::TryStreamExt;
    tokio::fs::create_dir_all(dest).await.map_err(io(dest))?;
    let name_of = |key: &str| key.trim_end_matches('/').rsplit('/').next().unwrap_or("checkpoint").to_string();
    let key = remote.prefix.clone();
    if key.is_empty() || key.split('/').any(|part| part == "." || part == "..") {
        return Err(CheckpointError::Url(format!("{}: names no object", remote.uri(&key))));
    }
    // The URI as reported keeps a trailing '/' for a directory; `Remote::parse` trimmed it, so
    // look for objects under it first.
    let dir_key = Key::parse(&key).map_err(|e| CheckpointError::Url(format!("{key}: {e}")))?;
    let mut under: Vec<_> = store.list(Some(&dir_key)).try_collect().await?;
    // Some stores list the object named by the prefix itself: then it is a file.
    let is_file = under.iter().any(|o| o.location == dir_key);
    under.retain(|o| o.location != dir_key);
    if is_file || under.is_empty() {
        let path = dest.join(name_of(&key));
        let n = get_file(store, &dir_key, &path).await?;
        return Ok((path, n));
    }
    let root = dest.join(name_of(&key));
    let mut total = 0;
    for o in under {
        let rel = o.location.as_ref().strip_prefix(dir_key.as_ref()).unwrap_or(o.location.as_ref());
        let rel = rel.trim_start_matches('/');
        // Keys come from the store: never let one climb out of the destination.
        if rel.split('/').any(|part| part == ".." || part.is_empty()) {
            return Err(CheckpointError::Url(format!("{}: unsafe key {}", remote.uri(&key), o.location)));
        }
        total += get_file(store, &o.location, &root.join(rel)).await?;
    }
    Ok((root, total))
}

async fn get_file(store: &dyn ObjectStore, key: &Key, path: &Path) -> Result<u64, CheckpointError> {
    use futures::StreamExt;
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(io(parent))?;
    }
    let mut stream = store.get(key).await?.into_stream();
    let tmp = path.with_extension("part");
    let mut f = tokio::fs::File::create(&tmp).await.map_err(io(&tmp))?;
    let mut n = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        n += chunk.len() as u64;
        f.write_all(&chunk).await.map_err(io(&tmp))?;
    }
    f.sync_all().await.map_err(io(&tmp))?;
    drop(f);
    tokio::fs::rename(&tmp, path).await.map_err(io(path))?;
    Ok(n)
}

/// What an attempt's upload worker tells the agent.
#[derive(Debug)]
pub enum UploadEvent {
    /// The checkpoint of `step` is complete in the store at `uri`: report it.
    Durable {
        /// Attempt.
        attempt: u64,
        /// Step.
        step: u64,
        /// Its URI in the store.
        uri: String,
        /// Bytes copied.
        bytes: u64,
        /// From the process's report to the copy's end.
        took: Duration,
    },
    /// A try failed; the worker waits `retry_in` and tries again (unless a newer checkpoint
    /// came, or this was the last try).
    Failed {
        /// Attempt.
        attempt: u64,
        /// Step.
        step: u64,
        /// Which try (from 1).
        try_number: u32,
        /// What failed.
        error: String,
        /// None: the worker gave up on this checkpoint.
        retry_in: Option<Duration>,
    },
    /// Old checkpoints deleted once a newer one was accepted by the servers.
    Pruned {
        /// Attempt.
        attempt: u64,
        /// Objects deleted.
        objects: usize,
    },
    /// The worker has nothing left to do: the attempt exited and every checkpoint it reported
    /// was copied or given up on.
    Done {
        /// Attempt.
        attempt: u64,
    },
}

/// The wait before try `n + 1` after `n` failed tries: 0.5 s doubling, capped.
pub fn backoff(failed_tries: u32) -> Duration {
    let ms = 500u64.saturating_mul(1u64 << failed_tries.saturating_sub(1).min(16));
    Duration::from_millis(ms).min(BACKOFF_CAP)
}

/// One attempt's uploads: checkpoints go in the order reported, a newer one superseding any
/// older one still waiting; the worker ends when the sender is dropped and the queue is empty.
pub struct Uploader {
    tx: mpsc::UnboundedSender<(u64, String, Instant)>,
}

/// Where an attempt's checkpoints go.
#[derive(Debug, Clone)]
pub struct Target {
    /// The job's location in the store.
    pub remote: Remote,
    /// The attempt's local checkpoint directory.
    pub base: PathBuf,
    /// Job.
    pub job: u64,
    /// Shard index.
    pub shard: u32,
    /// Attempt id.
    pub attempt: u64,
    /// Steps kept in the store per shard.
    pub keep: usize,
}

impl Uploader {
    /// Start the worker for `target`; its events go to `events`.
    pub fn start(store: Arc<dyn ObjectStore>, target: Target, events: mpsc::UnboundedSender<UploadEvent>) -> Uploader {
        let (tx, mut rx) = mpsc::unbounded_channel::<(u64, String, Instant)>();
        tokio::spawn(async move {
            let attempt = target.attempt;
            while let Some(mut next) = rx.recv().await {
                // Only the newest waiting checkpoint matters.
                while let Ok(newer) = rx.try_recv() {
                    next = newer;
                }
                let (step, reported, since) = next;
                let local = local_path(&reported);
                let mut tries = 0;
                loop {
                    tries += 1;
                    let result = upload(store.as_ref(), &target, &local, step).await;
                    match result {
                        Ok((uri, bytes)) => {
                            let _ =
                                events.send(UploadEvent::Durable { attempt, step, uri, bytes, took: since.elapsed() });
                            break;
                        }
                        Err(e) => {
                            let superseded = !rx.is_empty();
                            let retry_in = (tries < UPLOAD_TRIES && !superseded).then(|| backoff(tries));
                            let _ = events.send(UploadEvent::Failed {
                                attempt,
                                step,
                                try_number: tries,
                                error: e.to_string(),
                                retry_in,
                            });
                            let Some(wait) = retry_in else { break };
                            tokio::time::sleep(wait).await;
                        }
                    }
                }
            }
            let _ = events.send(UploadEvent::Done { attempt });
        });
        Uploader { tx }
    }

    /// Queue the checkpoint the process reported (a path or `file://` URI) at `step`.
    pub fn push(&self, step: u64, reported: String) {
        let _ = self.tx.send((step, reported, Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    #[test]
    fn urls_name_their_store_and_paths_are_not_remote() {
        let r = Remote::parse("s3://ckpt/llama/run1/").unwrap().unwrap();
        assert_eq!((r.scheme, r.bucket.as_str(), r.prefix.as_str()), ("s3", "ckpt", "llama/run1"));
        assert_eq!(r.uri("a/b"), "s3://ckpt/a/b");
        assert_eq!(Remote::parse("az://c").unwrap().unwrap().prefix, "");
        assert_eq!(Remote::parse("gs://b/p").unwrap().unwrap().scheme, "gs");
        assert_eq!(Remote::parse("/shared/ckpt").unwrap(), None);
        assert_eq!(Remote::parse("file:///shared/ckpt").unwrap(), None);
        assert!(Remote::parse("s3:///nobucket").unwrap_err().to_string().contains("names no bucket"));
        assert!(Remote::parse("ftp://x/y").unwrap_err().to_string().contains("unknown scheme"));
    }

    #[test]
    fn backoff_doubles_to_its_cap() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(4), Duration::from_secs(4));
        assert_eq!(backoff(30), BACKOFF_CAP);
    }

    #[tokio::test]
    async fn files_and_directories_go_up_come_back_and_old_steps_are_pruned() {
        let store = InMemory::new();
        let remote = Remote::parse("s3://b/runs/x").unwrap().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("checkpoints");
        let target =
            |attempt| Target { remote: remote.clone(), base: base.clone(), job: 7, shard: 1, attempt, keep: 2 };
        std::fs::create_dir_all(base.join("step-30")).unwrap();
        // A file bigger than a part, so it goes in several.
        let big: Vec<u8> = (0..(PART_BYTES * 2 + 123)).map(|i| (i % 251) as u8).collect();
        for step in [10u64, 20] {
            std::fs::write(base.join(format!("s{step}.pt")), &big).unwrap();
            let local = base.join(format!("s{step}.pt"));
            let (uri, n) = upload(&store, &target(42), &local, step).await.unwrap();
            assert_eq!(n, big.len() as u64);
            assert_eq!(uri, format!("s3://b/runs/x/job-7/shard-1/{step:012}-42/s{step}.pt"));
        }
        std::fs::write(base.join("step-30/model.bin"), b"model").unwrap();
        std::fs::create_dir_all(base.join("step-30/optim")).unwrap();
        std::fs::write(base.join("step-30/optim/0.bin"), b"optim").unwrap();
        let (uri, n) = upload(&store, &target(43), &base.join("step-30"), 30).await.unwrap();
        assert_eq!((uri.as_str(), n), ("s3://b/runs/x/job-7/shard-1/000000000030-43/step-30/", 10));

        // The servers accepted step 20 only (30 is not reported yet): 10 and 20 are the two
        // newest at or below it, so nothing goes, and 30 is never a candidate.
        assert_eq!(prune(&store, &remote, 7, 1, 2, 20).await.unwrap(), 0);
        // With 30 accepted: 20 and 30 stay, 10 goes.
        assert_eq!(prune(&store, &remote, 7, 1, 2, 30).await.unwrap(), 1);
        assert_eq!(prune(&store, &remote, 7, 1, 2, 30).await.unwrap(), 0);

        let back = tempfile::tempdir().unwrap();
        let r = Remote::parse(&uri).unwrap().unwrap();
        let (path, n) = download(&store, &r, back.path()).await.unwrap();
        assert_eq!(n, 10);
        assert_eq!(std::fs::read(path.join("model.bin")).unwrap(), b"model");
        assert_eq!(std::fs::read(path.join("optim/0.bin")).unwrap(), b"optim");
        let r20 = Remote::parse("s3://b/runs/x/job-7/shard-1/000000000020-42/s20.pt").unwrap().unwrap();
        let (path, _) = download(&store, &r20, back.path()).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), big);
        let r10 = Remote::parse("s3://b/runs/x/job-7/shard-1/000000000010-42/s10.pt").unwrap().unwrap();
        assert!(download(&store, &r10, back.path()).await.is_err(), "step 10 was pruned");
        // A URI that would climb out of the destination is refused.
        let up = Remote::parse("s3://b/runs/..").unwrap().unwrap();
        assert!(download(&store, &up, back.path()).await.unwrap_err().to_string().contains("names no object"));
    }

    #[tokio::test]
    async fn the_worker_reports_durable_copies_and_retries_what_fails() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_path_buf();
        std::fs::write(base.join("a.pt"), b"a").unwrap();
        let target = Target {
            remote: Remote::parse("s3://b/p").unwrap().unwrap(),
            base: base.clone(),
            job: 1,
            shard: 0,
            attempt: 5,
            keep: 3,
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let up = Uploader::start(store.clone(), target, tx);
        up.push(10, format!("file://{}", base.join("a.pt").display()));
        // A checkpoint whose file is missing fails and is retried, then given up on once a
        // newer one waits.
        let event = rx.recv().await.unwrap();
        assert!(
            matches!(&event, UploadEvent::Durable { step: 10, uri, bytes: 1, .. } if uri == "s3://b/p/job-1/shard-0/000000000010-5/a.pt"),
            "{event:?}"
        );
        up.push(20, base.join("missing.pt").display().to_string());
        let event = rx.recv().await.unwrap();
        assert!(matches!(&event, UploadEvent::Failed { step: 20, try_number: 1, retry_in: Some(_), .. }), "{event:?}");
        std::fs::write(base.join("b.pt"), b"bb").unwrap();
        up.push(30, base.join("b.pt").display().to_string());
        let event = rx.recv().await.unwrap();
        assert!(matches!(&event, UploadEvent::Failed { step: 20, try_number: 2, retry_in: None, .. }), "{event:?}");
        let event = rx.recv().await.unwrap();
        assert!(matches!(&event, UploadEvent::Durable { step: 30, bytes: 2, .. }), "{event:?}");
        drop(up);
        assert!(matches!(rx.recv().await.unwrap(), UploadEvent::Done { attempt: 5 }));
    }
}
