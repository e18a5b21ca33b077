//! `tessera dev --demo`: a gang job through the loss of a node.
//!
//! It submits a gang of two whole-node shards running the example trainer, waits until shard 0
//! is half way and the servers hold a checkpoint of it there, then kills the agent of shard 0's
//! node as if the host had died. Then it reports what the cluster does, as the API shows it:
//! the node marked down, the shards stopped and placed again, the trainer resuming from its
//! checkpoint, and the job finishing. Steps come from the trainers' progress files, which the
//! agents read too (the servers do not keep step progress).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tessera_proto::v1;

use super::AgentCtl;
use super::api::{Api, cloud_name};

const STEPS: u64 = 200;
const STEP_SECONDS: &str = "0.05";
const CHECKPOINT_EVERY: u64 = 10;
const SHARDS: u32 = 2;
/// A whole simulated node per shard, so the two shards land on two nodes.
const GPUS_PER_SHARD: u32 = 8;
/// How long the demo waits for any one thing to happen.
const PATIENCE: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(100);

/// Run the demo against the dev cluster; Ok once the job has succeeded after the loss.
pub(crate) async fn run(api: &Api, agents: &[AgentCtl], data: &Path, trainer: &Path) -> Result<(), String> {
    match tokio::process::Command::new("python3").arg("--version").output().await {
        Ok(o) if o.status.success() => {}
        _ => return Err("the demo runs examples/trainer.py with python3, which was not found on PATH".into()),
    }
    let submitted = Instant::now();
    let checkpoint_dir = data.join("checkpoints").join(format!("demo-{}", unix_ms()));
    let id = api.submit(demo_job(trainer, &checkpoint_dir), PATIENCE).await?;
    println!(
        "Demo: submitted job {id}, a gang of {SHARDS} shards of {GPUS_PER_SHARD} GPUs each (a whole node each) running \
         the example trainer: {STEPS} steps of {STEP_SECONDS} s, a checkpoint every {CHECKPOINT_EVERY} steps into {}. \
         The job may span clouds.",
        checkpoint_dir.display()
    );

    let job = wait(api, id, "every shard to be running", |j| {
        j.shards.len() == SHARDS as usize && j.shards.iter().all(|s| s.state == v1::ShardState::Running as i32)
    })
    .await?;
    println!("Job {id} is running:");
    for s in &job.shards {
        println!("  shard {}: attempt {} on {}", s.index, s.attempt, place(s));
    }

    let half = STEPS / 2;
    println!("Training. Waiting for shard 0 to pass step {half} and for the servers to hold its checkpoint there.");
    let job = wait(api, id, &format!("a checkpoint of shard 0 at step {half} or later"), |j| {
        j.shards.first().and_then(|s| s.last_checkpoint.as_ref()).is_some_and(|c| c.step >= half)
    })
    .await?;
    let mut tracks: Vec<Track> = Vec::new();
    for s in &job.shards {
        let agent = agents.iter().find(|a| a.name == s.node_name);
        let progress = match (agent, s.attempt_id) {
            (Some(a), Some(attempt_id)) => Some(progress_file(&a.work_dir, id, s.index, attempt_id)),
            _ => None,
        };
        tracks.push(Track::new(s, progress));
    }
    let victim = &job.shards[0];
    let lost_node = victim.node_name.clone();
    let lost_place = place(victim);
    let agent = agents
        .iter()
        .find(|a| a.name == lost_node)
        .ok_or_else(|| format!("shard 0 runs on '{lost_node}', which is not a node of this dev cluster"))?;
    let checkpoint_before = victim.last_checkpoint.as_ref().map_or(0, |c| c.step);

    let into_job = submitted.elapsed();
    let kill_ms = unix_ms();
    let killed = Instant::now();
    agent.kill().await?;
    let step_at_kill = tracks[0].progress.as_deref().and_then(last_step);
    // A report in flight at the kill may still have been committed: ask again.
    let checkpoint_before = match api.job(id).await {
        Ok(j) => j.shards.first().and_then(|s| s.last_checkpoint.as_ref()).map_or(checkpoint_before, |c| c.step),
        Err(_) => checkpoint_before,
    };
    println!(
        "\nKilled node {lost_node} {} into the job, as if its host had died: its agent is gone and shard 0's trainer \
         was killed (SIGKILL) at step {}. The last checkpoint of shard 0 the servers hold is at step {checkpoint_before}.",
        secs(into_job),
        step_or_unknown(step_at_kill),
    );
    println!("What the cluster does about it (times from the kill):");

    let mut node_down: Option<Duration> = None;
    let mut polls: u64 = 0;
    let mut last_error = String::new();
    let finished = loop {
        polls += 1;
        let mut lines: Lines = Vec::new();
        if node_down.is_none()
            && let Ok(nodes) = api.nodes().await
            && let Some(n) = nodes.iter().find(|n| n.name == lost_node && n.state == v1::NodeState::Down as i32)
        {
            let t = n.down_since_unix_ms.map_or_else(|| killed.elapsed(), |ms| since(kill_ms, ms));
            lines.push((t, format!("the servers marked {lost_node} down")));
            node_down = Some(t);
        }
        let job = api.job(id).await;
        match &job {
            Ok(j) => {
                for s in &j.shards {
                    if let Some(t) = tracks.get_mut(s.index as usize) {
                        t.observe(s, killed.elapsed(), kill_ms, agents, id, &mut lines);
                    }
                }
                for t in &mut tracks {
                    t.watch_progress(killed.elapsed(), &mut lines);
                }
            }
            Err(e) => last_error = e.clone(),
        }
        // Times come from the servers where they have them, so order each look's lines.
        lines.sort_by_key(|(t, _)| *t);
        for (t, line) in lines {
            println!("  {:>7}  {line}", secs(t));
        }
        if polls.is_multiple_of(3) {
            for t in &mut tracks {
                t.watch_resume(api, id).await;
            }
        }
        if let Ok(j) = job
            && j.state >= v1::JobState::Succeeded as i32
        {
            break j;
        }
        if killed.elapsed() > PATIENCE {
            return Err(format!(
                "job {id} did not finish within {} s of the kill ({}{})",
                PATIENCE.as_secs(),
                describe_tracks(&tracks),
                if last_error.is_empty() { String::new() } else { format!("; last error: {last_error}") }
            ));
        }
        tokio::time::sleep(POLL).await;
    };
    // The trainers' output stays with the leader after they exit: read what was not seen yet.
    for t in &mut tracks {
        t.watch_resume(api, id).await;
    }

    if finished.state != v1::JobState::Succeeded as i32 {
        let why = if finished.message.is_empty() { String::new() } else { format!(": {}", finished.message) };
        return Err(format!("the demo job {id} ended {}{why}", job_state(finished.state)));
    }
    let loss = Loss { node: &lost_node, place: &lost_place, step_at_kill, checkpoint_before, node_down };
    summary(&tracks, &finished, &loss, submitted)
}

