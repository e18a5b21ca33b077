#!/usr/bin/env bash
# Builds the container images of Tessera without pulling anything from a registry:
#
#   tessera:dev      the `tessera` binary (server, agent and CLI), /bin/sh, python3 and tini on
#                    a minimal Debian bookworm root filesystem, with the example trainers in
#                    /opt/tessera/examples;
#   tessera-s3:dev   the same root filesystem with moto's S3-compatible server in a venv, the
#                    object store of deploy/compose (built once, kept until --rebuild-s3).
#
# The root filesystem is made by `debootstrap --variant=minbase bookworm` from the apt mirror this
# machine already uses, and cached as a tarball under the cargo target directory
# (target/docker/), so only the first build takes minutes; `docker import` turns it into the
# base image, and the binary goes on top of it as a layer of its own (docker create + cp +
# commit: no Dockerfile, no builder, no FROM to resolve).
#
# Usage: deploy/docker/build.sh [--bin PATH] [--tag IMAGE] [--s3-tag IMAGE] [--no-s3]
#                               [--rebuild-s3] [--prepare] [--offline]
#   --bin PATH      the binary to put in (env TESSERA_BIN). Default target/release/tessera,
#                   built with `cargo build --release -p tessera` if missing.
#   --tag IMAGE     the image to write (env TESSERA_IMAGE, default tessera:dev).
#   --s3-tag IMAGE  the object store's image (env TESSERA_S3_IMAGE, default tessera-s3:dev).
#   --no-s3         do not build the object store's image.
#   --rebuild-s3    build it even if it exists.
#   --prepare       only the cached parts (root filesystem, base image, object store image): no
#                   binary needed, so CI can run it while cargo builds.
#   --offline       reach nothing outside this machine: if the root filesystem or the object
#                   store's image would have to be made (Debian mirror, PyPI), say so and exit 3.
# Env: TESSERA_DEBIAN_MIRROR (default: the first Debian mirror of /etc/apt), TESSERA_PIP_CERT
# (a CA bundle for pip; default the system bundle when pip is configured with it).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET" in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
BIN=${TESSERA_BIN:-}
IMAGE=${TESSERA_IMAGE:-tessera:dev}
S3_IMAGE=${TESSERA_S3_IMAGE:-tessera-s3:dev}
BUILD_S3=1
REBUILD_S3=0
PREPARE=0
OFFLINE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN=$2; shift 2 ;;
    --tag) IMAGE=$2; shift 2 ;;
    --s3-tag) S3_IMAGE=$2; shift 2 ;;
    --no-s3) BUILD_S3=0; shift ;;
    --rebuild-s3) REBUILD_S3=1; shift ;;
    --prepare) PREPARE=1; shift ;;
    --offline) OFFLINE=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown argument '$1' (--help lists them)" >&2; exit 2 ;;
  esac
done

# What goes into the root filesystem. Changing this list (or the trimming below) makes a new
# cache key, so a stale tarball is never reused.
SUITE=bookworm
PACKAGES=python3,python3-venv,tini
MOTO_VERSION=5.2.5
KEY=$(printf '%s\n' "$SUITE" "$PACKAGES" "trim-v1" | sha256sum | cut -c1-12)
CACHE=$TARGET/docker
ROOTFS_TAR=$CACHE/rootfs-$SUITE-$KEY.tar
BASE_IMAGE=tessera-base:$SUITE-$KEY

say() { echo "== $*" >&2; }
die() { echo "build.sh: $*" >&2; exit 1; }

command -v docker >/dev/null || die "docker not found"
docker info >/dev/null 2>&1 || die "the docker engine does not answer (docker info)"

mirror() {
  if [ -n "${TESSERA_DEBIAN_MIRROR:-}" ]; then echo "$TESSERA_DEBIAN_MIRROR"; return; fi
  local m
  m=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}')
  [ -n "$m" ] || m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
    awk '/^deb / && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}')
  echo "${m:-http://deb.debian.org/debian}"
}

if [ "$OFFLINE" = 1 ]; then
  if [ ! -s "$ROOTFS_TAR" ] || { [ "$BUILD_S3" = 1 ] && ! docker image inspect "$S3_IMAGE" >/dev/null 2>&1; }; then
    echo "build.sh: --offline: not prepared (no $ROOTFS_TAR or no $S3_IMAGE); run" \
      "deploy/docker/build.sh --prepare first (it needs the Debian mirror and PyPI)" >&2
    exit 3
  fi
  REBUILD_S3=0
