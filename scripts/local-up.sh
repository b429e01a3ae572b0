#!/usr/bin/env bash
# Runs the whole system locally on embedded defaults: test cluster, Azure
# emulator, mic (2 replicas), nmi (one per node, in network namespaces) and a
# pod that gets a token through 169.254.169.254; then tears everything down.
#
# Needs root on Debian with Go, Rust and Python; installs the rest
# (scripts/setup.sh). Extra arguments go to the demo, e.g. `--keep` to leave
# everything running after the token step until Ctrl-C.
#
# `--real` instead: the chart's containers on real nodes. Two nodes (kubelet,
# containerd, runc, CNI bridge, each in a network namespace of its own), a
# kube-controller-manager and kube-scheduler beside the apiserver, the
# images of scripts/images.sh, `helm install` of charts/aad-pod-identity, the
# seed manifests and an application pod that gets a token through
# 169.254.169.254 with the Python Azure SDK; then left running (it prints the
# kubeconfig and where the logs are) until Ctrl-C or AADPODID_REAL_KEEP_SECS
# seconds (default 3600). The same code as tests/tests/real_helm.rs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" != 0 ]; then
  echo "local-up: needs root (it creates network namespaces and iptables rules inside them)" >&2
  exit 1
fi

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/aadpodid/target}

echo "local-up: installing/building what is missing (fast when cached)" >&2
AADPODID_CLUSTER_BIN=$(AADPODID_SETUP_DEMO_ONLY=1 bash scripts/setup.sh)
export AADPODID_CLUSTER_BIN

if [ "${1:-}" = --real ]; then
  printf '\n== building the real-node test (cargo; a few minutes the first time)\n' >&2
  # The test binary's path, from cargo's "Executable" line.
  bin=$(cargo test -p aadpodid-tests --test real_helm --locked --no-run 2>&1 |
    sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -n 1)
  if [ -z "$bin" ] || [ ! -x "$bin" ]; then
    echo "local-up: could not build the real-node test" >&2
    exit 1
  fi
  printf '\n== bringing up the real nodes (images, cluster, nodes, helm install)\n\n' >&2
  exec "$bin" real_cluster_stays_up --exact --ignored --nocapture --test-threads=1
fi

# One binary: mic and nmi are the demo re-executed in their role.
printf '\n== building the demo with mic and nmi (cargo; a few minutes the first time)\n' >&2
cargo build -p aadpodid-local-up --bin local-up --locked

printf '\n== running the demo\n\n' >&2
exec "$CARGO_TARGET_DIR/debug/local-up" "$@"
