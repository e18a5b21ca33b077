//! Job arrays and dependencies, as the state machine applies them.
//!
//! **Arrays.** A submission with `array` creates one record for the array, with no shards of its
//! own, and its elements are created from it as ordinary jobs, in index order, each with
//! `element_of` naming the array and its index. An element is created only while the array has
//! fewer than its `%N` limit unfinished and fewer than [`ARRAY_WINDOW`] waiting for placement.
//! So a 100,000-element array costs one small record plus a window of pending jobs, not 100,000
//! jobs in the queue the planner walks, and admission of other tenants' jobs does not slow down.
//! Elements are created at apply, after every command that finishes or places one, so every
//! server creates the same elements with the same ids.
//!
//! The array's own state follows its elements: pending until one runs, running while any holds
//! GPUs, and when all have ended: failed if any failed, else cancelled if any was cancelled,
//! else succeeded. Cancelling the array cancels its unfinished elements and creates no more.
//!
//! **Dependencies.** `after_ok` and `after_any` name earlier jobs. A job whose dependencies have
//! not all ended keeps them in `waiting_on` and stays out of the pending index (the planner never
//! sees it; `job why` says DEPENDENCY). When a dependency ends it is struck off; when an
//! `after_ok` dependency ends in anything but success, the job is cancelled with the reason
//! "dependency never satisfied", and so, in turn, are the jobs waiting on it. A dependency that
//! has already ended in failure when the job is submitted is refused at submission.
//!
//! Endings cascade through arrays and dependency chains without recursion: [`State::settle`]
//! works through a queue at the end of each apply.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::State;
use crate::command::{Event, Rejection};
use crate::model::{ArrayElement, ArrayProgress, Job, JobId, JobState, Shard, Timestamp};
use crate::spec::JobSpec;

/// No new element of an array is created while this many wait for placement, so the planner
/// sees about this many of an array's elements however large the array (elements requeued
/// after a retry, a preemption or a lost node come on top).
pub const ARRAY_WINDOW: u32 = 512;

impl State {
    /// The dependencies of a new job that have not ended. Refuses one that does not exist, and an
    /// `after_ok` one that already ended other than successfully (it could never be met).
    pub(super) fn unmet_dependencies(&self, spec: &JobSpec) -> Result<Vec<JobId>, Rejection> {
        let mut unmet = BTreeSet::new();
        for (field, list, need_ok) in [("after_ok", &spec.after_ok, true), ("after_any", &spec.after_any, false)] {
            for raw in list {
                let id = JobId(*raw);
                let Some(dep) = self.job(id) else {
                    return Err(Rejection::InvalidArgument { field, message: format!("{id} does not exist") });
                };
                if !dep.state.is_terminal() {
                    unmet.insert(id);
                } else if need_ok && dep.state != JobState::Succeeded {
                    return Err(Rejection::InvalidArgument {
                        field,
                        message: format!(
                            "{id} already ended {}: the dependency could never be met",
                            dep.state.as_str()
                        ),
                    });
                }
            }
        }
        Ok(unmet.into_iter().collect())
    }

    /// Record that `id` waits on `deps`.
    pub(super) fn wait_on(&mut self, id: JobId, deps: &[JobId]) {
        for d in deps {
            self.dependents.entry(*d).or_default().insert(id);
        }
    }

    /// A new array's own record: no shards, nothing created yet.
    pub(super) fn new_array_record(job: &mut Job) {
        job.shards.clear();
        job.array = Some(ArrayProgress::default());
    }

    /// Create the array's next elements, as far as its limit and the window allow.
    pub(super) fn fill_array(&mut self, id: JobId, now: Timestamp) {
        loop {
            let Some(parent) = self.jobs.get(&id) else { return };
            let (Some(spec), Some(p)) = (&parent.spec.array, &parent.array) else { return };
            if parent.cancel_requested || !parent.waiting_on.is_empty() || parent.state.is_terminal() {
                return;
            }
            if p.next >= spec.len() || spec.max_running.is_some_and(|m| p.active >= m) || p.queued >= ARRAY_WINDOW {
                return;
            }
            let Some(index) = spec.index_at(p.next) else { return };
            let mut element_spec = parent.spec.clone();
            element_spec.array = None;
            element_spec.after_ok.clear();
            element_spec.after_any.clear();
            let element = Job {
                id: JobId(self.next_job),
                shards: (0..element_spec.shards).map(|index| Shard::new_pending(index, now)).collect(),
                spec: element_spec,
                state: JobState::Pending,
                submitted_at: parent.submitted_at,
                started_at: None,
                finished_at: None,
                failures: 0,
                cancel_requested: false,
                message: None,
                submitted_by: parent.submitted_by.clone(),
                events: Vec::new(),
                array: None,
                element_of: Some(ArrayElement { array: id, index }),
                waiting_on: Vec::new(),
                stalls: 0,
            };
            let eid = element.id;
            self.next_job += 1;
            self.jobs.insert(eid, Arc::new(element));
            self.pending.insert(eid);
            self.array_live.entry(id).or_default().insert(eid);
            if let Some(p) = self.jobs.get_mut(&id).map(Arc::make_mut).and_then(|j| j.array.as_mut()) {
                p.next += 1;
                p.active += 1;
                p.queued += 1;
            }
        }
    }

