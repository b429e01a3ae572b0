#!/usr/bin/env bash
# Builds the mic and nmi container images from this checkout, with no
# container registry: the bases are made from Debian packages through this
# machine's apt sources (images/base.sh), the binaries by cargo on this host
# (release, --locked), the images by `podman build` of Dockerfile.mic and
# Dockerfile.nmi (their BUILDER is the base with the binary already in), and
# each image is saved as an OCI archive. Run as root; installs podman, buildah, mmdebstrap and runc with
# apt-get when missing.
#
# Everything is cached under ${AADPODID_IMAGES_CACHE:-$HOME/.cache/aadpodid/images}:
#   base-<hash>/{nmi-base,mic-base}.tar   keyed by images/base.sh, the suite,
#                                          the architecture and the apt sources
#   <name>-<version>-<hash>.oci.tar        keyed by the binary, the Dockerfile,
#                                          images/<name>/, the base and the revision
# so a second run only checks cargo and hashes. AADPODID_IMAGES_BIN_DIR=<dir>
# takes mic and nmi from <dir> instead of running cargo (a CI job that built
# them already). Progress and each step's time
# go to stderr; stdout has two lines, `mic <archive>` and `nmi <archive>`.
# Images are tagged localhost/aad-pod-identity/{mic,nmi}:<version>.
# Used by tests/tests/images.rs and by `AADPODID_SETUP_IMAGES=1 scripts/setup.sh`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

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
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}" uidmap; } >&2
fi
took "tools (podman, buildah, mmdebstrap, runc)" "$t"

# The machine's own apt sources, as apt reads them.
sources=()
[ -s /etc/apt/sources.list ] && grep -qE '^\s*deb ' /etc/apt/sources.list && sources+=(/etc/apt/sources.list)
for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] && sources+=("$f")
done
suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
arch=$(dpkg --print-architecture)

t=$(now)
base_key=$( { cat images/base.sh "${sources[@]}"; echo "$suite $arch"; } | sha256sum | cut -c1-16)
base_dir=$cache/base-$base_key
if [ ! -f "$base_dir/mic-base.tar" ]; then
  mkdir -p "$base_dir"
  bash images/base.sh "$base_dir" "$suite" "${sources[@]}"
fi
for b in nmi mic; do
  ref=localhost/aad-pod-identity/$b-base:$base_key
  podman image exists "$ref" || podman import --quiet "$base_dir/$b-base.tar" "$ref" >/dev/null
done
took "bases (base-$base_key)" "$t"

t=$(now)
if [ -n "${AADPODID_IMAGES_BIN_DIR:-}" ]; then
  bin_dir=$AADPODID_IMAGES_BIN_DIR
  echo "images: the binaries in $bin_dir (AADPODID_IMAGES_BIN_DIR), no cargo build" >&2
else
  bin_dir=${CARGO_TARGET_DIR:-$PWD/target}/release
  # One package per command, as the benchmark builds its shipped binaries:
  # the same feature sets, so either build finds the other's artifacts.
  for b in mic nmi; do
    cargo build --release --locked -p "$b" --bin "$b" >&2
  done
  took "cargo build --release --locked (mic, nmi)" "$t"
fi

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
revision=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
for name in mic nmi; do
  t=$(now)
  extra=()
  [ -d "images/$name" ] && mapfile -t extra < <(find "images/$name" -type f | sort)
  key=$( { hash_of "$bin_dir/$name" "Dockerfile.$name" "${extra[@]}"; echo "$base_key $version $revision"; } | sha256sum | cut -c1-16)
  archive=$cache/$name-$version-$key.oci.tar
  if [ ! -f "$archive" ]; then
    tag=localhost/aad-pod-identity/$name:$version
    # The BUILDER: the Debian base with the host-built binary at /out/<name>,
    # so the Dockerfile's build stage skips cargo.
    builder=localhost/aad-pod-identity/builder-$name:$key
    work=$(buildah from --quiet "localhost/aad-pod-identity/nmi-base:$base_key")
    buildah copy --quiet "$work" "$bin_dir/$name" "/out/$name" >/dev/null
    buildah commit --quiet --rm "$work" "$builder" >/dev/null
    dangling() { podman images --quiet --no-trunc --filter dangling=true | sort -u; }
    before=$(dangling)
    podman build --quiet --isolation chroot -f "Dockerfile.$name" \
      --build-arg BUILDER="$builder" \
      --build-arg BASE="localhost/aad-pod-identity/$name-base:$base_key" \
      --build-arg VERSION="$version" --build-arg REVISION="$revision" \
      -t "$tag" . >/dev/null
    podman rmi "$builder" >/dev/null
    # The images this build left untagged: its build stage and the image the
    # tag named before (kept if a container still uses it).
    comm -13 <(echo "$before") <(dangling) | xargs -r podman rmi >/dev/null 2>&1 || true
    rm -f "$cache/$name-$version-"*.oci.tar
    podman save --quiet --format oci-archive -o "$archive.tmp" "$tag"
    mv "$archive.tmp" "$archive"
    size=$(podman image inspect --format '{{.Size}}' "$tag")
    built="built, $((size / 1000000)) MB in podman"
  else
    built="reused from the cache"
  fi
  took "image $name:$version ($built; archive $(($(stat -c %s "$archive") / 1000000)) MB)" "$t"
  echo "$name $archive"
done
