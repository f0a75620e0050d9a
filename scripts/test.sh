#!/usr/bin/env bash
# Installs whatever is missing, builds peft's tests and examples, and runs every test.
#   scripts/test.sh                  against the PyTorch 2.13.0 CPU wheel's LibTorch
#   scripts/test.sh --torch system   against Debian's libtorch-dev (1.13)
#   scripts/test.sh --sanitize       the tests of the readers, writers and training loop (see
#                                    PEFT_SANITIZE_TESTS below) under AddressSanitizer and
#                                    UndefinedBehaviorSanitizer, against the pip LibTorch
# Extra arguments go to ctest, e.g. scripts/test.sh -R lora
set -euo pipefail
source "$(dirname "$0")/common.sh"
sanitize=0
args=()
for a in "$@"; do
  if [[ "$a" == --sanitize ]]; then sanitize=1; else args+=("$a"); fi
done
peft_parse_torch "${args[@]+"${args[@]}"}"
peft_setup
mkdir -p "$PEFT_ROOT/build"
if [[ $sanitize == 1 ]]; then
  # The test executables whose code reads and writes files other people make or cannot afford to
  # lose, plus the training loop; the model and method tests and the programs on the real model
  # are left to the plain configuration (several times slower under the sanitizers, and their
  # code is the same tensor arithmetic LibTorch checks).
  PEFT_SANITIZE_TESTS="${PEFT_SANITIZE_TESTS:-peft_io_tests peft_text_tests peft_data_tests peft_train_tests peft_fuzz_replay}"
  build="$PEFT_ROOT/build/sanitize"
  peft_configure "$build" -DPEFT_SANITIZE=address,undefined -DPEFT_BUILD_EXAMPLES=OFF \
    -DPEFT_BUILD_BENCH=OFF -DPEFT_EXAMPLE_TESTS=OFF
  read -r -a targets <<<"$PEFT_SANITIZE_TESTS"
  peft_log "building $build (${targets[*]}) with -fsanitize=address,undefined"
  cmake --build "$build" -j "${PEFT_JOBS:-2}" --target "${targets[@]}"
  # LibTorch keeps allocations for the life of the process: leaks are not reported.
  export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
  labels="$(IFS='|'; echo "^(${targets[*]})\$")"
  ctest --test-dir "$build" --output-on-failure -j "${PEFT_JOBS:-2}" -L "$labels" "${PEFT_ARGS[@]+"${PEFT_ARGS[@]}"}"
  exit
fi
build="$PEFT_ROOT/build/$PEFT_TORCH"
peft_configure "$build"
peft_log "building $build"
cmake --build "$build" -j "${PEFT_JOBS:-2}"
ctest --test-dir "$build" --output-on-failure -j "${PEFT_JOBS:-2}" "${PEFT_ARGS[@]+"${PEFT_ARGS[@]}"}"
