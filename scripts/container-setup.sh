#!/usr/bin/env bash
# Make this machine able to build and run ftdeploy's containers, then print the settings for the build.
#   eval "$(scripts/container-setup.sh)" && docker compose -f compose.yaml -f compose.cpu.yaml build
# Every step is skipped when its result is already there (cached in FTDEPLOY_CACHE, default ~/.cache/ftdeploy):
#   1. a Docker engine: Debian's docker.io when none is installed (root + apt), dockerd started if not running;
#   2. Docker Compose v2 (pinned) built from its Go module when `docker compose` is missing;
#   3. the base image (FTDEPLOY_BASE_IMAGE, default ubuntu:24.04) and ollama/ollama:<pinned>: pulled, or, where no
#      registry is reachable, made here: Debian bookworm by debootstrap, and the pinned Ollama built by
#      scripts/install-ollama.sh on top of it under the official tag;
#   4. the wheels scripts/setup.sh built linked into .wheelhouse/ when the image's Python matches them, so the
#      image build installs them instead of compiling llama.cpp and downloading torch again.
# Progress goes to stderr; stdout is only `export NAME=value` lines.
set -euo pipefail
cd "$(dirname "$0")/.."

COMPOSE_VERSION="${COMPOSE_VERSION:-v2.40.3}"
OLLAMA_VERSION="${OLLAMA_VERSION:-v0.17.4}"
cache="${FTDEPLOY_CACHE:-$HOME/.cache/ftdeploy}"
tools="$cache/tools"
. scripts/lib-disk.sh
log() { echo "container-setup: $*" >&2; }
die() { echo "container-setup: $*" >&2; exit 1; }
as_root_apt() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || die "$1 is missing: install $2 (Debian/Ubuntu package names), or run this as root"
  log "installing $2"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null 2>&1 \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; } \
    || die "apt-get could not install $2"
}

# A failure nobody expected still says where it happened (set -e alone exits without a word).
trap 'die "failed at line $LINENO: $BASH_COMMAND"' ERR
# The Debian mirror apt already uses (deb822 .sources or the one-line format); either file may be absent.
debian_mirror() {
  local f line
  for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    while IFS= read -r line; do
      case "$line" in
        URIs:*security*|deb*security*) ;;
        URIs:*) set -- ${line#URIs:}; echo "$1"; return ;;
        "deb http"*" bookworm "*) set -- $line; echo "$2"; return ;;
      esac
    done <"$f"
  done
  echo http://deb.debian.org/debian
}

# ---------------------------------------------------------------- 1. the engine
# Debian's client is preferred over any newer one earlier on PATH: that one wants buildx for `docker build`.
docker_bin="$(command -v /usr/bin/docker docker | head -n 1 || true)"
if [ -z "$docker_bin" ] || ! command -v dockerd >/dev/null; then
  as_root_apt "the Docker engine" docker.io
  docker_bin=/usr/bin/docker
fi
if ! "$docker_bin" info >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || die "no Docker engine answers and only root can start one here: start dockerd (or ask for access to its socket)"
  log "starting dockerd (log: $cache/dockerd.log)"
  mkdir -p "$cache"
  setsid dockerd >"$cache/dockerd.log" 2>&1 < /dev/null &
  for _ in $(seq 60); do "$docker_bin" info >/dev/null 2>&1 && break; sleep 1; done
  "$docker_bin" info >/dev/null 2>&1 || die "dockerd did not come up in 60 s; its log: $cache/dockerd.log ($(tail -n 3 "$cache/dockerd.log" | tr '\n' ' '))"
fi

# Both images take about 16 GiB with their build cache the first time (torch, CUDA wheels, the Unsloth set);
# a rebuild over existing layers needs little. Say so now rather than fail inside a layer.
docker_root="$("$docker_bin" info -f '{{.DockerRootDir}}' 2>/dev/null || echo /var/lib/docker)"
if [ -n "$("$docker_bin" images -q --filter label=org.opencontainers.image.source=https://github.com/ftdeploy/ftdeploy)" ]; then
  need_space "$docker_root" 5 "rebuilding the ftdeploy images" || exit 1
else
  need_space "$docker_root" 25 "building the ftdeploy cpu and gpu images" || exit 1
fi

