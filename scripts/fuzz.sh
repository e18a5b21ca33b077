#!/usr/bin/env bash
# Long fuzzing runs of every target (or those named), N seconds each.
#
#   scripts/fuzz.sh [--seconds N] [--target NAME]... [--stable]
#
# With a nightly toolchain: libFuzzer with coverage feedback, debug assertions and overflow
# checks, starting from the seed corpus (written by the stable driver) and keeping what it finds
# in fuzz/corpus/<target>; crashes land in fuzz/artifacts/<target>. It runs through cargo-fuzz
# when that is installed, and otherwise builds the fuzz/ targets itself with the same flags.
# Without nightly (or with --stable): the stable driver in the `fuzz` profile with a fresh seed;
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
    -h|--help) sed -n '2,/^set /p' "$0" | grep '^#'; exit 0 ;;
    *) echo "unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done
case "$seconds" in ''|*[!0-9]*) echo "--seconds: '$seconds' is not a whole number of seconds" >&2; exit 2 ;; esac

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
driver=(cargo run --quiet --profile fuzz -p tessera-fuzz --)
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <("${driver[@]}" --list)
fi

have_nightly() { cargo +nightly --version >/dev/null 2>&1; }
have_cargo_fuzz() { cargo fuzz --version >/dev/null 2>&1; }

if [ "$stable" -eq 0 ] && have_nightly; then
  # The same dependency versions as the workspace (fuzz/ is a workspace of its own).
  [ -f fuzz/Cargo.lock ] || cp Cargo.lock fuzz/Cargo.lock
  seeds="$CARGO_TARGET_DIR/fuzz-seeds"
  target_args=()
  for t in "${targets[@]}"; do target_args+=(--target "$t"); done
  "${driver[@]}" --write-corpus "$seeds" "${target_args[@]}"
  libfuzzer_args=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1)
  if ! have_cargo_fuzz; then
    # cargo-fuzz's build, by hand: coverage instrumentation for the fuzzed code only (the
    # explicit --target keeps build scripts and proc macros out of it), no sanitizer.
    echo "== cargo-fuzz is missing: building the fuzz/ targets with nightly directly"
    triple="$(rustc +nightly -vV | sed -n 's/^host: //p')"
    (cd fuzz && RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
      -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
      -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
      cargo +nightly build --release --bins --target "$triple")
  fi
  echo "== libFuzzer: ${#targets[@]} targets, ${seconds} s each"
  failed=()
  for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    echo "== $t"
    if have_cargo_fuzz; then
      # -a: debug assertions and overflow checks, as the stable driver's `fuzz` profile has.
      (cd fuzz && cargo +nightly fuzz run -a "$t" "corpus/$t" "$seeds/$t" -- "${libfuzzer_args[@]}") || failed+=("$t")
    else
      "$CARGO_TARGET_DIR/$triple/release/$t" "${libfuzzer_args[@]}" -artifact_prefix="fuzz/artifacts/$t/" \
        "fuzz/corpus/$t" "$seeds/$t" || failed+=("$t")
    fi
  done
  if [ ${#failed[@]} -gt 0 ]; then
    echo "findings in: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    exit 1
  fi
  echo "no findings"
else
  if [ "$stable" -eq 0 ]; then
    echo "no nightly toolchain: running the stable driver instead"
  fi
  target_args=()
  for t in "${targets[@]}"; do target_args+=(--target "$t"); done
  exec "${driver[@]}" --seconds "$seconds" --seed "$(date +%s)" "${target_args[@]}"
fi
