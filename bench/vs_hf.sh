#!/usr/bin/env bash
# peft (C++) against Hugging Face transformers + PEFT (Python) on all-MiniLM-L6-v2: the same
# training step (LoRA r 8 / alpha 16 on query,value; prefix 10; prompt 20; AdamW lr 1e-3) and the
# same merged-LoRA forward, from the same adapter files and the same random token ids.
#
#   bench/vs_hf.sh [--repeats N] [--configs 8x64,8x128,32x64,32x128] [--out results.jsonl]
#                  [--no-build]   (use build/pip/bench/peft-bench as it is)
#                  [--bench PATH]   (this peft-bench, as it is; implies --no-build)
#                  [--methods lora,prefix,prompt,infer-lora-merged]   (the default: all four)
#                  [--plot PNG]   (with --out: also draw bench/plot.py's figure)
#
# With --out, the end prints bench/vs_hf_table.py's Markdown table of the file (medians, spread,
# ratios, load): `bench/vs_hf.sh --repeats 5 --methods lora --out vs_hf.jsonl --plot
# docs/bench_vs_hf.png` regenerates docs/BENCHMARKS.md's current table and figure.
#                  [--full-last-layer]   (C++ runs BERT's last layer for every position, as Python
#                                         does; by default only for [CLS], the one position read)
#                  [--device cpu|cuda]   (cuda: both sides on the GPU; needs a CUDA build of torch,
#                                         whose LibTorch peft-bench is then built against)
#                  [--precision fp32|bf16|fp16]   (both sides autocast the forward: peft's
#                                         AutocastGuard and loss scale, torch.autocast and GradScaler)
#
# Installs what is missing (scripts/common.sh), builds peft-bench, then for each configuration and
# method runs C++ and Python alternately (who goes first alternates too), each in its own process
# with 2 intra-op threads, and prints one JSON line:
#   {"method","batch","seq","cpp_step_ms","hf_step_ms","ratio_time","cpp_peak_mb","hf_peak_mb",
#    "ratio_mem","cpp_trainable","hf_trainable", ...}
# (ratios are C++ / Python; step times are medians after warm-up). Before any number counts, both
# sides' first-step losses must agree within 1e-4 (2e-2 under bf16/fp16 autocast, whose products
# round to 8 or 11 significant bits in each library's own order); otherwise the script says so
# and exits 1.
# Dropout is off on both sides (eval mode), so the step is deterministic. Memory is each process's
# peak RSS on CPU and the CUDA caching allocator's peak allocated bytes with --device cuda.
set -euo pipefail
source "$(dirname "$0")/../scripts/common.sh"

repeats=1
configs=8x64,8x128,32x64,32x128
out=""
build_it=1
plot=""
bench=""
methods="lora prefix prompt infer-lora-merged"
cpp_extra=()
device=cpu
precision=fp32
while [[ $# -gt 0 ]]; do
  case "$1" in
    --repeats) repeats="$2"; shift 2 ;;
    --configs) configs="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --no-build) build_it=0; shift ;;
    --plot) plot="$2"; shift 2 ;;
    --bench) bench="$2"; build_it=0; shift 2 ;;
    --methods)
      methods="${2//,/ }"
      for m in $methods; do
        [[ "$m" =~ ^(lora|prefix|prompt|infer-lora-merged)$ ]] ||
          { peft_log "--methods: unknown method $m (lora, prefix, prompt, infer-lora-merged)"; exit 2; }
      done
      shift 2 ;;
    --full-last-layer) cpp_extra+=(--full-last-layer); shift ;;
    --device)
      device="$2"
      [[ "$device" == cpu || "$device" == cuda ]] || { peft_log "--device must be cpu or cuda"; exit 2; }
      shift 2 ;;
    --precision)
      precision="$2"
      [[ "$precision" =~ ^(fp32|bf16|fp16)$ ]] || { peft_log "--precision must be fp32, bf16 or fp16"; exit 2; }
      shift 2 ;;
    *) peft_log "unknown argument $1"; exit 2 ;;
  esac
done

PEFT_TORCH=pip
build="$PEFT_ROOT/build/pip"
[[ -n "$bench" ]] || bench="$build/bench/peft-bench"
if ((build_it)); then
  peft_setup
  mkdir -p "$PEFT_ROOT/build"
  # Several agents may share this machine; builds queue on one lock (harmless when alone).
  lock=(flock "${PEFT_BUILD_LOCK:-/tmp/peft-build.lock}")
  command -v flock >/dev/null || lock=()
  "${lock[@]}" bash -c "source '$PEFT_ROOT/scripts/common.sh'; PEFT_TORCH=pip; peft_configure '$build'"
  "${lock[@]}" cmake --build "$build" --target peft-bench >/dev/null
fi
[[ -x "$bench" ]] || { peft_log "$bench not found (run without --no-build)"; exit 1; }
python="$(peft_python)"
hf_step="$PEFT_ROOT/bench/hf_step.py"
if [[ "$device" == cuda ]]; then
  "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' ||
    { peft_log "--device cuda: Python's torch sees no CUDA device"; exit 1; }
