#!/usr/bin/env bash
# Data-parallel training on this machine: the same peft-glue SST-2 run as 1 process x 2 threads
# and as 2 processes x 1 thread (--nproc 2, Gloo on the loopback address), for LoRA, a
# bottleneck adapter and full fine-tuning. Prints training seconds, the gradient bytes each step
# reduces and the share of time spent in reductions (docs/DISTRIBUTED.md has the results).
#
#   bench/distributed.sh [BUILD_DIR]        (default build/pip; needs ../shared/data/glue/SST-2
#                                            or PEFT_GLUE_DIR)
# Environment: ROWS (train rows, default 1024), REPEATS (default 2; the faster run is kept).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build/pip}"
glue="${PEFT_GLUE_DIR:-$root/../shared/data/glue}"
rows="${ROWS:-1024}"
repeats="${REPEATS:-2}"
out="$root/out/distributed"
mkdir -p "$out"
program="$build/examples/peft-glue"
[[ -x "$program" ]] || { echo "build $program first (scripts/test.sh)" >&2; exit 1; }

common=(--task sst2 --data-dir "$glue" --max-train-samples "$rows" --max-eval-samples 64
  --batch-size 32 --max-len 64 --epochs 1 --seed 1)
printf '%-8s %-12s %10s %14s %16s %12s\n' method layout train_s speedup bytes/step reduce_share
for method in lora adapter full; do
  declare -A best=()
  for layout in "1x2" "2x1"; do
    best[$layout]=""
    for ((i = 0; i < repeats; i++)); do
      log="$out/$method-$layout-$i.log"
      if [[ $layout == 1x2 ]]; then
        "$program" "${common[@]}" --method "$method" --threads 2 >"$log" 2>&1
      else
        "$program" "${common[@]}" --method "$method" --nproc 2 >"$log" 2>&1
      fi
      s=$(tail -1 "$log" | python3 -c 'import json,sys; print(json.load(sys.stdin)["train_seconds"])')
      if [[ -z "${best[$layout]}" ]] || python3 -c "import sys; sys.exit(0 if $s < ${best[$layout]} else 1)"; then
        best[$layout]=$s
        cp "$log" "$out/$method-$layout.log"
      fi
    done
  done
  bytes=$(grep -o '[0-9]* bytes reduced per step' "$out/$method-2x1.log" | grep -o '^[0-9]*' || echo "-")
  share=$(grep -o '([0-9.]* %)' "$out/$method-2x1.log" | tail -1 | tr -d '()' || echo "-")
  speedup=$(python3 -c "print(f'{${best[1x2]} / ${best[2x1]}:.2f}x')")
  printf '%-8s %-12s %10s %14s %16s %12s\n' "$method" "1 proc x 2" "${best[1x2]}" "1.00x" "-" "-"
  printf '%-8s %-12s %10s %14s %16s %12s\n' "$method" "2 proc x 1" "${best[2x1]}" "$speedup" "$bytes" "$share"
done
