#!/usr/bin/env bash
# Make a local base image for the pfp-deploy Dockerfile without any container registry:
# Debian bookworm (minbase) + python3 (3.11) + python3-venv + ca-certificates, made with debootstrap
# from a Debian mirror and loaded with `podman import`. Idempotent: an existing image is kept
# (FORCE=1 remakes it).
#
#   docker/build_base_image.sh [IMAGE]          # default localhost/pfp-base:bookworm-py311
#   MIRROR=http://deb.debian.org/debian SUITE=bookworm FORCE=1 docker/build_base_image.sh
#
# Then: docker/build_image.sh (or `make docker`) builds the pfp-deploy image FROM it.
# Needs root (debootstrap), podman, debootstrap: apt-get install -y podman runc debootstrap
set -euo pipefail

IMAGE=${1:-${BASE_IMAGE:-localhost/pfp-base:bookworm-py311}}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PACKAGES=${PACKAGES:-python3,python3-venv,ca-certificates}
WORKDIR_PARENT=${TMPDIR:-/var/tmp}

die() { echo "build_base_image.sh: error: $*" >&2; exit 1; }

command -v podman >/dev/null 2>&1 \
  || die "podman is not installed. Install it (Debian/Ubuntu: apt-get install -y podman runc debootstrap);" \
         "with Docker instead, build FROM the default BASE_IMAGE: docker build -t pfp-deploy . (docs/docker.md)."

if [ "${FORCE:-0}" != 1 ] && podman image exists "$IMAGE"; then
  echo "build_base_image.sh: $IMAGE already exists (FORCE=1 remakes it)"
  exit 0
fi

command -v debootstrap >/dev/null 2>&1 \
  || die "debootstrap is not installed. Install it (Debian/Ubuntu: apt-get install -y debootstrap), or pass" \
         "any Python 3.10+ image you can pull as BASE_IMAGE (e.g. BASE_IMAGE=docker.io/library/python:3.11-slim)."
[ "$(id -u)" = 0 ] || die "debootstrap needs root: run this script as root (sudo), or pass an existing Python 3.10+" \
                          "image as BASE_IMAGE (e.g. BASE_IMAGE=docker.io/library/python:3.11-slim)."

ROOTFS=$(mktemp -d "$WORKDIR_PARENT/pfp-base-rootfs.XXXXXX")
cleanup() { rm -rf --one-file-system "$ROOTFS"; }
trap cleanup EXIT

echo "build_base_image.sh: debootstrap --variant=minbase $SUITE ($PACKAGES) from $MIRROR into $ROOTFS"
start=$(date +%s)
if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1; then
  tail -n 20 "$ROOTFS.log" >&2
  rm -f "$ROOTFS.log"
  die "debootstrap failed (is $MIRROR reachable? set MIRROR=<your Debian mirror>), or pass an image you can pull" \
      "as BASE_IMAGE (e.g. BASE_IMAGE=docker.io/library/python:3.11-slim)."
fi
rm -f "$ROOTFS.log"

# Slim it: no package cache, lists, docs or man pages in the image.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*
[ -x "$ROOTFS/usr/bin/python3" ] || die "the debootstrapped tree has no /usr/bin/python3"

echo "build_base_image.sh: podman import -> $IMAGE"
tar --numeric-owner -C "$ROOTFS" -c . | podman import --quiet \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/usr/bin/python3"]' \
  --message "debootstrap --variant=minbase --include=$PACKAGES $SUITE $MIRROR" \
  - "$IMAGE" >/dev/null
echo "build_base_image.sh: made $IMAGE in $(( $(date +%s) - start )) s" \
     "($(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
