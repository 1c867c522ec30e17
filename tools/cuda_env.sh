# shellcheck shell=bash
# Sourced by tools/setup_env.sh and tools/device_check.sh: where the CUDA toolkit is, whether a GPU is present, and
# the extension build that adds the CUDA kernels when one is (tests/test_setup_env.py runs it with a fake GPU).

# The toolkit: CUDA_HOME when set, else the folder above nvcc's real location (empty without nvcc). torch guesses
# it from nvcc's folder without resolving links, which for /usr/local/bin/nvcc -> /usr/local/cuda-X/bin/nvcc is
# /usr/local, where the link step then fails (`ld: cannot find -lcudart`). Where nvcc is a wrapper script (exec
# /usr/local/cuda-X/bin/nvcc "$@"), its folder has no toolkit beside it; nvcc names its real folder in a dry run.
cuda_home() {
  local nvcc home here
  if [ -n "${CUDA_HOME:-}" ]; then
    echo "$CUDA_HOME"
    return
  fi
  nvcc=$(command -v nvcc) || return 0
  home=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
  if [ ! -e "$home/include/cuda_runtime.h" ]; then
    here=$("$nvcc" --dryrun -c lt_recipes_probe.cu 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)
    if [ -n "$here" ]; then home=$(dirname "$here"); fi
  fi
  echo "$home"
}

# A GPU is present when nvidia-smi runs (it fails without a driver or a device).
gpu_present() {
  nvidia-smi >/dev/null 2>&1
}

# What a fresh build on this machine has: "cuda" (the CUDA kernels) with a GPU, "" without. The set-up's stamp ends
# with it, or with "cuda-failed:<toolkit>" after a CUDA build that failed with that toolkit (not retried until the
# inputs or the toolkit change).
cuda_stamp_fresh() {  # cuda_stamp_fresh STAMP_FILE INPUT_HASH: whether the build recorded there fits this machine
  local have
  have=$(cat "$1" 2>/dev/null) || return 1
  if gpu_present; then
    [ "$have" = "$2 cuda" ] || [ "$have" = "$2 cuda-failed:$(cuda_home)" ]
  else
    [ "$have" = "$2" ]
  fi
}

# build_extension LOG COMMAND...: run the extension build COMMAND with the CUDA kernels when a GPU is present
# (FORCE_CUDA=1, CUDA_HOME from cuda_home, its output in LOG); when that fails or there is no GPU, run it CPU-only
# (NO_CUDA=1). A failed CUDA build is one line, not a stop. Sets CUDA_BUILD to what cuda_stamp_fresh expects.
build_extension() {
  local log=$1 home
  shift
  CUDA_BUILD=""
  if gpu_present; then
    home=$(cuda_home)
    if [ -n "$home" ] && env CUDA_HOME="$home" FORCE_CUDA=1 "$@" >"$log" 2>&1; then
      CUDA_BUILD=cuda
      return 0
    fi
    CUDA_BUILD="cuda-failed:$home"
    echo "[setup] the CUDA kernels did not build (CUDA_HOME=${home:-not found: no nvcc on PATH}; log $log);" \
      "building CPU-only"
  fi
  env NO_CUDA=1 "$@"
}
