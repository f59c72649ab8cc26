#!/usr/bin/env bash
# Serve a run trained on another machine (the lent GPU device) with the real Ollama server here.
#
#   scripts/serve_fetched_run.sh DIR ENGINE [RUNS_DIR]
#
# DIR holds ENGINE-run.tar.part-NN, written by tests/e2e/test_gpu_engines.py where llama-cpp-python is missing
# (FTDEPLOY_GPU_OUT) and brought back through the device's output folder. The parts are joined and unpacked into
# RUNS_DIR (default runs/), then the run goes on through export (GGUF, Q4_K_M), modelfile, register and verify.
# verify.compare is off: the random-weight base it was trained from exists only on the device.
set -euo pipefail
dir=${1:?usage: serve_fetched_run.sh DIR ENGINE [RUNS_DIR]}
engine=${2:?usage: serve_fetched_run.sh DIR ENGINE [RUNS_DIR]}
runs=${3:-runs}
shopt -s nullglob
parts=("$dir/$engine-run.tar.part-"*)
if [ ${#parts[@]} -eq 0 ]; then
  echo "serve_fetched_run: no $engine-run.tar.part-* in $dir" >&2
  exit 2
fi
mkdir -p "$runs"
cat "${parts[@]}" | tar -x -C "$runs"
rm -f "$runs/gpu-$engine/.lock"
ftdeploy=${FTDEPLOY:-ftdeploy}
for stage in export modelfile register verify; do
  "$ftdeploy" "$stage" --runs-dir "$runs" --name "gpu-$engine" --set verify.compare=false
done
