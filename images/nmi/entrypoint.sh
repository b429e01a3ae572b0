#!/bin/sh
# NMI's entry point in its image: picks the iptables back end (legacy or nft)
# the node's rules are in, then runs nmi with that back end's iptables
# (`--iptables-path`; nmi runs only that program for its rules).
#
# Both back ends write the same kernel hooks through different interfaces,
# and a rule added with one is not ordered against rules added with the
# other, so NMI must use the node's. The choice follows Kubernetes'
# iptables-wrapper (kubernetes-sigs/iptables-wrappers):
#   1. kubelet (1.17 and later) creates KUBE-IPTABLES-HINT or
#      KUBE-KUBELET-CANARY in the mangle table: found by iptables-nft-save
#      -t mangle (IPv4 or IPv6) -> nft; else found in the full
#      iptables-legacy-save output (`-t mangle` would make the legacy kernel
#      create that table) -> legacy.
#   2. No kubelet chains: the back end holding more rules (`-A` lines of
#      iptables-save and ip6tables-save) wins, as the wrapper's earlier
#      shell version decided; a tie, including no rules at all, -> nft.
# An explicit --iptables-path (or AADPODID_IPTABLES_MODE=legacy|nft) skips the
# detection. The choice and its reason go to stderr, one line;
# `nmi-entrypoint --print-iptables-mode` only prints the choice on stdout.
# POSIX sh only; every probe is bounded by `timeout`.
set -eu

NMI=${AADPODID_NMI:-/usr/local/bin/nmi}
SBIN=${AADPODID_IPTABLES_DIR:-/usr/sbin}

# The output of `<tool> <args>`, empty when it fails or takes over 5 s.
probe() {
  timeout 5 "$@" 2>/dev/null || true
}

kubelet_chains() {
  grep -cE '^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY) ' || true
}

rule_lines() {
  grep -c '^-A ' || true
}

detect() {
  if [ "$({ probe "$SBIN/iptables-nft-save" -t mangle; probe "$SBIN/ip6tables-nft-save" -t mangle; } | kubelet_chains)" -gt 0 ]; then
    echo "nft kubelet's chains are in iptables-nft"
    return
  fi
  legacy=$({ probe "$SBIN/iptables-legacy-save"; probe "$SBIN/ip6tables-legacy-save"; })
  if [ "$(printf '%s\n' "$legacy" | kubelet_chains)" -gt 0 ]; then
    echo "legacy kubelet's chains are in iptables-legacy"
    return
  fi
  n_legacy=$(printf '%s\n' "$legacy" | rule_lines)
  n_nft=$({ probe "$SBIN/iptables-nft-save"; probe "$SBIN/ip6tables-nft-save"; } | rule_lines)
  if [ "$n_legacy" -gt "$n_nft" ]; then
    echo "legacy no kubelet chains; $n_legacy legacy rules, $n_nft nft rules"
  else
    echo "nft no kubelet chains; $n_legacy legacy rules, $n_nft nft rules (a tie goes to nft)"
  fi
}

# `--print-iptables-mode` alone: print the choice (legacy or nft) on stdout
# and exit; the upstream nmi image's iptables wrapper asks this way.
print_only=false
if [ "$#" -eq 1 ] && [ "$1" = --print-iptables-mode ]; then
  print_only=true
else
  for arg in "$@"; do
    case "$arg" in
      --iptables-path | --iptables-path=*) exec "$NMI" "$@" ;;
    esac
  done
fi

case "${AADPODID_IPTABLES_MODE:-}" in
  legacy | nft) choice="$AADPODID_IPTABLES_MODE set by AADPODID_IPTABLES_MODE" ;;
  "") choice=$(detect) ;;
  *)
    echo "nmi-entrypoint: AADPODID_IPTABLES_MODE must be legacy or nft, not '$AADPODID_IPTABLES_MODE'" >&2
    exit 2
    ;;
esac
mode=${choice%% *}
if $print_only; then
  echo "$mode"
  exit 0
fi
echo "nmi-entrypoint: iptables back end $mode (${choice#* })" >&2
exec "$NMI" --iptables-path="$SBIN/iptables-$mode" "$@"
