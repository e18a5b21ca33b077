"""End-to-end check of tessera-client against a running cluster with one agent (1+ GPU).

    python tests/e2e.py --servers A,B,C --ca ca.pem --cert user.pem --key user-key.pem

The cargo integration test `python_client` starts the cluster over mutual TLS and runs this.
It exits non-zero, naming the failed check, on the first failure. It also lists the services
and submits a job with nothing but gRPC reflection (v1alpha, which Python's grpcio-reflection
speaks), the way a client without Tessera's stubs would.
"""

import argparse
import sys
import time

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tessera_client import FINAL_STATES, Client, TesseraError, pb


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def reflection_only(server, ca, cert, key):
    """List the services and submit a job knowing nothing but what reflection tells."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=open(ca, "rb").read(),
        private_key=open(key, "rb").read(),
        certificate_chain=open(cert, "rb").read(),
    )
    with grpc.secure_channel(server, creds) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        check("tessera.v1.JobService" in services, f"reflection lists JobService ({sorted(services)})")
        # A pool of our own: nothing from tessera_client's stubs.
        pool = descriptor_pool.DescriptorPool(db)
        method = pool.FindServiceByName("tessera.v1.JobService").FindMethodByName("SubmitJob")
        Req = message_factory.GetMessageClass(method.input_type)
        Resp = message_factory.GetMessageClass(method.output_type)
        req = Req()
        req.spec.command.extend(["sh", "-c", "echo submitted through reflection"])
        req.spec.shards = 1
        req.spec.resources.gpus = 1
        req.idempotency_key = f"reflection-{time.time_ns()}"
        call = ch.unary_unary(
            "/tessera.v1.JobService/SubmitJob",
            request_serializer=Req.SerializeToString,
            response_deserializer=Resp.FromString,
        )
        resp = call(req, timeout=15)
        check(resp.job_id > 0, f"a job submitted through reflection alone got id {resp.job_id}")
        return resp.job_id


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--servers", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    a = ap.parse_args()

    with Client(a.servers, ca=a.ca, cert=a.cert, key=a.key) as c:
        # Bad input is refused naming the field, and nothing is made.
        try:
            c.submit(["true"], gpus=0, shards=0)
            check(False, "a job with 0 shards is refused")
        except TesseraError as e:
            check(e.code == grpc.StatusCode.INVALID_ARGUMENT and "spec.shards" in e.message, f"0 shards refused: {e}")

        # Submit, watch to the end, read the output.
        job = c.submit(["sh", "-c", "sleep 1; echo hello from the python client"], name="py-hello", gpus=1)
        check(job > 0, f"submitted job {job}")
        updates = list(c.watch(job))
        states = [u.job.state for u in updates]
        check(states and states[-1] == pb.JOB_STATE_SUCCEEDED, f"watch ends in SUCCEEDED ({states})")
        watched = [u.event.kind for u in updates if u.HasField("event")]
        check(
            watched and watched[-1] == pb.JOB_EVENT_KIND_FINISHED and pb.JOB_EVENT_KIND_SHARD_EXITED in watched,
            f"watch() carries the events, FINISHED last ({watched})",
        )
        kinds = [e.kind for e in c.events(job)]
        check(
            kinds[0] == pb.JOB_EVENT_KIND_SUBMITTED
            and pb.JOB_EVENT_KIND_PLACED in kinds
            and kinds[-2:] == [pb.JOB_EVENT_KIND_SHARD_EXITED, pb.JOB_EVENT_KIND_FINISHED],
            f"events() gives the timeline ({kinds})",
        )
        text = b"".join(ch.data for ch in c.logs(job)).decode()
        check("hello from the python client" in text, f"logs hold the job's output ({text!r})")
        got = c.job(job)
        check(got.spec.name == "py-hello" and got.state in FINAL_STATES, f"job() reads it back ({got.spec.name})")

        # The same idempotency key makes one job.
        first = c.submit(["true"], idempotency_key="py-key-1")
        again = c.submit(["true"], idempotency_key="py-key-1")
        check(first == again, f"a retried submission is the same job ({first}, {again})")

        # A job no node can hold waits; cancelling it ends it; a second cancel says it was over.
        big = c.submit(["sleep", "60"], gpus=8, shards=64)
        check(c.job(big).state == pb.JOB_STATE_PENDING, "a 512-GPU job waits")
        check(big in [j.id for j in c.jobs(["pending"])], "jobs(['pending']) lists it")
        why = c.why(big)
        check(
            why.reason.kind == pb.PENDING_REASON_KIND_CONSTRAINT and "64 shards" in why.reason.message,
            f"why() says no set of nodes could hold it ({why.reason.message})",
        )
        check(any("shards" in r for r in why.remedies), f"why() says what would let it run ({list(why.remedies)})")
        check(c.cancel(big), "cancel() of a waiting job")
        final = c.wait(big, timeout=30)
        check(final.state == pb.JOB_STATE_CANCELLED, f"it ends cancelled ({final.state})")
        check(not c.cancel(big), "a second cancel() says it had already finished")
        all_ids = [j.id for j in c.jobs(include_finished=True, page_size=2)]
        check({job, first, big} <= set(all_ids), f"jobs(include_finished=True) pages through all ({all_ids})")

        # A job array: one id, elements listed apart, each seeing its index; a job after it.
        arr = c.submit(["sh", "-c", "echo element $TESSERA_ARRAY_INDEX"], array="0-3%2")
        after = c.submit(["true"], after_ok=[arr])
        check(c.why(after).reason.kind == pb.PENDING_REASON_KIND_DEPENDENCY, "why() says it waits on the array")
        done = c.wait(arr, timeout=60)
        check(
            done.state == pb.JOB_STATE_SUCCEEDED and done.array.total == 4 and done.array.succeeded == 4,
            f"the array of 4 succeeded ({done.state}, {done.array})",
        )
        elements = list(c.jobs(include_finished=True, array=arr))
        check(sorted(e.array_index for e in elements) == [0, 1, 2, 3], "jobs(array=) lists its 4 elements")
        check(arr not in [e.id for e in elements] and all(e.array_job_id == arr for e in elements), "only elements")
        check(c.wait(after, timeout=60).state == pb.JOB_STATE_SUCCEEDED, "the after-ok job ran once the array ended")

        # Reflection alone, then the job it made runs like any other.
        rj = reflection_only(a.servers.split(",")[0], a.ca, a.cert, a.key)
        check(c.wait(rj, timeout=60).state == pb.JOB_STATE_SUCCEEDED, "the reflection job succeeded")
    print("python client: all checks passed")


if __name__ == "__main__":
    main()