fn demo_job(trainer: &Path, checkpoint_dir: &Path) -> v1::SubmitJobRequest {
    let command = [
        "python3".to_string(),
        trainer.display().to_string(),
        "--steps".into(),
        STEPS.to_string(),
        "--step-seconds".into(),
        STEP_SECONDS.into(),
        "--checkpoint-every".into(),
        CHECKPOINT_EVERY.to_string(),
    ];
    v1::SubmitJobRequest {
        spec: Some(v1::JobSpec {
            name: "dev-demo".into(),
            command: command.to_vec(),
            shards: SHARDS,
            resources: Some(v1::Resources { gpus: GPUS_PER_SHARD, ..Default::default() }),
            // Two whole nodes in one cloud, until one is lost: then the gang needs two clouds.
            placement: Some(v1::Placement { span_clouds: true, ..Default::default() }),
            checkpoint_dir: checkpoint_dir.display().to_string(),
            // A shard stopped for a gang restart checkpoints on SIGUSR1 and keeps training, then
            // checkpoints again and exits on SIGTERM a second later.
            stop: Some(v1::StopPolicy {
                signal: "SIGUSR1".into(),
                checkpoint_grace_seconds: Some(1),
                term_grace_seconds: Some(5),
            }),
            ..Default::default()
        }),
        idempotency_key: format!("tessera-dev-demo-{}", unix_ms()),
    }
}

