//! deploy/systemd, deploy/cloud-init and deploy/k8s: the files that install servers and agents on
//! hosts, each checked by the tool that reads it where the machine has one, and always parsed
//! here with its key settings asserted.
//!
//! - systemd: `systemd-analyze verify` on each unit (pointed at the built binary), and `security
//!   --offline` for the exposure score; then the command lines of `ExecStart`, filled in from
//!   the example environment files, start a real server and agent that register.
//! - cloud-init: `cloud-init schema` on both templates and on what `render.sh` makes of them with
//!   certificates from `tessera certs`. Without `cloud-init` that part says so and is skipped,
//!   unless `TESSERA_REQUIRE_CLOUD_INIT` is set (CI installs Debian's package and sets it).
//! - Kubernetes: every manifest parsed (no kubectl or kubeconform runs here: they need a cluster
//!   or schemas from outside), kinds, selectors, volumes, probes and variables cross-checked.
//!
//! Every `tessera` command line in these files must use flags that the built binary's `--help`
//! lists for that subcommand.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use tessera_proto::v1;
use tessera_tests::{certs, free_port, secure_channel, tessera, tessera_bin, wait_for_leader_with, workspace_root};

fn deploy(rel: &str) -> PathBuf {
    workspace_root().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Is `name` an executable on PATH?
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| f.is_file()))
}

// ---------------------------------------------------------------------------------------------
// Command lines
// ---------------------------------------------------------------------------------------------

/// The long flags `tessera SUB --help` lists.
fn help_flags(sub: &str) -> BTreeSet<String> {
    static CACHE: OnceLock<std::sync::Mutex<BTreeMap<String, BTreeSet<String>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(f) = cache.lock().unwrap().get(sub) {
        return f.clone();
    }
    let out = tessera(&[sub, "--help"]);
    assert!(out.status.success(), "tessera {sub} --help failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let flags: BTreeSet<String> = text
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches([',', '.', ')']).split(['=', '[', '<']).next().unwrap_or_default().to_string())
        .collect();
    assert!(flags.contains("--help"), "no flags read from tessera {sub} --help:\n{text}");
    cache.lock().unwrap().insert(sub.to_string(), flags.clone());
    flags
}

/// Check a `... tessera SUB --flag value ...` command line: every flag is one `tessera SUB
/// --help` lists, and none is given twice (except the repeatable --label). Returns SUB and the
/// flags with their values (None for a switch or a flag followed by another flag).
fn check_command_line(words: &[String], what: &str) -> (String, BTreeMap<String, Option<String>>) {
    let at = words
        .iter()
        .position(|w| w == "tessera" || w.ends_with("/tessera"))
        .unwrap_or_else(|| panic!("{what}: no tessera binary in {words:?}"));
    let sub = words.get(at + 1).unwrap_or_else(|| panic!("{what}: no subcommand in {words:?}")).clone();
    assert!(sub == "server" || sub == "agent", "{what}: subcommand {sub}, expected server or agent");
    let known = help_flags(&sub);
    let mut flags = BTreeMap::new();
    let rest = &words[at + 2..];
    for (i, w) in rest.iter().enumerate() {
        if let Some(stripped) = w.strip_prefix("--") {
            let (name, inline) = match stripped.split_once('=') {
                Some((n, v)) => (format!("--{n}"), Some(v.to_string())),
                None => (w.clone(), None),
            };
            assert!(known.contains(&name), "{what}: `tessera {sub}` has no flag {name} (it has {known:?})");
            let value = inline.or_else(|| rest.get(i + 1).filter(|v| !v.starts_with("--")).cloned());
            let again = flags.insert(name.clone(), value).is_some();
            assert!(!again || name == "--label", "{what}: {name} given twice");
        } else {
            assert!(
                i > 0 && rest[i - 1].starts_with("--") && !rest[i - 1].contains('='),
                "{what}: `{w}` is neither a flag nor a flag's value (in {rest:?})"
            );
        }
    }
    (sub, flags)
}

