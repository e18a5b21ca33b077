#!/usr/bin/env bash
# Recovery times of the failure scenarios (docs/failure-handling.md): runs the end-to-end
# failure tests RUNS times, one test at a time, and prints the median, min and max of each
# scenario's recovery time. Each test prints "RECOVERY <scenario> <milliseconds>".
#
#   bash benches/scripts/recovery.sh [RUNS]      (default 5)
set -euo pipefail
cd "$(dirname "$0")/../.."
runs="${1:-5}"
tests=(
  a_killed_agent_s_shard_resumes_elsewhere_from_its_checkpoint
  an_agent_cut_off_without_a_fin_stops_its_shard_before_it_runs_elsewhere
  shards_keep_running_through_a_leader_change
  one_failed_rank_restarts_its_gang_in_place_from_the_checkpoint
  a_higher_priority_job_preempts_the_one_that_loses_least_and_the_victim_resumes
  aws_metadata_places_the_node_and_a_spot_notice_moves_its_shard
  an_xid_on_a_simulated_gpu_moves_the_shard_off_it_until_cleared
  a_drain_moves_long_shards_from_their_checkpoint_and_lets_short_ones_finish
)
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
cargo build -q -p tessera
for i in $(seq "$runs"); do
  for t in "${tests[@]}"; do
    cargo test -q -p tessera-tests --test integration -- --exact "agent_e2e::$t" --nocapture --test-threads 1 2>&1 \
      | grep '^RECOVERY' >>"$out" || { echo "run $i: $t failed or printed no time" >&2; exit 1; }
  done
done
python3 - "$out" "$runs" <<'PY'
import statistics, sys
times = {}
for line in open(sys.argv[1]):
    _, scenario, ms = line.split()
    times.setdefault(scenario, []).append(int(ms))
print(f"{'scenario':<16} {'runs':>4} {'median s':>9} {'min s':>7} {'max s':>7}")
for s, v in times.items():
    print(f"{s:<16} {len(v):>4} {statistics.median(v)/1000:>9.2f} {min(v)/1000:>7.2f} {max(v)/1000:>7.2f}")
PY
