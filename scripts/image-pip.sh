#!/bin/sh
# pip install inside an image build (see the Dockerfile's build knobs):
#   image-pip [--torch-index URL] PIP-ARGS...
# Wheels in /wheelhouse are used before any index; a CA bundle given as the `pipcert` build secret is
# trusted for this command only (it lives in /run/secrets, never in a layer). With --torch-index, torch
# comes from that index first (PyTorch's CPU-only one, say); if it cannot be reached, from the default.
set -eu
# llama.cpp, when pip compiles it here, is built for x86-64-v3 whatever CPU the build host has (scripts/lib-cpu.sh):
# an image runs on other machines than the one that built it.
. /usr/local/lib/ftdeploy-cpu.sh
CMAKE_ARGS="$(llama_cmake_args x86-64-v3)"
export CMAKE_ARGS
# The build runs as root with HOME pointing at the unprivileged user's home: keep pip's cache in the cache mount.
export PIP_CACHE_DIR=/root/.cache/pip
[ -s /run/secrets/pipcert ] && export PIP_CERT=/run/secrets/pipcert
if ls /wheelhouse/*.whl >/dev/null 2>&1; then
  export PIP_FIND_LINKS=/wheelhouse
fi
if [ "${1:-}" = "--torch-index" ]; then
  torch_index="$2"
  shift 2
  if [ -n "$torch_index" ]; then
    # The same torch range as pyproject.toml's train extra, read from it so there is one place to change.
    torch_req="$(python3 -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["train"]; print(next(d for d in deps if d.startswith("torch")))')"
    echo "image-pip: torch ($torch_req) from $torch_index" >&2
    pip install --retries 1 --timeout 30 --index-url "$torch_index" "$torch_req" \
      || echo "image-pip: $torch_index could not be used; torch comes from the default index instead" >&2
  fi
fi
pip install "$@"
# What the image's llama.cpp was built with, where `ftdeploy doctor` reads it (as scripts/setup.sh stamps .venv).
if [ -d "$VIRTUAL_ENV" ] && python3 -c 'import importlib.util, sys; sys.exit(not importlib.util.find_spec("llama_cpp"))'; then
  printf '%s\n' "$CMAKE_ARGS" > "$VIRTUAL_ENV/llama_cpp_python.cmake-args"
fi
# setuptools leaves build/ and *.egg-info in /src; a later layer's build would reuse build/lib and ship
# the empty package of the dependency layers (COPY keeps the sources' older mtimes).
rm -rf build ./*.egg-info
