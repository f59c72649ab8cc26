# Sourced by scripts/setup.sh, scripts/install-ollama.sh and the image build (image-pip): the one place that says
# which x86-64 CPU the native code we build (llama.cpp in llama-cpp-python, Ollama's cgo CPU backend) targets.
#
#   FTDEPLOY_CPU_TARGET=x86-64-v3   AVX, AVX2, FMA, F16C, BMI2: every x86-64 CPU since 2013-2015 (Haswell,
#                                   Excavator) and every cloud VM type. The default where this host has it.
#   FTDEPLOY_CPU_TARGET=x86-64      the x86-64 baseline (SSE2): any 64-bit x86 CPU, slower. The default elsewhere.
#   FTDEPLOY_CPU_TARGET=native      opt-in: everything this host's CPU claims (AVX-512, AMX, ...). Fastest here, and
#                                   the build dies with SIGILL on a CPU that lacks one of them, or on a VM that
#                                   advertises AMX it cannot execute (seen on a machine of this project's kind).
#
# Why a static target and not runtime dispatch: ggml can build one CPU library per x86-64 level
# (GGML_CPU_ALL_VARIANTS + GGML_BACKEND_DL) and pick the best at load time, but llama-cpp-python 0.3.36 installs only
# the single `ggml-cpu` target into llama_cpp/lib, and ggml_backend_load_all() searches the executable's folder
# (python's bin/) and the working directory, not the package's lib/: the variants would be built and never loaded.
#
# cpu_target                 -> prints the target (FTDEPLOY_CPU_TARGET, else x86-64-v3 where the host has it)
# llama_cmake_args TARGET    -> prints CMAKE_ARGS for llama-cpp-python's build of llama.cpp for TARGET
# cgo_march_flags TARGET     -> prints the C compiler flags for Ollama's cgo build for TARGET

# The flags that make x86-64-v3 (gcc's definition); FTDEPLOY_CPUINFO names another file to read (the tests use it).
_host_has_x86_64_v3() {
  local cpuinfo="${FTDEPLOY_CPUINFO:-/proc/cpuinfo}" cpu f
  [ "$(uname -m)" = x86_64 ] && [ -r "$cpuinfo" ] || return 1
  cpu=" $(grep -m 1 '^flags' "$cpuinfo" | cut -d: -f2) "
  for f in avx avx2 fma f16c bmi1 bmi2 movbe abm xsave; do
    case "$cpu" in *" $f "*) ;; *) return 1 ;; esac
  done
}

cpu_target() {
  if [ -n "${FTDEPLOY_CPU_TARGET:-}" ]; then
    case "$FTDEPLOY_CPU_TARGET" in
      x86-64-v3|x86-64|native) echo "$FTDEPLOY_CPU_TARGET" ;;
      *) echo "FTDEPLOY_CPU_TARGET=$FTDEPLOY_CPU_TARGET: expected x86-64-v3, x86-64 or native" >&2; return 1 ;;
    esac
  elif [ "$(uname -m)" != x86_64 ] || _host_has_x86_64_v3; then
    # Off x86-64 (an arm64 host) the target names do not apply; the builds use their own defaults there.
    echo x86-64-v3
  else
    echo x86-64
  fi
}

# Every ggml x86 switch named, so a newer ggml's changed defaults cannot add an instruction set silently.
_GGML_V3="SSE42 AVX AVX2 FMA F16C BMI2"
_GGML_BEYOND="AVX_VNNI AVX512 AVX512_VBMI AVX512_VNNI AVX512_BF16 AMX_TILE AMX_INT8 AMX_BF16"

llama_cmake_args() {
  local on="" off="$_GGML_BEYOND" args="-DGGML_NATIVE=OFF" f
  [ "$(uname -m)" = x86_64 ] || { echo ""; return; }
  case "$1" in
    native) echo "-DGGML_NATIVE=ON"; return ;;
    x86-64-v3) on="$_GGML_V3" ;;
    x86-64) off="$_GGML_V3 $_GGML_BEYOND" ;;
  esac
  for f in $on; do args="$args -DGGML_$f=ON"; done
  for f in $off; do args="$args -DGGML_$f=OFF"; done
  echo "$args"
}

cgo_march_flags() {
  [ "$(uname -m)" = x86_64 ] || { echo ""; return; }
  case "$1" in
    native) echo "-march=native" ;;
    x86-64-v3) echo "-march=x86-64-v3" ;;
    x86-64) echo "" ;;
  esac
}