/// KEY=VALUE lines (comments and blank lines skipped), as systemd's EnvironmentFile reads them.
fn env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("`{l}` is not KEY=VALUE"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

/// systemd's expansion of an ExecStart line (without quotes, which these units do not use):
/// `${VAR}` inside a word is replaced, a word that is only `$VAR` splits into the value's words
/// (none when empty). Every variable must be defined.
fn expand_exec(line: &str, env: &BTreeMap<String, String>) -> Vec<String> {
    let var = |name: &str| env.get(name).unwrap_or_else(|| panic!("${name} is not in the environment file")).clone();
    let mut words = Vec::new();
    for w in line.split_whitespace() {
        assert!(!w.contains(['"', '\'']), "unexpected quote in ExecStart: {w}");
        if let Some(name) = w.strip_prefix('$').filter(|n| n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')) {
            words.extend(var(name).split_whitespace().map(str::to_string));
            continue;
        }
        let mut out = String::new();
        let mut rest = w;
        while let Some(i) = rest.find("${") {
            out.push_str(&rest[..i]);
            let end = rest[i..].find('}').unwrap_or_else(|| panic!("unclosed ${{ in {w}")) + i;
            out.push_str(&var(&rest[i + 2..end]));
            rest = &rest[end + 1..];
        }
        out.push_str(rest);
        assert!(!out.contains('$'), "unexpanded variable in ExecStart word {w}");
        words.push(out);
    }
    words
}

// ---------------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------------

/// A unit file: section -> [(key, value)], in order (a key may repeat).
type Unit = BTreeMap<String, Vec<(String, String)>>;

fn parse_unit(text: &str) -> Unit {
    let mut unit = Unit::new();
    let mut section = String::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(!line.ends_with('\\'), "line {}: continuation lines are not used here", n + 1);
        if let Some(s) = line.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        assert!(!section.is_empty(), "line {}: a setting outside any section", n + 1);
        let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("line {}: `{line}` is not Key=Value", n + 1));
        unit.entry(section.clone()).or_default().push((k.trim().to_string(), v.trim().to_string()));
    }
    unit
}

/// The last value of `key` in `section` (systemd: a later assignment wins).
fn setting<'a>(unit: &'a Unit, section: &str, key: &str) -> Option<&'a str> {
    unit.get(section)?.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn expect(unit: &Unit, name: &str, section: &str, key: &str, want: &str) {
    assert_eq!(setting(unit, section, key), Some(want), "{name}: [{section}] {key}");
}

