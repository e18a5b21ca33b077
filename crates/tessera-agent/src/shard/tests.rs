//! Shards with real processes. Every test holds its `Shard` until the end; if an assertion fails
//! first, dropping the `Shard` SIGKILLs its group.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::kill;
use nix::unistd::Pid;

use super::*;

const TEST_TIMEOUT: Duration = Duration::from_secs(20);

fn spec(root: &Path, command: &[&str]) -> LaunchSpec {
    LaunchSpec {
        job_id: 42,
        shard_index: 1,
        num_shards: 4,
        attempt_id: 9001,
        attempt: 2,
        command: command.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::new(),
        gpus: vec![3, 1, 7],
        master_addr: "10.0.0.5".into(),
        master_port: 29500,
        world_size: 16,
        rank: 5,
        node_rank: 1,
        nnodes: 2,
        local_rank: 3,
        launch: LaunchMode::Process,
        checkpoint_dir: None,
        resume_from: None,
        checkpoint_signal: "SIGUSR1".into(),
        checkpoint_grace: Duration::from_millis(300),
        term_grace: Duration::from_millis(300),
        work_root: root.to_path_buf(),
        log_cap_bytes: 1 << 20,
        network: Vec::new(),
    }
}

fn sh(root: &Path, script: &str) -> LaunchSpec {
    spec(root, &["sh", "-c", script])
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(TEST_TIMEOUT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// Waits until `path` holds a complete line; returns its content trimmed.
async fn read_when_written(path: &Path) -> String {
    within(&format!("waiting for {}", path.display()), async {
        loop {
            if let Ok(s) = std::fs::read_to_string(path)
                && s.ends_with('\n')
            {
                return s.trim().to_string();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// Alive means signalable and not a zombie (a container's init may not reap orphans).
fn alive(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

async fn assert_dies(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        if Instant::now() > deadline {
            // Do not leave it behind even though the test fails.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            panic!("process {pid} survived its shard");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn read_env_dump(path: &Path) -> BTreeMap<String, String> {
    let raw = std::fs::read(path).expect("env dump");
    raw.split(|&b| b == 0)
        .filter(|e| !e.is_empty())
        .map(|e| {
            let e = String::from_utf8(e.to_vec()).expect("utf-8 env");
            let (k, v) = e.split_once('=').expect("NAME=value");
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[tokio::test]
async fn env_is_exactly_the_launch_environment() {
    let root = tempfile::tempdir().unwrap();
    let mut s = spec(root.path(), &["env", "-0"]);
    s.env = BTreeMap::from([
        ("FOO".to_string(), "bar baz".to_string()),
        ("MULTI".to_string(), "line1\nline2".to_string()),
        ("RANK".to_string(), "999".to_string()),
        ("PET_NNODES".to_string(), "99".to_string()),
        ("CUDA_VISIBLE_DEVICES".to_string(), "0,1,2,3,4,5,6,7".to_string()),
        ("TESSERA_RESUME_FROM".to_string(), "stale".to_string()),
    ]);
    let shard = Shard::spawn(s).unwrap();
    let exit = within("env", shard.wait()).await;
    assert_eq!(exit, ExitInfo { code: Some(0), signal: None });
    let env = read_env_dump(&shard.stdout_path());
    let wd = shard.workdir().to_path_buf();
    assert_eq!(wd, root.path().join("job-42").join("shard-1").join("attempt-9001"));

    let expected_launch = [
        ("MASTER_ADDR", "10.0.0.5".to_string()),
        ("MASTER_PORT", "29500".to_string()),
        ("WORLD_SIZE", "16".to_string()),
        ("RANK", "5".to_string()),
        ("NODE_RANK", "1".to_string()),
        ("NNODES", "2".to_string()),
        ("LOCAL_RANK", "3".to_string()),
        ("LOCAL_WORLD_SIZE", "1".to_string()),
        ("GROUP_RANK", "1".to_string()),
        ("CUDA_VISIBLE_DEVICES", "3,1,7".to_string()),
        // What a bare `torchrun train.py` reads: this node of the gang, 3 workers on it, and a
        // static rendezvous at the gang's master; no restarts by torchrun itself.
        ("PET_NNODES", "2".to_string()),
        ("PET_NODE_RANK", "1".to_string()),
        ("PET_NPROC_PER_NODE", "3".to_string()),
        ("PET_MASTER_ADDR", "10.0.0.5".to_string()),
        ("PET_MASTER_PORT", "29500".to_string()),
        ("PET_RDZV_BACKEND", "static".to_string()),
        ("PET_RDZV_ENDPOINT", "10.0.0.5:29500".to_string()),
        ("PET_RDZV_ID", "tessera-job-42".to_string()),
        ("PET_MAX_RESTARTS", "0".to_string()),
        ("TESSERA_JOB_ID", "42".to_string()),
        ("TESSERA_SHARD_INDEX", "1".to_string()),
        ("TESSERA_NUM_SHARDS", "4".to_string()),
        ("TESSERA_ATTEMPT", "2".to_string()),
        ("TESSERA_CHECKPOINT_DIR", wd.join("checkpoints").to_str().unwrap().to_string()),
        ("TESSERA_PROGRESS_FILE", wd.join("progress.jsonl").to_str().unwrap().to_string()),
    ];
    for (k, v) in &expected_launch {
        assert_eq!(env.get(*k), Some(v), "{k}");
    }
    assert_eq!(env.get("FOO").map(String::as_str), Some("bar baz"));
    assert_eq!(env.get("MULTI").map(String::as_str), Some("line1\nline2"));
    assert!(!env.contains_key("TESSERA_RESUME_FROM"), "a stale TESSERA_RESUME_FROM from the job env leaked");
    assert!(wd.join("checkpoints").is_dir());
    assert_eq!(std::fs::metadata(wd.join("progress.jsonl")).unwrap().len(), 0);

    // Nothing else: the inherited allow-list (as the agent has it), the job's env, the launch vars.
    let mut keys: BTreeSet<String> = expected_launch.iter().map(|(k, _)| k.to_string()).collect();
    keys.extend(["FOO", "MULTI"].map(String::from));
    keys.insert("PATH".into());
    for k in INHERITED_ENV {
        if std::env::var(k).is_ok() {
            keys.insert(k.to_string());
        }
    }
    assert_eq!(env.keys().cloned().collect::<BTreeSet<_>>(), keys);
    for k in INHERITED_ENV {
        if let Ok(v) = std::env::var(k) {
            assert_eq!(env.get(*k), Some(&v), "{k}");
        }
    }
}

#[tokio::test]
async fn env_without_gpus_with_resume_and_checkpoint_dir() {
    let root = tempfile::tempdir().unwrap();
    let mut s = spec(root.path(), &["env", "-0"]);
    s.gpus = vec![];
    s.resume_from = Some("s3://bucket/job-42/step-100".into());
    s.checkpoint_dir = Some("s3://bucket/job-42".into());
    let shard = Shard::spawn(s).unwrap();
    assert!(within("env", shard.wait()).await.success());
    let env = read_env_dump(&shard.stdout_path());
    assert_eq!(env.get("CUDA_VISIBLE_DEVICES").map(String::as_str), Some(""));
    assert_eq!(env.get("TESSERA_RESUME_FROM").map(String::as_str), Some("s3://bucket/job-42/step-100"));
    assert_eq!(env.get("TESSERA_CHECKPOINT_DIR").map(String::as_str), Some("s3://bucket/job-42"));
    assert!(!shard.workdir().join("checkpoints").exists());
}

/// Per-GPU mode: a 3-GPU shard (node rank 1, its first rank 3, in a world of 12) runs as three
/// processes of one group, each with its own rank; no torchrun variables.
#[tokio::test]
async fn per_gpu_mode_starts_one_process_per_gpu_with_its_own_rank() {
    let root = tempfile::tempdir().unwrap();
    let mut s = sh(
        root.path(),
        "env -0 > env-$LOCAL_RANK.dump; cut -d' ' -f5 /proc/$$/stat > pgid-$LOCAL_RANK; \
         echo out-$LOCAL_RANK; echo err-$LOCAL_RANK >&2",
    );
    s.launch = LaunchMode::PerGpu;
    s.world_size = 12;
    s.rank = 3;
    s.local_rank = 0;
    s.env = BTreeMap::from([("PET_NNODES".to_string(), "7".to_string())]);
    assert_eq!(s.processes(), 3);
    let shard = Shard::spawn(s).unwrap();
    assert_eq!(within("per-gpu", shard.wait()).await, ExitInfo { code: Some(0), signal: None });
    let wd = shard.workdir().to_path_buf();
    for local in 0..3u32 {
        let env = read_env_dump(&wd.join(format!("env-{local}.dump")));
        let get = |k: &str| env.get(k).cloned().unwrap_or_else(|| panic!("process {local}: no {k}"));
        assert_eq!(get("RANK"), (3 + local).to_string());
        assert_eq!(get("LOCAL_RANK"), local.to_string());
        assert_eq!(get("LOCAL_WORLD_SIZE"), "3");
        assert_eq!(get("WORLD_SIZE"), "12");
        assert_eq!(get("NODE_RANK"), "1");
        assert_eq!(get("GROUP_RANK"), "1");
        assert_eq!(get("NNODES"), "2");
        assert_eq!(get("MASTER_ADDR"), "10.0.0.5");
        assert_eq!(get("CUDA_VISIBLE_DEVICES"), "3,1,7", "every process sees all the shard's GPUs");
        assert_eq!(get("TESSERA_PROGRESS_FILE"), wd.join("progress.jsonl").to_str().unwrap());
        let pet: Vec<_> = env.keys().filter(|k| k.starts_with("PET_")).collect();
        assert!(pet.is_empty(), "torchrun variables in per-GPU mode: {pet:?}");
        let pgid = std::fs::read_to_string(wd.join(format!("pgid-{local}"))).unwrap();
        assert_eq!(pgid.trim(), shard.pid().to_string(), "process {local} is not in the attempt's group");
    }
    let out = std::fs::read_to_string(shard.stdout_path()).unwrap();
    let err = std::fs::read_to_string(shard.stderr_path()).unwrap();
    for local in 0..3 {
        assert!(out.lines().any(|l| l == format!("out-{local}")), "{out}");
        assert!(err.lines().any(|l| l == format!("err-{local}")), "{err}");
    }
}

#[tokio::test]
async fn per_gpu_mode_one_failure_kills_the_others_and_is_the_exit() {
    let root = tempfile::tempdir().unwrap();
    let mut s = sh(
        root.path(),
        "if [ \"$LOCAL_RANK\" = 1 ]; then \
           while [ ! -s pid-0 ] || [ ! -s pid-2 ]; do sleep 0.05; done; exit 5; \
         fi; trap '' USR1 TERM; echo $$ > pid-$LOCAL_RANK; while true; do sleep 0.1; done",
    );
    s.launch = LaunchMode::PerGpu;
    s.local_rank = 0;
    let shard = Shard::spawn(s).unwrap();
    let p0: i32 = read_when_written(&shard.workdir().join("pid-0")).await.parse().unwrap();
    let p2: i32 = read_when_written(&shard.workdir().join("pid-2")).await.parse().unwrap();
    assert_eq!(within("one fails", shard.wait()).await, ExitInfo { code: Some(5), signal: None });
    assert_dies(p0).await;
    assert_dies(p2).await;
}

#[tokio::test]
async fn per_gpu_mode_the_stop_ladder_reaches_every_process() {
    let root = tempfile::tempdir().unwrap();
    let mut s = sh(
        root.path(),
        "trap 'touch usr1-$LOCAL_RANK' USR1; trap 'exit 0' TERM; echo up > up-$LOCAL_RANK; \
         while true; do sleep 0.1; done",
    );
    s.launch = LaunchMode::PerGpu;
    s.local_rank = 0;
    let shard = Shard::spawn(s).unwrap();
    for local in 0..3 {
        read_when_written(&shard.workdir().join(format!("up-{local}"))).await;
    }
    assert_eq!(within("stop", shard.stop()).await, ExitInfo { code: Some(0), signal: None });
    for local in 0..3 {
        assert!(shard.workdir().join(format!("usr1-{local}")).exists(), "process {local} got no checkpoint signal");
    }
}

/// A process that left the attempt's group (as torchrun's workers do) still gets the ladder's
/// signals and does not outlive the attempt.
#[tokio::test]
async fn a_process_that_left_the_group_goes_with_the_attempt() {
    let root = tempfile::tempdir().unwrap();
    // It ignores USR1 and TERM (inherited): only the final SIGKILL ends it.
    let shard =
        Shard::spawn(sh(root.path(), "trap '' USR1 TERM; setsid sleep 1000 & echo $! > escaped.pid; wait")).unwrap();
    let pid: i32 = read_when_written(&shard.workdir().join("escaped.pid")).await.parse().unwrap();
    within("setsid", async {
        while nix::unistd::getpgid(Some(Pid::from_raw(pid))).is_ok_and(|g| g.as_raw() == shard.pid() as i32) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(alive(pid));
    assert_eq!(within("stop", shard.stop()).await.signal, Some(9));
    assert_dies(pid).await;

    // Its checkpoint signal reaches it too, and it goes when the leader exits by itself.
    let mut s = sh(
        root.path(),
        "trap true USR1; setsid sh -c 'trap \"touch usr1\" USR1; echo $$ > escaped.pid; while true; do sleep 0.1; done' & \
         while [ ! -f usr1 ]; do sleep 0.05; done; exit 3",
    );
    s.attempt_id += 1;
    let shard = Shard::spawn(s).unwrap();
    let pid: i32 = read_when_written(&shard.workdir().join("escaped.pid")).await.parse().unwrap();
    // Asked again until the escaped process has it. Once it has, the group's leader exits and
    // checkpoint_now() says false, so its answer does not end the loop.
    within("checkpoint signal", async {
        while !shard.workdir().join("usr1").exists() {
            shard.checkpoint_now();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(within("exit 3", shard.wait()).await.code, Some(3));
    assert_dies(pid).await;
}

#[test]
fn torchrun_is_recognised() {
    let cmd = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(is_torchrun(&cmd(&["torchrun", "train.py"])));
    assert!(is_torchrun(&cmd(&["/venv/bin/torchrun", "--nproc-per-node=8", "train.py"])));
    assert!(is_torchrun(&cmd(&["python3", "-m", "torch.distributed.run", "train.py"])));
    assert!(!is_torchrun(&cmd(&["python3", "train.py", "-m", "torchrun"])));
    assert!(!is_torchrun(&cmd(&["python3", "torchrun.py"])));
    assert!(!is_torchrun(&cmd(&["sh", "-c", "torchrun train.py"])));
}

/// torchrun dies of a SIGUSR1 it does not handle, orphaning its workers: the agent starts it
/// with the checkpoint signal ignored (the workers install their own handlers). Other commands
/// keep the default.
#[tokio::test]
async fn torchrun_starts_with_the_checkpoint_signal_ignored() {
    let root = tempfile::tempdir().unwrap();
    let bin = root.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let fake = bin.join("torchrun");
    std::fs::write(&fake, "#!/bin/sh\ngrep SigIgn /proc/$$/status > sigign\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let ignored = |dir: &Path| {
        let line = std::fs::read_to_string(dir.join("sigign")).expect("sigign");
        let mask = u64::from_str_radix(line.split_whitespace().nth(1).expect("mask"), 16).expect("hex");
        mask & (1 << (Signal::SIGUSR1 as u64 - 1)) != 0
    };
    let path = format!("{}:{DEFAULT_PATH}", bin.display());
    let mut s = spec(root.path(), &["torchrun", "train.py"]);
    s.env = BTreeMap::from([("PATH".to_string(), path.clone())]);
    let shard = Shard::spawn(s).unwrap();
    assert!(within("fake torchrun", shard.wait()).await.success());
    assert!(ignored(shard.workdir()), "torchrun would die of SIGUSR1");

    let mut s = sh(root.path(), "grep SigIgn /proc/$$/status > sigign");
    s.attempt_id += 1;
    let shard = Shard::spawn(s).unwrap();
    assert!(within("sh", shard.wait()).await.success());
    assert!(!ignored(shard.workdir()), "a plain command must keep SIGUSR1's default");
}

#[tokio::test]
async fn exit_code_signal_and_working_directory() {
    let root = tempfile::tempdir().unwrap();
    let shard = Shard::spawn(sh(root.path(), "pwd > cwd.txt; echo to-err >&2; exit 7")).unwrap();
    assert_eq!(within("exit 7", shard.wait()).await, ExitInfo { code: Some(7), signal: None });
    let cwd = std::fs::read_to_string(shard.workdir().join("cwd.txt")).unwrap();
    assert_eq!(Path::new(cwd.trim()), shard.workdir());
    assert_eq!(std::fs::read_to_string(shard.stderr_path()).unwrap(), "to-err\n");
    // Stopping a finished shard changes nothing.
    assert_eq!(within("stop after exit", shard.stop()).await.code, Some(7));

    let shard = Shard::spawn(sh(root.path(), "kill -9 $$")).unwrap();
    let exit = within("kill -9", shard.wait()).await;
    assert_eq!(exit, ExitInfo { code: None, signal: Some(9) });
    assert_eq!(exit.to_string(), "killed by SIGKILL");
}

#[tokio::test]
async fn bad_specs_are_errors() {
    let root = tempfile::tempdir().unwrap();
    let err = Shard::spawn(spec(root.path(), &["tessera-no-such-program-xyz", "--flag"])).unwrap_err();
    assert!(matches!(&err, ShardError::Spawn { program, .. } if program == "tessera-no-such-program-xyz"));
    assert!(err.to_string().contains("tessera-no-such-program-xyz"), "{err}");

    assert!(matches!(Shard::spawn(spec(root.path(), &[])), Err(ShardError::InvalidSpec(_))));
    let mut s = spec(root.path(), &["true"]);
    s.checkpoint_signal = "SIGNOPE".into();
    assert!(matches!(Shard::spawn(s), Err(ShardError::InvalidSpec(m)) if m.contains("checkpoint_signal")));
    let mut s = spec(root.path(), &["true"]);
    s.env.insert("A=B".into(), "x".into());
    assert!(matches!(Shard::spawn(s), Err(ShardError::InvalidSpec(m)) if m.contains("env")));

    assert_eq!(parse_checkpoint_signal("none").unwrap(), None);
    assert_eq!(parse_checkpoint_signal("usr2").unwrap(), Some(Signal::SIGUSR2));
    assert_eq!(parse_checkpoint_signal("SIGUSR1").unwrap(), Some(Signal::SIGUSR1));
    assert!(parse_checkpoint_signal("SIGKILL").is_err());
}

#[tokio::test]
async fn logs_rotate_keeping_the_latest_output_and_the_pipe_keeps_draining() {
    let root = tempfile::tempdir().unwrap();
    let mut s =
        sh(root.path(), "head -c 300000 /dev/zero | tr '\\0' a; head -c 300 /dev/zero | tr '\\0' b >&2; echo done");
    s.log_cap_bytes = 1000;
    let shard = Shard::spawn(s).unwrap();
    // 300 kB is far more than a pipe holds: a copier that stopped reading would hang the child.
    assert!(within("chatty child", shard.wait()).await.success());
    // At most the cap on disk, ending with the last words.
    let out = shard.stream(1);
    let (first, end) = out.kept();
    assert_eq!(end, 300_005);
    assert!(end - first <= 1000 && end - first >= 500, "{first}..{end}");
    let (at, data) = out.read(0, 2000);
    assert_eq!(at, first);
    assert_eq!(data.len() as u64, end - first);
    assert!(data.ends_with(b"aaaadone\n"));
    assert_eq!(shard.stream(2).read(0, 1000), (0, b"b".repeat(300)));
}

#[tokio::test]
async fn checkpoint_signal_lets_a_trapping_process_exit_cleanly() {
    let root = tempfile::tempdir().unwrap();
    let mut s = sh(root.path(), "trap 'echo got-usr1; exit 0' USR1; echo ready > ready; while :; do sleep 0.05; done");
    s.checkpoint_grace = Duration::from_secs(10);
    s.term_grace = Duration::from_secs(10);
    let shard = Shard::spawn(s).unwrap();
    read_when_written(&shard.workdir().join("ready")).await;
    let started = Instant::now();
    let exit = within("stop", shard.stop()).await;
    assert_eq!(exit, ExitInfo { code: Some(0), signal: None });
    assert!(started.elapsed() < Duration::from_secs(5), "waited for a grace: {:?}", started.elapsed());
    assert!(std::fs::read_to_string(shard.stdout_path()).unwrap().contains("got-usr1"));
}

#[tokio::test]
async fn checkpoint_now_signals_without_stopping() {
    let root = tempfile::tempdir().unwrap();
    let shard = Shard::spawn(sh(
        root.path(),
        "trap 'echo usr1 >> got' USR1; trap 'exit 5' TERM; echo ready > ready; while :; do sleep 0.05; done",
    ))
    .unwrap();
    read_when_written(&shard.workdir().join("ready")).await;
    assert!(shard.checkpoint_now());
    assert_eq!(read_when_written(&shard.workdir().join("got")).await, "usr1");
    assert_eq!(shard.try_exit(), None);
    assert_eq!(within("stop", shard.stop()).await.code, Some(5));
    assert!(!shard.checkpoint_now());

    let mut s = sh(root.path(), "sleep 1000");
    s.checkpoint_signal = "none".into();
    s.checkpoint_grace = Duration::from_secs(10);
    s.attempt_id += 1;
    let shard = Shard::spawn(s).unwrap();
    assert!(!shard.checkpoint_now());
    // No checkpoint rung: SIGTERM at once.
    let started = Instant::now();
    assert_eq!(within("stop", shard.stop()).await.signal, Some(15));
    assert!(started.elapsed() < Duration::from_secs(5), "waited for a checkpoint grace: {:?}", started.elapsed());
}

#[tokio::test]
async fn stubborn_process_is_killed_after_both_graces() {
    let root = tempfile::tempdir().unwrap();
    let shard =
        Shard::spawn(sh(root.path(), "trap '' USR1 TERM; echo ready > ready; while :; do sleep 0.05; done")).unwrap();
    read_when_written(&shard.workdir().join("ready")).await;
    let started = Instant::now();
    // Concurrent and repeated stops run one ladder and agree.
    let (a, b) = within("stop", async { tokio::join!(shard.stop(), shard.stop()) }).await;
    let elapsed = started.elapsed();
    assert_eq!(a, ExitInfo { code: None, signal: Some(9) });
    assert_eq!(a, b);
    assert!(elapsed >= Duration::from_millis(600), "SIGKILL before both graces: {elapsed:?}");
    assert_eq!(within("stop again", shard.stop()).await, a);
}

#[tokio::test]
async fn grandchild_does_not_survive_stop() {
    let root = tempfile::tempdir().unwrap();
    let shard =
        Shard::spawn(sh(root.path(), "trap '' USR1 TERM; sleep 1000 & echo $! > grandchild.pid; wait")).unwrap();
    let pid: i32 = read_when_written(&shard.workdir().join("grandchild.pid")).await.parse().unwrap();
    assert!(alive(pid));
    assert_eq!(within("stop", shard.stop()).await.signal, Some(9));
    assert_dies(pid).await;
}

#[tokio::test]
async fn grandchild_does_not_survive_its_leader() {
    let root = tempfile::tempdir().unwrap();
    // The leader exits cleanly at SIGTERM; the grandchild ignores SIGTERM.
    let shard = Shard::spawn(sh(
        root.path(),
        "trap '' USR1; trap 'exit 0' TERM; (trap '' TERM; exec sleep 1000) & echo $! > grandchild.pid; wait",
    ))
    .unwrap();
    let pid: i32 = read_when_written(&shard.workdir().join("grandchild.pid")).await.parse().unwrap();
    assert_eq!(within("stop", shard.stop()).await, ExitInfo { code: Some(0), signal: None });
    assert_dies(pid).await;

    // The leader exits by itself, leaving a background process.
    let mut s = sh(root.path(), "sleep 1000 & echo $! > grandchild.pid; exit 3");
    s.attempt_id += 1;
    let shard = Shard::spawn(s).unwrap();
    assert_eq!(within("exit 3", shard.wait()).await.code, Some(3));
    let pid: i32 = read_when_written(&shard.workdir().join("grandchild.pid")).await.parse().unwrap();
    assert_dies(pid).await;
}

#[tokio::test]
async fn dropping_a_running_shard_kills_its_group() {
    let root = tempfile::tempdir().unwrap();
    let shard = Shard::spawn(sh(root.path(), "sleep 1000 & echo $! > grandchild.pid; wait")).unwrap();
    let pid: i32 = read_when_written(&shard.workdir().join("grandchild.pid")).await.parse().unwrap();
    let leader = shard.pid() as i32;
    drop(shard);
    assert_dies(pid).await;
    assert_dies(leader).await;
}

async fn drain(mut rx: mpsc::UnboundedReceiver<CheckpointReport>) -> Vec<(u64, String)> {
    let mut all = Vec::new();
    while let Some(r) = within("checkpoint channel to close", rx.recv()).await {
        all.push((r.step, r.uri));
    }
    all
}

#[tokio::test]
async fn progress_is_tailed_from_a_real_process() {
    let root = tempfile::tempdir().unwrap();
    let script = r#"
f="$TESSERA_PROGRESS_FILE"
printf '{"step": 1, "total_steps": 10, "metrics": {"loss": 3.5}}\n' >> "$f"
printf 'garbage\n{"step": -2}\n{"step": 2, "metrics": {"loss": "x"}}\n' >> "$f"
printf '{"step": 2, "checkpoint": "file:///ck/2"}\n' >> "$f"
sleep 0.5
printf '{"step": 3, "chec' >> "$f"
sleep 0.5
printf 'kpoint": "file:///ck/2"}\n' >> "$f"
head -c 70000 /dev/zero | tr '\0' x >> "$f"
printf '\n{"step": 4, "checkpoint": "file:///ck/4", "metrics": {"loss": 1.25}}\n' >> "$f"
printf '{"step": 5}' >> "$f"
"#;
    let shard = Shard::spawn(sh(root.path(), script)).unwrap();
    let checkpoints = shard.take_checkpoints().unwrap();
    assert!(shard.take_checkpoints().is_none());
    // Seen while running: the first lines, before the partial line is completed.
    let mut watch = shard.progress_watch();
    let seen = within("progress while running", watch.wait_for(|p| p.step == 2)).await.unwrap().clone();
    assert_eq!(seen.malformed_lines, 3);
    assert!(seen.updated_at.is_some());
    assert!(within("exit", shard.wait()).await.success());
    assert_eq!(drain(checkpoints).await, vec![(2, "file:///ck/2".to_string()), (4, "file:///ck/4".to_string())]);
    let p = shard.progress();
    // The unterminated last line counts once the process is gone.
    assert_eq!(p.step, 5);
    assert_eq!(p.total_steps, Some(10));
    assert_eq!(p.metrics, BTreeMap::from([("loss".to_string(), 1.25)]));
    assert_eq!(p.malformed_lines, 4);
    assert_eq!(p.valid_lines, 5);
    assert_eq!(p.last_checkpoint, Some(CheckpointReport { step: 4, uri: "file:///ck/4".into() }));
}

#[tokio::test]
async fn progress_survives_truncation() {
    let root = tempfile::tempdir().unwrap();
    let script = r#"
f="$TESSERA_PROGRESS_FILE"
printf '{"step": 50, "total_steps": 100, "checkpoint": "file:///ck/50"}\n' >> "$f"
sleep 0.6
: > "$f"
sleep 0.6
printf '{"step": 1}\n' >> "$f"
sleep 0.6
"#;
    let shard = Shard::spawn(sh(root.path(), script)).unwrap();
    let checkpoints = shard.take_checkpoints().unwrap();
    let mut watch = shard.progress_watch();
    within("step 50", watch.wait_for(|p| p.step == 50)).await.unwrap();
    within("step 1 after truncation", watch.wait_for(|p| p.step == 1)).await.unwrap();
    assert!(within("exit", shard.wait()).await.success());
    let p = shard.progress();
    assert_eq!((p.step, p.total_steps, p.malformed_lines, p.valid_lines), (1, Some(100), 0, 2));
    assert_eq!(drain(checkpoints).await, vec![(50, "file:///ck/50".to_string())]);
}

fn trainer_py() -> Option<PathBuf> {
    let ok = std::process::Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("NOTE: python3 not found; skipping the examples/trainer.py test");
        return None;
    }
    Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/trainer.py"))
}

fn uri_path(uri: &str) -> PathBuf {
    PathBuf::from(uri.strip_prefix("file://").unwrap_or_else(|| panic!("not a file URI: {uri}")))
}

fn checkpoint_step(uri: &str) -> u64 {
    let text = std::fs::read_to_string(uri_path(uri)).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["step"].as_u64().unwrap()
}

#[tokio::test]
async fn example_trainer_runs_checkpoints_and_resumes() {
    let Some(trainer) = trainer_py() else { return };
    let trainer = trainer.to_str().unwrap();
    let root = tempfile::tempdir().unwrap();
    let ckdir = root.path().join("job-checkpoints");
    let args = ["python3", trainer, "--steps", "5", "--step-seconds", "0.01", "--checkpoint-every", "2"];
    let mut s = spec(root.path(), &args);
    s.checkpoint_dir = Some(ckdir.to_str().unwrap().to_string());
    let shard = Shard::spawn(s.clone()).unwrap();
    let checkpoints = shard.take_checkpoints().unwrap();
    let exit = within("trainer", shard.wait()).await;
    let stderr = std::fs::read_to_string(shard.stderr_path()).unwrap();
    assert!(exit.success(), "{exit}: {stderr}");
    let reports = drain(checkpoints).await;
    assert_eq!(reports.iter().map(|r| r.0).collect::<Vec<_>>(), vec![2, 4, 5]);
    for (step, uri) in &reports {
        assert!(uri_path(uri).starts_with(&ckdir), "{uri}");
        assert_eq!(checkpoint_step(uri), *step);
    }
    let files: Vec<String> =
        std::fs::read_dir(&ckdir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(files.len(), 3, "stray files (temp files left?): {files:?}");
    let p = shard.progress();
    assert_eq!((p.step, p.total_steps, p.malformed_lines), (5, Some(5), 0));
    assert!(p.metrics.contains_key("loss"));
    let stdout = std::fs::read_to_string(shard.stdout_path()).unwrap();
    assert_eq!(stdout.lines().filter(|l| l.starts_with("step ")).count(), 5, "{stdout}");
    assert!(stdout.contains("cuda_visible_devices='3,1,7'"), "{stdout}");

    // The next attempt resumes from the last checkpoint.
    s.attempt_id += 1;
    s.attempt += 1;
    s.resume_from = Some(reports[2].1.clone());
    s.command = ["python3", trainer, "--steps", "7", "--step-seconds", "0.01"].map(String::from).to_vec();
    let shard = Shard::spawn(s).unwrap();
    assert!(within("resumed trainer", shard.wait()).await.success());
    let stdout = std::fs::read_to_string(shard.stdout_path()).unwrap();
    assert!(stdout.contains("resuming from step 5"), "{stdout}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("step ")).count(), 2, "{stdout}");
    assert_eq!(shard.progress().step, 7);
}

#[tokio::test]
async fn example_trainer_checkpoints_on_signals() {
    let Some(trainer) = trainer_py() else { return };
    let root = tempfile::tempdir().unwrap();
    let args = ["python3", trainer.to_str().unwrap(), "--steps", "100000", "--step-seconds", "0.05"];
    let mut s = spec(root.path(), &args);
    s.checkpoint_grace = Duration::from_millis(400);
    s.term_grace = Duration::from_secs(10);
    let shard = Shard::spawn(s).unwrap();
    let mut checkpoints = shard.take_checkpoints().unwrap();
    let mut watch = shard.progress_watch();
    within("first steps", watch.wait_for(|p| p.step >= 2)).await.unwrap();

    // A spot notice: checkpoint now, keep training.
    assert!(shard.checkpoint_now());
    let first = within("checkpoint after SIGUSR1", checkpoints.recv()).await.unwrap();
    assert_eq!(checkpoint_step(&first.uri), first.step);
    within("training goes on", watch.wait_for(|p| p.step >= first.step + 2)).await.unwrap();
    assert_eq!(shard.try_exit(), None);

    // The ladder: SIGUSR1 (checkpoint, keeps running), then SIGTERM: checkpoint and exit 143.
    let exit = within("stop", shard.stop()).await;
    assert_eq!(exit, ExitInfo { code: Some(143), signal: None });
    let rest = drain(checkpoints).await;
    let (last_step, last_uri) = rest.last().expect("a checkpoint at SIGTERM").clone();
    assert_eq!(checkpoint_step(&last_uri), last_step);
    assert_eq!(shard.progress().step, last_step);
    let stdout = std::fs::read_to_string(shard.stdout_path()).unwrap();
    assert!(stdout.contains("checkpoint requested"), "{stdout}");
    assert!(stdout.contains("SIGTERM at step"), "{stdout}");
}

#[tokio::test]
async fn a_restarted_agent_kills_what_a_crashed_one_left_running() {
    let root = tempfile::tempdir().unwrap();
    let shard = Shard::spawn(spec(root.path(), &["sleep", "60"])).unwrap();
    let pid = Pid::from_raw(shard.pid() as i32);
    let pid_file = shard.workdir().join("pid");
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), shard.pid().to_string());
    // The agent dies without stopping it (no Drop runs on a crash).
    std::mem::forget(shard);
    // A pid file pointing at a process that runs elsewhere (this test) is not acted on.
    let foreign = root.path().join("job-7/shard-0/attempt-1");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("pid"), std::process::id().to_string()).unwrap();
    assert_eq!(kill_leftovers(root.path()), 1);
    within("the leftover dies", async {
        // Its parent is this process: reap it so it does not linger as a zombie.
        while nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG))
            .is_ok_and(|s| s == nix::sys::wait::WaitStatus::StillAlive)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(kill(pid, None).is_err(), "the leftover shard still runs");
    assert!(!pid_file.exists() && !foreign.join("pid").exists(), "pid files are cleaned up");
    assert_eq!(kill_leftovers(root.path()), 0);
}

#[test]
fn fabric_defaults_give_way_to_the_host_s_settings_and_then_the_job_s() {
    let root = tempfile::tempdir().unwrap();
    let mut s = spec(root.path(), &["true"]);
    s.network = super::network::network_defaults(tessera_proto::v1::Cloud::Aws, "p5.48xlarge")
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    s.env = BTreeMap::from([("NCCL_SOCKET_IFNAME".to_string(), "ens5".to_string())]);
    let host = [
        ("FI_EFA_FORK_SAFE".to_string(), "0".to_string()),
        ("NCCL_DEBUG".to_string(), "INFO".to_string()),
        ("SECRET".to_string(), "not for shards".to_string()),
    ];
    let env = launch_env(&s, root.path(), host);
    assert_eq!(env["FI_PROVIDER"], "efa", "a cloud default");
    assert_eq!(env["FI_EFA_FORK_SAFE"], "0", "the host's own over the default");
    assert_eq!(env["NCCL_DEBUG"], "INFO", "the host's NCCL_* pass through");
    assert_eq!(env["NCCL_SOCKET_IFNAME"], "ens5", "the job's env over both");
    assert!(!env.contains_key("SECRET"), "nothing else of the host's");
}
