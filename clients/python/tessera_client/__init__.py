"""A small typed client for the Tessera GPU job scheduler.

    from tessera_client import Client

    with Client("10.0.0.1:7001,10.0.0.2:7001", ca="ca.pem", cert="me.pem", key="me-key.pem") as c:
        job = c.submit(["python", "train.py"], gpus=8, shards=2, tenant="ml")
        for update in c.watch(job):
            print(update.job.state)
        for chunk in c.logs(job):
            print(chunk.data.decode(errors="replace"), end="")

Every call goes to the first server that answers: a server that is down or has no leader
(UNAVAILABLE) sends the call to the next. Submissions carry an idempotency key, so a retried
submission never makes two jobs. The messages returned are the generated protobuf classes of
``tessera_client.pb`` (``Job``, ``WatchJobResponse``...), documented in proto/tessera/v1.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Sequence, Union

import grpc

from ._proto import common_pb2, jobs_pb2, jobs_pb2_grpc

__all__ = ["Client", "TesseraError", "pb", "JOB_STATES", "FINAL_STATES"]


class _Messages:
    """The generated message classes and enums, under one name: ``pb.Job``, ``pb.JOB_STATE_RUNNING``."""

    def __getattr__(self, name: str):
        for module in (jobs_pb2, common_pb2):
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(name)


pb = _Messages()

#: Job state names as the CLI prints them, to their enum values.
JOB_STATES = {
    "pending": common_pb2.JOB_STATE_PENDING,
    "running": common_pb2.JOB_STATE_RUNNING,
    "succeeded": common_pb2.JOB_STATE_SUCCEEDED,
    "failed": common_pb2.JOB_STATE_FAILED,
    "cancelled": common_pb2.JOB_STATE_CANCELLED,
}

#: States a job never leaves.
FINAL_STATES = frozenset(
    {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED}
)


class TesseraError(Exception):
    """A call every server refused or failed; ``code`` is the gRPC status code of the last."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def _read(path: Union[str, Path, None], what: str) -> Optional[bytes]:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path}: {e}") from e


