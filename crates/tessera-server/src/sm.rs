//! The replicated state machine as the Raft driver sees it: log entries are
//! `[proposer's clock, 8 bytes big-endian ms][Command::encode]`, applied to
//! `tessera_core::State`. The time travels in the entry, so every server applies the same one.
//! The member addresses learnt from membership changes travel in the snapshot too, so a
//! server restarted from a snapshot still knows where its peers are.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tessera_core::command::{ApplyContext, Command, Event, Rejection};
use tessera_core::{State, Timestamp};
use tessera_raft::eraftpb::ConfChangeType;
use tessera_raft::node::{AppliedConfChange, StateMachine};
use tokio::sync::broadcast;

/// What applying one entry gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied; these events happened.
    Applied(Vec<Event>),
    /// Refused by the state machine; nothing changed.
    Rejected(Rejection),
    /// Not a command this build understands (every server refuses it alike).
    Undecodable(String),
}

impl Default for Outcome {
    fn default() -> Self {
        Outcome::Applied(Vec::new())
    }
}

/// Events of one applied entry, for watchers and the agent streams.
#[derive(Debug, Clone)]
pub struct Applied {
    /// Log index.
    pub index: u64,
    /// What happened.
    pub events: Vec<Event>,
}

/// Encode a command for the log, stamped with `now`.
pub fn encode_entry(cmd: &Command, now: Timestamp) -> Vec<u8> {
    let body = cmd.encode();
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&now.0.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// `[members length, 4 bytes big-endian][members JSON][State::snapshot]`.
fn encode_snapshot(members: &Members, state: &State) -> Vec<u8> {
    let members = serde_json::to_vec(members).unwrap_or_default();
    let state = state.snapshot();
    let mut out = Vec::with_capacity(4 + members.len() + state.len());
    out.extend_from_slice(&(members.len() as u32).to_be_bytes());
    out.extend_from_slice(&members);
    out.extend_from_slice(&state);
    out
}

/// Where every member listens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    /// Server id -> gRPC address.
    pub addresses: BTreeMap<u64, String>,
}

/// `tessera_core::State` behind the Raft driver.
pub struct ServerSm {
    /// The cluster state.
    pub state: State,
    /// Known member addresses.
    pub members: Members,
    events: broadcast::Sender<std::sync::Arc<Applied>>,
    /// Time spent applying commands, for the Raft thread's slow-cycle log.
    pub apply_time: std::time::Duration,
    /// Every applied entry's events, for the agent router: a channel that never drops any
    /// (a broadcast drops entries for a receiver that falls behind).
    agent_feed: Option<tokio::sync::mpsc::UnboundedSender<std::sync::Arc<Applied>>>,
    /// The token index to refresh when tokens change.
    auth: Option<std::sync::Arc<crate::auth::Auth>>,
}

impl ServerSm {
    /// An empty state; applied events go to `events`.
    pub fn new(members: Members, events: broadcast::Sender<std::sync::Arc<Applied>>) -> ServerSm {
        ServerSm {
            state: State::new(),
            members,
            events,
            apply_time: std::time::Duration::ZERO,
            agent_feed: None,
            auth: None,
        }
    }
}

impl ServerSm {
    /// Also send every applied entry's events to `feed`.
    pub fn with_agent_feed(mut self, feed: tokio::sync::mpsc::UnboundedSender<std::sync::Arc<Applied>>) -> ServerSm {
        self.agent_feed = Some(feed);
        self
    }

    /// Keep `auth`'s token index equal to the replicated tokens.
    pub fn with_auth(mut self, auth: std::sync::Arc<crate::auth::Auth>) -> ServerSm {
        auth.refresh(self.state.acl());
        self.auth = Some(auth);
        self
    }

    fn refresh_auth(&self) {
        if let Some(a) = &self.auth {
            a.refresh(self.state.acl());
        }
    }
}

impl StateMachine for ServerSm {
    type Output = Outcome;

