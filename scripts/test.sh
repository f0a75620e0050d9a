#!/usr/bin/env bash
# Installs whatever is missing, builds peft's tests and examples, and runs every test.
#   scripts/test.sh                  against the PyTorch 2.13.0 CPU wheel's LibTorch
#   scripts/test.sh --torch system   against Debian's libtorch-dev (1.13)
# Extra arguments go to ctest, e.g. scripts/test.sh -R lora
set -euo pipefail
source "$(dirname "$0")/common.sh"
peft_parse_torch "$@"
peft_setup
build="$PEFT_ROOT/build/$PEFT_TORCH"
mkdir -p "$PEFT_ROOT/build"
peft_configure "$build"
peft_log "building $build"
cmake --build "$build" -j "${PEFT_JOBS:-2}"
ctest --test-dir "$build" --output-on-failure -j "${PEFT_JOBS:-2}" "${PEFT_ARGS[@]}"
