#!/usr/bin/env bash
# Build the pinned Ollama release from its Go module and cache the binary.
#   scripts/install-ollama.sh            -> prints the path of the ollama binary
# The version is pinned here (0.17.1+ fixes CVE-2026-7482, a GGUF out-of-bounds read).
# Override with OLLAMA_VERSION; the cache lives in FTDEPLOY_CACHE (default ~/.cache/ftdeploy).
set -euo pipefail

OLLAMA_VERSION="${OLLAMA_VERSION:-v0.17.4}"
cache="${FTDEPLOY_CACHE:-$HOME/.cache/ftdeploy}/ollama/${OLLAMA_VERSION}"
bin="$cache/ollama"

# cgo compiles Ollama's CPU backend (ggml) once, with the compiler flags it is given. Ollama's own releases ship one
# CPU library per x86-64 level and load the best the CPU has; a `go build` gets one, and with no -march that is
# baseline x86-64 (SSE2): the demo model then generates 5-7x slower (docs/benchmarks.md, "Verify"). So build for the
# stated target of scripts/lib-cpu.sh: x86-64-v3 (AVX2, FMA, F16C, BMI2) where this host has it, else the baseline;
# never -march=native unless FTDEPLOY_CPU_TARGET=native asks for it. OLLAMA_CPU_FLAGS overrides the flags; set it
# empty for a binary that runs on any x86-64 CPU. The flags are stamped next to the binary, and a binary built with
# other flags is rebuilt. FTDEPLOY_CPUINFO names another file to read the CPU flags from (the tests use it).
. "$(dirname "$0")/lib-cpu.sh"
if [ -z "${OLLAMA_CPU_FLAGS+set}" ]; then
  target="$(cpu_target)"  # on a line of its own: a bad FTDEPLOY_CPU_TARGET stops the script here
  OLLAMA_CPU_FLAGS="$(cgo_march_flags "$target")"
fi
stamp="$cache/cpu-flags"

# The symbol table stays in the binary (-w drops only DWARF): the instruction scan (tests/integration/
# test_portable_builds.py) tells Go's runtime, whose AVX-512 code runs behind Go's own CPU checks, from the cgo code
# by it. A cached binary without one (built before) is rebuilt.
if [ -x "$bin" ] && "$bin" --version 2>&1 | grep -q "${OLLAMA_VERSION#v}" \
   && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$OLLAMA_CPU_FLAGS" ] \
   && { ! readelf -h "$bin" >/dev/null 2>&1 || readelf -S "$bin" | grep -q '\.symtab'; }; then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { echo "install-ollama: Go is required to build Ollama ${OLLAMA_VERSION} (https://go.dev/dl)" >&2; exit 1; }
command -v gcc >/dev/null || { echo "install-ollama: a C/C++ compiler (gcc, g++) is required: cgo compiles Ollama's CPU backend" >&2; exit 1; }

# Go module zips drop every vendor/ folder, so the headers llama.cpp vendors must come from
# elsewhere: nlohmann-json and stb from Debian's packages, miniaudio from its PyPI sdist.
inc="$cache/include"
if [ ! -f /usr/include/nlohmann/json.hpp ] || [ ! -f /usr/include/stb/stb_image.h ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "install-ollama: installing nlohmann-json3-dev and libstb-dev" >&2
    (apt-get install -y -qq nlohmann-json3-dev libstb-dev || { apt-get update -qq && apt-get install -y -qq nlohmann-json3-dev libstb-dev; }) >&2
  else
    echo "install-ollama: missing C++ headers: install nlohmann-json3-dev and libstb-dev (Debian/Ubuntu package names)" >&2
    exit 1
  fi
fi
if [ ! -f "$inc/miniaudio/miniaudio.h" ]; then
  dl="$(mktemp -d)"
  python3 -m pip download -q --no-deps --no-binary :all: "miniaudio==1.71" -d "$dl" >&2
  tar -xzf "$dl"/miniaudio-*.tar.gz -C "$dl"
  mkdir -p "$inc/miniaudio"
  cp "$(find "$dl" -name miniaudio.h | head -n 1)" "$inc/miniaudio/miniaudio.h"
  rm -rf "$dl"
fi
export CGO_CPPFLAGS="${CGO_CPPFLAGS:-} -I$inc"
export CGO_CFLAGS="-O3 $OLLAMA_CPU_FLAGS" CGO_CXXFLAGS="-O3 $OLLAMA_CPU_FLAGS"

echo "install-ollama: building ollama ${OLLAMA_VERSION} from its Go module for CPU flags '${OLLAMA_CPU_FLAGS}' (cgo compiles the CPU backend; several minutes on 2 cores)" >&2
mkdir -p "$cache"
tmp="$(mktemp -d "$cache/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
# The release version is stamped by ldflags, as Ollama's own release build does (else it reports 0.0.0).
CGO_ENABLED=1 GOBIN="$tmp" go install -trimpath \
  -ldflags "-w -X github.com/ollama/ollama/version.Version=${OLLAMA_VERSION#v}" \
  "github.com/ollama/ollama@${OLLAMA_VERSION}" >&2
"$tmp/ollama" --version >&2 || true
mv -f "$tmp/ollama" "$bin"
printf '%s\n' "$OLLAMA_CPU_FLAGS" > "$stamp"
echo "$bin"