class Client:
    """A connection to a Tessera cluster.

    ``servers``: ``HOST:PORT`` of one or more servers, as a list or comma-separated.
    ``ca``, ``cert``, ``key``: PEM files for mutual TLS (``tessera certs`` writes them); without
    them the connection is plain TCP, which only a server started with ``--insecure`` accepts.
    ``token``: a bearer token secret (``tessera acl token create``), sent with every call.
    ``timeout``: seconds for each unary call.
    """

    def __init__(
        self,
        servers: Union[str, Sequence[str]] = "127.0.0.1:7001",
        *,
        ca: Union[str, Path, None] = None,
        cert: Union[str, Path, None] = None,
        key: Union[str, Path, None] = None,
        token: Optional[str] = None,
        timeout: float = 15.0,
    ):
        addrs = [s.strip() for s in (servers.split(",") if isinstance(servers, str) else servers) if s.strip()]
        if not addrs:
            raise ValueError("servers: give at least one HOST:PORT")
        if (cert is None) != (key is None):
            raise ValueError("cert and key: give both or neither")
        if cert is not None and ca is None:
            raise ValueError("ca: a client certificate needs the CA bundle to check the servers with")
        self._metadata = [("authorization", f"Bearer {token}")] if token else []
        self._timeout = timeout
        if ca is not None:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(ca, "ca"),
                private_key=_read(key, "key"),
                certificate_chain=_read(cert, "cert"),
            )
            self._channels = [grpc.secure_channel(a, creds) for a in addrs]
        else:
            self._channels = [grpc.insecure_channel(a) for a in addrs]
        self._stubs = [jobs_pb2_grpc.JobServiceStub(ch) for ch in self._channels]
        self._addrs = addrs

    # ----- plumbing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close every channel."""
        for ch in self._channels:
            ch.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _unary(self, method: str, request, retry_for: float = 15.0):
        """Call ``method`` on each server in turn until one answers; go round again while the
        cluster has no leader (UNAVAILABLE), for up to ``retry_for`` seconds."""
        deadline = time.monotonic() + retry_for
        last: Optional[grpc.RpcError] = None
        while True:
            for stub in self._stubs:
                try:
                    return getattr(stub, method)(request, timeout=self._timeout, metadata=self._metadata)
                except grpc.RpcError as e:
                    last = e
                    if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise TesseraError(e.code(), e.details() or "") from None
            if time.monotonic() >= deadline:
                assert last is not None
                raise TesseraError(last.code(), last.details() or "") from None
            time.sleep(0.2)

    def _stream(self, method: str, request) -> Iterator:
        """A server-streaming call on the first server that takes it; once a message has come,
        an error ends the stream (going elsewhere would repeat what was already given)."""
        last: Optional[grpc.RpcError] = None
        for stub in self._stubs:
            started = False
            try:
                for message in getattr(stub, method)(request, metadata=self._metadata):
                    started = True
                    yield message
                return
            except grpc.RpcError as e:
                if started or e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise TesseraError(e.code(), e.details() or "") from None
                last = e
        assert last is not None
        raise TesseraError(last.code(), last.details() or "")

    # ----- jobs -------------------------------------------------------------------------------

    def submit(
        self,
        command: Sequence[str],
        *,
        name: str = "",
        tenant: str = "",
        shards: int = 1,
        gpus: int = 1,
        gpu_model: str = "",
        cpu_millis: int = 0,
        memory_mib: int = 0,
        env: Optional[Mapping[str, str]] = None,
        priority: Optional[int] = None,
        max_runtime_seconds: Optional[int] = None,
        checkpoint_dir: str = "",
        idempotency_key: Optional[str] = None,
        array: str = "",
        after_ok: Sequence[int] = (),
        after_any: Sequence[int] = (),
        launch: str = "process",
    ) -> int:
        """Submit a job; returns its id. An empty tenant is the server's "default"; the
        idempotency key defaults to a fresh UUID, so retries of this call make one job.
        ``launch`` is "process" (one process per shard, e.g. torchrun) or "per-gpu".

        ``array`` makes a job array in Slurm's form ("0-999%50": indices 0 to 999, at most 50
        unfinished at once); the id returned is the array's own, and each element is a job
        with ``TESSERA_ARRAY_INDEX`` set (``jobs(array=ID)`` lists them). ``after_ok`` and
        ``after_any`` hold the job until those jobs have succeeded, or ended however."""
        if isinstance(command, str):
            raise TypeError("command: give a list of arguments, e.g. ['python', 'train.py']")
        modes = {"process": common_pb2.LAUNCH_MODE_PROCESS, "per-gpu": common_pb2.LAUNCH_MODE_PER_GPU}
        if launch not in modes:
            raise ValueError(f"launch: {launch!r} is not 'process' or 'per-gpu'")
        spec = common_pb2.JobSpec(
            name=name,
            tenant=tenant,
            command=list(command),
            env=dict(env or {}),
            shards=shards,
            resources=common_pb2.Resources(gpus=gpus, gpu_model=gpu_model, cpu_millis=cpu_millis, memory_mib=memory_mib),
            checkpoint_dir=checkpoint_dir,
            array=array,
            after_ok=list(after_ok),
            after_any=list(after_any),
            launch=modes[launch],
        )
        if priority is not None:
            spec.priority = priority
        if max_runtime_seconds is not None:
            spec.max_runtime_seconds = max_runtime_seconds
        req = jobs_pb2.SubmitJobRequest(spec=spec, idempotency_key=idempotency_key or str(uuid.uuid4()))
        return self._unary("SubmitJob", req).job_id

    def job(self, job_id: int):
        """One job, with its shards (``pb.Job``)."""
        return self._unary("GetJob", jobs_pb2.GetJobRequest(job_id=job_id)).job

    def why(self, job_id: int):
        """Why a job waits and what would let it run (``pb.ExplainJobResponse``: ``.reason``
        with ``.kind`` and ``.message``, ``.funnel``, ``.remedies``, ``.jobs_ahead``); ``.reason``
        is unset for a job that is not waiting."""
        return self._unary("ExplainJob", jobs_pb2.ExplainJobRequest(job_id=job_id))

    def events(self, job_id: int) -> list:
        """The job's timeline, oldest first (``pb.JobEvent``: ``.kind``, ``.time_unix_ms``,
        ``.shard_index``, ``.node_name``, ``.message``, ``.sequence``): its submission, every
        placement, start, exit, checkpoint, stop, lost node and restart of its shards, and its
        end. Kept by the servers for as long as the job."""
        return list(self._unary("JobEvents", jobs_pb2.JobEventsRequest(job_id=job_id)).events)

    def jobs(
        self,
        states: Iterable[str] = (),
        *,
        tenant: str = "",
        include_finished: bool = False,
        page_size: int = 500,
        array: int = 0,
    ) -> Iterator:
        """Jobs (``pb.Job``), oldest first, page by page. ``states``: names of ``JOB_STATES``.
        A job array is one job (its own record, with counts in ``.array``); ``array=ID`` lists
        that array's elements instead."""
        wanted = []
        for s in states:
            if s not in JOB_STATES:
                raise ValueError(f"states: unknown state {s!r} (one of {', '.join(JOB_STATES)})")
            wanted.append(JOB_STATES[s])
        token = ""
        while True:
            req = jobs_pb2.ListJobsRequest(
                states=wanted,
                tenant=tenant,
                include_finished=include_finished,
                page_size=page_size,
                page_token=token,
                array_job_id=array,
            )
            resp = self._unary("ListJobs", req)
            yield from resp.jobs
            token = resp.next_page_token
            if not token:
                return

    def cancel(self, job_id: int, reason: str = "") -> bool:
        """Cancel a job; False if it had already finished."""
        return not self._unary("CancelJob", jobs_pb2.CancelJobRequest(job_id=job_id, reason=reason)).already_finished

    def watch(self, job_id: int) -> Iterator:
        """The job's state now, then after every change, until it has ended
        (``pb.WatchJobResponse``: ``.job`` and ``.event``, unset in the first message). The
        last message is the FINISHED event, or the first one if the job had already ended."""
        for update in self._stream("WatchJob", jobs_pb2.WatchJobRequest(job_id=job_id)):
            yield update
            ended = update.job.state in FINAL_STATES
            if ended and (not update.HasField("event") or update.event.kind == jobs_pb2.JOB_EVENT_KIND_FINISHED):
                return

    def wait(self, job_id: int, timeout: Optional[float] = None):
        """Block until the job reaches a final state; returns the job. ``timeout`` in seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.state in FINAL_STATES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {common_pb2.JobState.Name(job.state)}")
            time.sleep(0.25)

    def logs(self, job_id: int, *, shard: Optional[int] = None, follow: bool = False) -> Iterator:
        """The job's output (``pb.JobLogsResponse`` chunks: ``.shard_index``, ``.stream``,
        ``.data`` as bytes); with ``follow``, until the job ends."""
        req = jobs_pb2.JobLogsRequest(job_id=job_id, follow=follow)
        if shard is not None:
            req.shard_index = shard
        yield from self._stream("JobLogs", req)
