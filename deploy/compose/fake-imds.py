#!/usr/bin/env python3
"""A stand-in for a cloud's instance metadata service, for agents in containers.

`tessera agent --cloud aws|azure` learns its region, zone, instance type and spot status from
the cloud's metadata service, and polls it for spot notices. In deploy/compose each agent's
container runs this next to it on 127.0.0.1 and passes `--metadata-endpoint`, so a laptop
fleet looks like AWS and Azure hosts without anything leaving the machine. Standard library
only. It answers what the agent asks, in the shapes of the real services:

- AWS IMDSv2: PUT /latest/api/token, then GET /latest/meta-data/{instance-type,
  placement/region, placement/availability-zone, instance-id, instance-life-cycle,
  spot/instance-action} with the token (401 without it; instance-action 404 until a notice).
- Azure: GET /metadata/instance and /metadata/scheduledevents with `Metadata: true` (400
  without it); POST to the latter acknowledges an event.

POST /fake/notice?seconds=N (from inside the container) raises a spot notice N seconds ahead
(default 120): an AWS instance-action `terminate`, or an Azure `Preempt` event.

  python3 fake-imds.py --cloud aws --region us-east-1 --zone us-east-1a \
      --instance-type p5.48xlarge [--spot] [--listen 127.0.0.1:8169]
"""

import argparse
import email.utils
import json
import secrets
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class State:
    def __init__(self, args):
        self.args = args
        self.instance_id = args.instance_id or (
            "i-" + secrets.token_hex(8) if args.cloud == "aws" else str(uuid.uuid4())
        )
        self.tokens = set()
        self.notice_at = None  # Unix seconds of the pending notice's deadline
        self.event_id = None
        self.lock = threading.Lock()


def make_handler(state):
    a = state.args

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet: the agent polls every second
            pass

        def reply(self, status, body=b"", ctype="text/plain", headers=()):
            if isinstance(body, str):
                body = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def body(self):
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(min(n, 65536)) if n else b""

        def do_PUT(self):
            self.body()
            if a.cloud == "aws" and urlsplit(self.path).path == "/latest/api/token":
                ttl = self.headers.get("x-aws-ec2-metadata-token-ttl-seconds")
                if not ttl or not ttl.isdigit():
                    return self.reply(400, "missing or bad x-aws-ec2-metadata-token-ttl-seconds")
                token = secrets.token_urlsafe(32)
                with state.lock:
                    state.tokens.add(token)
                return self.reply(200, token, headers=[("x-aws-ec2-metadata-token-ttl-seconds", ttl)])
            self.reply(404, "not found")

        def do_GET(self):
            url = urlsplit(self.path)
            if a.cloud == "aws":
                return self.aws_get(url.path)
            return self.azure(url.path, None)

        def do_POST(self):
            url = urlsplit(self.path)
            body = self.body()
            if url.path == "/fake/notice":
                seconds = int(parse_qs(url.query).get("seconds", ["120"])[0])
                with state.lock:
                    state.notice_at = time.time() + seconds
                    state.event_id = str(uuid.uuid4())
                return self.reply(200, f"notice raised: {seconds} s ahead\n")
            if a.cloud == "azure":
                return self.azure(url.path, body)
            self.reply(404, "not found")

        def aws_get(self, path):
            with state.lock:
                if self.headers.get("x-aws-ec2-metadata-token") not in state.tokens:
                    return self.reply(401, "")
                notice_at = state.notice_at
            values = {
                "/latest/meta-data/instance-type": a.instance_type,
                "/latest/meta-data/placement/region": a.region,
                "/latest/meta-data/placement/availability-zone": a.zone,
                "/latest/meta-data/instance-id": state.instance_id,
                "/latest/meta-data/instance-life-cycle": "spot" if a.spot else "on-demand",
            }
            if path in values:
                return self.reply(200, values[path])
            if path == "/latest/meta-data/spot/instance-action" and notice_at is not None:
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(notice_at))
                return self.reply(200, json.dumps({"action": "terminate", "time": when}), "application/json")
            self.reply(404, "not found")

        def azure(self, path, body):
            if (self.headers.get("Metadata") or "").lower() != "true":
                return self.reply(400, json.dumps({"error": "Bad request: Metadata header"}), "application/json")
            if path == "/metadata/instance" and body is None:
                compute = {
                    "location": a.region,
                    "zone": a.zone,
                    "vmSize": a.instance_type,
                    "priority": "Spot" if a.spot else "Regular",
                    "vmId": state.instance_id,
                }
                return self.reply(200, json.dumps({"compute": compute}), "application/json")
            if path == "/metadata/scheduledevents":
                if body is not None:  # an acknowledgement: the event may start now
                    return self.reply(200, "")
                events = []
                with state.lock:
                    if state.notice_at is not None:
                        events.append(
                            {
                                "EventId": state.event_id,
                                "EventType": "Preempt",
                                "ResourceType": "VirtualMachine",
                                "Resources": [a.instance_type],
                                "EventStatus": "Scheduled",
                                "NotBefore": email.utils.formatdate(state.notice_at, usegmt=True),
                                "Description": "fake-imds spot eviction",
                                "EventSource": "Platform",
                            }
                        )
                return self.reply(200, json.dumps({"DocumentIncarnation": len(events), "Events": events}), "application/json")
            self.reply(404, json.dumps({"error": "not found"}), "application/json")

    return Handler


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cloud", choices=["aws", "azure"], required=True)
    p.add_argument("--region", required=True, help="us-east-1, eastus, ...")
    p.add_argument("--zone", default="", help="AWS: us-east-1a (default: REGION + a); Azure: 1, 2, 3 or empty")
    p.add_argument("--instance-type", required=True, help="p5.48xlarge, Standard_ND96isr_H100_v5, ...")
    p.add_argument("--instance-id", default="", help="default: a random one")
    p.add_argument("--spot", action="store_true", help="spot (AWS) or Spot priority (Azure) capacity")
    p.add_argument("--listen", default="127.0.0.1:8169", help="HOST:PORT (default 127.0.0.1:8169)")
    args = p.parse_args()
    if args.cloud == "aws" and not args.zone:
        args.zone = args.region + "a"
    host, port = args.listen.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), make_handler(State(args)))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
