#!/usr/bin/env bash
# Builds the binaries of a real test node and of the control-plane pieces that
# serve it (kubelet, kube-controller-manager, kube-scheduler) from the same
# k8s.io/kubernetes release as tests/cluster/build.sh, plus `pause`, the
# sandbox process of the node's pods (tests/cluster/node/pause). Prints the
# directory that holds them on stdout; progress and timings go to stderr.
#
# A module of its own (tests/cluster/node), so the apiserver's cache key and
# its dependency set stay as they are: only a test that runs a real node pays
# for this build. Cache: $AADPODID_NODE_CACHE (default
# $HOME/.cache/aadpodid/node)/<key>; caching, locking and Go's environment:
# tests/lib/go-tool.sh.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/../lib/go-tool.sh
. "$here/../lib/go-tool.sh"

kver=$(go_mod_version "$here/kube/go.mod" k8s.io/kubernetes)
node_kver=$(go_mod_version "$here/node/go.mod" k8s.io/kubernetes)
if [ "$kver" != "$node_kver" ]; then
  echo "node binaries: tests/cluster/node pins k8s.io/kubernetes $node_kver, tests/cluster/kube $kver: they must match" >&2
  exit 1
fi

go_tool_init "${AADPODID_NODE_CACHE:-$HOME/.cache/aadpodid/node}" \
  "$here"/node/go.mod "$here"/node/go.sum "$here"/node/pause/main.go "$here"/build-node.sh
go_tool_cached "node binaries" kubelet kube-controller-manager kube-scheduler pause
go_tool_begin

# Stamped as tests/cluster/build.sh stamps the apiserver (the kubelet reports
# it in the Node's status).
minor=${kver#v1.}; minor=${minor%%.*}
vpkg=k8s.io/component-base/version
ldflags="-s -w -X $vpkg.gitVersion=$kver -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor -X $vpkg.gitTreeState=clean"
echo "node binaries: building kubelet, kube-controller-manager and kube-scheduler ($kver)" >&2
(cd "$here/node" && go build -trimpath -ldflags="$ldflags" -o "$tmp/" \
  k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler) >&2
(cd "$here/node" && go build -trimpath -ldflags='-s -w' -o "$tmp/pause" ./pause) >&2

go_tool_done "node binaries"
