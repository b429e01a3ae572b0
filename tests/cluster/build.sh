#!/usr/bin/env bash
# Builds the real test-cluster binaries (kube-apiserver, kubectl, etcd) from their
# Go modules and caches them. Prints the directory that holds them on stdout;
# progress and timings go to stderr.
#
# Cache: $AADPODID_CLUSTER_CACHE (default $HOME/.cache/aadpodid/cluster)/<key>,
# where <key> changes with the pinned versions (go.mod/go.sum) and the Go release,
# so a version bump rebuilds and an unchanged tree reuses. Go's own caches go to
# $HOME/.cache/go-mod and $HOME/.cache/go-build. Safe to run concurrently: a lock
# serialises builders and the binaries appear in the cache atomically.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${AADPODID_CLUSTER_CACHE:-$HOME/.cache/aadpodid/cluster}
export GOMODCACHE=${GOMODCACHE:-$HOME/.cache/go-mod}
export GOCACHE=${GOCACHE:-$HOME/.cache/go-build}
export GOFLAGS=-mod=readonly
export GOTOOLCHAIN=local
export CGO_ENABLED=0

key=$( { go version; cat "$here"/kube/go.mod "$here"/kube/go.sum "$here"/etcd/go.mod "$here"/etcd/go.sum "$here"/build.sh; } | sha256sum | cut -c1-16)
out=$cache_root/$key

have_all() {
  [ -x "$1/kube-apiserver" ] && [ -x "$1/kubectl" ] && [ -x "$1/etcd" ]
}

if have_all "$out"; then
  echo "cluster binaries: cached in $out" >&2
  echo "$out"
  exit 0
fi

mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
flock 9
if have_all "$out"; then
  echo "$out"
  exit 0
fi

tmp=$(mktemp -d "$cache_root/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)
kver=$(grep -m1 'k8s.io/kubernetes v' "$here/kube/go.mod" | awk '{print $2}')
# A module build carries no git metadata; stamp the release as Kubernetes' own
# build does, so /version and `kubectl version` report it (helm checks it
# against charts' kubeVersion).
minor=${kver#v1.}; minor=${minor%%.*}
vpkg=k8s.io/component-base/version
ldflags="-s -w -X $vpkg.gitVersion=$kver -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor -X $vpkg.gitTreeState=clean"
echo "cluster binaries: building kube-apiserver and kubectl ($kver)" >&2
(cd "$here/kube" && go build -trimpath -ldflags="$ldflags" -o "$tmp/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl) >&2
echo "cluster binaries: building etcd ($(grep -m1 'etcd/server/v3 v' "$here/etcd/go.mod" | awk '{print $2}'))" >&2
(cd "$here/etcd" && go build -trimpath -ldflags='-s -w' -o "$tmp/etcd" go.etcd.io/etcd/server/v3) >&2
mv "$tmp" "$out"
trap - EXIT
echo "cluster binaries: built in $(( $(date +%s) - start ))s into $out" >&2
echo "$out"
