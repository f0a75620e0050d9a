#!/usr/bin/env bash
# Installs whatever is missing, builds peft-glue and peft-clue, fine-tunes the pretrained
# all-MiniLM-L6-v2 with LoRA on the bundled SST-2 sample (400 training and 100 dev sentences),
# then the converted multilingual-e5-small with LoRA on the bundled Chinese sample in
# ChnSentiCorp's layout (200 training and 50 dev reviews, written by examples/data/
# make_samples.py). Each run ends with its result as one line of JSON. Extra arguments go to
# peft-glue (e.g. --method bitfit). It takes about two minutes on two idle cores once built.
set -euo pipefail
source "$(dirname "$0")/common.sh"
peft_parse_torch "$@"
peft_setup
peft_setup_e5
build="$PEFT_ROOT/build/$PEFT_TORCH"
mkdir -p "$PEFT_ROOT/build"
peft_configure "$build"
peft_log "building peft-glue and peft-clue"
cmake --build "$build" -j "${PEFT_JOBS:-2}" --target peft-glue peft-clue >/dev/null
"$build/examples/peft-glue" --task sst2 --data-dir "$PEFT_ROOT/examples/data/sst2" \
  --epochs 3 --batch-size 16 --lr 1e-3 --max-len 64 --output "$build/demo-sst2" --overwrite \
  "${PEFT_ARGS[@]}"
peft_log "peft-clue on the bundled Chinese sample (multilingual-e5-small, converted from 4 bits)"
"$build/examples/peft-clue" --task chnsenticorp --data-dir "$PEFT_ROOT/examples/data/chnsenticorp" \
  --epochs 3 --output "$build/demo-chnsenticorp" --overwrite
