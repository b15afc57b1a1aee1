#!/usr/bin/env bash
# Build the pfp-deploy image with podman on a host without a container registry (this project's
# machines): FROM a local base image (docker/build_base_image.sh), with this host's pip sources.
# Elsewhere a plain `docker build -t pfp-deploy .` does the same from the public indexes (docs/docker.md).
#
#   docker/build_image.sh                       # what `make docker` runs after build_base_image.sh
#
# Settings (environment variables):
#   IMAGE            tag to build (default localhost/pfp-deploy:latest)
#   BASE_IMAGE       default localhost/pfp-base:bookworm-py311 (made by docker/build_base_image.sh)
#   TORCH_INDEX_URL  default PyTorch's CPU index when it answers, else the first local file index of
#                    this host's pip configuration that has torch (said so when it happens)
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_CERT
#                    default this host's values (environment, then `pip config get global.*`). Local
#                    paths and file:// indexes in them are mounted read-only into the build at the same
#                    path (an index .../simple: its parent, where its files live); PIP_CERT is mounted as
#                    /run/pfp-build/pip-cert.pem. They are build-time only: nothing of them is in the image.
#   PODMAN_RUNTIME   OCI runtime (default runc when installed: crun fails on this project's hosts)
#   PODMAN_BUILD_ARGS  extra arguments for podman build (e.g. --no-cache)
set -euo pipefail

