#!/usr/bin/env bash
# Two builds of peft-bench side by side: the same LoRA training step, alternating which binary goes
# first, and the median step time and peak memory of each per size. For a change's effect on the
# C++ step alone (bench/vs_hf.sh compares against Python, whose own speed drifts run to run).
#
#   bench/ab.sh OLD_PEFT_BENCH NEW_PEFT_BENCH [--configs 32x128,8x128,32x64] [--repeats 4]
#               [--threads 2] [-- more peft-bench options, e.g. --method adapter]
#
# Build the old binary from a worktree of the commit before the change, e.g.
#   git worktree add /tmp/old HEAD~1 && cmake -S /tmp/old -B /tmp/old/build -G Ninja \
#     -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))') \
#     -DPEFT_BUILD_TESTS=OFF -DPEFT_BUILD_EXAMPLES=OFF && cmake --build /tmp/old/build --target peft-bench
set -euo pipefail
old=${1:?usage: bench/ab.sh OLD_PEFT_BENCH NEW_PEFT_BENCH [options]}
new=${2:?usage: bench/ab.sh OLD_PEFT_BENCH NEW_PEFT_BENCH [options]}
shift 2
configs=32x128,8x128,32x64
repeats=4
threads=2
extra=(--method lora)
while [[ $# -gt 0 ]]; do
  case "$1" in
    --configs) configs="$2"; shift 2 ;;
    --repeats) repeats="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "bench/ab.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
for bin in "$old" "$new"; do
  [[ -x "$bin" ]] || { echo "bench/ab.sh: $bin is not an executable" >&2; exit 2; }
done
results=$(mktemp)
trap 'rm -f "$results"' EXIT
for config in ${configs//,/ }; do
  batch=${config%x*}
  seq=${config#*x}
  for ((r = 1; r <= repeats; r++)); do
    order=(old new)
    ((r % 2 == 0)) && order=(new old)
    for side in "${order[@]}"; do
      bin=$old
      [[ $side == new ]] && bin=$new
      line=$("$bin" "${extra[@]}" --batch "$batch" --seq "$seq" --threads "$threads" \
        --warmup 2 --steps 5 | tail -n 1)
      echo "$config $side $line" >>"$results"
      echo "$config repeat $r $side: $line" >&2
    done
  done
done
python3 - "$results" <<'EOF'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    config, side, result = line.split(" ", 2)
    r = json.loads(result)
    rows.setdefault(config, {}).setdefault(side, []).append((r["step_ms"], r["peak_mb"]))
print("| batch×seq | old ms, median (min–max) | new ms, median (min–max) | new/old | old peak MiB | new peak MiB |")
print("|---|---|---|---|---|---|")
for config, sides in rows.items():
    o = [t for t, _ in sides["old"]]
    n = [t for t, _ in sides["new"]]
    mo, mn = statistics.median(o), statistics.median(n)
    print(f"| {config} | {mo:.0f} ({min(o):.0f}–{max(o):.0f}) | {mn:.0f} ({min(n):.0f}–{max(n):.0f}) | "
          f"**{mn / mo:.3f}** | {statistics.median(p for _, p in sides['old']):.0f} | "
          f"{statistics.median(p for _, p in sides['new']):.0f} |")
EOF
