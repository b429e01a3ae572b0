#!/usr/bin/env bash
# Builds helm from its Go module (pinned in go.mod/go.sum next to this script)
# and caches it, the same way tests/cluster/build.sh builds the cluster. Prints
# the directory that holds `helm` on stdout; progress and timings go to stderr.
#
# Cache: $AADPODID_HELM_CACHE (default $HOME/.cache/aadpodid/helm)/<key>, where
# <key> changes with the pinned version and the Go release. Go's caches go to
# $HOME/.cache/go-mod and $HOME/.cache/go-build. Safe to run concurrently: a lock
# serialises builders and the binary appears in the cache atomically.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${AADPODID_HELM_CACHE:-$HOME/.cache/aadpodid/helm}
export GOMODCACHE=${GOMODCACHE:-$HOME/.cache/go-mod}
export GOCACHE=${GOCACHE:-$HOME/.cache/go-build}
export GOFLAGS=-mod=readonly
export GOTOOLCHAIN=local
export CGO_ENABLED=0

key=$( { go version; cat "$here"/go.mod "$here"/go.sum "$here"/build.sh; } | sha256sum | cut -c1-16)
out=$cache_root/$key

if [ -x "$out/helm" ]; then
  echo "helm: cached in $out" >&2
  echo "$out"
  exit 0
fi

mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
flock 9
if [ -x "$out/helm" ]; then
  echo "$out"
  exit 0
fi

tmp=$(mktemp -d "$cache_root/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)
ver=$(grep -m1 'helm.sh/helm/v3 v' "$here/go.mod" | awk '{print $2}')
# A module build has no git metadata: stamp the version as helm's Makefile does,
# so `helm version` reports it.
# Also stamp the Kubernetes minor of its client-go, as the Makefile does: it is
# the version `helm template` and `helm lint` assume (else v1.20).
cgo=$(grep -m1 'k8s.io/client-go v' "$here/go.mod" | awk '{print $2}')
kminor=${cgo#v0.}; kminor=${kminor%%.*}
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$ver -X helm.sh/helm/v3/internal/version.gitTreeState=clean -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$kminor"
echo "helm: building $ver" >&2
(cd "$here" && go build -trimpath -ldflags="$ldflags" -o "$tmp/helm" helm.sh/helm/v3/cmd/helm) >&2
mv "$tmp" "$out"
trap - EXIT
echo "helm: built in $(( $(date +%s) - start ))s into $out" >&2
echo "$out"
