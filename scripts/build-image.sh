#!/usr/bin/env bash
# Builds one of the images in images/ with buildah, without Docker and without pulling
# anything: the Python base is a Debian root filesystem made here with debootstrap.
#
#   scripts/build-image.sh operator            # -> localhost/fedstudy-operator:0.1.0
#   scripts/build-image.sh aggregator|trainer|trainer-cpu
#
# Needs root, buildah and debootstrap (apt-get install buildah debootstrap) and the network
# (a Debian mirror for the base, PyPI for the pinned Python packages). With a registry at
# hand, build the Dockerfiles with `docker build -f images/NAME.Dockerfile .` instead: they
# default to python:3.11-slim-bookworm.
#
# Environment: BASE_IMAGE (skip debootstrap, use this image), MIRROR (Debian mirror),
# HOST_CA (CA bundle put in the base), WORK (scratch folder, default /var/tmp/fedstudy-build), STORAGE_DRIVER (default vfs).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
name=${1:?usage: scripts/build-image.sh operator|aggregator|trainer|trainer-cpu}
dockerfile="images/$name.Dockerfile"
[ -f "$dockerfile" ] || { echo "no $dockerfile" >&2; exit 2; }
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
case "$name" in
  trainer-cpu) tag="localhost/fedstudy-trainer:$version-cpu" ;;
  *) tag="localhost/fedstudy-$name:$version" ;;
esac
work=${WORK:-/var/tmp/fedstudy-build}
mirror=${MIRROR:-http://deb.debian.org/debian}
bah=(buildah --storage-driver "${STORAGE_DRIVER:-vfs}")
base=${BASE_IMAGE:-localhost/fedstudy-python:3.11-bookworm}
mkdir -p "$work"

if [ -z "${BASE_IMAGE:-}" ] && ! "${bah[@]}" inspect --type image "$base" >/dev/null 2>&1; then
  echo "== base image $base: debootstrap bookworm (python3.11) from $mirror"
  rootfs="$work/rootfs"
  rm -rf "$rootfs"
  time debootstrap --variant=minbase \
    --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$mirror"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  # The host's trust store: where a proxy re-signs TLS, pip in the build needs its CA too.
  cp "${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}" "$rootfs/etc/ssl/certs/ca-certificates.crt"
  ctr=$("${bah[@]}" from scratch)
  "${bah[@]}" copy "$ctr" "$rootfs" /
  "${bah[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt --cmd python3 "$ctr"
  "${bah[@]}" commit --rm "$ctr" "$base"
fi

echo "== build context: the files git knows (tracked and untracked, not ignored)"
context="$work/context"
rm -rf "$context" && mkdir -p "$context"
git ls-files -z --cached --others --exclude-standard | \
  (while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done) | \
  tar --null -T - -cf - | tar -C "$context" -xf -

echo "== $tag from $dockerfile"
time "${bah[@]}" bud --isolation chroot --layers=false \
  --build-arg "PYTHON_IMAGE=$base" -f "$context/$dockerfile" -t "$tag" "$context"
"${bah[@]}" images "$tag"
