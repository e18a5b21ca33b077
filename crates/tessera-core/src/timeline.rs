//! A job's timeline: what happened to it, kept in the replicated state for as long as the job.
//!
//! [`crate::state::State::apply`] records a [`JobEvent`] in [`Job::events`] for each placement,
//! start, exit, checkpoint, stop request, lost node and requeue of one of the job's shards, with
//! the time the command was stamped with. A job's submission and its end are not stored: its
//! `submitted_at`, `finished_at`, state and message say them, and [`timeline`] puts them in.
//!
//! The list is bounded: past [`MAX_EVENTS`], the oldest checkpoint after the first [`HEAD`]
//! events is dropped; with none, the oldest start, stop request or requeue; only then the
//! oldest event after the first [`HEAD`]. So a long job keeps how it began, the placement and
//! end of each of its attempts (which usage is counted from) up to about 120 attempts, and its
//! recent history; a job that checkpoints every few minutes for weeks would otherwise grow
//! without end. Each event carries its number among the job's events ever recorded, so readers
//! see where some were dropped, and the servers' watch loop takes up exactly where its last
//! read ended. Training progress is not stored: it lives on the leader, from heartbeats.

use crate::model::{Job, JobEvent, JobEventKind, JobState, Requeue, StopReason, Timestamp};

/// Most events stored per job.
pub const MAX_EVENTS: usize = 256;
/// Events at the start of a job's history that are never dropped.
pub const HEAD: usize = 16;
/// Longest [`JobEvent::detail`], in bytes.
pub const MAX_DETAIL: usize = 256;

/// Append `event` to the job's history, numbered after the last, keeping the history bounded.
pub(crate) fn record(job: &mut Job, mut event: JobEvent) {
    if let Some(d) = &mut event.detail {
        truncate(d, MAX_DETAIL);
    }
    event.seq = events_total(job);
    job.events.push(event);
    if job.events.len() > MAX_EVENTS {
        // Never the event just recorded; checkpoints first, then what usage does not count
        // (starts, stop requests, requeues), placements and ends last.
        let last = job.events.len() - 1;
        let oldest = |f: fn(&JobEventKind) -> bool| job.events[HEAD..last].iter().position(|e| f(&e.kind));
        let drop = oldest(|k| matches!(k, JobEventKind::Checkpoint { .. }))
            .or_else(|| {
                oldest(|k| {
                    matches!(k, JobEventKind::Started | JobEventKind::Stopping { .. } | JobEventKind::Requeued { .. })
                })
            })
            .map_or(HEAD, |i| HEAD + i);
        job.events.remove(drop);
    }
}

/// Cut `s` to at most `max` bytes, at a character boundary.
pub fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Events ever recorded for the job, dropped ones included.
pub fn events_total(job: &Job) -> u64 {
    job.events.last().map_or(0, |e| e.seq + 1)
}

/// Events dropped to keep the job's history bounded.
pub fn dropped(job: &Job) -> u64 {
    events_total(job) - job.events.len() as u64
}

/// The stored events numbered `seen` and after: what a watcher that has seen the first `seen`
/// has not (less any dropped since).
pub fn events_after(job: &Job, seen: u64) -> &[JobEvent] {
    let i = job.events.partition_point(|e| e.seq < seen);
    &job.events[i..]
}

/// One line of a job's timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry<'a> {
    /// The job was accepted.
    Submitted(Timestamp),
    /// A stored event.
    Event(&'a JobEvent),
    /// This many events were dropped here.
    Dropped(u64),
    /// The job reached a final state.
    Finished(Timestamp, JobState),
}

/// The job's whole timeline, oldest first: its submission, its stored events (with a marker
/// wherever some were dropped) and, once it ended, its end.
pub fn timeline(job: &Job) -> Vec<Entry<'_>> {
    let mut out = Vec::with_capacity(job.events.len() + 3);
    out.push(Entry::Submitted(job.submitted_at));
    let mut next = 0;
    for e in &job.events {
        if e.seq > next {
            out.push(Entry::Dropped(e.seq - next));
        }
        next = e.seq + 1;
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
        StopReason::TimeLimit => "the job ran past its time limit".to_string(),
        StopReason::Stalled => "it made no progress (a hang); the gang restarts from its checkpoint".to_string(),
        StopReason::Hung => {
            format!("it hung {} times in a row without a new checkpoint: the job fails", crate::model::MAX_STALLS)
        }
    }
}

fn secs_text(ms: u64) -> String {
    if ms.is_multiple_of(1000) { format!("{} s", ms / 1000) } else { format!("{:.1} s", ms as f64 / 1000.0) }
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
