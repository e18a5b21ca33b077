#!/usr/bin/env python3
"""A real PyTorch DistributedDataParallel trainer speaking the Tessera contracts.

It runs however the job launches it: one process per shard (`python ddp_train.py`), one per
GPU under torchrun (`torchrun ddp_train.py`, no flags: the agent sets the PET_* variables torchrun
reads), or one per GPU started by the agent (`launch = "per-gpu"`). It joins the job's process
group through torch.distributed's env:// rendezvous: MASTER_ADDR, MASTER_PORT, WORLD_SIZE and
RANK come from the agent or from torchrun. It uses NCCL when CUDA is available, with the GPU
LOCAL_RANK selects among those CUDA_VISIBLE_DEVICES lists, and gloo on CPU otherwise. It trains a
small regression model on synthetic data.

Tessera contracts:

- Checkpoints: rank 0 saves the model and optimizer state every --checkpoint-every steps, and
  at the end, into TESSERA_CHECKPOINT_DIR. It writes each to a temporary file, fsyncs it and
  renames it, then reports it through the progress protocol.
- Resume: every rank resumes from TESSERA_RESUME_FROM when it is set.
- Progress: every rank appends {"step", "total_steps", "metrics": {"loss"}} lines to
  TESSERA_PROGRESS_FILE.
- Signals: SIGUSR1 asks for a checkpoint at the next step boundary, and SIGTERM checkpoints and
  exits with 143. The ranks agree on the step at which to checkpoint with an all-reduce, so the
  checkpoint is consistent.

Run two ranks by hand on CPU:
  MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 WORLD_SIZE=2 RANK=0 python3 examples/ddp_train.py &
  MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 WORLD_SIZE=2 RANK=1 python3 examples/ddp_train.py
"""

import argparse
import json
import os
import signal
import sys
import time
import urllib.parse
import urllib.request

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

_pending = {"checkpoint": 0, "terminate": 0}


def _on_usr1(signum, frame):
    _pending["checkpoint"] = 1


def _on_term(signum, frame):
    _pending["terminate"] = 1


def to_path(uri_or_path):
    parsed = urllib.parse.urlparse(uri_or_path)
    if parsed.scheme == "file":
        return urllib.request.url2pathname(parsed.path)
    return uri_or_path


def report(progress_file, record):
    if not progress_file:
        return
    with open(progress_file, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def save_checkpoint(ckpt_dir, shard, step, model, optimizer):
    os.makedirs(ckpt_dir, exist_ok=True)
    final = os.path.join(ckpt_dir, f"ddp-step{step:08d}.pt")
    tmp = final + ".tmp"
    with open(tmp, "wb") as f:
        torch.save({"step": step, "model": model.module.state_dict(), "optimizer": optimizer.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return "file://" + os.path.abspath(final)


def say(line):
    """Print one whole line with a single write. Under torchrun every worker of a node shares one
    stdout pipe, and an unbuffered print() writes the text and the newline separately, so two
    ranks' lines could run together; a write of under PIPE_BUF bytes to a pipe is atomic."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--step-seconds", type=float, default=0.0, help="extra sleep per step, to watch it")
    args = p.parse_args()

    env = os.environ
    rank = int(env.get("RANK", "0"))
    world = int(env.get("WORLD_SIZE", "1"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    ckpt_dir = env.get("TESSERA_CHECKPOINT_DIR", "checkpoints")
    progress_file = env.get("TESSERA_PROGRESS_FILE")
    resume_from = env.get("TESSERA_RESUME_FROM")
    shard = int(env.get("TESSERA_SHARD_INDEX", str(rank)))

    signal.signal(signal.SIGUSR1, _on_usr1)
    signal.signal(signal.SIGTERM, _on_term)

    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    say(
        f"rank {rank}/{world} local_rank={local_rank} backend={backend} device={device} "
        f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')} attempt={env.get('TESSERA_ATTEMPT', '1')}"
    )

    torch.manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)).to(device)
    ddp = DDP(model, device_ids=[local_rank] if use_cuda else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    true_w = torch.randn(32, 1, device=device)

    step = 0
    if resume_from:
        state = torch.load(to_path(resume_from), map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        say(f"resuming from step {step} ({resume_from})")

    gen = torch.Generator(device="cpu").manual_seed(rank * 7919 + step)
    while step < args.steps:
        x = torch.randn(args.batch, 32, generator=gen).to(device)
        y = x @ true_w + 0.01 * torch.randn(args.batch, 1, generator=gen).to(device)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        optimizer.step()
        step += 1
        if args.step_seconds:
            time.sleep(args.step_seconds)

        # Every rank must agree on when to checkpoint and stop: all-reduce the signal flags.
        flags = torch.tensor([_pending["checkpoint"], _pending["terminate"]], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        want_ckpt, want_stop = bool(flags[0].item()), bool(flags[1].item())
        _pending["checkpoint"] = 0
        record = {"step": step, "total_steps": args.steps, "metrics": {"loss": float(loss.item())}}
        if want_ckpt or want_stop or step % args.checkpoint_every == 0 or step == args.steps:
            if rank == 0:
                record["checkpoint"] = save_checkpoint(ckpt_dir, shard, step, ddp, optimizer)
                say(f"checkpoint step={step} {record['checkpoint']}")
            dist.barrier()
        report(progress_file, record)
        if want_stop:
            say(f"SIGTERM at step {step}: checkpointed, exiting")
            dist.destroy_process_group()
            sys.exit(143)

    say(f"done at step {step} loss={loss.item():.6f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
