#!/usr/bin/env python3
"""Workload, nemesis and checker of deploy/nemesis/run.sh (docs/nemesis.md).

Runs against a compose cluster that run.sh has started, from the host, over mutual TLS as the
admin. Three parts run at once, then one after the other:

- the workload: submitters of short trainer jobs (some 2-shard gangs, checkpoints in
  s3://tessera-checkpoints/nemesis), each job named by its idempotency key and retried under the
  same key until acknowledged; some cancels; reads (GetJob, ListJobs); the logs of ended jobs.
  Every acknowledged submission goes to acked.jsonl (key -> id).
- the nemesis: faults in a seeded random order, each held, healed, and timed (faults.jsonl).
- monitors: the GPU invariants of the committed state (ListJobs with shards, `tessera node
  list`), and the trainer processes really running in the agent containers (from the host's
  /proc), every second.

Then it heals everything, waits for every job to end, checks, prints a report and exits 1 on
any violation.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict

import grpc  # noqa: F401  (the client's dependency; imported for a clear error if missing)
from tessera_client import FINAL_STATES, Client, TesseraError, pb

SERVERS = ["server-1", "server-2", "server-3"]
AGENTS = ["aws-1", "aws-2", "azure-1"]
KINDS = [
    "kill-server",
    "kill-leader",
    "partition-leader",
    "partition-agent",
    "pause-leader",
    "pause-agent",
    "wipe-agent",
]
TRAINER = "/opt/tessera/examples/trainer.py"
CHECKPOINTS = "s3://tessera-checkpoints/nemesis"
HELD_SHARD_STATES = {pb.SHARD_STATE_ASSIGNED, pb.SHARD_STATE_RUNNING, pb.SHARD_STATE_STOPPING}

T0 = time.time()


def now():
    return time.time()


def rel(t):
    return t - T0


def fmt(seconds):
    return "-" if seconds is None else f"{seconds:.2f} s"


def log(msg):
    print(f"[{rel(now()):7.1f}s] {msg}", flush=True)


class Run:
    def __init__(self, args):
        self.args = args
        self.out = args.out
        self.compose = args.compose.split() + ["-p", args.project, "-f", args.compose_file]
        self.certs = args.certs
        self.servers = args.servers.split(",")
        self.seed = args.seed
        self.rng = random.Random(f"nemesis-{args.seed}")
        self.lock = threading.Lock()
        self.stop_faults = threading.Event()
        self.stop_workload = threading.Event()
        self.stop_monitors = threading.Event()
        self.violations = []
        self.notes = []
        self.acked = {}  # key -> job id
        self.unacked = []  # keys never acknowledged
        self.counts = defaultdict(int)
        self.faults = []
        self.paused = {}  # service -> time it was paused (None when thawed at .thawed[service])
        self.thawed = {}  # service -> time it was thawed or restarted
        self.acked_file = open(os.path.join(self.out, "acked.jsonl"), "w", encoding="utf-8")
        self.faults_file = open(os.path.join(self.out, "faults.jsonl"), "w", encoding="utf-8")
        self.obs_file = open(os.path.join(self.out, "observations.log"), "w", encoding="utf-8")

    # ----- helpers ----------------------------------------------------------------------------

    def client(self, servers=None, timeout=5.0):
        return Client(
            servers or self.servers,
            ca=os.path.join(self.certs, "ca.pem"),
            cert=os.path.join(self.certs, "user-admin.pem"),
            key=os.path.join(self.certs, "user-admin-key.pem"),
            timeout=timeout,
        )

    def violation(self, what):
        with self.lock:
            if what not in self.violations:
                self.violations.append(what)
                log(f"VIOLATION: {what}")

    def note(self, what):
        with self.lock:
            self.notes.append(what)
        log(f"note: {what}")

    def observe(self, line):
        with self.lock:
            self.obs_file.write(f"{rel(now()):.2f} {line}\n")
            self.obs_file.flush()

    def sh(self, argv, timeout=60, check=True):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {p.stdout}{p.stderr}".strip())
        return p.stdout.strip()

    def dc(self, *args, timeout=120):
        return self.sh(self.compose + list(args), timeout=timeout)

    def container(self, service):
        """The service's container id ("" if none), from one `docker ps` (compose's own `ps` is slow)."""
        out = self.sh(
            [
                "docker", "ps", "-a", "--filter", f"label=com.docker.compose.project={self.args.project}",
                "--filter", f"label=com.docker.compose.service={service}", "--format", "{{.ID}}",
            ]
        )
        return out.splitlines()[0] if out else ""

    def inspect(self, cid, fmt):
        return self.sh(["docker", "inspect", "-f", fmt, cid])

    def ip(self, service):
        return self.inspect(self.container(service), "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")

    def pid(self, service):
        return self.inspect(self.container(service), "{{.State.Pid}}")

    def cli(self, *args, timeout=20):
        env = dict(os.environ)
        env.update(
            TESSERA_SERVER=",".join(self.servers),
            TESSERA_CA=os.path.join(self.certs, "ca.pem"),
            TESSERA_CERT=os.path.join(self.certs, "user-admin.pem"),
            TESSERA_KEY=os.path.join(self.certs, "user-admin-key.pem"),
        )
        env.pop("TESSERA_TOKEN", None)
        p = subprocess.run([self.args.cli, *args, "-o", "json"], capture_output=True, text=True, timeout=timeout, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"tessera {' '.join(args)}: {p.stderr.strip()}")
        return json.loads(p.stdout)

    def leader(self):
        """The leader's service name, if all reachable servers agree on one."""
        try:
            st = self.cli("cluster", "status", timeout=10)
        except Exception:  # noqa: BLE001
            return None
        lid = st.get("leader_id") or 0
        return f"server-{lid}" if lid else None

    def healthy(self):
        """A leader every server knows and three ready nodes with 8 GPUs: (ok, why)."""
        try:
            st = self.cli("cluster", "status", timeout=10)
            members = st.get("members") or []
            lid = st.get("leader_id") or 0
            if not lid or len(members) != 3 or any(m.get("leader_id") != lid for m in members):
                return False, f"leader {lid}, members {[(m.get('id'), m.get('leader_id')) for m in members]}"
            nodes = self.cli("node", "list", timeout=10).get("nodes") or []
            ready = sorted(n["name"] for n in nodes if n.get("state") == "ready" and n.get("gpus_total") == 8)
            if ready != sorted(AGENTS):
                return False, f"ready nodes {ready}"
            return True, ""
        except Exception as e:  # noqa: BLE001
            return False, str(e)[:200]

    def wait_healthy(self, timeout):
        t = now()
        why = ""
        while now() - t < timeout:
            ok, why = self.healthy()
            if ok:
                return now() - t
            time.sleep(0.5)
        raise TimeoutError(f"not healthy after {timeout} s: {why}")

    def list_jobs(self, c, include_finished=True, shards=False):
        jobs, token = [], ""
        while True:
            resp = c._unary(
                "ListJobs",
                pb.ListJobsRequest(include_finished=include_finished, include_shards=shards, page_size=500, page_token=token),
            )
            jobs.extend(resp.jobs)
            token = resp.next_page_token
            if not token:
                return jobs

    # ----- workload ---------------------------------------------------------------------------

    def submitter(self, i):
        rng = random.Random(f"workload-{self.seed}-{i}")
        c = self.client()
        mine = {}  # id -> key
        n = 0
        try:
            while not self.stop_workload.is_set() or mine:
                if not self.stop_workload.is_set() and len(mine) < self.args.in_flight:
                    n += 1
                    key = f"nemesis-{self.seed}-s{i}-{n:04d}"
                    shards = 2 if rng.random() < 0.35 else 1
                    gpus = rng.choice([1, 2])
                    steps = rng.randint(24, 48)
                    cancel_after = rng.uniform(1.0, 5.0) if rng.random() < 0.15 else None
                    jid = self.submit(c, key, shards, gpus, steps)
                    if jid is not None:
                        mine[jid] = key
                        if cancel_after is not None:
                            threading.Thread(target=self.cancel, args=(jid, cancel_after), daemon=True).start()
                for jid in list(mine):
                    try:
                        job = c.job(jid)
                        self.counts["reads"] += 1
                    except TesseraError as e:
                        self.counts["read errors"] += 1
                        if e.code == grpc.StatusCode.NOT_FOUND:
                            self.violation(f"acknowledged job {jid} ({mine[jid]}) not found by GetJob")
                            del mine[jid]
                        continue
                    if job.state in FINAL_STATES:
                        del mine[jid]
                        self.read_logs(jid)
                time.sleep(0.5)
        finally:
            c.close()

    def submit(self, c, key, shards, gpus, steps):
        command = ["python3", TRAINER, "--steps", str(steps), "--step-seconds", "0.25", "--checkpoint-every", "5"]
        t = now()
        while now() - t < 120:
            try:
                jid = c.submit(command, name=key, shards=shards, gpus=gpus, checkpoint_dir=CHECKPOINTS, idempotency_key=key)
                with self.lock:
                    self.acked[key] = jid
                    self.acked_file.write(json.dumps({"key": key, "id": jid, "t": round(rel(now()), 3)}) + "\n")
                    self.acked_file.flush()
                self.counts["submissions acked"] += 1
                return jid
            except Exception as e:  # noqa: BLE001
                self.counts["submission errors (retried, same key)"] += 1
                self.observe(f"submit {key}: {e}")
                time.sleep(0.5)
        self.unacked.append(key)
        return None

    def cancel(self, jid, after):
        time.sleep(after)
        c = self.client()
        try:
            for _ in range(5):
                try:
                    c.cancel(jid, reason="nemesis workload")
                    self.counts["cancels"] += 1
                    return
                except Exception as e:  # noqa: BLE001
                    self.counts["cancel errors"] += 1
                    self.observe(f"cancel {jid}: {e}")
                    time.sleep(1)
        finally:
            c.close()

    def read_logs(self, jid):
        def read():
            c = self.client()
            try:
                size = sum(len(chunk.data) for chunk in c.logs(jid))
                self.counts["logs read"] += 1
                self.observe(f"logs {jid}: {size} bytes")
            except Exception as e:  # noqa: BLE001
                self.counts["log reads failed"] += 1
                self.observe(f"logs {jid}: {e}")
            finally:
                c.close()

        threading.Thread(target=read, daemon=True).start()

    def reader(self):
        c = self.client()
        while not self.stop_workload.is_set():
            try:
                self.list_jobs(c)
                self.counts["lists"] += 1
            except Exception as e:  # noqa: BLE001
                self.counts["list errors"] += 1
                self.observe(f"list: {e}")
            time.sleep(2)
        c.close()

    # ----- monitors ---------------------------------------------------------------------------

    def gpu_monitor(self):
        """Committed state: no GPU under two attempts, no attempt on two nodes."""
        c = self.client()
        while not self.stop_monitors.is_set():
            try:
                self.check_gpus(c)
                self.counts["GPU checks"] += 1
            except Exception as e:  # noqa: BLE001
                self.observe(f"gpu check: {e}")
            time.sleep(1.5)
        c.close()

    def check_gpus(self, c):
        claims = defaultdict(list)
        for job in self.list_jobs(c, include_finished=False, shards=True):
            for s in job.shards:
                if s.state in HELD_SHARD_STATES and s.node_name:
                    for g in s.gpus:
                        claims[(s.node_name, g)].append((job.id, s.index, s.attempt_id))
        for (node, g), who in claims.items():
            if len({w[2] for w in who}) > 1:
                self.violation(f"GPU {g} of {node} claimed by shards of two attempts at once (ListJobs): {who}")
        nodes = self.cli("node", "list").get("nodes") or []
        where = defaultdict(set)
        attempts = defaultdict(set)
        for n in nodes:
            for g in n.get("gpus") or []:
                a = g.get("allocation")
                if a:
                    where[a["attempt_id"]].add(n["name"])
                    attempts[(a["job_id"], a["shard_index"])].add(a["attempt_id"])
        for att, on in where.items():
            if len(on) > 1:
                self.violation(f"attempt {att} holds GPUs on two nodes at once: {sorted(on)}")
        for (jid, idx), atts in attempts.items():
            if len(atts) > 1:
                self.violation(f"job {jid} shard {idx} holds GPUs under two attempts at once: {sorted(atts)}")

    def process_monitor(self):
        """Reality: which trainer processes run in which agent container, from the host's /proc."""
        seen = defaultdict(list)  # (job, shard) -> [(t, agent, attempt)]
        while not self.stop_monitors.is_set():
            t = now()
            running = defaultdict(set)
            for agent in AGENTS:
                if agent in self.paused:
                    continue
                if now() - self.thawed.get(agent, 0) < self.args.thaw_grace:
                    continue
                try:
                    cid = self.container(agent)
                    if not cid:
                        continue
                    out = self.sh(["docker", "top", cid, "-eo", "pid,args"], timeout=10, check=False)
                except Exception:  # noqa: BLE001
                    continue
                for line in out.splitlines()[1:]:
                    parts = line.split(None, 1)
                    if len(parts) < 2 or TRAINER not in parts[1]:
                        continue
                    try:
                        with open(f"/proc/{parts[0]}/environ", "rb") as f:
                            env = dict(
                                kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv
                            )
                        state = open(f"/proc/{parts[0]}/stat", encoding="utf-8").read().rsplit(")", 1)[1].split()[0]
                    except OSError:
                        continue
                    if state in ("T", "t", "Z", "X"):
                        continue
                    job = env.get(b"TESSERA_JOB_ID", b"?").decode()
                    shard = env.get(b"TESSERA_SHARD_INDEX", b"?").decode()
                    attempt = env.get(b"TESSERA_ATTEMPT", b"?").decode()
                    running[(job, shard)].add((agent, attempt))
                    self.counts["process samples"] += 1
            for key, where in running.items():
                seen[key].append((round(rel(t), 2), sorted(where)))
                if len(where) > 1:
                    self.violation(
                        f"job {key[0]} shard {key[1]} running as two processes at {rel(t):.1f} s: {sorted(where)}"
                    )
            time.sleep(1.0)
        with open(os.path.join(self.out, "processes.json"), "w", encoding="utf-8") as f:
            json.dump({f"{k[0]}/{k[1]}": v for k, v in seen.items()}, f)

    # ----- nemesis ----------------------------------------------------------------------------

    def probe_writes(self, clients, since, until_event):
        """Seconds from `since` to the first write (a 1-GPU job running `true`) acknowledged by
        any server, each tried with a 1 s deadline in turn (`clients`: one per server)."""
        key = f"nemesis-{self.seed}-probe-{len(self.faults):03d}"
        req = pb.SubmitJobRequest(
            spec=pb.JobSpec(name=key, command=["true"], shards=1, resources=pb.Resources(gpus=1)), idempotency_key=key
        )
        try:
            while not until_event.is_set():
                for c in clients:
                    try:
                        resp = c._unary("SubmitJob", req, retry_for=0)
                        t = now() - since
                        with self.lock:
                            self.acked[key] = resp.job_id
                            self.acked_file.write(json.dumps({"key": key, "id": resp.job_id, "t": round(rel(now()), 3)}) + "\n")
                            self.acked_file.flush()
                        return t
                    except Exception:  # noqa: BLE001
                        pass
                time.sleep(0.1)
        finally:
            for c in clients:
                c.close()
        return None

    def shards_on(self, c, agent):
        return {
            (j.id, s.index): s.attempt_id
            for j in self.list_jobs(c, include_finished=False, shards=True)
            for s in j.shards
            if s.node_name == agent and s.state in HELD_SHARD_STATES
        }

    def shards_moved(self, c, before, since, until_event):
        """Seconds from `since` until every shard in `before` runs under a new attempt (or its
        job ended); None if there were none or it did not happen in time."""
        if not before:
            return None
        while not until_event.is_set():
            try:
                jobs = {j.id: j for j in self.list_jobs(c, include_finished=True, shards=True)}
            except Exception:  # noqa: BLE001
                time.sleep(0.3)
                continue
            pending = 0
            for (jid, idx), att in before.items():
                j = jobs.get(jid)
                if j is None or j.state in FINAL_STATES:
                    continue
                s = j.shards[idx]
                if not (s.state == pb.SHARD_STATE_RUNNING and s.attempt_id != att):
                    pending += 1
            if pending == 0:
                return now() - since
            time.sleep(0.25)
        return None

    def restarts_between(self, c, jobs, t_from, t_to):
        """NODE_LOST events of these jobs between the two times (Unix seconds)."""
        lost = []
        for jid in jobs:
            try:
                for e in c.events(jid):
                    if e.kind == pb.JOB_EVENT_KIND_NODE_LOST and t_from * 1000 <= e.time_unix_ms <= t_to * 1000:
                        lost.append(f"job {jid} shard {e.shard_index}: {e.message}")
            except Exception as e:  # noqa: BLE001
                self.observe(f"events {jid}: {e}")
        return lost

    def netns(self, pid, *rule):
        """iptables in the network namespace of process `pid` (a container's): the image has no
        iptables, this host does."""
        self.sh(["nsenter", "-t", pid, "-n", "iptables", "-w", *rule])

    def partition(self, pid, ips):
        """Drops every packet between the container and these addresses: no FIN, no RST."""
        for ip in ips:
            self.netns(pid, "-I", "INPUT", "-s", ip, "-j", "DROP")
            self.netns(pid, "-I", "OUTPUT", "-d", ip, "-j", "DROP")

    def heal_partition(self, pid):
        self.netns(pid, "-F", "INPUT")
        self.netns(pid, "-F", "OUTPUT")

    def wipe(self, agent):
        cid = self.container(agent)
        self.sh(["docker", "kill", "-s", "KILL", cid], check=False)
        self.dc("rm", "-sf", agent)
        vols = self.sh(
            [
                "docker", "volume", "ls", "-q",
                "--filter", f"label=com.docker.compose.project={self.args.project}",
                "--filter", f"label=com.docker.compose.volume={agent}",
            ]
        ).split()
        for v in vols:
            self.sh(["docker", "volume", "rm", v])
        return vols

    def fault(self, kind):
        rng = self.rng
        c = self.client()
        leader = None
        for _ in range(20):
            leader = self.leader()
            if leader:
                break
            time.sleep(0.5)
        followers = [s for s in SERVERS if s != leader]
        if kind in ("kill-leader", "partition-leader", "pause-leader"):
            target = leader
        elif kind == "kill-server":
            target = rng.choice(followers)
        else:
            target = rng.choice(AGENTS)
        running_before = set()
        before = {}
        try:
            running_before = {j.id for j in self.list_jobs(c, include_finished=False)}
            if target in AGENTS:
                before = self.shards_on(c, target)
        except Exception as e:  # noqa: BLE001
            self.observe(f"before {kind}: {e}")
        rec = {"kind": kind, "target": target, "leader_before": leader, "shards_on_target": len(before)}
        done = threading.Event()
        result = {}

        def measure():
            if target in SERVERS:
                result["recovery_s"] = self.probe_writes(probes, start, done)
                result["recovery"] = "first write acknowledged"
            else:
                result["recovery_s"] = self.shards_moved(c, before, start, done)
                result["recovery"] = "its shards running under new attempts"

        cid = self.container(target)
        pid = self.inspect(cid, "{{.State.Pid}}")
        peers = followers if kind == "partition-leader" else SERVERS
        ips = [self.ip(p) for p in peers] if kind.startswith("partition") else []
        probes = [self.client([s], timeout=1.0) for s in self.servers] if target in SERVERS else []
        for p in probes:  # connected before the fault, so that the time measured is the cluster's
            try:
                p._unary("GetJob", pb.GetJobRequest(job_id=1), retry_for=0)
            except Exception:  # noqa: BLE001
                pass
        log(f"fault {len(self.faults) + 1}: {kind} {target} (leader {leader}; {len(before)} shards on it)")
        start = now()
        hold = 0.0
        if kind in ("kill-server", "kill-leader"):
            self.sh(["docker", "kill", "-s", "KILL", cid])
            hold = 4.0
        elif kind.startswith("partition"):
            self.partition(pid, ips)
            hold = 10.0
        elif kind in ("pause-leader", "pause-agent"):
            self.sh(["docker", "pause", cid])
            self.paused[target] = start
            hold = 8.0
        elif kind == "wipe-agent":
            rec["volumes_removed"] = self.wipe(target)
        m = threading.Thread(target=measure, daemon=True)
        m.start()
        time.sleep(hold)
        # Heal.
        if kind in ("kill-server", "kill-leader"):
            self.sh(["docker", "start", cid])
        elif kind in ("partition-leader", "partition-agent"):
            self.heal_partition(pid)
        elif kind in ("pause-leader", "pause-agent"):
            self.sh(["docker", "unpause", cid])
            self.paused.pop(target, None)
        elif kind == "wipe-agent":
            self.dc("up", "-d", "--no-deps", target)
        self.thawed[target] = now()
        end = now()
        m.join(timeout=self.args.recovery_timeout)
        done.set()
        m.join(timeout=5)
        try:
            healthy_s = self.wait_healthy(120)
        except TimeoutError as e:
            healthy_s = None
            self.violation(f"{kind} {target}: cluster not healthy again 120 s after healing ({e})")
        rec.update(
            start=round(rel(start), 2),
            end=round(rel(end), 2),
            held_s=round(end - start, 2),
            recovery=result.get("recovery"),
            recovery_s=None if result.get("recovery_s") is None else round(result["recovery_s"], 2),
            healthy_after_heal_s=None if healthy_s is None else round(healthy_s, 2),
        )
        if target in SERVERS and kind != "partition-leader":
            # A server killed or frozen, the leader included, must cost no shard its attempt.
            time.sleep(1.0)
            lost = self.restarts_between(c, running_before, start, now())
            rec["shards_restarted"] = len(lost)
            for what in lost:
                self.violation(f"{kind} {target} at {rel(start):.1f} s restarted a shard: {what}")
        elif target in SERVERS:
            lost = self.restarts_between(c, running_before, start, now())
            rec["shards_restarted"] = len(lost)
            if lost:
                self.note(f"{kind} {target} at {rel(start):.1f} s: {len(lost)} shard(s) lost their node: {lost[:3]}")
        rec["restarted_shards"] = sorted(f"{j}/{i}" for (j, i) in before)
        c.close()
        for p in probes:
            p.close()
        log(
            f"  healed after {rec['held_s']} s; recovery ({rec['recovery']}): {rec['recovery_s']} s; "
            f"healthy {rec['healthy_after_heal_s']} s after healing"
        )
        self.faults.append(rec)
        self.faults_file.write(json.dumps(rec) + "\n")
        self.faults_file.flush()

    def nemesis(self):
        deadline = now() + self.args.minutes * 60
        deck = []
        while now() < deadline and not self.stop_faults.is_set():
            if not deck:
                deck = list(KINDS)
                self.rng.shuffle(deck)
            kind = deck.pop(0)
            try:
                self.fault(kind)
            except Exception as e:  # noqa: BLE001
                self.violation(f"the nemesis failed to inject or heal {kind}: {e}")
                self.heal_all()
            time.sleep(self.rng.uniform(2.0, 4.0))

    def heal_all(self):
        for svc in SERVERS + AGENTS:
            try:
                cid = self.container(svc)
                if not cid:
                    self.dc("up", "-d", "--no-deps", svc)
                    continue
                st = self.inspect(cid, "{{.State.Status}}")
                if st == "paused":
                    self.sh(["docker", "unpause", cid])
                elif st != "running":
                    self.sh(["docker", "start", cid])
                    continue
                self.heal_partition(self.inspect(cid, "{{.State.Pid}}"))
            except Exception as e:  # noqa: BLE001
                self.observe(f"heal {svc}: {e}")
        self.paused.clear()

    # ----- checker ----------------------------------------------------------------------------

    def check(self):
        c = self.client(timeout=10.0)
        jobs = [j for j in self.list_jobs(c, include_finished=True, shards=True) if j.spec.name.startswith("nemesis-")]
        by_name = defaultdict(list)
        for j in jobs:
            by_name[j.spec.name].append(j.id)
        for name, ids in by_name.items():
            if len(ids) > 1:
                self.violation(f"duplicated: {len(ids)} jobs named {name}: {ids}")
        ids = {j.id: j for j in jobs}
        for key, jid in self.acked.items():
            try:
                j = ids.get(jid) or c.job(jid)
            except TesseraError as e:
                self.violation(f"lost: acknowledged {key} -> job {jid}: {e}")
                continue
            if j.spec.name != key:
                self.violation(f"acknowledged {key} -> job {jid}, which is named {j.spec.name!r}")
        states = defaultdict(int)
        resumed = 0
        for j in jobs:
            states[pb.JobState.Name(j.state).removeprefix("JOB_STATE_").lower()] += 1
            if j.state not in FINAL_STATES:
                self.violation(f"job {j.id} ({j.spec.name}) not final: {pb.JobState.Name(j.state)}")
            if j.state == pb.JOB_STATE_FAILED:
                self.violation(f"job {j.id} ({j.spec.name}) failed: {j.message}")
            for s in j.shards:
                if s.HasField("last_checkpoint") and not s.last_checkpoint.uri.startswith("s3://"):
                    self.violation(f"job {j.id} shard {s.index}: last checkpoint not in the store: {s.last_checkpoint.uri}")
            if j.spec.command == ["true"]:
                continue
            # Every shard placed again after losing its node resumed from its checkpoint if it had one.
            had_checkpoint, lost = set(), set()
            for e in c.events(j.id):
                if not e.HasField("shard_index"):
                    continue
                if e.kind == pb.JOB_EVENT_KIND_CHECKPOINT:
                    had_checkpoint.add(e.shard_index)
                elif e.kind == pb.JOB_EVENT_KIND_NODE_LOST:
                    lost.add(e.shard_index)
                elif e.kind == pb.JOB_EVENT_KIND_RESTARTED and e.shard_index in lost:
                    lost.discard(e.shard_index)
                    if e.shard_index in had_checkpoint:
                        if "resumes from the checkpoint" in e.message:
                            resumed += 1
                        else:
                            self.violation(
                                f"job {j.id} shard {e.shard_index} lost its node after a checkpoint but was "
                                f"placed again without it: {e.message!r}"
                            )
        # Nothing holds a GPU once every job has ended.
        for n in self.cli("node", "list").get("nodes") or []:
            for g in n.get("gpus") or []:
                if g.get("allocation"):
                    self.violation(f"GPU {g['index']} of {n['name']} still held after every job ended: {g['allocation']}")
        c.close()
        return jobs, dict(states), resumed

    def wait_final(self, timeout):
        c = self.client(timeout=10.0)
        t = now()
        left = []
        while now() - t < timeout:
            try:
                left = [j for j in self.list_jobs(c, include_finished=False) if j.spec.name.startswith("nemesis-")]
                if not left:
                    break
            except Exception as e:  # noqa: BLE001
                self.observe(f"wait final: {e}")
            time.sleep(1)
        c.close()
        return now() - t, len(left)

    # ----- report -----------------------------------------------------------------------------

    def report(self, jobs, states, resumed, drained_s):
        lines = []
        p = lines.append
        p("")
        p(f"Tessera nemesis: seed {self.seed}, {self.args.minutes} min of faults, {len(self.faults)} faults")
        p("")
        p(f"{'fault':<18} {'n':>3} {'recovery: median':>17} {'max':>7}  {'healthy after heal: median':>27} {'max':>7}  recovery measured as")
        for kind in KINDS:
            recs = [r for r in self.faults if r["kind"] == kind]
            if not recs:
                p(f"{kind:<18} {0:>3} {'-':>17} {'-':>7}  {'-':>27} {'-':>7}")
                continue
            rs = [r["recovery_s"] for r in recs if r["recovery_s"] is not None]
            hs = [r["healthy_after_heal_s"] for r in recs if r["healthy_after_heal_s"] is not None]
            med = f"{statistics.median(rs):.2f} s" if rs else "-"
            mx = f"{max(rs):.2f} s" if rs else "-"
            hmed = f"{statistics.median(hs):.2f} s" if hs else "-"
            hmx = f"{max(hs):.2f} s" if hs else "-"
            how = recs[0]["recovery"] or ""
            if kind.endswith("agent"):
                how += f" ({len(rs)} of {len(recs)} had shards on it)"
            p(f"{kind:<18} {len(recs):>3} {med:>17} {mx:>7}  {hmed:>27} {hmx:>7}  {how}")
        p("")
        p("faults (seconds from the start of the workload):")
        for r in self.faults:
            p(
                f"  {r['start']:7.1f}-{r['end']:7.1f}  {r['kind']:<17} {r['target']:<9} recovery {fmt(r['recovery_s'])}, "
                f"healthy {fmt(r['healthy_after_heal_s'])} after heal, shards on target {r['shards_on_target']}"
            )
        p("")
        p(
            f"jobs: {len(jobs)} ({', '.join(f'{v} {k}' for k, v in sorted(states.items()))}); "
            f"acknowledged {len(self.acked)}, never acknowledged {len(self.unacked)}; waited {drained_s:.0f} s for them to end after the faults"
        )
        p(f"shards placed again after losing their node that resumed from a checkpoint in the store: {resumed}")
        p("client calls: " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())))
        for n in self.notes:
            p(f"note: {n}")
        p("")
        if self.violations:
            p(f"VIOLATIONS ({len(self.violations)}):")
            for v in self.violations:
                p(f"  - {v}")
        else:
            p(
                "no violations: no acknowledged job lost or duplicated, every job ended, no GPU under two attempts, "
                "no shard running as two processes, every shard that lost its node after a checkpoint resumed from it"
            )
        text = "\n".join(lines)
        print(text, flush=True)
        with open(os.path.join(self.out, "report.txt"), "w", encoding="utf-8") as f:
            f.write(text + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", required=True)
    ap.add_argument("--compose-file", required=True)
    ap.add_argument("--compose", required=True, help="the compose command, e.g. 'docker-compose'")
    ap.add_argument("--cli", required=True, help="the tessera binary on this host")
    ap.add_argument("--servers", required=True)
    ap.add_argument("--certs", required=True)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--submitters", type=int, default=3)
    ap.add_argument("--in-flight", type=int, default=2, help="unfinished jobs per submitter")
    ap.add_argument("--recovery-timeout", type=float, default=45.0)
    ap.add_argument("--drain-timeout", type=float, default=180.0)
    ap.add_argument("--thaw-grace", type=float, default=1.5, help="seconds a thawed agent may take to fence its shards")
    args = ap.parse_args()

    run = Run(args)
    log(f"waiting for a leader and three ready nodes (seed {args.seed})")
    took = run.wait_healthy(180)
    log(f"healthy in {took:.1f} s")
    threads = [threading.Thread(target=run.submitter, args=(i,), daemon=True) for i in range(args.submitters)]
    threads.append(threading.Thread(target=run.reader, daemon=True))
    monitors = [threading.Thread(target=run.gpu_monitor, daemon=True), threading.Thread(target=run.process_monitor, daemon=True)]
    for t in threads + monitors:
        t.start()
    time.sleep(3)
    try:
        run.nemesis()
    finally:
        run.stop_faults.set()
        run.heal_all()
    log("faults over, everything healed; the workload stops submitting")
    run.stop_workload.set()
    t = now()
    drained_s, left = run.wait_final(args.drain_timeout)
    log(f"{left} jobs not ended after {drained_s:.0f} s")
    run.stop_monitors.set()
    for th in monitors:
        th.join(timeout=15)
    for th in threads:
        th.join(timeout=15)
    jobs, states, resumed = run.check()
    run.report(jobs, states, resumed, now() - t)
    return 1 if run.violations else 0


if __name__ == "__main__":
    sys.exit(main())