    fn apply(&mut self, index: u64, data: &[u8]) -> Outcome {
        let Some((now, body)) = data.split_first_chunk::<8>() else {
            return Outcome::Undecodable("entry shorter than its timestamp".into());
        };
        let cmd = match Command::decode(body) {
            Ok(cmd) => cmd,
            Err(e) => {
                tracing::error!(index, error = %e, "undecodable command in the log; skipped on every server");
                return Outcome::Undecodable(e.to_string());
            }
        };
        let kind = cmd.kind();
        let ctx = ApplyContext { index, now: Timestamp(u64::from_be_bytes(*now)) };
        let started = std::time::Instant::now();
        let result = self.state.apply(cmd, ctx);
        let took = started.elapsed();
        self.apply_time += took;
        if took >= std::time::Duration::from_millis(50) {
            tracing::warn!(index, kind, ms = took.as_millis() as u64, bytes = data.len(), "slow apply");
        }
        match result {
            Ok(events) => {
                if events.iter().any(|e| matches!(e, Event::AclChanged { .. })) {
                    self.refresh_auth();
                }
                if !events.is_empty() {
                    let applied = std::sync::Arc::new(Applied { index, events: events.clone() });
                    if let Some(feed) = &self.agent_feed {
                        let _ = feed.send(applied.clone());
                    }
                    let _ = self.events.send(applied);
                }
                Outcome::Applied(events)
            }
            Err(r) => {
                tracing::debug!(index, kind, rejection = %r, "command rejected");
                Outcome::Rejected(r)
            }
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        encode_snapshot(&self.members, &self.state)
    }

    fn snapshot_later(&self) -> Box<dyn FnOnce() -> Vec<u8> + Send> {
        // A copy now, sharing the jobs and nodes (milliseconds), instead of the encoding
        // (seconds) on the Raft thread.
        let (members, state) = (self.members.clone(), self.state.snapshot_copy());
        Box::new(move || encode_snapshot(&members, &state))
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), String> {
        if data.is_empty() {
            // The snapshot a new cluster starts from: the empty state, members as configured.
            self.state = State::new();
            self.refresh_auth();
            return Ok(());
        }
        let (len, rest) = data.split_first_chunk::<4>().ok_or("snapshot shorter than its header")?;
        let len = u32::from_be_bytes(*len) as usize;
        let members = rest.get(..len).ok_or("snapshot member list truncated")?;
        self.members = serde_json::from_slice(members).map_err(|e| format!("snapshot member list: {e}"))?;
        self.state = State::restore(&rest[len..]).map_err(|e| e.to_string())?;
        self.refresh_auth();
        Ok(())
    }

    fn conf_changed(&mut self, change: &AppliedConfChange) {
        match change.change {
            ConfChangeType::RemoveNode => {
                self.members.addresses.remove(&change.node);
            }
            _ => {
                if let Ok(addr) = String::from_utf8(change.context.clone())
                    && !addr.is_empty()
                {
                    self.members.addresses.insert(change.node, addr);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_core::JobSpec;

    #[test]
    fn entries_apply_and_snapshots_round_trip() {
        let (tx, mut rx) = broadcast::channel(8);
        let mut sm = ServerSm::new(Members::default(), tx.clone());
        let cmd = Command::SubmitJob {
            spec: JobSpec::new(vec!["true".into()], 1, 1),
            idempotency_key: None,
            priority_defaulted: false,
            submitted_by: None,
        };
        let out = sm.apply(1, &encode_entry(&cmd, Timestamp(5)));
        assert!(matches!(&out, Outcome::Applied(e) if e.len() == 1));
        assert_eq!(rx.try_recv().unwrap().index, 1);
        assert!(matches!(sm.apply(2, b"short"), Outcome::Undecodable(_)));
        assert!(matches!(sm.apply(3, b"\0\0\0\0\0\0\0\0garbage"), Outcome::Undecodable(_)));
        sm.conf_changed(&AppliedConfChange {
            change: ConfChangeType::AddNode,
            node: 4,
            context: b"127.0.0.1:9".to_vec(),
        });
        let mut other = ServerSm::new(Members::default(), tx);
        other.restore(&sm.snapshot()).unwrap();
        assert_eq!(other.state, sm.state);
        assert_eq!(other.members.addresses[&4], "127.0.0.1:9");
        assert!(other.restore(b"\0\0\0\x09{}").is_err());
    }
}