/// The node that was killed, and shard 0 at that moment.
struct Loss<'a> {
    node: &'a str,
    /// "aws-1 (aws us-east-1)".
    place: &'a str,
    /// From the trainer's progress file.
    step_at_kill: Option<u64>,
    /// The last checkpoint of shard 0 the servers held.
    checkpoint_before: u64,
    /// When the servers marked the node down, from the kill.
    node_down: Option<Duration>,
}

/// Print what happened, in sentences; Err if the shard did not come back from a checkpoint.
fn summary(tracks: &[Track], job: &v1::Job, loss: &Loss, submitted: Instant) -> Result<(), String> {
    let Loss { node: lost_node, place: lost_place, step_at_kill, checkpoint_before, node_down } = *loss;
    let victim = &tracks[0];
    println!("\nWhat happened:");
    println!(
        "- Node {lost_place} was lost while shard 0 was at step {}; the last checkpoint of shard 0 the servers held \
         was at step {checkpoint_before}.",
        step_or_unknown(step_at_kill)
    );
    if let Some(t) = node_down {
        println!("- The servers marked {lost_node} down {} after the kill.", secs(t));
    }
    let Some(new) = &victim.new else {
        return Err(format!("job {} succeeded, but shard 0 was never seen running again after the kill", job.id));
    };
    let Some(running_after) = new.running_after else {
        return Err(format!("job {} succeeded, but shard 0 was never seen running again after the kill", job.id));
    };
    println!(
        "- Recovery: shard 0 was placed on {} {} after the kill, and was running again there {} after the kill, as \
         attempt {}.",
        new.place,
        secs(new.placed_after),
        secs(running_after),
        new.attempt
    );
    if let Some((t, step)) = &new.progress_after {
        println!("- Shard 0 was making progress again (step {step}) {} after the kill.", secs(*t));
    }
    match &new.resumed {
        Some((step, uri)) => {
            let lost = step_at_kill.map(|s| s.saturating_sub(*step));
            let lost = match (lost, step_at_kill) {
                (Some(l), Some(at)) => format!("{l} steps were lost (step {at} at the kill minus step {step})"),
                _ => "the steps lost are unknown (the step at the kill is unknown)".into(),
            };
            println!("- Shard 0 resumed from its checkpoint at step {step} (TESSERA_RESUME_FROM={uri}): {lost}.");
        }
        None => {
            return Err(format!(
                "shard 0 ran again as attempt {} but its trainer never said it was resuming from a checkpoint",
                new.attempt
            ));
        }
    }
    for t in &tracks[1..] {
        match &t.new {
            Some(n) => {
                let why = t.stop_reason.as_deref().map_or_else(|| " with its gang".to_string(), |r| format!(" ({r})"));
                let resumed = match (&n.resumed, t.progress.as_deref().and_then(last_step)) {
                    (Some((step, _)), Some(at)) => format!(
                        " and resumed from its checkpoint at step {step}; it had reached step {at} when it stopped, \
                         so {} steps were lost",
                        at.saturating_sub(*step)
                    ),
                    (Some((step, _)), None) => format!(" and resumed from its checkpoint at step {step}"),
                    (None, _) => String::new(),
                };
                println!(
                    "- Shard {} was not on {lost_node}, but the servers stopped it on {} too{why} and placed it \
                     again: it ran on {} as attempt {}{resumed}.",
                    t.index, t.node_before, n.place, n.attempt
                );
            }
            None => println!(
                "- Shard {} kept running on {} (attempt {}) through the loss.",
                t.index, t.node_before, t.attempt_before
            ),
        }
    }
    let final_step = job.latest_checkpoint.as_ref().map_or_else(|| "?".into(), |c| c.step.to_string());
    println!(
        "- Job {} succeeded: step {final_step} of {STEPS} reached, {} restarts, {} after it was submitted.",
        job.id,
        job.restarts,
        secs(submitted.elapsed())
    );
    Ok(())
}

/// Lines of the narrative, with their time from the kill.
type Lines = Vec<(Duration, String)>;