# ---------------------------------------------------------------- 2. compose v2
if ! "$docker_bin" compose version >/dev/null 2>&1; then
  plugin="$tools/docker-compose-$COMPOSE_VERSION"
  if [ ! -x "$plugin" ]; then
    command -v go >/dev/null || die "docker compose v2 is missing and Go is needed to build it (https://go.dev/dl)"
    log "building docker compose $COMPOSE_VERSION from its Go module (a few minutes)"
    # `go install` refuses this module (exclude directives in its go.mod): build it from a writable copy.
    mkdir -p "$tools"
    build_log="$cache/compose-build.log"
    src_dir="$(go mod download -json "github.com/docker/compose/v2@$COMPOSE_VERSION" 2>"$build_log" \
      | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')" \
      || die "could not download the compose module $COMPOSE_VERSION; its log: $build_log"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    cp -r "$src_dir/." "$work" && chmod -R u+w "$work"
    (cd "$work" && CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X github.com/docker/compose/v2/internal.Version=$COMPOSE_VERSION" -o "$plugin.tmp" ./cmd) \
      >>"$build_log" 2>&1 || die "building docker compose failed; its log: $build_log"
    mv -f "$plugin.tmp" "$plugin"
  fi
  mkdir -p "$HOME/.docker/cli-plugins"
  ln -sf "$plugin" "$HOME/.docker/cli-plugins/docker-compose"
  "$docker_bin" compose version >/dev/null 2>&1 || die "docker compose still does not answer after installing $plugin"
fi

# ---------------------------------------------------------------- 3. base and Ollama images
have_image() { "$docker_bin" image inspect "$1" >/dev/null 2>&1; }
registry=yes
base_image="${FTDEPLOY_BASE_IMAGE:-ubuntu:24.04}"
if ! have_image "$base_image" && ! "$docker_bin" pull -q "$base_image" >/dev/null 2>&1; then
  registry=no
  local_base=ftdeploy-local/debian:bookworm
  if ! have_image "$local_base"; then
    command -v debootstrap >/dev/null || as_root_apt "debootstrap" debootstrap
    mirror="$(debian_mirror)"
    log "no registry gives $base_image: making $local_base with debootstrap from $mirror"
    rootfs="$(mktemp -d)"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 \
      || die "debootstrap failed; its log: $cache/debootstrap.log"
    tar -C "$rootfs" -c . | "$docker_bin" import --change 'CMD ["bash"]' - "$local_base" >/dev/null
    rm -rf "$rootfs"
  fi
  base_image="$local_base"
fi

ollama_image="ollama/ollama:${OLLAMA_VERSION#v}"
if ! have_image "$ollama_image" && ! "$docker_bin" pull -q "$ollama_image" >/dev/null 2>&1; then
  registry=no
  log "no registry gives $ollama_image: building it from the pinned release on $base_image"
  # The image gets the default portable build, whatever target this shell asked for: the host's cached binary where
  # it is that build, else one built in a cache of its own (so the host's .venv/bin/ollama is left as it is).
  . scripts/lib-cpu.sh
  portable_flags="$(cgo_march_flags "$(FTDEPLOY_CPU_TARGET='' cpu_target)")"
  image_cache="$cache"
  [ "$(cat "$cache/ollama/$OLLAMA_VERSION/cpu-flags" 2>/dev/null)" = "$portable_flags" ] || image_cache="$cache/image"
  ollama_bin="$(env -u FTDEPLOY_CPU_TARGET -u OLLAMA_CPU_FLAGS FTDEPLOY_CACHE="$image_cache" \
    OLLAMA_VERSION="$OLLAMA_VERSION" scripts/install-ollama.sh)"
  cid="$("$docker_bin" create "$base_image" true)"
  "$docker_bin" cp "$ollama_bin" "$cid:/bin/ollama"
  # The official image's interface: /bin/ollama serve on 0.0.0.0:11434, models under /root/.ollama.
  "$docker_bin" commit \
    --change 'ENV OLLAMA_HOST=0.0.0.0:11434' --change 'EXPOSE 11434' \
    --change 'ENTRYPOINT ["/bin/ollama"]' --change 'CMD ["serve"]' \
    --change "LABEL org.opencontainers.image.description=\"Ollama ${OLLAMA_VERSION} built from its Go module by ftdeploy's scripts/container-setup.sh\"" \
    "$cid" "$ollama_image" >/dev/null
  "$docker_bin" rm "$cid" >/dev/null
fi

# ---------------------------------------------------------------- 4. the wheelhouse
# What scripts/setup.sh built for this machine's .venv fits an image whose Python is the same (Debian
# bookworm's 3.11 for the local base); then the cpu dependencies can be installed offline from it. The
# Unsloth set of the gpu target still comes from the index, through the pipcert secret where one is needed.
mkdir -p .wheelhouse
find .wheelhouse -name '*.whl' -delete
no_index=""
if [ -x .venv/bin/python ] && [ "$base_image" = ftdeploy-local/debian:bookworm ]; then
  pytag="$(.venv/bin/python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
  wheels="${FTDEPLOY_WHEELHOUSE:-$cache/wheels/$pytag}"
  if [ "$pytag" = cp311 ] && compgen -G "$wheels/*.whl" >/dev/null; then
    cp -l "$wheels"/*.whl .wheelhouse/ 2>/dev/null || cp "$wheels"/*.whl .wheelhouse/
    no_index=1
    # The images carry the portable llama.cpp build only: a wheel this host built for itself (FTDEPLOY_CPU_TARGET=
    # native) or an unstamped one stays out, and the image build compiles llama.cpp for x86-64-v3 instead.
    . scripts/lib-cpu.sh
    if [ "$(cat "$wheels/llama_cpp_python.cmake-args" 2>/dev/null)" != "$(llama_cmake_args x86-64-v3)" ]; then
      log "the cached llama-cpp-python wheel is not the x86-64-v3 build: the image build compiles it (about 11 min)"
      rm -f .wheelhouse/llama_cpp_python-*.whl
      no_index=""
    fi
  fi
fi

echo "export DOCKER=$docker_bin"
echo "export FTDEPLOY_BASE_IMAGE=$base_image"
echo "export FTDEPLOY_OLLAMA_IMAGE=$ollama_image"
echo "export FTDEPLOY_REGISTRY_REACHABLE=$registry"
# Where no registry answers, PyTorch's CPU index does not either: say so rather than wait for it.
[ "$registry" = yes ] || echo "export FTDEPLOY_TORCH_INDEX_URL="
echo "export FTDEPLOY_PIP_NO_INDEX=$no_index"
[ -n "${PIP_CERT:-}" ] && [ -s "$PIP_CERT" ] && echo "export FTDEPLOY_PIP_CERT=$PIP_CERT"
exit 0
