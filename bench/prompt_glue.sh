#!/usr/bin/env bash
# The few-shot comparison of docs/PROMPTING.md (LM-BFF's and PET's): for each task, zero-shot,
# 16 examples per class with the prompt (LM head at the blank) and with a classification head,
# the prompt with demonstrations, and PET. Each run prints one JSON line; they are collected in
# out/prompt/<task>.jsonl. Takes about an hour and a half on 2 cores.
#
#   bench/prompt_glue.sh [build dir] [tasks...]     # defaults: build/pip, sst2 mrpc rte
set -euo pipefail
build=${1:-build/pip}
shift || true
tasks=("$@")
[ ${#tasks[@]} -gt 0 ] || tasks=(sst2 mrpc rte)
lm="$build/examples/peft-lm"
common=(--eval-max 200)
mkdir -p out/prompt
run() {  # task, then arguments
  local task=$1
  shift
  echo "[prompt_glue] $task $*" >&2
  "$lm" prompt --task "$task" "${common[@]}" "$@" | tee -a "out/prompt/$task.jsonl"
}
for t in "${tasks[@]}"; do
  run "$t" --shots 0
  run "$t" --seeds 5 --demos none
  run "$t" --seeds 5 --mode head
done
for t in "${tasks[@]}"; do run "$t" --seeds 5 --demos random; done
for t in "${tasks[@]}"; do run "$t" --seeds 2 --mode pet --unlabeled 300; done
