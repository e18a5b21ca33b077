"""Submit a job to Tessera, follow it to the end and print its output.

    python examples/submit_and_watch.py --servers $TESSERA_SERVER \
        --ca $TESSERA_CA --cert $TESSERA_CERT --key $TESSERA_KEY -- python3 -c 'print("hello")'

(`tessera dev` prints those four variables for its cluster.)
"""

import argparse

from tessera_client import Client, pb


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="127.0.0.1:7001", help="HOST:PORT[,HOST:PORT...]")
    ap.add_argument("--ca", help="CA bundle (PEM) for mutual TLS")
    ap.add_argument("--cert", help="your certificate (PEM)")
    ap.add_argument("--key", help="its key (PEM)")
    ap.add_argument("--token", help="a bearer token secret")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--tenant", default="")
    ap.add_argument("command", nargs="+")
    a = ap.parse_args()

    with Client(a.servers, ca=a.ca, cert=a.cert, key=a.key, token=a.token) as c:
        job = c.submit(a.command, gpus=a.gpus, shards=a.shards, tenant=a.tenant)
        print(f"submitted job {job}")
        for update in c.watch(job):
            state = pb.JobState.Name(update.job.state)
            what = pb.JobEventKind.Name(update.event.kind) if update.HasField("event") else ""
            print(f"  {state:<22} {what}")
        for chunk in c.logs(job):
            print(chunk.data.decode(errors="replace"), end="")


if __name__ == "__main__":
    main()
