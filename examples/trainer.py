#!/usr/bin/env python3
"""An example Tessera trainer: standard library only, runs anywhere python3 does.

It speaks the Tessera contracts:

- Launch environment: reads TESSERA_JOB_ID, TESSERA_SHARD_INDEX, TESSERA_NUM_SHARDS,
  TESSERA_ATTEMPT, TESSERA_CHECKPOINT_DIR, TESSERA_RESUME_FROM, TESSERA_PROGRESS_FILE and the
  torch.distributed variables (RANK, WORLD_SIZE, ...), printing them at start.
- Checkpoints: every --checkpoint-every steps and at the last step it writes a JSON checkpoint into
  TESSERA_CHECKPOINT_DIR atomically (temp file, fsync, rename). With TESSERA_RESUME_FROM set (a
  path or a file:// URI of such a checkpoint) it resumes after the checkpoint's step.
- Progress: after every step it appends one JSON line to TESSERA_PROGRESS_FILE:
  {"step": n, "total_steps": N, "metrics": {"loss": x}} plus "checkpoint": "file:///..." when it
  wrote one.
- Signals: SIGUSR1 (the agent's default checkpoint signal) checkpoints now and keeps training;
  SIGTERM checkpoints and exits with 143.

Run it by hand:  python3 examples/trainer.py --steps 20 --step-seconds 0.05
"""

import argparse
import json
import math
import os
import signal
import sys
import time
import urllib.parse
import urllib.request

_pending = {"checkpoint": False, "terminate": False}


def _on_usr1(signum, frame):
    _pending["checkpoint"] = True


def _on_term(signum, frame):
    _pending["terminate"] = True


def to_path(uri_or_path):
    """A local path from a plain path or a file:// URI; other schemes are not supported here."""
    parsed = urllib.parse.urlparse(uri_or_path)
    if parsed.scheme == "file":
        return urllib.request.url2pathname(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:
        raise SystemExit(f"trainer.py: only local paths and file:// URIs are supported, not {uri_or_path!r}")
    return uri_or_path


def loss_at(step, total):
    # A smooth, deterministic "training curve".
    return round(0.05 + 2.5 * math.exp(-4.0 * step / max(total, 1)) + 0.01 * math.sin(step), 6)


class Trainer:
    def __init__(self, args):
        env = os.environ
        self.args = args
        self.job_id = env.get("TESSERA_JOB_ID", "local")
        self.shard = int(env.get("TESSERA_SHARD_INDEX", "0"))
        self.num_shards = int(env.get("TESSERA_NUM_SHARDS", "1"))
        self.attempt = int(env.get("TESSERA_ATTEMPT", "0"))
        self.rank = int(env.get("RANK", "0"))
        self.world_size = int(env.get("WORLD_SIZE", "1"))
        self.checkpoint_dir = os.path.abspath(to_path(env.get("TESSERA_CHECKPOINT_DIR", "checkpoints")))
        self.progress_file = env.get("TESSERA_PROGRESS_FILE")
        self.resume_from = env.get("TESSERA_RESUME_FROM")
        self.total = args.steps
        self.step = 0
        self.last_checkpoint_step = None

    def resume(self):
        if not self.resume_from:
            return
        with open(to_path(self.resume_from), encoding="utf-8") as f:
            state = json.load(f)
        self.step = int(state["step"])
        self.last_checkpoint_step = self.step
        print(f"resuming from step {self.step} ({self.resume_from})", flush=True)

    def checkpoint(self):
        """Writes a checkpoint of the current step atomically; returns its file:// URI."""
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        name = f"ckpt-shard{self.shard}-step{self.step:08d}.json"
        final = os.path.join(self.checkpoint_dir, name)
        tmp = os.path.join(self.checkpoint_dir, f".{name}.tmp-{os.getpid()}")
        state = {
            "step": self.step,
            "total_steps": self.total,
            "loss": loss_at(self.step, self.total),
            "job_id": self.job_id,
            "shard_index": self.shard,
            "attempt": self.attempt,
            "written_at": time.time(),
        }
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        try:
            dir_fd = os.open(self.checkpoint_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass
        self.last_checkpoint_step = self.step
        uri = "file://" + urllib.request.pathname2url(final)
        print(f"checkpoint step={self.step} {uri}", flush=True)
        return uri

    def report(self, checkpoint=None):
        line = {"step": self.step, "total_steps": self.total, "metrics": {"loss": loss_at(self.step, self.total)}}
        if checkpoint:
            line["checkpoint"] = checkpoint
        if not self.progress_file:
            return
        data = (json.dumps(line) + "\n").encode("utf-8")
        # One write of the whole line with O_APPEND: the agent never sees a half line interleaved.
        fd = os.open(self.progress_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def handle_signals(self):
        if _pending["terminate"]:
            _pending["terminate"] = False
            print(f"SIGTERM at step {self.step}: checkpointing and exiting", flush=True)
            if self.last_checkpoint_step != self.step:
                self.report(self.checkpoint())
            sys.exit(143)
        if _pending["checkpoint"]:
            _pending["checkpoint"] = False
            print(f"checkpoint requested at step {self.step}", flush=True)
            if self.last_checkpoint_step != self.step:
                self.report(self.checkpoint())

    def sleep_step(self):
        # Sleep in slices so a signal is acted on promptly even with long steps.
        deadline = time.monotonic() + self.args.step_seconds
        while not _pending["terminate"]:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, 0.05))

    def run(self):
        print(
            f"trainer: job={self.job_id} shard={self.shard}/{self.num_shards} attempt={self.attempt} "
            f"rank={self.rank}/{self.world_size} "
            f"cuda_visible_devices={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r} "
            f"master={os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')} "
            f"checkpoint_dir={self.checkpoint_dir} steps={self.total}",
            flush=True,
        )
        self.resume()
        while self.step < self.total:
            self.handle_signals()
            self.sleep_step()
            self.handle_signals()
            self.step += 1
            checkpoint = None
            every = self.args.checkpoint_every
            if self.step == self.total or (every > 0 and self.step % every == 0):
                checkpoint = self.checkpoint()
            print(f"step {self.step}/{self.total} loss={loss_at(self.step, self.total)}", flush=True)
            self.report(checkpoint)
        if self.last_checkpoint_step != self.step:
            self.report(self.checkpoint())
        print(f"done at step {self.step}", flush=True)
        return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="total training steps (default 100)")
    parser.add_argument("--step-seconds", type=float, default=0.1, help="seconds per step (default 0.1)")
    parser.add_argument(
        "--checkpoint-every", type=int, default=10, help="checkpoint every K steps, 0 for never (default 10)"
    )
    args = parser.parse_args(argv)
    if args.steps < 0 or args.step_seconds < 0 or args.checkpoint_every < 0:
        parser.error("--steps, --step-seconds and --checkpoint-every must not be negative")
    signal.signal(signal.SIGUSR1, _on_usr1)
    signal.signal(signal.SIGTERM, _on_term)
    return Trainer(args).run()


if __name__ == "__main__":
    sys.exit(main())
