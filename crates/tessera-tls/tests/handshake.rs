//! Real handshakes on loopback: a server and clients with certificates from `issue`, a
//! rotation to a second CA through a bundle holding both, and reloads.

use std::path::Path;
use std::time::Duration;

use tessera_core::acl::{Principal, Role};
use tessera_tls::issue::{Ca, write_file, write_pair};
use tessera_tls::{Security, Tls, TlsFiles};

fn user(name: &str) -> Principal {
    Principal::User { name: name.into(), role: Some(Role::Viewer), tenants: Default::default(), token: None }
}

async fn health(sec: &Security, addr: &str) -> Result<(), String> {
    let ep = sec.endpoint(addr).map_err(|e| e.to_string())?.connect_timeout(Duration::from_secs(2));
    let ch = sec.connect(&ep).await.map_err(|e| format!("connect: {e:?}"))?;
    health_on(ch).await
}

async fn health_on(ch: tonic::transport::Channel) -> Result<(), String> {
    let mut c = tonic_health::pb::health_client::HealthClient::new(ch);
    c.check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn client(dir: &Path, ca_file: &str, stem: &str) -> Security {
    let files = TlsFiles {
        ca: dir.join(ca_file),
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}-key.pem")),
    };
    Security::Tls(Tls::load(files).expect("client files"))
}

#[tokio::test]
async fn rotation_through_a_two_ca_bundle_keeps_open_connections() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let (ca1, f1) = Ca::create("old CA", 1).expect("ca1");
    write_pair(d, "ca", &f1).expect("write ca1");
    write_pair(d, "server-1", &ca1.issue(&Principal::Server { id: 1 }, &["127.0.0.1".into()], 1).expect("server"))
        .expect("write server");
    write_pair(d, "alice", &ca1.issue(&user("alice"), &[], 1).expect("alice")).expect("write alice");

    let server_tls = Tls::load(TlsFiles::in_dir(d, "server-1")).expect("server files");
    assert_eq!(server_tls.identity(), Principal::Server { id: 1 });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (_reporter, health_service) = tonic_health::server::health_reporter();
    let sec = Security::Tls(server_tls.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server =
        tokio::spawn(tonic::transport::Server::builder().add_service(health_service).serve_with_incoming_shutdown(
            sec.incoming(listener),
            async {
                let _ = stopped.await;
            },
        ));

    // A client of the old CA gets in and keeps its connection open.
    let alice = client(d, "ca.pem", "alice");
    let ep = alice.endpoint(&addr).expect("endpoint");
    let open = alice.connect(&ep).await.expect("alice connects");
    health_on(open.clone()).await.expect("alice is served");

    // A client of a new CA is refused until the server's bundle holds both CAs.
    let (ca2, f2) = Ca::create("new CA", 1).expect("ca2");
    write_file(&d.join("ca2.pem"), &f2.cert_pem, 0o644).expect("write ca2");
    write_pair(d, "bob", &ca2.issue(&user("bob"), &[], 1).expect("bob")).expect("write bob");
    write_file(&d.join("both.pem"), &format!("{}{}", f1.cert_pem, f2.cert_pem), 0o644).expect("bundle");
    let bob = client(d, "both.pem", "bob");
    assert!(health(&bob, &addr).await.is_err(), "a certificate of an unknown CA got in");
    write_file(&d.join("ca.pem"), &format!("{}{}", f1.cert_pem, f2.cert_pem), 0o644).expect("server bundle");
    assert!(server_tls.reload(false).expect("reload"), "a changed CA file is reloaded");
    health(&bob, &addr).await.expect("the new CA's client is served after the reload");
    health(&alice, &addr).await.expect("the old CA's clients still are");
    health_on(open).await.expect("a connection opened before the reload goes on");

    // A reload that would change who the server is keeps the old files.
    write_pair(d, "server-1", &ca2.issue(&Principal::Server { id: 2 }, &["127.0.0.1".into()], 1).expect("server 2"))
        .expect("write");
    assert!(server_tls.reload(false).is_err());
    assert_eq!(server_tls.identity(), Principal::Server { id: 1 });
    health(&alice, &addr).await.expect("still served with the kept files");

    let _ = stop.send(());
    let _ = server.await;
}

#[tokio::test]
async fn material_from_memory_handshakes_and_does_not_reload() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let (ca, f) = Ca::create("memory CA", 1).expect("ca");
    write_pair(d, "ca", &f).expect("write ca");
    write_pair(d, "server-1", &ca.issue(&Principal::Server { id: 1 }, &["127.0.0.1".into()], 1).expect("server"))
        .expect("write server");
    let server_tls = Tls::load(TlsFiles::in_dir(d, "server-1")).expect("server files");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (_reporter, health_service) = tonic_health::server::health_reporter();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server =
        tokio::spawn(tonic::transport::Server::builder().add_service(health_service).serve_with_incoming_shutdown(
            Security::Tls(server_tls).incoming(listener),
            async {
                let _ = stopped.await;
            },
        ));

    let agent = Principal::Agent { node: "sim-00001".into() };
    let issued = ca.issue(&agent, &[], 1).expect("agent");
    let tls = Tls::from_pem(ca.cert_pem(), &issued.cert_pem, &issued.key_pem).expect("from memory");
    assert_eq!(tls.identity(), agent);
    assert!(tls.files().is_none());
    assert!(!tls.reload(true).expect("a reload of memory material is a no-op"));
    assert!(tls.watch(Duration::from_millis(10)).await.is_ok(), "watching memory material ends at once");
    let sec = Security::Tls(tls);
    health(&sec, &addr).await.expect("a client with material from memory is served");
    let lazy = sec.connect_lazy(&sec.endpoint(&addr).expect("endpoint"));
    health_on(lazy).await.expect("and lazily");

    // Errors say which piece is wrong.
    let e = Tls::from_pem(ca.cert_pem(), "not a certificate", &issued.key_pem).expect_err("bad cert");
    assert!(e.to_string().contains("certificate"), "{e}");
    let e = Tls::from_pem("", &issued.cert_pem, &issued.key_pem).expect_err("no CA");
    assert!(e.to_string().contains("CA bundle"), "{e}");

    let _ = stop.send(());
    let _ = server.await;
}
