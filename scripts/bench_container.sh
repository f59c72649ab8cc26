#!/usr/bin/env bash
# Image sizes and the times of the container path, for docs/benchmarks.md:
#   scripts/bench_container.sh [--no-cache]
# Builds the cpu and gpu images through compose (as tests/container does), then times
# `docker compose run --rm ftdeploy train-and-serve` on the embedded demo in a fresh project with empty
# volumes, and prints one JSON object. --no-cache rebuilds every layer (BuildKit's pip cache mount stays).
set -euo pipefail
cd "$(dirname "$0")/.."

no_cache=()
[ "${1:-}" = "--no-cache" ] && no_cache=(--no-cache)
eval "$(scripts/container-setup.sh)"
export COMPOSE_BAKE=false
build_args=()
[ -n "${FTDEPLOY_PIP_NO_INDEX:-}" ] && build_args=(--build-arg PIP_NO_INDEX=1)
project="ftdeploy-bench-$$"
work="$(mktemp -d)"
trap 'FTDEPLOY_IMAGE=ftdeploy-bench:cpu "$DOCKER" compose -p "$project" -f compose.yaml -f compose.cpu.yaml down --volumes >/dev/null 2>&1; rm -rf "$work"' EXIT
export FTDEPLOY_RUNS_DIR="$work/runs" FTDEPLOY_DATA_DIR="$work/data"
mkdir -p "$FTDEPLOY_DATA_DIR"

seconds() { local start=$SECONDS; "$@" >"$work/last.log" 2>&1 || { tail -n 30 "$work/last.log" >&2; exit 1; }; echo $((SECONDS - start)); }
cpu_s=$(FTDEPLOY_IMAGE=ftdeploy-bench:cpu seconds "$DOCKER" compose -p "$project" -f compose.yaml -f compose.cpu.yaml \
  build "${no_cache[@]}" "${build_args[@]}" ftdeploy)
gpu_s=$(FTDEPLOY_IMAGE=ftdeploy-bench:gpu seconds "$DOCKER" compose -p "$project" -f compose.yaml \
  build "${no_cache[@]}" "${build_args[@]}" ftdeploy)
run_s=$(FTDEPLOY_IMAGE=ftdeploy-bench:cpu seconds "$DOCKER" compose -p "$project" -f compose.yaml -f compose.cpu.yaml \
  run --rm -T ftdeploy train-and-serve --json)

size() { "$DOCKER" image inspect --format '{{.Size}}' "$1"; }
# Layers both images hold are stored once: the gpu image's own share is what it adds on top.
shared=$(comm -12 <("$DOCKER" image inspect --format '{{range .RootFS.Layers}}{{println .}}{{end}}' ftdeploy-bench:cpu | sort) \
                  <("$DOCKER" image inspect --format '{{range .RootFS.Layers}}{{println .}}{{end}}' ftdeploy-bench:gpu | sort) | grep -c . || true)
python3 - "$cpu_s" "$gpu_s" "$run_s" "$(size ftdeploy-bench:cpu)" "$(size ftdeploy-bench:gpu)" "$shared" \
  "$(size "$FTDEPLOY_OLLAMA_IMAGE")" "${#no_cache[@]}" <<'EOF'
import json, sys
cpu_s, gpu_s, run_s, cpu_b, gpu_b, shared, ollama_b, no_cache = map(int, sys.argv[1:])
gib = lambda b: round(b / 2**30, 2)
print(json.dumps({"build_cpu_s": cpu_s, "build_gpu_s": gpu_s, "no_cache": bool(no_cache),
                  "train_and_serve_demo_s": run_s, "cpu_image_gib": gib(cpu_b), "gpu_image_gib": gib(gpu_b),
                  "layers_shared": shared, "ollama_image_gib": gib(ollama_b)}, indent=2))
EOF
