#!/usr/bin/env bash
# P7: RSS and CPU of one agent with 8 simulated GPUs at 1 Hz telemetry, idle and with a shard
# running, against a one-server cluster on loopback. Usage: benches/scripts/agent-footprint.sh [SECONDS]
# Needs the release binary: cargo build --release -p tessera
set -euo pipefail
secs=${1:-60}
bin=$(dirname "$0")/../../target/release/tessera
dir=$(mktemp -d)
sport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
hport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin" server --id 1 --listen 127.0.0.1:$sport --data-dir "$dir/s1" --initial-cluster 1=127.0.0.1:$sport >"$dir/server.log" 2>&1 &
server=$!
"$bin" agent --name footprint --servers 127.0.0.1:$sport --simulate-gpus 8xH100-80GB --work-dir "$dir/agent" --http 127.0.0.1:$hport >"$dir/agent.log" 2>&1 &
agent=$!
trap 'kill -9 $agent $server 2>/dev/null; rm -rf "$dir"' EXIT
sleep 3
ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' /proc/$agent/stat; }
c0=$(cpu); t0=$(date +%s.%N)
sleep "$secs"
c1=$(cpu); t1=$(date +%s.%N)
rss=$(awk '/VmRSS/ {print $2}' /proc/$agent/status)
hwm=$(awk '/VmHWM/ {print $2}' /proc/$agent/status)
python3 - "$c0" "$c1" "$t0" "$t1" "$ticks" "$rss" "$hwm" <<'PY'
import sys
c0, c1, t0, t1, ticks, rss, hwm = map(float, sys.argv[1:])
cpu = (c1 - c0) / ticks / (t1 - t0) * 100
print(f"agent, 8 simulated GPUs, 1 Hz, {t1-t0:.0f} s: CPU {cpu:.3f}% of one core, RSS {rss/1024:.1f} MiB (peak {hwm/1024:.1f} MiB)")
PY
curl -s 127.0.0.1:$hport/metrics | grep -c '^DCGM_FI_DEV_GPU_UTIL{' | sed 's/^/GPU_UTIL series exported: /'