    /// An element's job state changed from `old` to `new`: keep its array's counts.
    pub(super) fn element_moved(&mut self, element: ArrayElement, id: JobId, old: JobState, new: JobState) {
        let Some(p) = self.jobs.get_mut(&element.array).map(Arc::make_mut).and_then(|j| j.array.as_mut()) else {
            return;
        };
        if old == JobState::Pending {
            p.queued = p.queued.saturating_sub(1);
        }
        if new == JobState::Pending {
            p.queued += 1;
        }
        if new.is_terminal() {
            p.active = p.active.saturating_sub(1);
            match new {
                JobState::Succeeded => p.succeeded += 1,
                JobState::Failed => p.failed += 1,
                _ => p.cancelled += 1,
            }
            if let Some(live) = self.array_live.get_mut(&element.array) {
                live.remove(&id);
                if live.is_empty() {
                    self.array_live.remove(&element.array);
                }
            }
        }
        self.touched_arrays.insert(element.array);
    }

    /// Cancel an array: no more elements, and its unfinished ones are cancelled.
    pub(super) fn cancel_array(&mut self, id: JobId, now: Timestamp, ev: &mut Vec<Event>) {
        let Some(job) = self.jobs.get_mut(&id).map(Arc::make_mut) else { return };
        let total = job.spec.array.as_ref().map_or(0, |a| a.len());
        if let Some(p) = job.array.as_mut() {
            p.cancelled += total.saturating_sub(p.next);
            p.next = total;
        }
        let elements: Vec<JobId> = self.array_live.get(&id).into_iter().flatten().copied().collect();
        for e in elements {
            // A short reason of its own (the array's may be at the length limit already); an
            // element may have ended within this command, which is fine.
            let _ = self.cancel(e, Some(format!("array {id} cancelled")), now, ev);
        }
        self.touched_arrays.insert(id);
    }

    /// Recompute an array's own state from its elements' counts.
    fn refresh_array(&mut self, id: JobId, now: Timestamp, ev: &mut Vec<Event>) {
        let Some(job) = self.jobs.get_mut(&id).map(Arc::make_mut) else { return };
        let (Some(spec), Some(p)) = (&job.spec.array, &job.array) else { return };
        let total = spec.len();
        let new = if p.active == 0 && p.next >= total {
            if job.cancel_requested {
                JobState::Cancelled
            } else if p.failed > 0 {
                JobState::Failed
            } else if p.cancelled > 0 {
                JobState::Cancelled
            } else {
                JobState::Succeeded
            }
        } else if p.active > p.queued {
            JobState::Running
        } else {
            JobState::Pending
        };
        if new == JobState::Running {
            job.started_at.get_or_insert(now);
        }
        if new.is_terminal() {
            job.finished_at.get_or_insert(now);
            if new == JobState::Failed {
                job.message = Some(format!("{} of {total} elements failed", p.failed));
            }
        }
        if new != job.state {
            job.state = new;
            ev.push(Event::JobStateChanged { job: id, state: new });
            if new.is_terminal() {
                self.ended.push(id);
            }
        }
    }

    /// A dependency ended: strike it off its dependents' lists, releasing those it was the last
    /// of, and cancel those that needed it to succeed.
    fn dependency_ended(&mut self, id: JobId, now: Timestamp, ev: &mut Vec<Event>) {
        // A job that ended waits on nothing any more (it may have been cancelled while waiting).
        let own: Vec<JobId> =
            self.jobs.get_mut(&id).map(Arc::make_mut).map(|j| std::mem::take(&mut j.waiting_on)).unwrap_or_default();
        for d in own {
            if let Some(w) = self.dependents.get_mut(&d) {
                w.remove(&id);
                if w.is_empty() {
                    self.dependents.remove(&d);
                }
            }
        }
        let Some(waiting) = self.dependents.remove(&id) else { return };
        let Some(state) = self.job(id).map(|j| j.state) else { return };
        for d in waiting {
            let Some(job) = self.jobs.get_mut(&d).map(Arc::make_mut) else { continue };
            if job.state.is_terminal() {
                continue;
            }
            job.waiting_on.retain(|w| *w != id);
            if job.spec.after_ok.contains(&id.0) && state != JobState::Succeeded {
                let reason = format!("dependency never satisfied: {id} ended {} (after-ok)", state.as_str());
                let _ = self.cancel(d, Some(reason), now, ev);
            } else if job.waiting_on.is_empty() {
                if job.is_array() {
                    self.touched_arrays.insert(d);
                } else {
                    self.refresh_job(d, now, ev);
                }
            }
        }
    }

