#!/usr/bin/env bash
# Builds helm from its Go module (pinned in go.mod/go.sum next to this script)
# and caches it, the same way tests/cluster/build.sh builds the cluster. Prints
# the directory that holds `helm` on stdout; progress and timings go to stderr.
#
# Cache: $AADPODID_HELM_CACHE (default $HOME/.cache/aadpodid/helm)/<key>, where
# <key> changes with the pinned version, this script and the Go release.
# Caching, locking and Go's environment: tests/lib/go-tool.sh.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/../lib/go-tool.sh
. "$here/../lib/go-tool.sh"

go_tool_init "${AADPODID_HELM_CACHE:-$HOME/.cache/aadpodid/helm}" \
  "$here"/go.mod "$here"/go.sum "$here"/build.sh
go_tool_cached helm helm
go_tool_begin

ver=$(go_mod_version "$here/go.mod" helm.sh/helm/v3)
# A module build has no git metadata: stamp the version as helm's Makefile does,
# so `helm version` reports it.
# Also stamp the Kubernetes minor of its client-go, as the Makefile does: it is
# the version `helm template` and `helm lint` assume (else v1.20).
cgo=$(go_mod_version "$here/go.mod" k8s.io/client-go)
kminor=${cgo#v0.}; kminor=${kminor%%.*}
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$ver -X helm.sh/helm/v3/internal/version.gitTreeState=clean -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$kminor"
echo "helm: building $ver" >&2
(cd "$here" && go build -trimpath -ldflags="$ldflags" -o "$tmp/helm" helm.sh/helm/v3/cmd/helm) >&2

go_tool_done helm
