# shellcheck shell=bash
# Sourced by images/base.sh and images/app/base.sh, never run on its own.
#
# debian_rootfs VARIANT PACKAGES ROOT SUITE SOURCES_FILE...
#   makes ROOT from Debian packages with mmdebstrap (root mode), through
#   the given apt sources: VARIANT (essential, extract, ...) plus PACKAGES
#   (comma-separated), merged /usr, and no documentation but the copyright
#   files. Release files are accepted whatever their dates (a mirror's
#   snapshot may be old).
debian_rootfs() {
  local variant=$1 packages=$2 root=$3 suite=$4
  shift 4
  mmdebstrap --mode=root --variant="$variant" --quiet \
    --include="$packages" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --aptopt='Acquire::Check-Valid-Until "false"' --aptopt='Acquire::Check-Date "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    "$suite" "$root" "$@" >&2
}