/// One shard, followed from the kill on.
struct Track {
    index: u32,
    attempt_before: u32,
    node_before: String,
    /// Progress file of the attempt that ran at the kill.
    progress: Option<PathBuf>,
    /// (state, attempt, node, stop reason) last printed.
    seen: (i32, u32, Option<u64>, i32),
    stop_reason: Option<String>,
    /// The first attempt after the kill that ran.
    new: Option<NewAttempt>,
}

struct NewAttempt {
    attempt: u32,
    place: String,
    /// When it was placed, and when the servers had its start report.
    placed_after: Duration,
    running_after: Option<Duration>,
    progress: Option<PathBuf>,
    /// When the trainer reported its first step, and which.
    progress_after: Option<(Duration, u64)>,
    /// The step and checkpoint the trainer said it resumed from.
    resumed: Option<(u64, String)>,
    /// Attempt's output looked at and no resume line found, after it had reported progress.
    fresh_start: bool,
}

impl Track {
    fn new(s: &v1::Shard, progress: Option<PathBuf>) -> Track {
        Track {
            index: s.index,
            attempt_before: s.attempt,
            node_before: s.node_name.clone(),
            progress,
            seen: (s.state, s.attempt, s.node_id, s.stop_reason),
            stop_reason: None,
            new: None,
        }
    }

    /// Print what changed since the last look.
    fn observe(&mut self, s: &v1::Shard, now: Duration, kill_ms: u64, agents: &[AgentCtl], job: u64, out: &mut Lines) {
        let key = (s.state, s.attempt, s.node_id, s.stop_reason);
        if key != self.seen {
            self.seen = key;
            let i = s.index;
            let (t, line) = match v1::ShardState::try_from(s.state) {
                Ok(v1::ShardState::Pending) => (now, format!("shard {i} is pending, to be placed again")),
                Ok(v1::ShardState::Assigned) => (
                    s.assigned_unix_ms.map_or(now, |ms| since(kill_ms, ms)),
                    format!("shard {i}: attempt {} placed on {}", s.attempt, place(s)),
                ),
                Ok(v1::ShardState::Running) => (
                    s.started_unix_ms.map_or(now, |ms| since(kill_ms, ms)),
                    format!("shard {i}: attempt {} is running on {}, its agent reports", s.attempt, place(s)),
                ),
                Ok(v1::ShardState::Stopping) => {
                    let reason = stop_reason(s.stop_reason);
                    if self.stop_reason.is_none() {
                        self.stop_reason = Some(reason.clone());
                    }
                    (now, format!("shard {i} is being stopped on {} ({reason})", s.node_name))
                }
                Ok(v1::ShardState::Succeeded) => (now, format!("shard {i} finished its {STEPS} steps")),
                _ => (now, format!("shard {i} is {}", shard_state(s.state))),
            };
            out.push((t, line));
        }
        let placed = s.state == v1::ShardState::Assigned as i32 || s.state == v1::ShardState::Running as i32;
        if self.new.is_none() && s.attempt > self.attempt_before && placed {
            let progress = match (agents.iter().find(|a| a.name == s.node_name), s.attempt_id) {
                (Some(a), Some(attempt_id)) => Some(progress_file(&a.work_dir, job, s.index, attempt_id)),
                _ => None,
            };
            self.new = Some(NewAttempt {
                attempt: s.attempt,
                place: place(s),
                placed_after: s.assigned_unix_ms.map_or(now, |ms| since(kill_ms, ms)),
                running_after: None,
                progress,
                progress_after: None,
                resumed: None,
                fresh_start: false,
            });
        }
        if let Some(n) = &mut self.new
            && n.running_after.is_none()
            && n.attempt == s.attempt
            && s.state == v1::ShardState::Running as i32
        {
            n.running_after = Some(s.started_unix_ms.map_or(now, |ms| since(kill_ms, ms)));
        }
    }

    /// The new attempt's first reported step.
    fn watch_progress(&mut self, now: Duration, out: &mut Lines) {
        let index = self.index;
        let Some(n) = &mut self.new else { return };
        if n.progress_after.is_some() {
            return;
        }
        if let Some(step) = n.progress.as_deref().and_then(first_step) {
            out.push((now, format!("shard {index} is making progress again: step {step} (from its progress file)")));
            n.progress_after = Some((now, step));
        }
    }

