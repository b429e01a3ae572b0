# shellcheck shell=bash
# The steps shared by the scripts that build a tool from a pinned Go module and
# cache it (tests/cluster/build.sh, tests/helm/build.sh,
# tests/upstream/build.sh). Sourced by them, never run on its own.
#
# A build script calls, in this order:
#   go_tool_init CACHE_ROOT INPUT...  Go's environment; sets $out to CACHE_ROOT/<key>
#   go_tool_cached LABEL BIN...       prints $out and exits when every BIN is in it
#   go_tool_begin                     sets $tmp (removed if the build fails)
#   go build ... -o "$tmp/..."        the tool's own build
#   go_tool_done LABEL                moves $tmp to $out and prints $out
#
# <key> changes with the Go release, the INPUT files (go.mod, go.sum, the
# calling script) and this file, so a version bump or a changed recipe rebuilds
# and an unchanged tree reuses. Go's own caches go to $HOME/.cache/go-mod and
# $HOME/.cache/go-build. Safe to run concurrently: a lock under CACHE_ROOT
# serialises builders and the binaries appear in the cache atomically (one
# rename). Progress and timings go to stderr; stdout carries only the folder.

# Sets Go's build environment and $out, the cache folder of this recipe.
go_tool_init() {
  go_tool_cache=$1
  shift
  export GOMODCACHE=${GOMODCACHE:-$HOME/.cache/go-mod}
  export GOCACHE=${GOCACHE:-$HOME/.cache/go-build}
  export GOFLAGS=-mod=readonly
  export GOTOOLCHAIN=local
  export CGO_ENABLED=0
  local key
  key=$( { go version; cat "$@" "${BASH_SOURCE[0]}"; } | sha256sum | cut -c1-16)
  out=$go_tool_cache/$key
}

# Succeeds when every named binary is an executable in $out.
go_tool_have() {
  local bin
  for bin in "$@"; do
    [ -x "$out/$bin" ] || return 1
  done
}

# When the binaries BIN... are cached, prints $out and exits. Otherwise takes
# the builders' lock (held until the script ends) and checks again, since
# another builder may have finished meanwhile.
go_tool_cached() {
  local label=$1
  shift
  if go_tool_have "$@"; then
    echo "$label: cached in $out" >&2
    echo "$out"
    exit 0
  fi
  mkdir -p "$go_tool_cache"
  exec 9>"$go_tool_cache/.lock"
  flock 9
  if go_tool_have "$@"; then
    echo "$out"
    exit 0
  fi
}

# Sets $tmp, a scratch folder in the cache that becomes $out on success and is
# removed when the script fails; starts the build clock.
go_tool_begin() {
  tmp=$(mktemp -d "$go_tool_cache/.build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  go_tool_start=$(date +%s)
}

# Publishes $tmp as $out and prints $out.
go_tool_done() {
  mv "$tmp" "$out"
  trap - EXIT
  echo "$1: built in $(( $(date +%s) - go_tool_start ))s into $out" >&2
  echo "$out"
}

# Prints the version go.mod file FILE requires of module MODULE.
go_mod_version() {
  grep -m1 "$2 v" "$1" | awk '{print $2}'
}
