#!/usr/bin/env bash
# Makes the base of the application image from Debian packages, fetched
# through this machine's own apt sources (no container registry):
#   app-base.tar  Debian's Python 3 interpreter and standard library
#                 (python3.11-minimal, libpython3.11-stdlib and the
#                 libraries they need), the standard library compiled to
#                 .pyc once (the image's root is read-only when it runs),
#                 passwd/group with root and nonroot (65532), /tmp and the
#                 packages' copyright files. No shell, no package manager.
# The packages are only unpacked (mmdebstrap's `extract` variant): nothing
# runs their maintainer scripts, and nothing else needs them.
# Usage (root): images/app/base.sh OUT_DIR SUITE SOURCES_FILE...
# Prints nothing on stdout. The tarball is a rootfs tarball for `podman
# import`, with sorted names, numeric owners and one timestamp.
set -euo pipefail

out=$1 suite=$2
shift 2
[ $# -gt 0 ] || { echo "app/base.sh: no apt sources given" >&2; exit 2; }
work=$(mktemp -d "$out/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/app

# shellcheck source=images/debian.sh
. "$(dirname "${BASH_SOURCE[0]}")/../debian.sh"
debian_rootfs extract python3.11-minimal,libpython3.11-stdlib "$root" "$suite" "$@"

# What the interpreter does not use: glibc's gconv modules (Python has its
# own codecs), and the tools the merged-/usr hook brought in to install
# usr-is-merged (dpkg and tar with their state).
rm -rf "$root"/usr/lib/*-linux-gnu/gconv "$root"/var/lib/dpkg "$root"/var/cache/* \
  "$root"/var/log/* "$root"/usr/share/dpkg "$root"/usr/share/lintian "$root"/usr/share/bug \
  "$root"/etc/dpkg "$root"/etc/alternatives "$root"/usr/share/polkit-1
rm -f "$root"/usr/bin/dpkg* "$root"/usr/bin/tar "$root"/usr/bin/update-alternatives \
  "$root"/usr/sbin/*
ln -sf python3.11 "$root/usr/bin/python3"

# The standard library as .pyc, compiled by the image's own interpreter
# (chroot: nothing of the host's Python is involved). Unchecked hashes: the
# image never changes, and the tarball's single timestamp would make
# timestamp-checked .pyc files look stale (recompiled at every start).
chroot "$root" /usr/bin/python3.11 -m compileall -q --invalidation-mode unchecked-hash \
  /usr/lib/python3.11 >&2 || {
  echo "app/base.sh: compileall failed" >&2
  exit 1
}

printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$root/etc/passwd"
printf '%s\n' 'root:x:0:' 'nonroot:x:65532:' >"$root/etc/group"
mkdir -p "$root/home/nonroot" "$root/root" "$root/tmp"
chown 65532:65532 "$root/home/nonroot"
chmod 700 "$root/root"
chmod 1777 "$root/tmp"

epoch=${SOURCE_DATE_EPOCH:-$(stat -c %Y "$root/usr/lib/python3.11/os.py")}
tar --sort=name --numeric-owner --mtime="@$epoch" \
  --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
  --exclude='./run/*' --exclude='./tmp/*' \
  -C "$root" -cf "$work/app-base.tar" .
mv "$work/app-base.tar" "$out/"
