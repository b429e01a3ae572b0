#!/usr/bin/env bash
# The README's test command: installs what is missing (scripts/setup.sh: Debian
# packages, the test cluster, helm and upstream's v1.8.17 binaries built from
# their Go modules, the Python Azure SDK), then runs every test of the
# workspace. Run as root (the network tests create namespaces and iptables
# rules inside them). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/aadpodid/target}
AADPODID_CLUSTER_BIN=$(bash scripts/setup.sh)
export AADPODID_CLUSTER_BIN

printf '\n== cargo test --workspace --locked (%s)\n' "$(date -u +%H:%M:%S)" >&2
exec cargo test --workspace --locked "$@"
