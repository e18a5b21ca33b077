#!/usr/bin/env bash
# Faults across hosts, Jepsen style: brings up the compose cluster of deploy/compose under a
# project of its own (tessera-nemesis-PID, free host ports), runs a client workload from this
# host while a nemesis injects faults in a seeded random order (kill -9 of a server and of the
# leader, the leader partitioned from the other servers, an agent partitioned from every server,
# a server and an agent frozen for 8 s, an agent host restarted with its disk wiped), heals
# everything, waits for every job to end, and checks what the cluster acknowledged
# (docs/nemesis.md). Exits 0 when the checker found no violation, 1 when it found one, 3 when the
# images cannot be built without reaching outside the machine (build.sh --offline), 2 on bad
# usage. The cluster is always removed (`down -v`), also on failure or Ctrl-C.
#
# Usage: deploy/nemesis/run.sh [--minutes N] [--seed S] [--bin PATH] [--image IMAGE] [--out DIR]
#                              [--drain-timeout S]
#   --minutes N   how long faults are injected (default 5; fractions allowed).
#   --seed S      the seed of the fault order, the faults' targets and the workload (default:
#                 random, printed); the same seed deals the same kinds in the same order (which
#                 server leads, and so the server targets, varies).
#   --bin PATH    the binary to build the image from (default target/debug/tessera, else
#                 target/release/tessera); the image is tessera-nemesis:PID, removed at exit.
#   --image IMAGE use this image as it is instead of building one (e.g. tessera:dev).
#   --out DIR     where the record goes (default target/nemesis/PROJECT): acked.jsonl (every
#                 acknowledged submission, key -> id), faults.jsonl, observations, report.txt
#                 and the services' logs.
#   --drain-timeout S  how long every job may take to end once the faults are over (default
#                 180); a job still running then is a violation.
# Needs: docker, docker-compose (or `docker compose`), nsenter and iptables on this host (the
# partitions are iptables rules in a container's network namespace), and a Python with
# tessera_client and grpc (TESSERA_CLIENT_PYTHON, default target/pyclient-venv/bin/python).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET" in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
MINUTES=5
SEED=${TESSERA_NEMESIS_SEED:-$(( (RANDOM << 15) | RANDOM ))}
BIN=""
IMAGE=""
OUT=""
DRAIN=180
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) MINUTES=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    --image) IMAGE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --drain-timeout) DRAIN=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument '$1' (--help lists them)" >&2; exit 2 ;;
  esac
done

say() { echo "== $(date +%H:%M:%S) $*" >&2; }
die() { echo "run.sh: $*" >&2; exit 1; }

PY=${TESSERA_CLIENT_PYTHON:-$TARGET/pyclient-venv/bin/python}
[ -x "$PY" ] || PY=$ROOT/target/pyclient-venv/bin/python
[ -x "$PY" ] || die "no Python with tessera_client (TESSERA_CLIENT_PYTHON, or target/pyclient-venv)"
"$PY" -c 'import tessera_client, grpc' 2>/dev/null || die "$PY lacks tessera_client or grpc"
command -v docker >/dev/null || die "docker not found"
docker info >/dev/null 2>&1 || die "the docker engine does not answer (docker info)"
if docker-compose version >/dev/null 2>&1; then
  COMPOSE=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
else
  die "neither docker-compose nor docker compose is installed"
fi
command -v nsenter >/dev/null && command -v iptables >/dev/null ||
  die "the partitions need nsenter and iptables on this host"

# What a run killed before its trap could act (SIGKILL) left: projects whose process is gone.
for p in $( (docker ps -a --format '{{.Label "com.docker.compose.project"}}'
  docker volume ls --format '{{.Label "com.docker.compose.project"}}') | sort -u | grep '^tessera-nemesis-' || true); do
  if [ ! -e "/proc/${p#tessera-nemesis-}" ]; then
    echo "run.sh: removing $p, left behind by a run that was killed" >&2
    for c in $(docker ps -q --filter "label=com.docker.compose.project=$p" --filter status=paused); do docker unpause "$c" >/dev/null 2>&1 || true; done
    "${COMPOSE[@]}" -p "$p" -f "$ROOT/deploy/compose/compose.yaml" down -v --remove-orphans --timeout 1 >/dev/null 2>&1 || true
    docker rmi -f "tessera-nemesis:${p#tessera-nemesis-}" >/dev/null 2>&1 || true
  fi
