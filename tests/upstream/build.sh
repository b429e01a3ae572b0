#!/usr/bin/env bash
# Builds upstream aad-pod-identity v1.8.17's own `mic` and `nmi` from their Go
# module (pinned in go.mod/go.sum next to this script) and caches them, for the
# side-by-side benchmark. Prints the directory that holds them on stdout;
# progress and timings go to stderr. The binaries are never committed.
#
# Cache: $AADPODID_UPSTREAM_CACHE (default $HOME/.cache/aadpodid/upstream)/<key>,
# where <key> changes with the pinned versions (go.mod/go.sum), this script and
# the Go release. Caching, locking and Go's environment: tests/lib/go-tool.sh.
# Modules come through the Go module proxy the machine is configured with
# (`go env GOPROXY`).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/../lib/go-tool.sh
. "$here/../lib/go-tool.sh"

go_tool_init "${AADPODID_UPSTREAM_CACHE:-$HOME/.cache/aadpodid/upstream}" \
  "$here"/go.mod "$here"/go.sum "$here"/build.sh
go_tool_cached "upstream binaries" mic nmi
go_tool_begin

ver=$(go_mod_version "$here/go.mod" github.com/Azure/aad-pod-identity)
# Stamp the version as upstream's Makefile does (GO_BUILD_OPTIONS), so both
# binaries report it in --version and their User-Agent. Tag v1.8.17 is commit
# d17ea6a4 of Azure/aad-pod-identity.
vpkg=github.com/Azure/aad-pod-identity/version
ldflags="-s -w -X $vpkg.MICVersion=$ver -X $vpkg.NMIVersion=$ver -X $vpkg.GitCommit=d17ea6a41aed5284fda895d6d48f50cc5f9f175f -X $vpkg.BuildDate=module-build"
echo "upstream binaries: building aad-pod-identity mic and nmi ($ver); the first build takes a few minutes" >&2
(cd "$here" && go build -trimpath -tags 'netgo osusergo' -ldflags="$ldflags" -o "$tmp/" \
  github.com/Azure/aad-pod-identity/cmd/mic github.com/Azure/aad-pod-identity/cmd/nmi) >&2

go_tool_done "upstream binaries"
