#!/usr/bin/env bash
# Installs whatever is missing, builds peft-glue and fine-tunes the pretrained all-MiniLM-L6-v2
# with LoRA on the bundled SST-2 sample (400 training and 100 dev sentences). The last line
# printed is the result as JSON. Extra arguments go to peft-glue (e.g. --method bitfit).
# It takes about a minute on two idle cores once built.
set -euo pipefail
source "$(dirname "$0")/common.sh"
peft_parse_torch "$@"
peft_setup
build="$PEFT_ROOT/build/$PEFT_TORCH"
mkdir -p "$PEFT_ROOT/build"
peft_configure "$build"
peft_log "building peft-glue"
cmake --build "$build" -j "${PEFT_JOBS:-2}" --target peft-glue >/dev/null
"$build/examples/peft-glue" --task sst2 --data-dir "$PEFT_ROOT/examples/data/sst2" \
  --epochs 3 --batch-size 16 --lr 1e-3 --max-len 64 --output "$build/demo-sst2" --overwrite \
  "${PEFT_ARGS[@]}"