fi

export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
export HF_HUB_DISABLE_PROGRESS_BARS=1 HF_HUB_OFFLINE=1
threads=2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
[[ -n "$out" ]] && : >"$out"

peft_log "writing inputs and adapters to $work"
"$python" "$hf_step" prepare --out "$work" --configs "$configs"

# Warm-up and timed steps per configuration: fewer where a step is long (three repeats of 8x64
# and 32x128 took 13 minutes on 2 quiet cores).
steps_for() {
  case "$1" in
    8x64) echo "2 10" ;;
    8x128) echo "2 6" ;;
    *) echo "1 4" ;;
  esac
}

# Merges one C++ and one Python JSON line into the comparison line; exits 3 when the first-step
# losses differ by more than the tolerance (1e-4; 2e-2 under autocast).
combine() {
  "$python" - "$@" <<'EOF'
import json, sys
method, cpp, hf, plain = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
precision, load1 = sys.argv[5], float(sys.argv[6])
tolerance = 1e-4 if precision == "fp32" else 2e-2
diff = abs(cpp["first_loss"] - hf["first_loss"])
line = {"method": method, "batch": cpp["batch"], "seq": cpp["seq"],
        "cpp_step_ms": round(cpp["step_ms"], 2), "hf_step_ms": round(hf["step_ms"], 2),
        "ratio_time": round(cpp["step_ms"] / hf["step_ms"], 3),
        "cpp_peak_mb": round(cpp["peak_mb"], 1), "hf_peak_mb": round(hf["peak_mb"], 1),
        "ratio_mem": round(cpp["peak_mb"] / hf["peak_mb"], 3),
        "cpp_trainable": cpp["trainable_params"], "hf_trainable": hf["trainable_params"],
        "cpp_base_mb": round(cpp["base_mb"], 1), "hf_base_mb": round(hf["base_mb"], 1),
        "first_loss_cpp": cpp["first_loss"], "first_loss_hf": hf["first_loss"],
        "loss_diff": diff, "cpp_last_layer": cpp.get("last_layer"), "device": cpp["device"],
        "precision": precision, "load1": load1}
if plain:
    plain = json.loads(plain)
    line["cpp_plain_step_ms"] = round(plain["step_ms"], 2)
    line["merged_vs_plain"] = round(cpp["step_ms"] / plain["step_ms"], 3)
print(json.dumps(line))
if not diff <= tolerance:
    print(f"[peft] {method} {cpp['batch']}x{cpp['seq']}: first-step losses differ: C++ "
          f"{cpp['first_loss']:.8f}, Python {hf['first_loss']:.8f} (|diff| {diff:.3g} > "
          f"{tolerance:g}, {precision})", file=sys.stderr)
    sys.exit(3)
EOF
}

failed=0
turn=0
for ((r = 0; r < repeats; ++r)); do
  for config in ${configs//,/ }; do
    read -r warmup steps <<<"$(steps_for "$config")"
    inputs="$work/inputs_$config.safetensors"
    for method in $methods; do
      case "$method" in
        infer-lora-merged) adapter="$work/adapter_lora" ;;
        *) adapter="$work/adapter_$method" ;;
      esac
      run_cpp() {
        "$bench" --method "$1" --inputs "$inputs" --init-adapter "$adapter" --threads "$threads" \
          --warmup "$warmup" --steps "$steps" --device "$device" --precision "$precision" \
          ${cpp_extra[@]+"${cpp_extra[@]}"}
      }
      run_hf() {
        "$python" "$hf_step" run --method "$method" --inputs "$inputs" --adapter "$adapter" \
          --threads "$threads" --warmup "$warmup" --steps "$steps" --device "$device" \
          --precision "$precision"
      }
      plain=""
      # The one-minute load average before the pair: how busy the machine was.
      read -r load1 _ </proc/loadavg
      if ((turn % 2 == 0)); then
        cpp="$(run_cpp "$method")"
        hf="$(run_hf)"
      else
        hf="$(run_hf)"
        cpp="$(run_cpp "$method")"
      fi
      # The plain model's forward, right after the merged one, for the merge-overhead ratio.
      [[ "$method" == infer-lora-merged ]] && plain="$(run_cpp infer-plain)"
      turn=$((turn + 1))
      if line="$(combine "$method" "$cpp" "$hf" "$plain" "$precision" "$load1")"; then
        echo "$line"
      else
        echo "$line"
        failed=1
      fi
      [[ -n "$out" ]] && echo "$line" >>"$out"
    done
  done
done
if ((failed)); then
  peft_log "FAILED: the two libraries did not compute the same first step (see above)"
  exit 1
fi
if [[ -n "$out" ]]; then
  "$python" "$PEFT_ROOT/bench/vs_hf_table.py" "$out"
  if [[ -n "$plot" ]]; then
    if "$python" -c 'import matplotlib' 2>/dev/null; then
      "$python" "$PEFT_ROOT/bench/plot.py" "$out" --out "$plot"
    else
      peft_log "--plot needs matplotlib (python3 -m pip install matplotlib); $out holds the data"
      exit 1
    fi
  fi
fi