/// `systemd-analyze verify` on a copy of the unit whose ExecStart runs the built binary (verify
/// refuses a unit whose binary does not exist); any message about the unit fails. Then, where
/// this systemd has `security --offline`, the unit's exposure score must be at most `max`.
fn systemd_analyze(name: &str, text: &str, max_exposure: f64) {
    let Some(analyze) = on_path("systemd-analyze") else {
        eprintln!("systemd-analyze not found: {name} only parsed");
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join(name);
    let bin = tessera_bin();
    std::fs::write(&copy, text.replace("/usr/local/bin/tessera", bin.to_str().expect("utf-8 path")))
        .expect("write the unit's copy");
    let out = Command::new(&analyze).arg("verify").arg(&copy).output().expect("run systemd-analyze verify");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let about_unit: Vec<&str> = said.lines().filter(|l| l.contains(name)).collect();
    assert!(out.status.success() && about_unit.is_empty(), "systemd-analyze verify {name}: {}\n{said}", out.status);
    if !said.trim().is_empty() {
        eprintln!("systemd-analyze verify {name} (nothing about the unit):\n{said}");
    }

    let out = Command::new(&analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&copy)
        .output()
        .expect("run systemd-analyze security");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    let Some(score) = said
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .and_then(|l| l.rsplit(':').next())
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse::<f64>().ok())
    else {
        eprintln!(
            "systemd-analyze security --offline gave no score for {name} (an older systemd?): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    };
    assert!(score <= max_exposure, "{name}: exposure {score} > {max_exposure}:\n{said}");
}

fn exec_start(unit: &Unit, name: &str) -> String {
    let all: Vec<_> = unit["Service"].iter().filter(|(k, _)| k == "ExecStart").collect();
    assert_eq!(all.len(), 1, "{name}: one ExecStart");
    all[0].1.clone()
}

/// A child process killed and reaped when dropped, even if the test fails.
struct Reaped(Child, PathBuf);

impl Reaped {
    fn spawn(words: &[String], log: PathBuf) -> Reaped {
        let f = std::fs::File::create(&log).expect("create log");
        let child = Command::new(tessera_bin())
            .args(&words[1..])
            .env("TESSERA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("clone"))
            .stderr(f)
            .spawn()
            .expect("spawn tessera");
        Reaped(child, log)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn systemd_units_verify_and_hold_their_settings() {
    let name = "tessera-server.service";
    let text = read(&deploy("systemd/tessera-server.service"));
    let u = parse_unit(&text);
    for (k, v) in [
        ("Type", "exec"),
        ("User", "tessera"),
        ("EnvironmentFile", "/etc/tessera/server.env"),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "2"),
        ("StateDirectory", "tessera/server"),
        ("StateDirectoryMode", "0700"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("CapabilityBoundingSet", ""),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallFilter", "@system-service"),
    ] {
        expect(&u, name, "Service", k, v);
    }
    expect(&u, name, "Unit", "After", "network-online.target");
    expect(&u, name, "Install", "WantedBy", "multi-user.target");
    systemd_analyze(name, &text, 2.5);

    let name = "tessera-agent.service";
    let text = read(&deploy("systemd/tessera-agent.service"));
    let a = parse_unit(&text);
    for (k, v) in [
        ("Type", "exec"),
        ("User", "tessera"),
        ("EnvironmentFile", "/etc/tessera/agent.env"),
        // A stopped agent takes its shards with it, escaped process groups and sessions too.
        ("KillMode", "control-group"),
        ("Delegate", "yes"),
        ("Restart", "always"),
        ("RestartPreventExitStatus", "2"),
        ("StateDirectory", "tessera/agent"),
        ("LimitMEMLOCK", "infinity"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "full"),
        ("CapabilityBoundingSet", ""),
        ("PrivateTmp", "yes"),
    ] {
        expect(&a, name, "Service", k, v);
    }
    // Jobs need the GPU and RDMA devices and may JIT code.
    for k in ["PrivateDevices", "MemoryDenyWriteExecute", "DevicePolicy"] {
        assert_eq!(setting(&a, "Service", k), None, "{name}: {k} would break training jobs");
    }
    let stop: u64 = setting(&a, "Service", "TimeoutStopSec")
        .and_then(|s| s.strip_suffix('s'))
        .and_then(|s| s.parse().ok())
        .expect("TimeoutStopSec=Ns");
    assert!(stop >= 90, "{name}: TimeoutStopSec {stop}s is shorter than a job's default stop ladder (90 s)");
    expect(&a, name, "Install", "WantedBy", "multi-user.target");
    systemd_analyze(name, &text, 6.0);

    // The command lines, as systemd fills them in from the example environment files.
    let server_env = env_file(&read(&deploy("systemd/server.env.example")));
    let words = expand_exec(&exec_start(&u, "server"), &server_env);
    let (sub, flags) = check_command_line(&words, "tessera-server.service ExecStart");
    assert_eq!(sub, "server");
    assert_eq!(flags["--data-dir"].as_deref(), Some("/var/lib/tessera/server"), "the unit's StateDirectory");
    assert_eq!(flags["--tls-key"].as_deref(), Some("/etc/tessera/tls/server-1-key.pem"));
    assert!(flags.contains_key("--initial-cluster"));
    let agent_env = env_file(&read(&deploy("systemd/agent.env.example")));
    let words = expand_exec(&exec_start(&a, "agent"), &agent_env);
    let (sub, flags) = check_command_line(&words, "tessera-agent.service ExecStart");
    assert_eq!(sub, "agent");
    assert_eq!(flags["--work-dir"].as_deref(), Some("/var/lib/tessera/agent"), "the unit's StateDirectory");
    assert_eq!(flags["--cert"].as_deref(), Some("/etc/tessera/tls/agent-gpu-001.pem"));
    // A server added later joins instead.
    let mut joining = server_env.clone();
    joining.insert("TESSERA_CLUSTER".into(), "--join 10.0.1.11:7001".into());
    check_command_line(&expand_exec(&exec_start(&u, "server"), &joining), "a joining server");
}

/// The units' command lines, filled in for 127.0.0.1 with certificates from `tessera certs` in a
/// temporary directory standing for /etc/tessera/tls and /var/lib/tessera, start a one-member
/// cluster and an agent that registers with it: the binary accepts every word of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_command_lines_start_a_server_and_an_agent() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tls = dir.path().join("etc/tessera/tls");
    let state = dir.path().join("var/lib/tessera");
    std::fs::create_dir_all(&tls).expect("certificates dir");
    certs(&tls, &["ca"]);
    certs(&tls, &["server", "1", "--host", "127.0.0.1"]);
    certs(&tls, &["agent", "gpu-001"]);
    certs(&tls, &["user", "admin", "--role", "admin"]);
    let relocate = |words: Vec<String>| -> Vec<String> {
        words
            .into_iter()
            .map(|w| {
                w.replace("/etc/tessera/tls", tls.to_str().expect("utf-8"))
                    .replace("/var/lib/tessera", state.to_str().expect("utf-8"))
            })
            .collect()
    };
    // Override only what the example files define, so that they stay complete.
    let with = |example: &str, set: &[(&str, String)]| {
        let mut env = env_file(&read(&deploy(example)));
        for (k, v) in set {
            assert!(env.contains_key(*k), "{example} has no {k}");
            env.insert(k.to_string(), v.clone());
        }
        env
    };
    let addr = format!("127.0.0.1:{}", free_port());
    let env = with(
        "systemd/server.env.example",
        &[
            ("TESSERA_LISTEN", addr.clone()),
            ("TESSERA_ADVERTISE", addr.clone()),
            ("TESSERA_HTTP", format!("127.0.0.1:{}", free_port())),
            ("TESSERA_CLUSTER", format!("--initial-cluster 1={addr}")),
        ],
    );
    let server_unit = parse_unit(&read(&deploy("systemd/tessera-server.service")));
    let words = relocate(expand_exec(&exec_start(&server_unit, "server"), &env));
    std::fs::create_dir_all(state.join("server")).expect("state dir");
    let server = Reaped::spawn(&words, dir.path().join("server.log"));

    let admin = tessera_tls::Tls::load(tessera_tls::TlsFiles::in_dir(&tls, "user-admin")).expect("admin cert");
    let sec = tessera_tls::Security::Tls(admin);
    let leader = wait_for_leader_with(&sec, std::slice::from_ref(&addr), Duration::from_secs(30)).await;
    assert_eq!(leader, Some(1), "the unit's server did not lead:\n{}", server.log());

    let env = with(
        "systemd/agent.env.example",
        &[
            ("TESSERA_SERVERS", addr.clone()),
            ("TESSERA_ADVERTISE", "127.0.0.1".into()),
            ("TESSERA_HTTP", format!("127.0.0.1:{}", free_port())),
            ("TESSERA_AGENT_FLAGS", "--simulate-gpus 8xH100-80GB --label rack=r1".into()),
        ],
    );
    let agent_unit = parse_unit(&read(&deploy("systemd/tessera-agent.service")));
    let words = relocate(expand_exec(&exec_start(&agent_unit, "agent"), &env));
    check_command_line(&words, "the agent's test command line");
    std::fs::create_dir_all(state.join("agent")).expect("state dir");
    let agent = Reaped::spawn(&words, dir.path().join("agent.log"));

    let mut nodes = v1::node_service_client::NodeServiceClient::new(secure_channel(&sec, &addr));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = nodes.list_nodes(v1::ListNodesRequest::default()).await {
            let r = r.into_inner();
            if let Some(n) = r.nodes.iter().find(|n| n.name == "gpu-001") {
                assert_eq!(n.gpus.len(), 8);
                assert_eq!(n.labels.get("rack").map(String::as_str), Some("r1"));
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the unit's agent did not register:\n--- agent ---\n{}\n--- server ---\n{}",
            agent.log(),
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// cloud-init
// ---------------------------------------------------------------------------------------------

/// `cloud-init`, or None (and a message) when it is missing and not required.
fn cloud_init() -> Option<PathBuf> {
    let found = on_path("cloud-init");
    if found.is_none() {
        assert!(
            std::env::var_os("TESSERA_REQUIRE_CLOUD_INIT").is_none(),
            "TESSERA_REQUIRE_CLOUD_INIT is set but no cloud-init is on PATH"
        );
        eprintln!("cloud-init not found (Debian's package installs it): schema checks skipped, YAML still parsed");
    }
    found
}

fn cloud_init_schema(bin: &Path, file: &Path) {
    let out = Command::new(bin).args(["schema", "--config-file"]).arg(file).output().expect("run cloud-init schema");
    assert!(
        out.status.success(),
        "cloud-init schema --config-file {}: {}\n{}{}",
        file.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One YAML document as JSON values.
fn yaml(text: &str, what: &str) -> Value {
    serde_norway::from_str(text).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Every document of a multi-document YAML file (empty ones skipped).
fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap_or_else(|e| panic!("{what}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn render(template: &Path, node: &str, certs: &Path, servers: &str) -> std::process::Output {
    Command::new("sh")
        .arg(deploy("cloud-init/render.sh"))
        .arg(template)
        .args([node, certs.to_str().expect("utf-8"), servers, "https://artifacts.internal/tessera", &"a".repeat(64)])
        .output()
        .expect("run render.sh")
}

#[test]
fn cloud_init_user_data_installs_and_starts_the_agent() {
    let tool = cloud_init();
    let dir = tempfile::tempdir().expect("temp dir");
    let tls = dir.path().join("certs");
    std::fs::create_dir_all(&tls).expect("certificates dir");
    certs(&tls, &["ca"]);
    certs(&tls, &["agent", "gpu-007"]);
    let unit = read(&deploy("systemd/tessera-agent.service"));
    for (file, cloud, instance, max_size) in [
        ("aws-p5.48xlarge.yaml", "aws", "p5.48xlarge", 16 * 1024),
        ("azure-nd-h100-v5.yaml", "azure", "Standard_ND96isr_H100_v5", 64 * 1024),
    ] {
        let template = deploy(&format!("cloud-init/{file}"));
        let raw = read(&template);
        assert!(raw.starts_with("#cloud-config\n"), "{file}: first line #cloud-config");
        assert!(raw.contains(instance), "{file} names {instance}");
        if let Some(bin) = &tool {
            cloud_init_schema(bin, &template);
        }

        let out = render(&template, "gpu-007", &tls, "10.0.1.11:7001,10.0.1.12:7001,10.0.1.13:7001");
        assert!(out.status.success(), "render.sh {file}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).expect("utf-8");
        let pieces: Vec<&str> = text.split('@').collect();
        let left = pieces[1..pieces.len().saturating_sub(1).max(1)]
            .iter()
            .find(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'));
        assert_eq!(left, None, "{file}: a placeholder was left:\n{text}");
        // Cloud providers cap user data: 16 KiB on AWS, 64 KiB on Azure.
        assert!(text.len() < max_size, "{file}: {} bytes of user data", text.len());
        let rendered = dir.path().join(file);
        std::fs::write(&rendered, &text).expect("write");
        if let Some(bin) = &tool {
            cloud_init_schema(bin, &rendered);
        }

        let v = yaml(&text, file);
        let users = v["users"].as_array().expect("users");
        assert!(users.iter().any(|u| u["name"] == "tessera" && u["system"] == true), "{file}: a system user tessera");
        let files: BTreeMap<&str, &Value> = v["write_files"]
            .as_array()
            .expect("write_files")
            .iter()
            .map(|f| (f["path"].as_str().expect("path"), f))
            .collect();
        let content = |path: &str| files[path]["content"].as_str().expect("content").to_string();
        for (path, stem) in [("/etc/tessera/tls/ca.pem", "ca"), ("/etc/tessera/tls/agent-gpu-007.pem", "agent-gpu-007")]
        {
            assert_eq!(content(path), read(&tls.join(format!("{stem}.pem"))), "{file}: {path}");
            assert_eq!(files[path]["permissions"], "0644", "{file}: {path}");
        }
        let key = "/etc/tessera/tls/agent-gpu-007-key.pem";
        assert_eq!(content(key), read(&tls.join("agent-gpu-007-key.pem")), "{file}: the key");
        assert_eq!(files[key]["permissions"], "0600", "{file}: the key is the agent user's only");
        assert_eq!(files[key]["owner"], "tessera:tessera", "{file}: the key's owner");
        // users-groups runs after write_files: the key waits for its owner to exist.
        assert_eq!(files[key]["defer"], true, "{file}: the key is written once its owner exists");
        assert_eq!(content("/etc/systemd/system/tessera-agent.service"), unit, "{file}: the agent's unit, as shipped");

        // The agent as the host will run it: the unit's ExecStart from this agent.env.
        let mut env = env_file(&content("/etc/tessera/agent.env"));
        assert_eq!(env["TESSERA_CLOUD"], cloud, "{file}: --cloud {cloud}");
        assert_eq!(env["TESSERA_NODE"], "gpu-007", "{file}: the certificate's node");
        assert_eq!(env["TESSERA_ADVERTISE"], "", "{file}: the address is filled in at boot");
        env.insert("TESSERA_ADVERTISE".into(), "10.0.2.21".into());
        let words = expand_exec(&exec_start(&parse_unit(&unit), file), &env);
        let (_, flags) = check_command_line(&words, file);
        assert_eq!(flags["--cloud"].as_deref(), Some(cloud), "{file}");
        for f in ["--ca", "--cert", "--key"] {
            let path = flags[f].as_deref().expect("a path");
            assert!(files.contains_key(path), "{file}: {f} {path} is not written");
        }

        let runcmd: Vec<String> = v["runcmd"]
            .as_array()
            .expect("runcmd")
            .iter()
            .map(|c| match c {
                Value::Array(words) => words.iter().map(|w| w.as_str().expect("a word")).collect::<Vec<_>>().join(" "),
                other => other.as_str().expect("a command").to_string(),
            })
            .collect();
        let at = |needle: &str| {
            runcmd.iter().position(|c| c.contains(needle)).unwrap_or_else(|| panic!("{file}: no `{needle}` in runcmd"))
        };
        assert!(runcmd[at("curl")].contains("sha256sum -c"), "{file}: the binary's checksum is checked");
        assert!(at("TESSERA_ADVERTISE=") < at("enable --now tessera-agent"));
        assert!(at("mv /usr/local/bin/tessera.new /usr/local/bin/tessera") < at("enable --now tessera-agent"));
        assert!(at("daemon-reload") < at("enable --now tessera-agent"));
    }

    // render.sh refuses what would not make a working host.
    let aws = deploy("cloud-init/aws-p5.48xlarge.yaml");
    for (node, servers, why) in [
        ("gpu 007", "10.0.1.11:7001", "a node name with a space"),
        ("gpu-008", "10.0.1.11:7001", "a node without certificate"),
        ("gpu-007", "10.0.1.11:7001 'x", "servers with a quote"),
    ] {
        let out = render(&aws, node, &tls, servers);
        assert_eq!(out.status.code(), Some(2), "render.sh took {why}");
        assert!(out.stdout.is_empty(), "render.sh wrote output for {why}");
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------------------

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str().unwrap_or_else(|| panic!("{what}: not a string: {v}"))
}

/// `selector` (a map of labels) is contained in `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector.as_object().is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Cross-checks of a pod template: mounts name volumes (or claim templates), `$(VAR)`s in the
/// command are defined, probes hit declared ports, secret volumes are readable only by owner or
/// group. Returns the first container's command line as words.
fn check_pod(what: &str, pod: &Value, claims: &[&str], config_maps: &BTreeMap<String, Value>) -> Vec<String> {
    let volumes: BTreeSet<&str> = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| str_of(&v["name"], "volume name"))
        .chain(claims.iter().copied())
        .collect();
    for v in pod["volumes"].as_array().into_iter().flatten() {
        if !v["secret"].is_null() {
            // Kubernetes reads YAML 1.1, where 0440 is octal; this reader leaves a number with a
            // leading zero as its text. Without the zero it would be decimal: 440 is 0o670.
            let mode = &v["secret"]["defaultMode"];
            let text = mode.as_str().map(str::to_string).or_else(|| mode.as_u64().map(|n| n.to_string()));
            let text = text.unwrap_or_else(|| panic!("{what}: {} sets no defaultMode", v["name"]));
            assert!(text.starts_with('0'), "{what}: defaultMode {text} is not octal (write 0400)");
            let octal = u64::from_str_radix(&text, 8).unwrap_or_else(|_| panic!("{what}: defaultMode {text}"));
            assert_eq!(octal & 0o037, 0, "{what}: secret volume {} mode {octal:o} lets others read keys", v["name"]);
        }
    }
    let containers = pod["containers"].as_array().unwrap_or_else(|| panic!("{what}: containers"));
    assert_eq!(containers.len(), 1, "{what}: one container");
    let c = &containers[0];
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let name = str_of(&m["name"], "mount name");
        assert!(volumes.contains(name), "{what}: mount {name} names no volume");
    }
    let mut defined: BTreeSet<String> =
        c["env"].as_array().into_iter().flatten().map(|e| str_of(&e["name"], "env name").to_string()).collect();
    for from in c["envFrom"].as_array().into_iter().flatten() {
        let cm = str_of(&from["configMapRef"]["name"], "configMapRef");
        let data = config_maps.get(cm).unwrap_or_else(|| panic!("{what}: ConfigMap {cm} is not in the manifests"));
        defined.extend(data.as_object().expect("data").keys().cloned());
    }
    let words: Vec<String> = c["command"]
        .as_array()
        .into_iter()
        .chain(c["args"].as_array())
        .flatten()
        .map(|w| str_of(w, "command word").to_string())
        .collect();
    // Kubernetes reads `$(NAME)` in a command as a variable and `$$` as a `$`; an undefined
    // `$(...)` stays as written, which is never what was meant (a shell's `$((` must be `$$((`).
    let words: Vec<String> = words
        .iter()
        .map(|w| {
            let mut out = String::new();
            let mut rest = w.as_str();
            while let Some(i) = rest.find('$') {
                out.push_str(&rest[..i]);
                rest = &rest[i..];
                if let Some(r) = rest.strip_prefix("$$") {
                    out.push('$');
                    rest = r;
                } else if let Some(r) = rest.strip_prefix("$(") {
                    let end = r.find(')').unwrap_or(r.len());
                    let var = &r[..end];
                    assert!(defined.contains(var), "{what}: $({var}) is not defined in env or envFrom (in {w})");
                    out.push_str(&rest[..end + 3]);
                    rest = &r[end + 1..];
                } else {
                    out.push('$');
                    rest = &rest[1..];
                }
            }
            out.push_str(rest);
            out
        })
        .collect();
    let ports: BTreeMap<&str, u64> = c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| (str_of(&p["name"], "port name"), p["containerPort"].as_u64().expect("containerPort")))
        .collect();
    let probes: Vec<&Value> =
        ["livenessProbe", "readinessProbe"].iter().map(|p| &c[*p]).filter(|p| !p.is_null()).collect();
    assert!(!c["livenessProbe"].is_null(), "{what}: a liveness probe");
    for p in probes {
        let port = if !p["httpGet"].is_null() { &p["httpGet"]["port"] } else { &p["tcpSocket"]["port"] };
        match port {
            Value::String(name) => assert!(ports.contains_key(name.as_str()), "{what}: probe port {name} undeclared"),
            Value::Number(n) => assert!(ports.values().any(|p| Some(*p) == n.as_u64()), "{what}: probe port {n}"),
            other => panic!("{what}: probe without a port: {other}"),
        }
    }
    words
}

#[test]
fn kubernetes_manifests_parse_and_fit_together() {
    let dir = deploy("k8s");
    let mut docs = Vec::new();
    let mut names: Vec<PathBuf> =
        std::fs::read_dir(&dir).expect("deploy/k8s").map(|e| e.expect("entry").path()).collect();
    names.sort();
    for path in names.iter().filter(|p| p.extension().is_some_and(|e| e == "yaml")) {
        docs.extend(yaml_docs(&read(path), &path.display().to_string()));
    }
    let mut by_kind: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for d in docs {
        let kind = str_of(&d["kind"], "kind").to_string();
        str_of(&d["apiVersion"], "apiVersion");
        let name = str_of(&d["metadata"]["name"], "metadata.name");
        if kind != "Namespace" {
            assert_eq!(d["metadata"]["namespace"], "tessera", "{kind} {name}: namespace");
        }
        by_kind.entry(kind).or_default().push(d);
    }
    let one = |kind: &str| -> &Value {
        let all = by_kind.get(kind).unwrap_or_else(|| panic!("no {kind}"));
        assert_eq!(all.len(), 1, "one {kind}");
        &all[0]
    };
    assert_eq!(one("Namespace")["metadata"]["name"], "tessera");
    let config_maps: BTreeMap<String, Value> = by_kind
        .get("ConfigMap")
        .into_iter()
        .flatten()
        .map(|c| (str_of(&c["metadata"]["name"], "name").to_string(), c["data"].clone()))
        .collect();

    // Servers: a StatefulSet behind a headless Service.
    let sts = one("StatefulSet");
    let service_name = str_of(&sts["spec"]["serviceName"], "serviceName");
    let services = &by_kind["Service"];
    let headless = services
        .iter()
        .find(|s| s["metadata"]["name"] == service_name)
        .unwrap_or_else(|| panic!("no Service {service_name}"));
    assert_eq!(headless["spec"]["clusterIP"], "None", "the StatefulSet's Service is headless");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], true, "members find each other before ready");
    let labels = &sts["spec"]["template"]["metadata"]["labels"];
    assert!(selects(&sts["spec"]["selector"]["matchLabels"], labels), "StatefulSet selector");
    for s in services {
        assert!(selects(&s["spec"]["selector"], labels), "Service {} selects the servers", s["metadata"]["name"]);
    }
    let pdb = one("PodDisruptionBudget");
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], labels), "the PodDisruptionBudget selects the servers");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    let replicas = sts["spec"]["replicas"].as_u64().expect("replicas");
    assert!(replicas >= 3 && replicas % 2 == 1, "an odd number of members, at least 3");
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel", "founding members start together");
    let claims: Vec<&str> = sts["spec"]["volumeClaimTemplates"]
        .as_array()
        .expect("volumeClaimTemplates")
        .iter()
        .map(|c| str_of(&c["metadata"]["name"], "claim name"))
        .collect();
    let pod = &sts["spec"]["template"]["spec"];
    let words = check_pod("StatefulSet", pod, &claims, &config_maps);
    assert_eq!(words[..2], ["/bin/sh", "-c"], "the server's id comes from the pod's ordinal");
    let script = &words[2];
    let line = script.lines().find(|l| l.contains("tessera server")).expect("a tessera server line");
    // The script's variables stand for their values: quotes go, `$cluster` splits into both
    // forms it can take.
    let server_words: Vec<String> =
        line.split_whitespace().map(|w| w.replace('"', "")).filter(|w| w != "$cluster").collect();
    assert!(line.ends_with(" $cluster"), "the cluster flags end the server's command line");
    let (_, flags) = check_command_line(&server_words, "StatefulSet server");
    let mount = |path: &str| {
        pod["containers"][0]["volumeMounts"].as_array().expect("mounts").iter().any(|m| m["mountPath"] == path)
    };
    assert!(mount(flags["--data-dir"].as_deref().expect("--data-dir")), "--data-dir is the claim's mount");
    assert!(mount("/etc/tessera/tls"), "the certificates are mounted");
    let cluster_of = |prefix: &str| -> Vec<String> {
        script
            .lines()
            .filter_map(|l| l.trim().strip_prefix("cluster=\"").and_then(|c| c.strip_suffix('"')))
            .filter(|c| c.starts_with(prefix))
            .flat_map(|c| c.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .collect()
    };
    let initial = cluster_of("--initial-cluster");
    let join = cluster_of("--join");
    for extra in [&initial, &join] {
        assert!(!extra.is_empty(), "the script's two cluster forms");
        let mut all = server_words.clone();
        all.extend(extra.iter().cloned());
        check_command_line(&all, "StatefulSet server with its cluster flags");
    }
    let port = pod["containers"][0]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "grpc")
        .and_then(|p| p["containerPort"].as_u64())
        .expect("a grpc port");
    let sts_name = str_of(&sts["metadata"]["name"], "name");
    let member = |i: u64| format!("{sts_name}-{i}.{service_name}:{port}");
    let expected: Vec<String> = (0..replicas).map(|i| format!("{}={}", i + 1, member(i))).collect();
    assert_eq!(initial[1], expected.join(","), "--initial-cluster lists every pod by its DNS name");
    assert!(script.contains(&format!("\"$id\" -le {replicas}")), "pods past the founding members join");
    assert_eq!(join[1], member(0));

    // Agents: a DaemonSet holding the node's GPUs.
    let ds = one("DaemonSet");
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    assert!(selects(&ds["spec"]["selector"]["matchLabels"], labels), "DaemonSet selector");
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let gpus = &c["resources"]["limits"]["nvidia.com/gpu"];
    assert!(gpus.as_u64().is_some_and(|n| n >= 1), "the agent asks for nvidia.com/gpu: {gpus}");
    assert_eq!(pod["hostNetwork"], true, "gangs rendezvous at the host's address");
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet", "host network, cluster DNS for the servers");
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "OnDelete", "no rollout kills running shards");
    let words = check_pod("DaemonSet", pod, &[], &config_maps);
    let (_, flags) = check_command_line(&words, "DaemonSet agent");
    let from_config = |flag: &str| -> String {
        let value = flags[flag].as_deref().unwrap_or_else(|| panic!("{flag} has a value"));
        let var = value.strip_prefix("$(").and_then(|v| v.strip_suffix(')')).expect("$(VAR)");
        str_of(&config_maps["tessera-agent"][var], var).to_string()
    };
    assert!(["aws", "azure", "none"].contains(&from_config("--cloud").as_str()), "--cloud");
    let servers: Vec<String> = (0..replicas).map(member).collect();
    assert_eq!(from_config("--servers"), servers.join(","), "the agents dial every server pod");
    assert!(
        pod["containers"][0]["volumeMounts"].as_array().expect("mounts").iter().any(|m| m["mountPath"] == "/dev/shm")
    );
    assert_eq!(flags["--work-dir"].as_deref(), Some("/var/lib/tessera/agent"));
    let work = pod["volumes"].as_array().expect("volumes").iter().find(|v| v["name"] == "work").expect("work volume");
    assert_eq!(work["hostPath"]["path"], "/var/lib/tessera/agent", "the work directory outlives the pod");
}
