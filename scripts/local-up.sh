#!/usr/bin/env bash
# Runs the whole system locally on embedded defaults: test cluster, Azure
# emulator, mic (2 replicas), nmi (one per node, in network namespaces) and a
# pod that gets a token through 169.254.169.254; then tears everything down.
#
# Needs root on Debian with Go, Rust and Python; installs the rest
# (scripts/setup.sh). Extra arguments go to the demo, e.g. `--keep` to leave
# everything running after the token step until Ctrl-C.
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

# One binary: mic and nmi are the demo re-executed in their role.
printf '\n== building the demo with mic and nmi (cargo; a few minutes the first time)\n' >&2
cargo build -p aadpodid-local-up --bin local-up --locked

printf '\n== running the demo\n\n' >&2
exec "$CARGO_TARGET_DIR/debug/local-up" "$@"
