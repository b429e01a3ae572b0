#!/usr/bin/env bash
# Builds the container images from this checkout, with no container
# registry: the bases are made from Debian packages through this machine's
# apt sources (images/base.sh, images/app/base.sh), the binaries by cargo on
# this host (release, --locked), the images by `podman build`, and each image
# is saved as an OCI archive. Run as root; installs podman, buildah,
# mmdebstrap and runc with apt-get when missing.
#
# usage: scripts/images.sh [--upstream] [NAME...]
#   NAME: mic, nmi, app, upstream-mic, upstream-nmi. No NAME: mic, nmi and
#   app; --upstream (or AADPODID_IMAGES_UPSTREAM=1) adds upstream-mic and
#   upstream-nmi.
#
#   mic, nmi      Dockerfile.mic, Dockerfile.nmi; BUILDER is the Debian base
#                 with the host-built binary at /out/<name>.
#                 Tag localhost/aad-pod-identity/{mic,nmi}:<version>.
#   app           images/app: Debian's Python 3.11 and the Python Azure SDK
#                 (azure-identity of tests/python/requirements.txt, its
#                 dependencies pinned by images/app/constraints.txt, wheels
#                 installed by the host's pip with `--target`), and
#                 /app/token.py. No cargo. Tag localhost/aadpodid-app:dev.
#   upstream-mic, upstream-nmi
#                 upstream aad-pod-identity's own Go binaries
#                 (tests/upstream/build.sh, or $AADPODID_UPSTREAM_BIN) in
#                 images/upstream/Dockerfile. Tag
#                 localhost/upstream-{mic,nmi}:<upstream version>.
#
# Everything is cached under ${AADPODID_IMAGES_CACHE:-$HOME/.cache/aadpodid/images}:
#   base-<hash>/{nmi-base,mic-base}.tar   keyed by images/base.sh and
#                                          images/debian.sh, the suite,
#                                          the architecture and the apt sources
#   app-base-<hash>/app-base.tar           the same, with images/app/base.sh
#                                          for images/base.sh
#   <name>-<version>-<hash>.oci.tar        keyed by what goes into the image:
#                                          binary, Dockerfile, images/<name>/,
#                                          the base (and, for mic and nmi, the
#                                          git revision)
# so a second run only checks cargo and hashes. AADPODID_IMAGES_BIN_DIR=<dir>
# takes mic and nmi from <dir> instead of running cargo (a CI job that built
# them already). Progress and each step's time go to stderr; stdout has one
# line per image, `<name> <archive>`, in the order above.
# Used by tests/tests/images.rs and by `AADPODID_SETUP_IMAGES=1 scripts/setup.sh`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

all=(mic nmi app upstream-mic upstream-nmi)
names=()
upstream=${AADPODID_IMAGES_UPSTREAM:-0}
for arg in "$@"; do
  case "$arg" in
    --upstream) upstream=1 ;;
    mic | nmi | app | upstream-mic | upstream-nmi) names+=("$arg") ;;
    *)
      echo "images.sh: unknown argument '$arg' (usage: images.sh [--upstream] [${all[*]}...])" >&2
      exit 2
      ;;
  esac
done
[ ${#names[@]} -gt 0 ] || names=(mic nmi app)
[ "$upstream" = 1 ] && names+=(upstream-mic upstream-nmi)
want() { [[ " ${names[*]} " == *" $1 "* ]]; }

cache=${AADPODID_IMAGES_CACHE:-$HOME/.cache/aadpodid/images}
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

now() { date +%s.%N; }
took() { awk -v a="$2" -v b="$(now)" -v w="$1" 'BEGIN { printf "images: %s took %.1f s\n", w, b - a }' >&2; }
hash_of() { cat "$@" | sha256sum | cut -c1-16; }

t=$(now)
missing=()
for pair in podman:podman buildah:buildah mmdebstrap:mmdebstrap runc:runc; do
  command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
# The application image's wheels come through the host's pip.
if want app && ! python3 -m pip --version >/dev/null 2>&1; then missing+=(python3-pip); fi
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}" uidmap; } >&2
fi
took "tools (podman, buildah, mmdebstrap, runc, pip)" "$t"

# The machine's own apt sources, as apt reads them.
sources=()
[ -s /etc/apt/sources.list ] && grep -qE '^\s*deb ' /etc/apt/sources.list && sources+=(/etc/apt/sources.list)
for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] && sources+=("$f")
done
suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
arch=$(dpkg --print-architecture)