    /// The new attempt's "resuming from step N" line, from its output on the leader.
    async fn watch_resume(&mut self, api: &Api, job: u64) {
        let index = self.index;
        let Some(n) = &mut self.new else { return };
        if n.resumed.is_some() || n.fresh_start {
            return;
        }
        let Ok(out) = api.stdout(job, index, n.attempt).await else { return };
        if let Some(line) = out.lines().find(|l| l.starts_with("resuming from step ")) {
            let step = line["resuming from step ".len()..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|d| d.parse::<u64>().ok());
            let uri = line.split_once(" (").map(|(_, u)| u.trim_end_matches(')').to_string()).unwrap_or_default();
            if let Some(step) = step {
                println!("           shard {index}'s trainer says: {line}");
                n.resumed = Some((step, uri));
            }
        } else if out.lines().any(|l| l.starts_with("step ")) {
            // It trained without resuming first.
            n.fresh_start = true;
        }
    }
}

fn describe_tracks(tracks: &[Track]) -> String {
    tracks
        .iter()
        .map(|t| {
            let (state, attempt, _, _) = t.seen;
            format!("shard {} {} at attempt {attempt}", t.index, shard_state(state))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Poll the job until `done` holds; Err if it ends first, or after `PATIENCE`.
async fn wait(api: &Api, id: u64, what: &str, done: impl Fn(&v1::Job) -> bool) -> Result<v1::Job, String> {
    let deadline = Instant::now() + PATIENCE;
    let mut last: String;
    loop {
        match api.job(id).await {
            Ok(j) if done(&j) => return Ok(j),
            Ok(j) if j.state >= v1::JobState::Succeeded as i32 => {
                let why = if j.message.is_empty() { String::new() } else { format!(": {}", j.message) };
                return Err(format!("job {id} ended {} while waiting for {what}{why}", job_state(j.state)));
            }
            Ok(j) => last = describe(&j),
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            return Err(format!("nothing happened within {} s: still waiting for {what} ({last})", PATIENCE.as_secs()));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn describe(j: &v1::Job) -> String {
    let shards = j
        .shards
        .iter()
        .map(|s| {
            let at = if s.node_name.is_empty() { String::new() } else { format!(" on {}", s.node_name) };
            format!("shard {} {}{at}", s.index, shard_state(s.state))
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!("job {} {}; {shards}", j.id, job_state(j.state))
}

/// "azure-1 (azure eastus)".
fn place(s: &v1::Shard) -> String {
    format!("{} ({} {})", s.node_name, cloud_name(s.cloud), s.region)
}

fn progress_file(work_dir: &Path, job: u64, shard: u32, attempt_id: u64) -> PathBuf {
    work_dir
        .join(format!("job-{job}"))
        .join(format!("shard-{shard}"))
        .join(format!("attempt-{attempt_id}"))
        .join("progress.jsonl")
}

fn steps(path: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("step").and_then(|s| s.as_u64()))
        .collect()
}

fn last_step(path: &Path) -> Option<u64> {
    steps(path).last().copied()
}

fn first_step(path: &Path) -> Option<u64> {
    steps(path).first().copied()
}

fn step_or_unknown(step: Option<u64>) -> String {
    step.map_or_else(|| "an unknown step".into(), |s| s.to_string())
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn since(start_ms: u64, ms: u64) -> Duration {
    Duration::from_millis(ms.saturating_sub(start_ms))
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// "running", "stopping", ...
fn shard_state(s: i32) -> String {
    v1::ShardState::try_from(s)
        .map(|s| s.as_str_name().trim_start_matches("SHARD_STATE_").to_lowercase())
        .unwrap_or_else(|_| format!("in state {s}"))
}

fn job_state(s: i32) -> String {
    v1::JobState::try_from(s)
        .map(|s| s.as_str_name().trim_start_matches("JOB_STATE_").to_lowercase())
        .unwrap_or_else(|_| format!("in state {s}"))
}

/// "gang restart", "node lost", ...
fn stop_reason(r: i32) -> String {
    v1::StopReason::try_from(r)
        .map(|s| s.as_str_name().trim_start_matches("STOP_REASON_").to_lowercase().replace('_', " "))
        .unwrap_or_else(|_| format!("reason {r}"))
}
