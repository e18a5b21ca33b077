//! Raft messages between servers over gRPC (`RaftService.Send`). One task per peer batches
//! what the Raft thread hands it into `RaftBatch` calls, so messages to a peer normally keep
//! their order; failures are reported back to Raft, which retries on its own schedule.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::mpsc::Sender;
use std::time::Duration;

use protobuf::Message as _;
use tessera_proto::v1::RaftBatch;
use tessera_proto::v1::raft_service_client::RaftServiceClient;
use tessera_raft::eraftpb::Message;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::raft_loop::Request;

/// Largest Raft message accepted or sent, bytes (a snapshot travels as one message).
pub const MAX_RAFT_MESSAGE: usize = 256 * 1024 * 1024;

struct Peer {
    address: String,
    tx: mpsc::UnboundedSender<(Message, bool)>,
}

/// Sends Raft messages to the other servers.
pub struct Transport {
    id: u64,
    runtime: Handle,
    security: tessera_tls::Security,
    raft: Mutex<Option<Sender<Request>>>,
    peers: Mutex<BTreeMap<u64, Peer>>,
}

impl Transport {
    /// A transport for server `id`, spawning its peer tasks on `runtime`, connecting with
    /// `security` (TLS with this server's certificate, or plain with `--insecure`).
    pub fn new(id: u64, runtime: Handle, security: tessera_tls::Security) -> Transport {
        Transport { id, runtime, security, raft: Mutex::new(None), peers: Mutex::new(BTreeMap::new()) }
    }

    /// Where failures are reported (set once the Raft thread exists).
    pub fn set_raft(&self, tx: Sender<Request>) {
        if let Ok(mut r) = self.raft.lock() {
            *r = Some(tx);
        }
    }

    /// Is `id` a known peer? Messages from unknown servers are refused before decoding.
    pub fn is_peer(&self, id: u64) -> bool {
        self.peers.lock().map(|p| p.contains_key(&id)).unwrap_or(false)
    }

    /// Known peers and their addresses.
    pub fn peers(&self) -> BTreeMap<u64, String> {
        self.peers.lock().map(|p| p.iter().map(|(id, p)| (*id, p.address.clone())).collect()).unwrap_or_default()
    }

    /// Add or update a peer.
    pub fn set_peer(&self, id: u64, address: String) {
        if id == self.id {
            return;
        }
        let Ok(mut peers) = self.peers.lock() else { return };
        if peers.get(&id).is_some_and(|p| p.address == address) {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let raft = self.raft.lock().ok().and_then(|r| r.clone());
        self.runtime.spawn(peer_task(self.id, id, address.clone(), rx, raft, self.security.clone()));
        peers.insert(id, Peer { address, tx });
    }

    /// Forget a peer (removed from the cluster); its task ends.
    pub fn remove_peer(&self, id: u64) {
        if let Ok(mut peers) = self.peers.lock() {
            peers.remove(&id);
        }
    }

    /// Queue a message for its peer.
    pub fn send(&self, m: Message, snapshot: bool) {
        let to = m.to;
        let sent = self.peers.lock().ok().and_then(|p| p.get(&to).map(|p| p.tx.send((m, snapshot)).is_ok()));
        if sent != Some(true) {
            self.report(Request::Unreachable(to));
            if snapshot {
                // Raft waits for the snapshot's outcome before it tries that peer again.
                self.report(Request::SnapshotSent(to, false));
            }
        }
    }

    fn report(&self, r: Request) {
        if let Some(tx) = self.raft.lock().ok().and_then(|r| r.clone()) {
            let _ = tx.send(r);
        }
    }
}

async fn peer_task(
    from: u64,
    to: u64,
    address: String,
    mut rx: mpsc::UnboundedReceiver<(Message, bool)>,
    raft: Option<Sender<Request>>,
    security: tessera_tls::Security,
) {
    let report = |r: Request| {
        if let Some(tx) = &raft {
            let _ = tx.send(r);
        }
    };
    let endpoint = match security.endpoint(&address) {
        Ok(e) => e.connect_timeout(Duration::from_secs(1)).timeout(Duration::from_secs(10)).tcp_nodelay(true),
        Err(e) => {
            tracing::error!(peer = to, %address, error = %e, "bad peer address; no messages will reach it");
            return;
        }
    };
    let mut client = RaftServiceClient::new(security.connect_lazy(&endpoint))
        .max_encoding_message_size(MAX_RAFT_MESSAGE)
        .max_decoding_message_size(MAX_RAFT_MESSAGE);
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 256 {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let snapshots: Vec<bool> = batch.iter().map(|(_, s)| *s).collect();
        let messages: Vec<Vec<u8>> = batch.iter().filter_map(|(m, _)| m.write_to_bytes().ok()).collect();
        let req = RaftBatch { from_id: from, to_id: to, messages };
        let ok = match client.send(req).await {
            Ok(_) => true,
            Err(status) => {
                tracing::debug!(peer = to, %address, error = %status.message(), "raft send failed");
                report(Request::Unreachable(to));
                false
            }
        };
        for s in snapshots {
            if s {
                report(Request::SnapshotSent(to, ok));
            }
        }
    }
}
