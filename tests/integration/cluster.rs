//! Three (or four) real `tessera server` processes on loopback: kill -9, restarts, membership
//! changes, snapshots. Every process is killed when its guard drops, even on failure.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tessera_proto::v1;
use tessera_tests::{Cluster, ServerProc, applied_index, channel, free_port, job_ids, submit, wait_for_leader};

const T: Duration = Duration::from_secs(20);

async fn leader(c: &Cluster) -> u64 {
    match wait_for_leader(&c.running_addrs(), T).await {
        Some(l) => l,
        None => panic!("no leader elected\n{}", c.logs()),
    }
}

/// Wait until every running server has applied at least what the others have.
async fn converge(c: &Cluster) {
    let deadline = Instant::now() + T;
    loop {
        let mut idx = Vec::new();
        for a in c.running_addrs() {
            idx.push(applied_index(&a).await.unwrap_or(0));
        }
        if idx.iter().min() == idx.iter().max() && idx[0] > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "servers did not converge: {idx:?}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn assert_all_have(c: &Cluster, acked: &BTreeSet<u64>) {
    converge(c).await;
    for s in c.servers.values().filter(|s| s.running()) {
        let have: BTreeSet<u64> = job_ids(&s.addr, true).await.unwrap().into_iter().collect();
        let missing: Vec<_> = acked.difference(&have).collect();
        assert!(missing.is_empty(), "server {} lost acknowledged jobs {missing:?}", s.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_then_restart_loses_nothing() {
    let mut c = Cluster::start(3, &[]);
    let first = leader(&c).await;
    let mut acked = BTreeSet::new();
    for i in 0..20 {
        let addrs = c.running_addrs();
        let one = vec![addrs[i % addrs.len()].clone()];
        acked.insert(submit(&one, &format!("a{i}"), T).await.expect("submit through any server"));
    }
    // kill -9 the leader; a new leader serves.
    c.servers.get_mut(&first).unwrap().kill();
    let killed_at = Instant::now();
    let id = submit(&c.running_addrs(), "after-kill", T).await.expect("a write after the leader died");
    eprintln!("leader kill -> first accepted write: {:?}", killed_at.elapsed());
    acked.insert(id);
    let second = leader(&c).await;
    assert_ne!(second, first);
    for i in 0..10 {
        acked.insert(submit(&c.running_addrs(), &format!("b{i}"), T).await.unwrap());
    }
    // The killed server restarts and catches up.
    c.servers.get_mut(&first).unwrap().restart();
    assert_all_have(&c, &acked).await;
    // A duplicate submission with a used key gets the first job back.
    let again = submit(&c.running_addrs(), "a3", T).await.unwrap();
    assert!(acked.contains(&again));
    assert_eq!(job_ids(&c.servers[&first].addr, false).await.unwrap().len(), acked.len());
}

/// A submission that a follower forwarded to a leader that then froze and died is proposed
/// again by that follower once it sees the leader change: the client's one call succeeds (it
/// used to wait out the ten-second write timeout and fail UNAVAILABLE), and the job exists
/// once. Then the CLI submits through a list that starts with the dead server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_forwarded_to_a_dying_leader_is_proposed_again_once() {
    let mut c = Cluster::start(3, &[]);
    let old = leader(&c).await;
    let follower = c.servers.values().find(|s| s.id != old).unwrap().addr.clone();
    let mut client = v1::job_service_client::JobServiceClient::new(channel(&follower));
    // A first write through the follower: it knows the leader and its connection is warm.
    let req = |key: &str| v1::SubmitJobRequest { spec: Some(tessera_tests::spec(key)), idempotency_key: key.into() };
    client.submit_job(req("warm")).await.expect("a write through the follower");
    // Freeze the leader (its sockets stay open, so nothing tells the follower), submit through
    // the follower, then kill the leader.
    c.servers[&old].signal("STOP");
    let pending = tokio::spawn(async move { client.submit_job(req("through-failover")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.servers.get_mut(&old).unwrap().kill();
    let job = match pending.await.unwrap() {
        Ok(r) => r.into_inner().job_id,
        Err(s) => panic!("the forwarded submission failed: {s}\n{}", c.logs()),
    };
    let logs = c.logs();
    assert!(logs.contains("proposed again after the leader changed"), "no re-proposal logged\n{logs}");
    // The CLI, told about the dead server first, reaches a live one.
    let servers = c.servers.values().map(|s| s.addr.clone()).collect::<Vec<_>>().join(",");
    let out = tessera_tests::tessera(&[
        "job",
        "submit",
        "--insecure",
        "--server",
        &servers,
        "--name",
        "cli-after-kill",
        "-o",
        "json",
        "--",
        "true",
    ]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), c.logs());
    converge(&c).await;
    let ids = job_ids(&follower, false).await.unwrap();
    assert_eq!(ids.len(), 3, "warm-up, the forwarded submission and the CLI's: {ids:?}");
    assert!(ids.contains(&job));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loop_while_clients_submit_loses_no_acknowledged_job() {
    kill_loop(20).await;
}

/// The long run of targets.md R1: `cargo test -p tessera-tests -- --ignored kill_9_loop_long`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 100 kills, several minutes"]
async fn kill_9_loop_long() {
    kill_loop(100).await;
}

async fn kill_loop(kills: u64) {
    let mut c = Cluster::start(3, &[]);
    leader(&c).await;
    let addrs = c.running_addrs();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for client in 0..4 {
        let addrs = addrs.clone();
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // The same key is retried until acknowledged: no duplicates, nothing lost.
                let key = format!("c{client}-{n}");
                if let Some(id) = submit(&addrs, &key, Duration::from_secs(30)).await {
                    acked.push(id);
                    n += 1;
                }
            }
            acked
        }));
    }
    for k in 0..kills {
        tokio::time::sleep(Duration::from_millis(300 + (k % 4) * 150)).await;
        let victim = match k % 3 {
            0 => wait_for_leader(&c.running_addrs(), T).await.unwrap_or(1),
            _ => 1 + (k % 3),
        };
        c.servers.get_mut(&victim).unwrap().kill();
        tokio::time::sleep(Duration::from_millis(200 + (k % 3) * 200)).await;
        c.servers.get_mut(&victim).unwrap().restart();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = BTreeSet::new();
    for t in clients {
        acked.extend(t.await.unwrap());
    }
    eprintln!("{kills} kills, {} submissions acknowledged", acked.len());
    assert!(acked.len() > 20, "clients made progress through the kills: {}\n{}", acked.len(), c.logs());
    leader(&c).await;
    assert_all_have(&c, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_a_fourth_server_then_remove_the_leader() {
    let mut c = Cluster::start(3, &[]);
    let first = leader(&c).await;
    let mut acked = BTreeSet::new();
    for i in 0..10 {
        acked.insert(submit(&c.running_addrs(), &format!("m{i}"), T).await.unwrap());
    }
    let addr = format!("127.0.0.1:{}", free_port());
    let join = c.servers[&first].addr.clone();
    let four = ServerProc::start(4, &addr, &c.dir.path().join("s4"), &["--join".into(), join]);
    c.servers.insert(4, four);
    // It joins as a learner and is promoted once caught up.
    let deadline = Instant::now() + T;
    loop {
        let mut cl = v1::cluster_service_client::ClusterServiceClient::new(channel(&c.servers[&first].addr));
        let members = cl.status(v1::StatusRequest {}).await.map(|r| r.into_inner().members).unwrap_or_default();
        if members.iter().any(|m| m.id == 4 && m.kind == v1::MemberKind::Voter as i32) {
            break;
        }
        assert!(Instant::now() < deadline, "server 4 never became a voter: {members:?}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_all_have(&c, &acked).await;
    // Remove the current leader, asking a follower: leadership moves first.
    let l = leader(&c).await;
    let follower = c.servers.keys().copied().find(|id| *id != l).unwrap();
    let mut cl = v1::cluster_service_client::ClusterServiceClient::new(channel(&c.servers[&follower].addr));
    let r = cl.remove_server(v1::RemoveServerRequest { id: l }).await;
    assert!(r.is_ok(), "{r:?}\n{}", c.logs());
    let mut removed = c.servers.remove(&l).unwrap();
    removed.kill();
    let new = leader(&c).await;
    assert_ne!(new, l);
    acked.insert(submit(&c.running_addrs(), "after-remove", T).await.unwrap());
    assert_all_have(&c, &acked).await;
    let members = cl.status(v1::StatusRequest {}).await.unwrap().into_inner().members;
    assert_eq!(members.len(), 3, "{members:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_server_catches_up_from_a_snapshot_and_the_cluster_survives_a_full_stop() {
    let mut c = Cluster::start(3, &["--snapshot-every", "20"]);
    leader(&c).await;
    c.servers.get_mut(&3).unwrap().kill();
    let mut acked = BTreeSet::new();
    for i in 0..60 {
        acked.insert(submit(&c.running_addrs(), &format!("s{i}"), T).await.unwrap());
    }
    c.servers.get_mut(&3).unwrap().restart();
    assert_all_have(&c, &acked).await;
    let log = c.servers[&3].log_tail();
    assert!(log.contains("installed a snapshot"), "server 3 should catch up through a snapshot:\n{log}");
    // Stop everything, start everything: all of it is still there.
    for s in c.servers.values_mut() {
        s.kill();
    }
    for s in c.servers.values_mut() {
        s.restart();
    }
    leader(&c).await;
    assert_all_have(&c, &acked).await;
}

/// Save a snapshot through the Cluster API, as `tessera cluster snapshot save` does.
async fn save_snapshot(addr: &str, path: &std::path::Path) -> v1::SnapshotHeader {
    let mut c = v1::cluster_service_client::ClusterServiceClient::new(channel(addr));
    let mut stream = c.snapshot(v1::SnapshotRequest {}).await.expect("snapshot").into_inner();
    let (mut header, mut data) = (None, Vec::new());
    while let Some(m) = stream.message().await.expect("snapshot stream") {
        match m.chunk {
            Some(v1::snapshot_response::Chunk::Header(h)) => header = Some(h),
            Some(v1::snapshot_response::Chunk::Data(d)) => data.extend_from_slice(&d),
            None => {}
        }
    }
    let header = header.expect("a header first");
    assert_eq!(header.size_bytes, data.len() as u64);
    std::fs::write(path, &data).unwrap();
    header
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_snapshot_starts_a_new_cluster_with_every_job() {
    let a = Cluster::start(3, &[]);
    leader(&a).await;
    let mut acked = BTreeSet::new();
    for i in 0..5 {
        acked.insert(submit(&a.running_addrs(), &format!("r{i}"), T).await.unwrap());
    }
    let bad = tempfile::tempdir().unwrap();
    let file = bad.path().join("backup.snap");
    let header = save_snapshot(&a.running_addrs()[0], &file).await;
    assert!(header.index > 0);
    drop(a);

    // A corrupt file is refused with the field named.
    let junk = bad.path().join("junk.snap");
    std::fs::write(&junk, b"not a snapshot").unwrap();
    let port = free_port();
    let out = tessera_tests::tessera(&[
        "server",
        "--id",
        "1",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        &bad.path().join("s1").display().to_string(),
        "--initial-cluster",
        &format!("1=127.0.0.1:{port}"),
        "--restore-from",
        &junk.display().to_string(),
        "--insecure",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("restore_from") && err.contains("not a Tessera snapshot"), "{err}");

    // Three new servers, the same file each: every job is there, and new ids follow on.
    let path = file.display().to_string();
    let b = Cluster::start(3, &["--restore-from", &path]);
    leader(&b).await;
    assert_all_have(&b, &acked).await;
    let next = submit(&b.running_addrs(), "after-restore", T).await.unwrap();
    assert!(acked.iter().all(|id| *id < next), "job ids restarted after a restore: {next} vs {acked:?}");
}
