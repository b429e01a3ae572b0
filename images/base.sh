#!/usr/bin/env bash
# Makes the two runtime bases of the images from Debian packages, fetched
# through this machine's own apt sources (no container registry):
#   nmi-base.tar  Debian's essential set plus iptables (legacy and nft),
#                 conntrack and ca-certificates; no documentation but the
#                 copyright files. What Dockerfile.nmi's BASE needs.
#   mic-base.tar  only what mic links and reads: glibc and libgcc's shared
#                 libraries (not glibc's gconv modules), the CA bundle,
#                 nsswitch.conf, passwd/group with root and nonroot (65532),
#                 os-release, /tmp and the copyright files of those
#                 packages; no shell. The counterpart of distroless cc.
# Usage (root): images/base.sh OUT_DIR SUITE SOURCES_FILE...
# Both tarballs are rootfs tarballs for `podman import`, with sorted names,
# numeric owners and one timestamp.
set -euo pipefail

out=$1 suite=$2
shift 2
[ $# -gt 0 ] || { echo "base.sh: no apt sources given" >&2; exit 2; }
arch=$(dpkg --print-architecture)
work=$(mktemp -d "$out/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/nmi

# shellcheck source=images/debian.sh
. "$(dirname "${BASH_SOURCE[0]}")/debian.sh"
debian_rootfs essential iptables,conntrack,ca-certificates "$root" "$suite" "$@"

# One timestamp for every file: the newest package's build date would do as
# well; the snapshot the installed packages came from is what matters.
epoch=${SOURCE_DATE_EPOCH:-$(stat -c %Y "$root/var/lib/dpkg/status")}
pack() {
  tar --sort=name --numeric-owner --mtime="@$epoch" --xattrs \
    --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
    --exclude='./run/*' --exclude='./tmp/*' --exclude='./var/cache/*' \
    --exclude='./var/log/*' \
    -C "$1" -cf "$2" .
}
pack "$root" "$work/nmi-base.tar"

# mic: files of libc6 and libgcc-s1 under the library folders, as the
# merged-/usr tree stores them (/lib is usr/lib, /lib64 is usr/lib64).
mic=$work/mic
mkdir -p "$mic/usr/lib" "$mic/usr/lib64" "$mic/etc/ssl/certs" "$mic/tmp"
chmod 1777 "$mic/tmp"
ln -s usr/lib "$mic/lib"
ln -s usr/lib64 "$mic/lib64"
for pkg in libc6 libgcc-s1; do
  list=$root/var/lib/dpkg/info/$pkg:$arch.list
  [ -f "$list" ] || list=$root/var/lib/dpkg/info/$pkg.list
  sed -E 's#^/(lib|lib64)/#/usr/\1/#' "$list" |
    grep -E '^/usr/lib(64)?/' | grep -v '/gconv' | grep -v '/audit' |
    while read -r path; do
      if [ -L "$root$path" ] || [ -f "$root$path" ]; then
        (cd "$root" && cp -a --parents ".$path" "$mic/")
      fi
    done
done
for pkg in libc6 libgcc-s1 ca-certificates; do
  (cd "$root" && cp -a --parents "./usr/share/doc/$pkg/copyright" "$mic/")
done
cp -L "$root/etc/ssl/certs/ca-certificates.crt" "$mic/etc/ssl/certs/ca-certificates.crt"
cp -L "$root/etc/os-release" "$mic/etc/os-release"
cp "$root/etc/nsswitch.conf" "$mic/etc/nsswitch.conf"
printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$mic/etc/passwd"
printf '%s\n' 'root:x:0:' 'nonroot:x:65532:' >"$mic/etc/group"
mkdir -p "$mic/home/nonroot" "$mic/root"
chown 65532:65532 "$mic/home/nonroot"
chmod 700 "$mic/root"
pack "$mic" "$work/mic-base.tar"

mv "$work/nmi-base.tar" "$work/mic-base.tar" "$out/"
