#!/usr/bin/env bash
# Fuzzes peft's file readers with libFuzzer (Debian's clang, AddressSanitizer and
# UndefinedBehaviorSanitizer) against the pip LibTorch, and prints what each target did.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 600; the targets (tests/fuzz/fuzz_readers.cpp) to all of
# safetensors gguf config adapter tokenizer glue clue checkpoint sharded. PEFT_FUZZ_JOBS targets
# run at once (default: the number of cores). Builds build/fuzz; the corpus each run grows is
# kept in build/fuzz/corpus/<target>/ and reused by the next run; inputs that break a reader are written
# to build/fuzz/findings/<target>/ (copy them to tests/fuzz/regressions/<target>/ once fixed, and
# the normal test suite replays them). Exits non-zero when a target found something.
set -euo pipefail
source "$(dirname "$0")/common.sh"
seconds="${1:-600}"
shift || true
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(safetensors gguf config adapter tokenizer glue clue checkpoint sharded)
[[ "$seconds" =~ ^[0-9]+$ ]] || { peft_log "SECONDS_PER_TARGET must be a whole number, got '$seconds'"; exit 2; }

PEFT_TORCH=pip
peft_setup
clang_version=19
peft_apt_install "clang-$clang_version" "libclang-rt-$clang_version-dev"
build="$PEFT_ROOT/build/fuzz"
mkdir -p "$PEFT_ROOT/build"
peft_configure "$build" -DCMAKE_CXX_COMPILER="clang++-$clang_version" -DPEFT_BUILD_FUZZ=ON \
  -DPEFT_BUILD_TESTS=OFF -DPEFT_BUILD_EXAMPLES=OFF -DPEFT_BUILD_BENCH=OFF -DPEFT_INSTALL=OFF
peft_log "building $build/tests/fuzz/peft_fuzz"
cmake --build "$build" --target peft_fuzz -j "${PEFT_JOBS:-2}"
fuzzer="$build/tests/fuzz/peft_fuzz"

# Seeds: peft's own writers (adapter, checkpoint, safetensors, the GLUE/CLUE samples) and
# tests/fuzz/make_seeds.py (GGUF, tokenizers, configs).
seeds="$build/seeds"
rm -rf "$seeds"
ASAN_OPTIONS=detect_leaks=0 PEFT_FUZZ_WRITE_SEEDS="$seeds" PEFT_FUZZ_DATA="$PEFT_ROOT/tests/data" \
  PEFT_FUZZ_TARGET=safetensors "$fuzzer"
"$(peft_python)" "$PEFT_ROOT/tests/fuzz/make_seeds.py" "$seeds"

# Leaks are not findings here: LibTorch keeps allocations for the life of the process.
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
jobs="${PEFT_FUZZ_JOBS:-$(nproc)}"
run_target() {
  local t="$1"
  mkdir -p "$build/corpus/$t" "$build/findings/$t" "$seeds/$t"
  # -malloc_limit_mb: a reader may not allocate far beyond what its input justifies (inputs are
  # at most -max_len bytes); -timeout: one input may not take more than 10 s.
  PEFT_FUZZ_TARGET="$t" "$fuzzer" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 \
    -malloc_limit_mb=512 -max_len=65536 -print_final_stats=1 \
    -artifact_prefix="$build/findings/$t/" "$build/corpus/$t" "$seeds/$t" \
    >"$build/$t.log" 2>&1 || true
}
peft_log "fuzzing ${#targets[@]} targets for $seconds s each, $jobs at a time (logs: $build/<target>.log)"
running=0
for t in "${targets[@]}"; do
  run_target "$t" &
  running=$((running + 1))
  if [[ $running -ge $jobs ]]; then
    wait -n
    running=$((running - 1))
  fi
done
wait

status=0
printf '%-12s %12s %10s %8s %9s\n' target executions exec/s corpus findings
for t in "${targets[@]}"; do
  log="$build/$t.log"
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  speed=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  corpus=$(find "$build/corpus/$t" -type f | wc -l)
  found=$(find "$build/findings/$t" -type f | wc -l)
  printf '%-12s %12s %10s %8s %9s\n' "$t" "${runs:-0}" "${speed:-0}" "$corpus" "$found"
  if [[ "$found" -gt 0 ]] || ! grep -q 'Done [0-9]* runs' "$log"; then
    status=1
    peft_log "$t: see $log"
  fi
done
exit $status
