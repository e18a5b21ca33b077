//! A job's timeline: what happened to it, kept in the replicated state for as long as the job.
//!
//! [`crate::state::State::apply`] records a [`JobEvent`] in [`Job::events`] for each placement,
//! start, exit, checkpoint, stop request, lost node and requeue of one of the job's shards, with
//! the time the command was stamped with. A job's submission and its end are not stored: its
//! `submitted_at`, `finished_at`, state and message say them, and [`timeline`] puts them in.
//!
//! The list is bounded: past [`MAX_EVENTS`], the oldest event after the first [`HEAD`] is
//! dropped and counted in [`Job::events_dropped`], so a long job keeps how it began and its
//! recent history (a job that checkpoints every few minutes for weeks would otherwise grow
//! without end). Training progress is not stored: it lives on the leader, from heartbeats.

use crate::model::{Job, JobEvent, JobEventKind, JobState, Requeue, StopReason, Timestamp};

/// Most events stored per job.
pub const MAX_EVENTS: usize = 256;
/// Events at the start of a job's history that are never dropped.
pub const HEAD: usize = 16;
/// Longest [`JobEvent::detail`], in bytes.
pub const MAX_DETAIL: usize = 256;

/// Append `event` to the job's history, keeping it bounded.
pub(crate) fn record(job: &mut Job, mut event: JobEvent) {
    if let Some(d) = &mut event.detail {
        truncate(d, MAX_DETAIL);
    }
    job.events.push(event);
    if job.events.len() > MAX_EVENTS {
        job.events.remove(HEAD);
        job.events_dropped += 1;
    }
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Events ever recorded for the job, dropped ones included: a watcher that has seen `n` of them
/// has missed `events_total(job) - n`.
pub fn events_total(job: &Job) -> u64 {
    job.events.len() as u64 + job.events_dropped
}

/// The events recorded after the first `seen` (see [`events_total`]). Events dropped since are
/// not returned: the newest ones are.
pub fn events_after(job: &Job, seen: u64) -> &[JobEvent] {
    let new = events_total(job).saturating_sub(seen);
    let n = usize::try_from(new).unwrap_or(usize::MAX).min(job.events.len());
    &job.events[job.events.len() - n..]
}

/// One line of a job's timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry<'a> {
    /// The job was accepted.
    Submitted(Timestamp),
    /// A stored event.
    Event(&'a JobEvent),
    /// `events_dropped` events were dropped here.
    Dropped(u64),
    /// The job reached a final state.
    Finished(Timestamp, JobState),
}

/// The job's whole timeline, oldest first: its submission, its stored events (with a marker
/// where some were dropped) and, once it ended, its end.
pub fn timeline(job: &Job) -> Vec<Entry<'_>> {
    let mut out = Vec::with_capacity(job.events.len() + 3);
    out.push(Entry::Submitted(job.submitted_at));
    for (i, e) in job.events.iter().enumerate() {
        if i == HEAD && job.events_dropped > 0 {
            out.push(Entry::Dropped(job.events_dropped));
        }
        out.push(Entry::Event(e));
    }
    if job.state.is_terminal() {
        out.push(Entry::Finished(job.finished_at.unwrap_or(job.submitted_at), job.state));
    }
    out
}

/// What the event says, for people; `node` is the name of its node (or its id).
pub fn describe(e: &JobEvent, node: &str) -> String {
    let mut s = match e.kind {
        JobEventKind::Placed { number: 1 } => format!("placed on {node}"),
        JobEventKind::Placed { number } => format!("placed again on {node} (attempt {number})"),
        JobEventKind::Started => format!("started on {node}"),
        JobEventKind::Exited { code: Some(c), .. } => format!("exited with code {c}"),
        JobEventKind::Exited { signal: Some(sig), .. } => format!("killed by signal {sig}"),
        JobEventKind::Exited { .. } => "exited".to_string(),
        JobEventKind::Checkpoint { step } => format!("checkpoint at step {step}"),
        JobEventKind::Stopping { reason } => format!("{}: stopping it", stop_text(reason, node)),
        JobEventKind::NodeLost => format!("{node} was lost with the shard on it"),
        JobEventKind::Requeued { why, not_before } => {
            let why = match why {
                Requeue::Stopped(r) => stop_text(r, node),
                Requeue::NodeLost => format!("{node} was lost"),
                Requeue::NodeFault => format!("it failed because of {node} or its GPUs (no retry used)"),
                Requeue::Retry => "it failed; the retry policy allows another attempt".to_string(),
            };
            match not_before.map(|t| t.since(e.at)) {
                Some(ms) if ms > 0 => format!("back in the queue: {why}; not placed for {}", secs_text(ms)),
                _ => format!("back in the queue: {why}"),
            }
        }
    };
    if let Some(d) = &e.detail {
        s.push_str(" (");
        s.push_str(d);
        s.push(')');
    }
    s
}

fn stop_text(r: StopReason, node: &str) -> String {
    match r {
        StopReason::Cancelled => "the job was cancelled".to_string(),
        StopReason::Preempted { by } => format!("preempted by job {} of higher priority", by.0),
        StopReason::Drain => format!("{node} is draining"),
        StopReason::SpotInterruption => format!("spot interruption notice for {node}"),
        StopReason::GpuFault => format!("a GPU of {node} failed"),
        StopReason::GangRestart => "the gang restarts".to_string(),
        StopReason::JobFailed => "another shard failed the job".to_string(),
    }
}

fn secs_text(ms: u64) -> String {
    if ms % 1000 == 0 { format!("{} s", ms / 1000) } else { format!("{:.1} s", ms as f64 / 1000.0) }
}

/// What a finished job's end says, for people.
pub fn finished_text(job: &Job) -> String {
    let state = match job.state {
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        JobState::Pending | JobState::Running => "ended",
    };
    match &job.message {
        Some(m) if job.state != JobState::Succeeded => format!("{state}: {m}"),
        _ => state.to_string(),
    }
}