done

PROJECT=tessera-nemesis-$$
FILE=$ROOT/deploy/compose/compose.yaml
OUT=${OUT:-$TARGET/nemesis/$PROJECT}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUILT=""

# Always: thaw what is frozen (a paused container cannot be stopped), keep the services' logs,
# remove containers, network and volumes, and the image if this run built it.
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [ -n "${UP:-}" ]; then
    for c in $(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" --filter status=paused); do
      docker unpause "$c" >/dev/null 2>&1
    done
    "${COMPOSE[@]}" -p "$PROJECT" -f "$FILE" logs --no-color --timestamps >"$OUT/services.log" 2>&1
    "${COMPOSE[@]}" -p "$PROJECT" -f "$FILE" down -v --remove-orphans --timeout 2 >/dev/null 2>&1 ||
      echo "run.sh: down -v of $PROJECT failed" >&2
  fi
  [ -n "$BUILT" ] && docker rmi -f "$BUILT" >/dev/null 2>&1
  say "cluster $PROJECT removed; record in $OUT"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -z "$IMAGE" ]; then
  if [ -z "$BIN" ]; then
    BIN=$TARGET/debug/tessera
    [ -x "$BIN" ] || BIN=$TARGET/release/tessera
  fi
  [ -x "$BIN" ] || die "no binary at $BIN (--bin PATH, or cargo build -p tessera)"
  IMAGE=tessera-nemesis:$$
  t=$(date +%s)
  rc=0
  CARGO_TARGET_DIR=$TARGET bash "$ROOT/deploy/docker/build.sh" --offline --bin "$BIN" --tag "$IMAGE" \
    >"$OUT/build.log" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then
    cat "$OUT/build.log" >&2
    exit "$rc"
  fi
  BUILT=$IMAGE
  say "image $IMAGE built in $(( $(date +%s) - t )) s"
fi
CLI=${TESSERA_CLI:-${BIN:-$TARGET/debug/tessera}}
[ -x "$CLI" ] || CLI=$(command -v tessera || true)
[ -x "$CLI" ] || die "no tessera binary on this host for the CLI (--bin PATH or TESSERA_CLI)"

read -r P1 P2 P3 PUI PS3 < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
for s in socks:
    s.close()')
export TESSERA_IMAGE=$IMAGE TESSERA_PORT_1=$P1 TESSERA_PORT_2=$P2 TESSERA_PORT_3=$P3 \
  TESSERA_UI_PORT=$PUI TESSERA_S3_PORT=$PS3

say "seed $SEED, $MINUTES min of faults; project $PROJECT, servers on 127.0.0.1:$P1,$P2,$P3"
UP=1
"${COMPOSE[@]}" -p "$PROJECT" -f "$FILE" up -d >"$OUT/up.log" 2>&1 || { cat "$OUT/up.log" >&2; die "up -d failed"; }

# The admin's certificate, out of the certs volume (as README.md shows).
mkdir -p "$OUT/certs"
S1=$("${COMPOSE[@]}" -p "$PROJECT" -f "$FILE" ps -q server-1)
for f in ca.pem user-admin.pem user-admin-key.pem; do
  docker cp "$S1:/etc/tessera/certs/$f" "$OUT/certs/$f" >/dev/null
done

rc=0
"$PY" "$ROOT/deploy/nemesis/nemesis.py" \
  --project "$PROJECT" --compose-file "$FILE" --compose "${COMPOSE[*]}" --cli "$CLI" \
  --servers "127.0.0.1:$P1,127.0.0.1:$P2,127.0.0.1:$P3" --certs "$OUT/certs" \
  --minutes "$MINUTES" --seed "$SEED" --out "$OUT" --drain-timeout "$DRAIN" || rc=$?
exit "$rc"