src=${BASH_SOURCE[0]}; [[ $src == */* ]] || src=./$src
here=$(cd "${src%/*}" && pwd)
root=${here%/*}
IMAGE=${IMAGE:-localhost/pfp-deploy:latest}
BASE_IMAGE=${BASE_IMAGE:-localhost/pfp-base:bookworm-py311}
CPU_INDEX=https://download.pytorch.org/whl/cpu

die() { echo "build_image.sh: error: $*" >&2; exit 1; }
say() { echo "build_image.sh: $*" >&2; }

command -v podman >/dev/null 2>&1 \
  || die "podman is not installed. Install it (Debian/Ubuntu: apt-get install -y podman runc debootstrap), or" \
         "build with Docker: docker build -t pfp-deploy . (docs/docker.md)."

RUNTIME=${PODMAN_RUNTIME:-}
if [ -z "$RUNTIME" ] && command -v runc >/dev/null 2>&1; then RUNTIME=runc; fi
runtime_args=()
[ -n "$RUNTIME" ] && runtime_args=(--runtime "$RUNTIME")

# The base image: local, or pulled; otherwise say what to pass.
if ! podman image exists "$BASE_IMAGE"; then
  say "base image $BASE_IMAGE is not local; pulling it"
  if ! podman pull -q "$BASE_IMAGE" >/dev/null 2>"${TMPDIR:-/tmp}/pfp-pull.$$"; then
    tail -n 3 "${TMPDIR:-/tmp}/pfp-pull.$$" >&2; rm -f "${TMPDIR:-/tmp}/pfp-pull.$$"
    die "base image '$BASE_IMAGE' is neither local nor pullable. Pass BASE_IMAGE=<an image you have or can" \
        "pull>: make a local one with docker/build_base_image.sh (then BASE_IMAGE=localhost/pfp-base:bookworm-py311," \
        "what \`make docker\` does), or any Debian-based Python 3.10+ image, e.g." \
        "BASE_IMAGE=docker.io/library/python:3.11-slim where Docker Hub is reachable."
  fi
  rm -f "${TMPDIR:-/tmp}/pfp-pull.$$"
fi

# Can podman start a container here? Some kernels refuse the rlimits podman sets by default
# ("error setting rlimit type 7"): then use docker/containers.conf (default_ulimits = []).
probe() { podman run --rm --pull never --network none "${runtime_args[@]}" "$BASE_IMAGE" true 2>&1; }
if ! out=$(probe); then
  if [ -z "${CONTAINERS_CONF:-}" ] && grep -q rlimit <<<"$out"; then
    export CONTAINERS_CONF="$here/containers.conf"
    say "this kernel refuses podman's default rlimits: using CONTAINERS_CONF=$CONTAINERS_CONF (default_ulimits = [])"
    out=$(probe) || die "podman cannot start a container from $BASE_IMAGE: $out"
  else
    die "podman cannot start a container from $BASE_IMAGE${RUNTIME:+ with runtime $RUNTIME}: $out" \
        "(on hosts where crun fails, install runc: apt-get install -y runc)"
  fi
fi

# pip settings: the environment's, else this host's pip configuration.
pip_cmd=$(command -v pip3 || command -v pip || echo "$root/.venv/bin/pip")
pip_conf() { "$pip_cmd" config get "global.$1" 2>/dev/null | tr '\n' ' ' | sed 's/ *$//' || true; }
PIP_INDEX_URL=${PIP_INDEX_URL:-$(pip_conf index-url)}
PIP_INDEX_URL=${PIP_INDEX_URL:-https://pypi.org/simple}
PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL-$(pip_conf extra-index-url)}
PIP_FIND_LINKS=${PIP_FIND_LINKS-$(pip_conf find-links)}
PIP_CERT=${PIP_CERT-$(pip_conf cert)}

if [ -z "${TORCH_INDEX_URL:-}" ]; then
  if command -v curl >/dev/null 2>&1 && ! curl -sfI -m 10 -o /dev/null "$CPU_INDEX/torch/"; then
    for url in $PIP_EXTRA_INDEX_URL $PIP_INDEX_URL; do
      case "$url" in file://*) [ -d "${url#file://}/torch" ] && { TORCH_INDEX_URL=$url; break; } ;; esac
    done
    [ -n "${TORCH_INDEX_URL:-}" ] \
      || die "PyTorch's CPU index ($CPU_INDEX) is unreachable and no local file index has torch: pass" \
             "TORCH_INDEX_URL=<an index with torch==2.14.1> (a CPU build keeps the image small)."
    say "PyTorch's CPU index is unreachable: torch from $TORCH_INDEX_URL (whatever build it holds: a CUDA" \
        "build makes the image several GB larger)"
  else
    TORCH_INDEX_URL=$CPU_INDEX
  fi
fi

# Mount every local pip source read-only at its own path; the CA bundle at a fixed path.
mounts=()
declare -A seen=()
for src in $TORCH_INDEX_URL $PIP_INDEX_URL $PIP_EXTRA_INDEX_URL $PIP_FIND_LINKS; do
  case "$src" in file://*) path=${src#file://} ;; /*) path=$src ;; *) continue ;; esac
  path=${path%/}
  case "$path" in */simple) path=${path%/simple} ;; esac
  [ -e "$path" ] || die "pip source $src does not exist on this host"
  [ -n "${seen[$path]:-}" ] && continue
  seen[$path]=1
  mounts+=(-v "$path:$path:ro")
done
cert_arg=()
if [ -n "$PIP_CERT" ]; then
  [ -f "$PIP_CERT" ] || die "PIP_CERT=$PIP_CERT is not a file"
  mounts+=(-v "$PIP_CERT:/run/pfp-build/pip-cert.pem:ro")
  cert_arg=(--build-arg PIP_CERT=/run/pfp-build/pip-cert.pem)
fi

say "building $IMAGE FROM $BASE_IMAGE (torch from $TORCH_INDEX_URL; pip: $PIP_INDEX_URL ${PIP_EXTRA_INDEX_URL}" \
    "${PIP_FIND_LINKS:+find-links $PIP_FIND_LINKS})"
start=$(date +%s)
# shellcheck disable=SC2086
podman build "${runtime_args[@]}" --network host --layers \
  -f "$root/Dockerfile" -t "$IMAGE" \
  --build-arg BASE_IMAGE="$BASE_IMAGE" \
  --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" \
  --build-arg PIP_INDEX_URL="$PIP_INDEX_URL" \
  --build-arg PIP_EXTRA_INDEX_URL="$PIP_EXTRA_INDEX_URL" \
  --build-arg PIP_FIND_LINKS="$PIP_FIND_LINKS" \
  "${cert_arg[@]}" "${mounts[@]}" ${PODMAN_BUILD_ARGS:-} "$root"
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
say "built $IMAGE in $(( $(date +%s) - start )) s, $(awk -v s="$size" 'BEGIN{printf "%.2f GB", s/1e9}')"
