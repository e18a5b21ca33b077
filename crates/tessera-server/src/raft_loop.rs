//! The Raft thread: owns the [`RaftNode`] over its log store (raft-engine, or sled in an older
//! data directory), ticks it, feeds it requests and messages, and runs its Ready cycles.
//! Requests that arrive together are handled before one Ready, so many proposals share one
//! fsync (group commit). It runs on its own OS thread because a Ready cycle blocks on fsync.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use tessera_raft::eraftpb::{ConfChangeType, Message, MessageType, Snapshot};
use tessera_raft::node::{ProposeError, RaftNode, ReadFn, Responder, Status};
use tessera_raft::storage::StoreError;
use tessera_raft::storage::server_store::ServerStore;
use tokio::sync::{oneshot, watch};

use crate::sm::{Outcome, ServerSm};
use crate::transport::Transport;

/// The driver this server runs.
pub type Node = RaftNode<ServerStore, ServerSm>;

/// Something for the Raft thread to do.
pub enum Request {
    /// Propose a log entry.
    Propose(Vec<u8>, Responder<Outcome>),
    /// Propose a log entry only as the leader (never forwarded).
    ProposeAsLeader(Vec<u8>, Responder<Outcome>),
    /// Propose a membership change.
    ConfChange(ConfChangeType, u64, String, Responder<Outcome>),
    /// A linearizable read.
    Read(ReadFn<ServerSm>),
    /// Run against the node now (stale reads, status, leadership transfer, planning).
    Local(Box<dyn FnOnce(&mut Node) + Send>),
    /// A message from a peer.
    Step(Message),
    /// A peer could not be reached.
    Unreachable(u64),
    /// A snapshot was (or was not) delivered to a peer.
    SnapshotSent(u64, bool),
    /// A snapshot job finished on its thread.
    SnapshotWritten(Result<Option<Snapshot>, StoreError>),
    /// Stop the thread.
    Shutdown,
}

/// A cheap, cloneable way to talk to the Raft thread.
#[derive(Clone)]
pub struct RaftHandle {
    tx: Sender<Request>,
    status: watch::Receiver<Status>,
}

/// The Raft thread has stopped (storage failure or shutdown).
#[derive(Debug, thiserror::Error)]
#[error("the Raft thread has stopped")]
pub struct Stopped;

impl RaftHandle {
    /// Send a request.
    pub fn send(&self, r: Request) -> Result<(), Stopped> {
        self.tx.send(r).map_err(|_| Stopped)
    }

    /// Propose an entry and wait for it to apply (here; followers forward to the leader).
    pub async fn propose(&self, data: Vec<u8>) -> Result<Outcome, ProposeError> {
        let (tx, rx) = oneshot::channel();
        self.send(Request::Propose(data, Box::new(move |r| drop(tx.send(r)))))
            .map_err(|_| ProposeError::Storage("the Raft thread has stopped".into()))?;
        rx.await.unwrap_or(Err(ProposeError::Storage("the Raft thread has stopped".into())))
    }

    /// Propose an entry only if this server leads now, and wait for it to apply; a follower
    /// fails at once with [`ProposeError::NotLeader`] rather than forwarding it.
    pub async fn propose_as_leader(&self, data: Vec<u8>) -> Result<Outcome, ProposeError> {
        let (tx, rx) = oneshot::channel();
        self.send(Request::ProposeAsLeader(data, Box::new(move |r| drop(tx.send(r)))))
            .map_err(|_| ProposeError::Storage("the Raft thread has stopped".into()))?;
        rx.await.unwrap_or(Err(ProposeError::Storage("the Raft thread has stopped".into())))
    }

    /// Propose a membership change and wait for it to apply.
    pub async fn conf_change(
        &self,
        change: ConfChangeType,
        node: u64,
        address: String,
    ) -> Result<Outcome, ProposeError> {
        let (tx, rx) = oneshot::channel();
        self.send(Request::ConfChange(change, node, address, Box::new(move |r| drop(tx.send(r)))))
            .map_err(|_| ProposeError::Storage("the Raft thread has stopped".into()))?;
        rx.await.unwrap_or(Err(ProposeError::Storage("the Raft thread has stopped".into())))
    }

    /// Run `f` on the state once every write acknowledged before now is applied here.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ServerSm) -> T + Send + 'static,
    ) -> Result<T, ProposeError> {
        let (tx, rx) = oneshot::channel();
        let f: ReadFn<ServerSm> = Box::new(move |sm| drop(tx.send(sm.map(f))));
        self.send(Request::Read(f)).map_err(|_| ProposeError::Storage("the Raft thread has stopped".into()))?;
        rx.await.unwrap_or(Err(ProposeError::Storage("the Raft thread has stopped".into())))
    }

    /// Run `f` against the node now, without a read barrier.
    pub async fn local<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Node) -> T + Send + 'static,
    ) -> Result<T, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.send(Request::Local(Box::new(move |n| drop(tx.send(f(n))))))?;
        rx.await.map_err(|_| Stopped)
    }

    /// The node's status as of its last Ready cycle.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// Watch the status.
    pub fn watch_status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }
}

