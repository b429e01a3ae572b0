#!/usr/bin/env bash
# Installs what the tests and the local demo need on a fresh Debian machine
# (run as root; the network may be limited to package registries):
#   - Debian packages: openssl, util-linux (setpriv, flock), git, iproute2,
#     python3 + venv, iptables, curl, conntrack
#   - the test-cluster binaries (kube-apiserver, kubectl, etcd) built from their
#     Go modules by tests/cluster/build.sh: about 10-15 minutes the first time,
#     then cached under $HOME/.cache/aadpodid/cluster
#   - for the tests (not the demo): helm, upstream's v1.8.17 mic and nmi, and the
#     real test nodes' pieces (Debian's containerd, runc and CNI plugins;
#     kubelet, kube-controller-manager, kube-scheduler by tests/cluster/build-node.sh)
#   - the pinned Python Azure SDK virtualenv (tests/python/setup.sh)
#   - with AADPODID_SETUP_IMAGES=1 only: the mic, nmi and application (Python
#     Azure SDK) container images, and upstream v1.8.17's mic and nmi in images
#     built the same way (scripts/images.sh --upstream: podman, a base made
#     from Debian packages, the release binaries; about 2 minutes plus the
#     release build the first time, then cached under $HOME/.cache/aadpodid/images)
# Go, Rust (cargo) and Python must be present. Progress goes to stderr; the only
# line on stdout is the folder of the cluster binaries, for
#   export AADPODID_CLUSTER_BIN=$(bash scripts/setup.sh)
# Used by .ci/run and scripts/local-up.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)" >&2; }

step "system packages"
# install_missing TOOL:PACKAGE...: installs, in one apt-get run, the Debian
# package of each TOOL that is missing. TOOL is a command looked up on PATH,
# or an absolute path that must be executable.
install_missing() {
  local missing=() pair tool
  for pair in "$@"; do
    tool=${pair%%:*}
    if [ "${tool#/}" != "$tool" ]; then
      [ -x "$tool" ] || missing+=("${pair#*:}")
    else
      command -v "$tool" >/dev/null || missing+=("${pair#*:}")
    fi
  done
  if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } >&2
  fi
}
install_missing openssl:openssl setpriv:util-linux flock:util-linux git:git ip:iproute2 python3:python3 \
  iptables:iptables curl:curl conntrack:conntrack
if ! python3 -m venv --help >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -q && apt-get install -y -q --no-install-recommends python3-venv; } >&2
fi
for tool in go cargo; do
  command -v "$tool" >/dev/null || { echo "setup: $tool is required but not installed" >&2; exit 1; }
done
go version >&2
cargo --version >&2

# Runs a Go build script in the background, saying every 30 s that it is still
# going (a cached run answers at once and prints nothing here); prints the
# folder it reports.
build_with_progress() {
  local what=$1 script=$2 expected=$3 start out pid elapsed
  start=$(date +%s)
  out=$(mktemp)
  bash "$script" >"$out" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    for _ in $(seq 30); do
      sleep 1
      kill -0 "$pid" 2>/dev/null || break 2
    done
    elapsed=$(( $(date +%s) - start ))
    printf '%s: still building (%dm%02ds so far; the first build takes about %s, later runs reuse the cache)\n' \
      "$what" $((elapsed / 60)) $((elapsed % 60)) "$expected" >&2
  done
  if ! wait "$pid"; then
    rm -f "$out"
    echo "setup: $script failed" >&2
    exit 1
  fi
  local dir
  dir=$(tail -n1 "$out")
  rm -f "$out"
  echo "$what step took $(( $(date +%s) - start ))s; binaries in $dir" >&2
  echo "$dir"
}

step "test cluster binaries (kube-apiserver, kubectl, etcd from Go modules)"
bin=$(build_with_progress "cluster binaries" tests/cluster/build.sh "10-15 min")
"$bin/kube-apiserver" --version >&2
"$bin/etcd" --version | sed -n 1p >&2

if [ "${AADPODID_SETUP_DEMO_ONLY:-}" != 1 ]; then
  # Only the tests and benchmarks need these; the demo does not.
  step "helm (from its Go module, for the chart tests)"
  helm_bin=$(build_with_progress "helm" tests/helm/build.sh "5-6 min")
  "$helm_bin/helm" version --short >&2
  step "upstream aad-pod-identity v1.8.17 mic and nmi (from its Go module, for side-by-side tests and benchmarks)"
  upstream_bin=$(build_with_progress "upstream binaries" tests/upstream/build.sh "6-7 min")
  "$upstream_bin/mic" --version >&2 || true
  step "real test nodes: containerd, runc, CNI plugins (Debian) and kubelet, kube-controller-manager, kube-scheduler (from their Go module)"
  install_missing containerd:containerd runc:runc /usr/lib/cni/bridge:containernetworking-plugins
  node_bin=$(build_with_progress "node binaries" tests/cluster/build-node.sh "4-5 min after the cluster binaries")
  "$node_bin/kubelet" --version >&2
fi

step "Python Azure SDK clients for token tests"
bash tests/python/setup.sh >&2

if [ "${AADPODID_SETUP_IMAGES:-}" = 1 ]; then
  step "container images mic, nmi, app and upstream's mic and nmi (scripts/images.sh --upstream)"
  bash scripts/images.sh --upstream >&2
fi

echo "$bin"