    /// Work through what this command set off: arrays to fill and recount, and jobs that ended
    /// (whose arrays and dependents move on in turn).
    pub(super) fn settle(&mut self, now: Timestamp, ev: &mut Vec<Event>) {
        loop {
            if let Some(id) = self.touched_arrays.pop_first() {
                self.fill_array(id, now);
                self.refresh_array(id, now, ev);
            } else if let Some(id) = self.ended.pop() {
                self.dependency_ended(id, now, ev);
            } else {
                return;
            }
        }
    }

    /// Rebuild the array and dependency indexes from the jobs.
    pub(super) fn rebuild_array_indexes(&mut self) {
        self.array_live.clear();
        self.dependents.clear();
        for job in self.jobs.values() {
            if job.state.is_terminal() {
                continue;
            }
            if let Some(e) = job.element_of {
                self.array_live.entry(e.array).or_default().insert(job.id);
            }
            for d in &job.waiting_on {
                self.dependents.entry(*d).or_default().insert(job.id);
            }
        }
    }

    /// The invariants of arrays and dependencies.
    pub(super) fn check_arrays(&self) -> Result<(), String> {
        #[derive(Default)]
        struct Seen {
            active: u32,
            queued: u32,
            ended: u64,
        }
        let mut seen: std::collections::BTreeMap<JobId, Seen> = std::collections::BTreeMap::new();
        for job in self.jobs.values() {
            if job.is_array() != job.array.is_some() || (job.is_array() && !job.shards.is_empty()) {
                return Err(format!("{} is half an array: spec, progress and shards disagree", job.id));
            }
            if let Some(e) = job.element_of {
                let parent = self.job(e.array).and_then(|p| p.spec.array.as_ref());
                if parent.is_none() || job.is_array() || e.array >= job.id {
                    return Err(format!("{} is an element of {}, which is not an earlier array", job.id, e.array));
                }
                if !parent.is_some_and(|a| {
                    a.ranges.iter().any(|&(f, l, st)| (f..=l).contains(&e.index) && (e.index - f) % st.max(1) == 0)
                }) {
                    return Err(format!("{} has index {}, which its array does not list", job.id, e.index));
                }
                let s = seen.entry(e.array).or_default();
                if job.state.is_terminal() {
                    s.ended += 1;
                } else {
                    s.active += 1;
                    if job.state == JobState::Pending {
                        s.queued += 1;
                    }
                    if !self.array_live.get(&e.array).is_some_and(|l| l.contains(&job.id)) {
                        return Err(format!("{} is missing from its array's index", job.id));
                    }
                }
            }
            if job.state.is_terminal() && !job.waiting_on.is_empty() {
                return Err(format!("{} has ended but still waits on {:?}", job.id, job.waiting_on));
            }
            for d in &job.waiting_on {
                if *d >= job.id || !(job.spec.after_ok.contains(&d.0) || job.spec.after_any.contains(&d.0)) {
                    return Err(format!("{} waits on {d}, which is not an earlier job it depends on", job.id));
                }
                if self.job(*d).is_none_or(|dep| dep.state.is_terminal()) {
                    return Err(format!("{} waits on {d}, which has ended or does not exist", job.id));
                }
                if !self.dependents.get(d).is_some_and(|w| w.contains(&job.id)) {
                    return Err(format!("{} is missing from the dependents of {d}", job.id));
                }
            }
        }
        for job in self.jobs.values().filter(|j| j.is_array()) {
            let (Some(spec), Some(p)) = (&job.spec.array, &job.array) else { continue };
            let s = seen.remove(&job.id).unwrap_or_default();
            if p.active != s.active || p.queued != s.queued {
                return Err(format!(
                    "array {} counts {}/{} unfinished/pending elements, its elements show {}/{}",
                    job.id, p.active, p.queued, s.active, s.queued
                ));
            }
            let sum = p
                .succeeded
                .checked_add(p.failed)
                .and_then(|x| x.checked_add(p.cancelled))
                .and_then(|x| x.checked_add(u64::from(p.active)));
            if p.next > spec.len() || sum != Some(p.next) {
                return Err(format!("array {} counts do not add up: {p:?}", job.id));
            }
            if job.state.is_terminal() && (p.active > 0 || p.next < spec.len()) {
                return Err(format!("array {} has ended with elements unfinished or not created", job.id));
            }
            if s.ended > p.succeeded + p.failed + p.cancelled {
                return Err(format!("array {} has more ended elements than it counts", job.id));
            }
            if spec.max_running.is_some_and(|m| p.active > m) {
                return Err(format!("array {} has {} elements unfinished, above its limit", job.id, p.active));
            }
        }
        if let Some(id) = seen.keys().next() {
            return Err(format!("elements of {id}, which is not an array"));
        }
        Ok(())
    }
}
