#!/usr/bin/env bash
# Writes an OCI image archive (the layout `ctr images import` reads) of one
# static binary: a FROM-scratch image whose only file is /<name of BINARY>,
# its entrypoint. No registry and no image builder are needed: the tar, the
# config, the manifest and the index are made here, each blob named by its
# sha256.
#
#   oci-image.sh BINARY REFERENCE OUTPUT.tar
#
# REFERENCE is the image's full name (for example aadpodid.test/pause:1),
# recorded as containerd's image name annotation.
set -euo pipefail

bin=$1 ref=$2 out=$3
name=$(basename "$bin")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root" "$work/oci/blobs/sha256"
install -m 0755 "$bin" "$work/root/$name"

# The layer: fixed owner and time, so one binary always makes the same image.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
  -C "$work/root" -cf "$work/layer.tar" "$name"

# Stores file $1 as a blob; prints "<digest> <size>".
blob() {
  local sum size
  sum=$(sha256sum "$1" | cut -d' ' -f1)
  size=$(stat -c %s "$1")
  cp "$1" "$work/oci/blobs/sha256/$sum"
  echo "sha256:$sum $size"
}

read -r layer layer_size < <(blob "$work/layer.tar")
printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/%s"]},"rootfs":{"type":"layers","diff_ids":["%s"]}}' \
  "$name" "$layer" > "$work/config.json"
read -r config config_size < <(blob "$work/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%s}]}' \
  "$config" "$config_size" "$layer" "$layer_size" > "$work/manifest.json"
read -r manifest manifest_size < <(blob "$work/manifest.json")
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
  "$manifest" "$manifest_size" "$ref" "${ref##*:}" > "$work/oci/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$work/oci/oci-layout"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$work/oci" -cf "$out" .
