#!/usr/bin/env bash
# Long fuzzing runs of every target (or those named), N seconds each.
#
#   scripts/fuzz.sh [--seconds N] [--target NAME]... [--stable]
#
# With cargo-fuzz and a nightly toolchain: libFuzzer with coverage feedback, debug assertions
# and overflow checks, starting from the seed corpus (written by the stable driver) and keeping
# what it finds in fuzz/corpus/<target>; crashes land in fuzz/artifacts/<target>.
# Otherwise (or with --stable): the stable driver in the `fuzz` profile with a fresh seed;
# findings land in target/fuzz-findings.
# See docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=600
targets=()
stable=0
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --seconds=*) seconds="${1#*=}"; shift ;;
    --target) targets+=("$2"); shift 2 ;;
    --target=*) targets+=("${1#*=}"); shift ;;
    --stable) stable=1; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done
case "$seconds" in ''|*[!0-9]*) echo "--seconds: '$seconds' is not a whole number of seconds" >&2; exit 2 ;; esac

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
driver=(cargo run --quiet --profile fuzz -p tessera-fuzz --)
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <("${driver[@]}" --list)
fi

have_cargo_fuzz() {
  cargo fuzz --version >/dev/null 2>&1 && cargo +nightly --version >/dev/null 2>&1
}

if [ "$stable" -eq 0 ] && have_cargo_fuzz; then
  echo "== cargo fuzz (nightly, libFuzzer): ${#targets[@]} targets, ${seconds} s each"
  seeds="$CARGO_TARGET_DIR/fuzz-seeds"
  target_args=()
  for t in "${targets[@]}"; do target_args+=(--target "$t"); done
  "${driver[@]}" --write-corpus "$seeds" "${target_args[@]}"
  failed=()
  for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    echo "== $t"
    # -a: debug assertions and overflow checks, as the stable driver's `fuzz` profile has.
    if ! (cd fuzz && cargo +nightly fuzz run -a "$t" "corpus/$t" "$seeds/$t" -- \
          -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1); then
      failed+=("$t")
    fi
  done
  if [ ${#failed[@]} -gt 0 ]; then
    echo "findings in: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    exit 1
  fi
  echo "no findings"
else
  if [ "$stable" -eq 0 ]; then
    echo "cargo-fuzz or a nightly toolchain is missing: running the stable driver instead"
  fi
  target_args=()
  for t in "${targets[@]}"; do target_args+=(--target "$t"); done
  exec "${driver[@]}" --seconds "$seconds" --seed "$(date +%s)" "${target_args[@]}"
fi
