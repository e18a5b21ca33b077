//! The Python client (`clients/python`, package `tessera-client`) against three real servers
//! over mutual TLS and one agent: `clients/python/tests/e2e.py` submits, watches, reads logs,
//! cancels, pages through jobs, and submits through gRPC reflection alone (v1alpha).

use std::time::Duration;

use tessera_tests::{AgentProc, Cluster, certs, python_with, wait_for_leader_with, workspace_root};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_submits_watches_reads_logs_and_cancels_over_tls() {
    // $TESSERA_CLIENT_PYTHON: .ci/run installs the client into target/pyclient-venv.
    let check = "import tessera_client, grpc_reflection.v1alpha.proto_reflection_descriptor_database";
    let Some(py) = python_with("TESSERA_CLIENT_PYTHON", check) else {
        eprintln!(
            "no Python with tessera-client (pip install ./clients/python grpcio-reflection; set TESSERA_CLIENT_PYTHON): skipping"
        );
        return;
    };
    let certs_dir = tempfile::tempdir().expect("temp dir");
    let c = certs_dir.path();
    certs(c, &["ca"]);
    for id in ["1", "2", "3"] {
        certs(c, &["server", id, "--host", "127.0.0.1"]);
    }
    certs(c, &["agent", "py-node"]);
    certs(c, &["user", "py", "--role", "admin"]);
    let cluster = Cluster::start_tls(3, c, &[]);
    let addrs = cluster.running_addrs();
    let admin = tessera_tls::Security::Tls(
        tessera_tls::Tls::load(tessera_tls::TlsFiles::in_dir(c, "user-py")).expect("user certificate"),
    );
    wait_for_leader_with(&admin, &addrs, Duration::from_secs(20)).await.expect("a leader");
    let agent_files = tessera_tls::TlsFiles::in_dir(c, "agent-py-node");
    let (ca, cert, key) = (
        agent_files.ca.display().to_string(),
        agent_files.cert.display().to_string(),
        agent_files.key.display().to_string(),
    );
    let _agent = AgentProc::start(
        "py-node",
        &addrs,
        "2xH100-80GB",
        cluster.dir.path(),
        &["--ca", &ca, "--cert", &cert, "--key", &key],
    );

    let user = tessera_tls::TlsFiles::in_dir(c, "user-py");
    let script = workspace_root().join("clients/python/tests/e2e.py");
    let run = tokio::process::Command::new(&py)
        .arg(&script)
        .args(["--servers", &addrs.join(",")])
        .args(["--ca", &user.ca.display().to_string()])
        .args(["--cert", &user.cert.display().to_string()])
        .args(["--key", &user.key.display().to_string()])
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(Duration::from_secs(180), run).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => panic!("cannot run {py} {}: {e}", script.display()),
        Err(_) => panic!("the Python client's checks took over 180 s (the script was killed)"),
    };
    let (out, err) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    println!("{out}");
    assert!(output.status.success(), "the Python client's checks failed:\n{out}\n{err}\n{}", cluster.logs());
    assert!(out.contains("all checks passed"), "{out}\n{err}");
}
