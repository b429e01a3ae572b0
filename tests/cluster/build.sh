#!/usr/bin/env bash
# Builds the real test-cluster binaries (kube-apiserver, kubectl, etcd) from their
# Go modules and caches them. Prints the directory that holds them on stdout;
# progress and timings go to stderr.
#
# Cache: $AADPODID_CLUSTER_CACHE (default $HOME/.cache/aadpodid/cluster)/<key>,
# where <key> changes with the pinned versions (go.mod/go.sum), this script and
# the Go release. Caching, locking and Go's environment: tests/lib/go-tool.sh.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/../lib/go-tool.sh
. "$here/../lib/go-tool.sh"

go_tool_init "${AADPODID_CLUSTER_CACHE:-$HOME/.cache/aadpodid/cluster}" \
  "$here"/kube/go.mod "$here"/kube/go.sum "$here"/etcd/go.mod "$here"/etcd/go.sum "$here"/build.sh
go_tool_cached "cluster binaries" kube-apiserver kubectl etcd
go_tool_begin

kver=$(go_mod_version "$here/kube/go.mod" k8s.io/kubernetes)
# A module build carries no git metadata; stamp the release as Kubernetes' own
# build does, so /version and `kubectl version` report it (helm checks it
# against charts' kubeVersion).
minor=${kver#v1.}; minor=${minor%%.*}
vpkg=k8s.io/component-base/version
ldflags="-s -w -X $vpkg.gitVersion=$kver -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor -X $vpkg.gitTreeState=clean"
echo "cluster binaries: building kube-apiserver and kubectl ($kver)" >&2
(cd "$here/kube" && go build -trimpath -ldflags="$ldflags" -o "$tmp/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl) >&2
echo "cluster binaries: building etcd ($(go_mod_version "$here/etcd/go.mod" go.etcd.io/etcd/server/v3))" >&2
(cd "$here/etcd" && go build -trimpath -ldflags='-s -w' -o "$tmp/etcd" go.etcd.io/etcd/server/v3) >&2

go_tool_done "cluster binaries"