fi

# ---- 1. The root filesystem tarball (cached) -----------------------------------------------
if [ ! -s "$ROOTFS_TAR" ]; then
  command -v debootstrap >/dev/null || die "debootstrap not found: apt-get install debootstrap"
  [ "$(id -u)" = 0 ] || die "debootstrap needs root"
  mkdir -p "$CACHE"
  WORK=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  MIRROR=$(mirror)
  say "debootstrap --variant=minbase $SUITE ($PACKAGES) from $MIRROR (once; cached in $ROOTFS_TAR)"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$WORK/root" "$MIRROR" >"$WORK.log" 2>&1 || {
    tail -30 "$WORK.log" >&2
    die "debootstrap failed (log above)"
  }
  R=$WORK/root
  # What a container never reads: package caches and lists, docs, man pages, translations.
  rm -rf "$R"/var/cache/apt/* "$R"/var/lib/apt/lists/* "$R"/var/log/* "$R"/usr/share/doc/* \
    "$R"/usr/share/man/* "$R"/usr/share/info/* "$R"/usr/share/locale/* "$R"/tmp/* "$R"/var/tmp/*
  find "$R" -name __pycache__ -type d -prune -exec rm -rf {} +
  # Files docker provides per container, and one identity for the services.
  : >"$R/etc/hostname"
  : >"$R/etc/resolv.conf"
  echo "tessera:x:1000:1000:Tessera:/var/lib/tessera:/usr/sbin/nologin" >>"$R/etc/passwd"
  echo "tessera:x:1000:" >>"$R/etc/group"
  tar -C "$R" --numeric-owner -cf "$ROOTFS_TAR.tmp" .
  mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
  rm -rf "$WORK" "$WORK.log"
  trap - EXIT
fi

# ---- 2. The base image -----------------------------------------------------------------------
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  say "docker import $ROOTFS_TAR as $BASE_IMAGE"
  docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    -c 'CMD ["/bin/sh"]' \
    "$ROOTFS_TAR" "$BASE_IMAGE" >/dev/null
fi

# A container made from $1 (created, never started), given the files of directory $2 (copied
# over /), committed as image $3 with the changes that follow. Replaces the image $3 named
# before, so rebuilding leaves no dangling copy behind.
commit_layer() {
  local from=$1 files=$2 tag=$3
  shift 3
  local old ctr
  old=$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
  ctr=$(docker create --network none "$from" /bin/true)
  # shellcheck disable=SC2064
  trap "docker rm -f $ctr >/dev/null 2>&1 || true" RETURN
  if [ -n "$files" ]; then
    docker cp -a "$files/." "$ctr:/"
  fi
  local changes=()
  for c in "$@"; do changes+=(-c "$c"); done
  docker commit "${changes[@]}" "$ctr" "$tag" >/dev/null
  local new
  new=$(docker image inspect -f '{{.Id}}' "$tag")
  if [ -n "$old" ] && [ "$old" != "$new" ]; then
    docker rmi "$old" >/dev/null 2>&1 || true
  fi
}

# ---- 3. The object store's image (moto), built once ------------------------------------------
if [ "$BUILD_S3" = 1 ] && { [ "$REBUILD_S3" = 1 ] || ! docker image inspect "$S3_IMAGE" >/dev/null 2>&1; }; then
  say "$S3_IMAGE: moto[server]==$MOTO_VERSION in a venv (pip, once)"
  PIP_ARGS=()
  CERT=${TESSERA_PIP_CERT:-${PIP_CERT:-}}
  [ -z "$CERT" ] && [ -f /etc/ssl/certs/ca-certificates.crt ] && CERT=/etc/ssl/certs/ca-certificates.crt
  if [ -n "$CERT" ]; then
    PIP_ARGS=(-v "$(readlink -f "$CERT"):/etc/tessera-pip-ca.pem:ro" -e PIP_CERT=/etc/tessera-pip-ca.pem)
  fi
  old=$(docker image inspect -f '{{.Id}}' "$S3_IMAGE" 2>/dev/null || true)
  ctr=$(docker create "${PIP_ARGS[@]}" -e PIP_DISABLE_PIP_VERSION_CHECK=1 -e PIP_DEFAULT_TIMEOUT=120 "$BASE_IMAGE" \
    /bin/sh -c "python3 -m venv /opt/moto && /opt/moto/bin/pip install --no-cache-dir --quiet 'moto[server]==$MOTO_VERSION' \
      && find /opt/moto -name __pycache__ -type d -prune -exec rm -rf {} +")
  if ! docker start -a "$ctr" >&2; then
    docker rm -f "$ctr" >/dev/null
    die "pip install moto[server] failed in $BASE_IMAGE"
  fi
  docker commit \
    -c 'ENV PATH=/opt/moto/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENTRYPOINT ["/usr/bin/tini", "--"]' \
    -c 'CMD ["moto_server", "-H", "0.0.0.0", "-p", "5000"]' \
    -c 'USER 1000' \
    "$ctr" "$S3_IMAGE" >/dev/null
  docker rm -f "$ctr" >/dev/null
  new=$(docker image inspect -f '{{.Id}}' "$S3_IMAGE")
  if [ -n "$old" ] && [ "$old" != "$new" ]; then docker rmi "$old" >/dev/null 2>&1 || true; fi
fi

if [ "$PREPARE" = 1 ]; then
  say "prepared: $ROOTFS_TAR, $BASE_IMAGE$([ "$BUILD_S3" = 1 ] && echo ", $S3_IMAGE")"
  exit 0
fi

# ---- 4. The tessera image --------------------------------------------------------------------
if [ -z "$BIN" ]; then
  BIN=$TARGET/release/tessera
  if [ ! -x "$BIN" ]; then
    say "cargo build --release -p tessera"
    (cd "$ROOT" && cargo build --release -p tessera)
  fi
fi
[ -x "$BIN" ] || die "$BIN is not an executable"

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/tessera-image.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
chmod 0755 "$STAGE"
mkdir -p "$STAGE/usr/local/bin" "$STAGE/opt/tessera/examples" "$STAGE/var/lib/tessera" "$STAGE/etc/tessera/certs"
# The services run as uid 1000 (tessera); a named volume mounted on these starts owned by it.
chown 1000:1000 "$STAGE/var/lib/tessera" "$STAGE/etc/tessera/certs"
# Debug information stays on the build machine: a debug build shrinks from hundreds of MB to
# tens (symbols are kept, so backtraces still name functions).
if command -v objcopy >/dev/null; then
  objcopy --strip-debug "$BIN" "$STAGE/usr/local/bin/tessera"
else
  cp "$BIN" "$STAGE/usr/local/bin/tessera"
fi
chmod 0755 "$STAGE/usr/local/bin/tessera"
cp "$ROOT"/examples/*.py "$STAGE/opt/tessera/examples/"
cp -r "$ROOT/deploy/examples" "$STAGE/opt/tessera/specs"
cp "$ROOT/deploy/compose/fake-imds.py" "$STAGE/opt/tessera/fake-imds.py"

# The binary's shared libraries must all be in the root filesystem.
tar -tf "$ROOTFS_TAR" >"$STAGE.files"
missing=$(ldd "$BIN" | awk '/=>/ {print $3}' | while read -r lib; do
  [ -z "$lib" ] && continue
  grep -qxF -e ".$lib" -e "./usr$lib" "$STAGE.files" || echo "$lib"
done)
rm -f "$STAGE.files"
[ -z "$missing" ] || die "$BIN needs libraries the root filesystem lacks: $missing"

say "$IMAGE from $BIN on $BASE_IMAGE"
REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
commit_layer "$BASE_IMAGE" "$STAGE" "$IMAGE" \
  'ENTRYPOINT ["/usr/bin/tini", "--"]' \
  'CMD ["tessera", "--help"]' \
  'WORKDIR /var/lib/tessera' \
  'USER 1000:1000' \
  "LABEL org.opencontainers.image.title=tessera org.opencontainers.image.revision=$REV"

docker run --rm --network none "$IMAGE" tessera --version >/dev/null || die "$IMAGE: tessera --version failed"
docker run --rm --network none "$IMAGE" python3 -c 'import argparse, json, urllib.request' ||
  die "$IMAGE: python3 lacks the standard library the example trainer needs"
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
say "built $IMAGE ($((size / 1000000)) MB)$([ "$BUILD_S3" = 1 ] && echo "; object store $S3_IMAGE")"