# A new empty build context folder, removed when the script ends.
stage=$(mktemp -d "$cache/.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
context() { mktemp -d "$stage/context.XXXXXX"; }

# podman build --isolation chroot "$@" -t TAG, then removes what the build
# left untagged (its build stages, and the image TAG named before, kept if a
# container still uses it).
build() {
  local tag=$1 before
  shift
  dangling() { podman images --quiet --no-trunc --filter dangling=true | sort -u; }
  before=$(dangling)
  podman build --quiet --isolation chroot "$@" -t "$tag" >/dev/null
  comm -13 <(echo "$before") <(dangling) | xargs -r podman rmi >/dev/null 2>&1 || true
}

# NAME VERSION KEY STEP_START BUILD_FUNCTION...: runs the build function
# unless <name>-<version>-<key>.oci.tar is cached, saves the image it tagged
# (TAG, set by the function) there, and prints `<name> <archive>`.
image() {
  local name=$1 version=$2 key=$3 t=$4 archive built size
  shift 4
  archive=$cache/$name-$version-$key.oci.tar
  if [ ! -f "$archive" ]; then
    "$@"
    rm -f "$cache/$name-$version-"*.oci.tar
    podman save --quiet --format oci-archive -o "$archive.tmp" "$TAG"
    mv "$archive.tmp" "$archive"
    size=$(podman image inspect --format '{{.Size}}' "$TAG")
    built="built as $TAG, $((size / 1000000)) MB in podman"
  else
    built="reused from the cache"
  fi
  took "image $name:$version ($built; archive $(($(stat -c %s "$archive") / 1000000)) MB)" "$t"
  echo "$name $archive"
}

if want mic || want nmi || want upstream-mic || want upstream-nmi; then
  t=$(now)
  base_key=$( { cat images/base.sh images/debian.sh "${sources[@]}"; echo "$suite $arch"; } | sha256sum | cut -c1-16)
  base_dir=$cache/base-$base_key
  if [ ! -f "$base_dir/mic-base.tar" ]; then
    rm -rf "$cache"/base-*
    mkdir -p "$base_dir"
    bash images/base.sh "$base_dir" "$suite" "${sources[@]}"
  fi
  for b in nmi mic; do
    ref=localhost/aad-pod-identity/$b-base:$base_key
    podman image exists "$ref" || podman import --quiet "$base_dir/$b-base.tar" "$ref" >/dev/null
  done
  took "bases (base-$base_key)" "$t"
fi

if want mic || want nmi; then
  t=$(now)
  if [ -n "${AADPODID_IMAGES_BIN_DIR:-}" ]; then
    bin_dir=$AADPODID_IMAGES_BIN_DIR
    echo "images: the binaries in $bin_dir (AADPODID_IMAGES_BIN_DIR), no cargo build" >&2
  else
    bin_dir=${CARGO_TARGET_DIR:-$PWD/target}/release
    # One package per command, as the benchmark builds its shipped binaries:
    # the same feature sets, so either build finds the other's artifacts.
    for b in mic nmi; do
      if want "$b"; then cargo build --release --locked -p "$b" --bin "$b" >&2; fi
    done
    took "cargo build --release --locked (mic, nmi)" "$t"
  fi
fi

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
revision=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)

# mic or nmi from its Dockerfile. The BUILDER is the Debian base with the
# host-built binary at /out/<name>, so the Dockerfile's build stage skips
# cargo.
ours() {
  local name=$1 key=$2 builder work
  TAG=localhost/aad-pod-identity/$name:$version
  builder=localhost/aad-pod-identity/builder-$name:$key
  work=$(buildah from --quiet "localhost/aad-pod-identity/nmi-base:$base_key")
  buildah copy --quiet "$work" "$bin_dir/$name" "/out/$name" >/dev/null
  buildah commit --quiet --rm "$work" "$builder" >/dev/null
  build "$TAG" -f "Dockerfile.$name" \
    --build-arg BUILDER="$builder" \
    --build-arg BASE="localhost/aad-pod-identity/$name-base:$base_key" \
    --build-arg VERSION="$version" --build-arg REVISION="$revision" .
  podman rmi "$builder" >/dev/null
}