/// Start the Raft thread.
pub fn spawn(
    node: Node,
    transport: Arc<Transport>,
    tick: Duration,
) -> (RaftHandle, Sender<Request>, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let (status_tx, status_rx) = watch::channel(node.status());
    let handle = RaftHandle { tx: tx.clone(), status: status_rx };
    let me = tx.clone();
    let join = std::thread::Builder::new()
        .name("raft".into())
        .spawn(move || {
            // A panic here (raft-rs aborts on impossible states, and the state machine runs
            // here) must not leave a server that answers but never commits: stop the process.
            let run = std::panic::AssertUnwindSafe(|| run(node, rx, me, transport, tick, status_tx));
            if std::panic::catch_unwind(run).is_err() {
                tracing::error!("the Raft thread panicked; stopping the server");
                std::process::exit(70);
            }
        })
        .unwrap_or_else(|e| panic!("cannot start the Raft thread: {e}"));
    (handle, tx, join)
}

/// A cycle this long is logged: ticks wait while the thread works.
const SLOW_CYCLE: Duration = Duration::from_millis(100);

/// Largest number of requests handled before one Ready cycle.
const MAX_BATCH: usize = 4096;

fn run(
    mut node: Node,
    rx: Receiver<Request>,
    me: Sender<Request>,
    transport: Arc<Transport>,
    tick: Duration,
    status: watch::Sender<Status>,
) {
    let mut next_tick = Instant::now() + tick;
    loop {
        let wait = next_tick.saturating_duration_since(Instant::now());
        let mut handled = 0;
        let mut handle_took = Duration::ZERO;
        match rx.recv_timeout(wait) {
            Ok(req) => {
                let started = Instant::now();
                let mut stop = !handle(&mut node, req);
                for req in rx.try_iter().take(MAX_BATCH) {
                    stop |= !handle(&mut node, req);
                    handled += 1;
                }
                handle_took = started.elapsed();
                if stop {
                    break;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if Instant::now() >= next_tick {
            node.tick();
            next_tick += tick;
            if next_tick < Instant::now() {
                next_tick = Instant::now() + tick;
            }
        }
        let ready_started = Instant::now();
        let apply_before = node.state_machine().apply_time;
        let mut applied = 0;
        while node.has_ready() {
            match node.process_ready() {
                Ok(out) => {
                    applied += out.applied;
                    for cc in &out.conf_changes {
                        match cc.change {
                            ConfChangeType::RemoveNode => transport.remove_peer(cc.node),
                            _ => {
                                if let Ok(addr) = String::from_utf8(cc.context.clone()) {
                                    transport.set_peer(cc.node, addr);
                                }
                            }
                        }
                    }
                    if out.installed_snapshot {
                        // Members added in the history the snapshot replaced: learn their
                        // addresses now, or their messages would be refused.
                        for (id, addr) in node.state_machine().members.addresses.clone() {
                            transport.set_peer(id, addr);
                        }
                    }
                    if let Some(role) = out.role {
                        tracing::info!(?role, term = node.status().term, "raft role changed");
                    }
                    for m in out.messages {
                        let snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
                        transport.send(m, snapshot);
                    }
                }
                Err(e) => {
                    // A store we cannot write is a store we cannot trust: stop serving.
                    tracing::error!(error = %e, "raft storage failed; stopping the server");
                    std::process::exit(70);
                }
            }
        }
        let ready_took = ready_started.elapsed();
        if handle_took + ready_took >= SLOW_CYCLE {
            // Ticks wait while this thread works: past the election timeout, followers elect.
            tracing::warn!(
                requests = handled + 1,
                handle_ms = handle_took.as_millis() as u64,
                ready_ms = ready_took.as_millis() as u64,
                apply_ms = (node.state_machine().apply_time - apply_before).as_millis() as u64,
                applied,
                "slow raft cycle"
            );
        }
        if let Some(job) = node.take_snapshot_job() {
            // Encoding and writing a large state takes seconds: elsewhere, while this thread
            // keeps ticking (a leader that stops ticking loses its followers).
            let index = job.index();
            let me = me.clone();
            let spawned = std::thread::Builder::new().name("snapshot".into()).spawn(move || {
                // A panic must still answer, or no snapshot would ever be taken again.
                let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run()))
                    .unwrap_or_else(|_| Err(StoreError::Engine("the snapshot thread panicked".into())));
                drop(me.send(Request::SnapshotWritten(written)));
            });
            if let Err(e) = spawned {
                tracing::warn!(index, error = %e, "cannot start the snapshot thread; the next snapshot is due later");
                let _ = node.snapshot_written(Ok(None));
            }
        }
        let s = node.status();
        status.send_if_modified(|old| {
            if *old != s {
                *old = s;
                true
            } else {
                false
            }
        });
    }
    tracing::info!("raft thread stopped");
}

/// Handle one request; false means stop.
fn handle(node: &mut Node, req: Request) -> bool {
    match req {
        Request::Propose(data, respond) => node.propose(data, respond),
        Request::ProposeAsLeader(data, respond) => node.propose_as_leader(data, respond),
        Request::ConfChange(change, id, addr, respond) => {
            node.propose_conf_change(change, id, addr.into_bytes(), respond)
        }
        Request::Read(f) => node.read(f),
        Request::Local(f) => f(node),
        Request::Step(m) => {
            if let Err(e) = node.step(m) {
                tracing::debug!(error = %e, "raft message refused");
            }
        }
        Request::Unreachable(id) => node.report_unreachable(id),
        Request::SnapshotSent(id, ok) => node.report_snapshot(id, ok),
        Request::SnapshotWritten(written) => {
            if let Err(e) = node.snapshot_written(written) {
                tracing::error!(error = %e, "writing a snapshot failed; stopping the server");
                std::process::exit(70);
            }
        }
        Request::Shutdown => return false,
    }
    true
}
