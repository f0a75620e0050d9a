#!/usr/bin/env bash
# Installs whatever is missing, builds the example programs and runs the main job.
set -euo pipefail
source "$(dirname "$0")/common.sh"
peft_parse_torch "$@"
peft_setup
build="$PEFT_ROOT/build/$PEFT_TORCH"
mkdir -p "$PEFT_ROOT/build"
peft_configure "$build"
peft_log "building the examples"
cmake --build "$build" -j "${PEFT_JOBS:-2}" --target peft_quickstart >/dev/null
"$build/examples/peft_quickstart" "${PEFT_ARGS[@]}"