for name in mic nmi; do
  want "$name" || continue
  t=$(now)
  extra=()
  [ -d "images/$name" ] && mapfile -t extra < <(find "images/$name" -type f | sort)
  key=$( { hash_of "$bin_dir/$name" "Dockerfile.$name" "${extra[@]}"; echo "$base_key $version $revision"; } | sha256sum | cut -c1-16)
  image "$name" "$version" "$key" "$t" ours "$name" "$key"
done

# The application image: its base (Debian's Python only), the SDK's wheels
# installed for that Python into the build context, then its Dockerfile.
app() {
  local ctx=$1 machine
  case "$arch" in
    amd64) machine=x86_64 ;;
    arm64) machine=aarch64 ;;
    *) echo "images: no wheel platform known for $arch" >&2; return 1 ;;
  esac
  cp images/app/Dockerfile images/app/token.py "$ctx/"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    --target "$ctx/site-packages" --no-compile --only-binary=:all: \
    --platform "manylinux_2_28_$machine" --platform "manylinux_2_17_$machine" \
    --platform "manylinux2014_$machine" --implementation cp --python-version 3.11 \
    --abi cp311 --abi abi3 --abi none \
    -r tests/python/requirements.txt -c images/app/constraints.txt >&2
  # Console scripts of the wheels, written for the host's Python.
  rm -rf "$ctx/site-packages/bin"
  TAG=localhost/aadpodid-app:dev
  build "$TAG" --build-arg BASE="localhost/aad-pod-identity/app-base:$app_base_key" "$ctx"
}

if want app; then
  t=$(now)
  app_base_key=$( { cat images/app/base.sh images/debian.sh "${sources[@]}"; echo "$suite $arch"; } | sha256sum | cut -c1-16)
  app_base_dir=$cache/app-base-$app_base_key
  if [ ! -f "$app_base_dir/app-base.tar" ]; then
    rm -rf "$cache"/app-base-*
    mkdir -p "$app_base_dir"
    bash images/app/base.sh "$app_base_dir" "$suite" "${sources[@]}"
  fi
  ref=localhost/aad-pod-identity/app-base:$app_base_key
  podman image exists "$ref" || podman import --quiet "$app_base_dir/app-base.tar" "$ref" >/dev/null
  took "app base (app-base-$app_base_key)" "$t"
  t=$(now)
  mapfile -t files < <(find images/app -type f | sort)
  key=$( { hash_of "${files[@]}" tests/python/requirements.txt; echo "$app_base_key $arch"; } | sha256sum | cut -c1-16)
  image app dev "$key" "$t" app "$(context)"
fi

# Upstream's mic or nmi (target NAME of images/upstream/Dockerfile) from a
# build context holding its binaries, the iptables wrapper and nmi's entry
# point.
theirs() {
  local name=$1 ctx=$2
  cp images/upstream/Dockerfile "$ctx/"
  install -m 0755 images/upstream/iptables-wrapper "$upstream_bin/mic" "$upstream_bin/nmi" "$ctx/"
  install -m 0755 images/nmi/entrypoint.sh "$ctx/nmi-entrypoint"
  TAG=localhost/upstream-$name:$upstream_version
  build "$TAG" --target "$name" \
    --build-arg MIC_BASE="localhost/aad-pod-identity/mic-base:$base_key" \
    --build-arg NMI_BASE="localhost/aad-pod-identity/nmi-base:$base_key" "$ctx"
}

if want upstream-mic || want upstream-nmi; then
  t=$(now)
  upstream_version=$(grep -m1 'github.com/Azure/aad-pod-identity v' tests/upstream/go.mod | awk '{print $2}')
  if [ -n "${AADPODID_UPSTREAM_BIN:-}" ]; then
    upstream_bin=$AADPODID_UPSTREAM_BIN
  else
    upstream_bin=$(bash tests/upstream/build.sh)
  fi
  took "upstream binaries ($upstream_version, $upstream_bin)" "$t"
  for name in mic nmi; do
    want "upstream-$name" || continue
    t=$(now)
    key=$( { hash_of "$upstream_bin/$name" images/upstream/* images/nmi/entrypoint.sh; echo "$base_key modes 0755"; } | sha256sum | cut -c1-16)
    image "upstream-$name" "$upstream_version" "$key" "$t" theirs "$name" "$(context)"
  done
fi
