#!/usr/bin/env bash
# Build the image's base offline-ready: a debootstrapped Debian bookworm root with what ctwatchd needs
# at run time (python3, kmod, libudev1) and python3-venv for the Containerfile's venv stage, as a tar
# for `docker import` / `podman import`. With it the image builds with no network at all:
#   packaging/kubernetes/build-base.sh ctwatchd-base.tar
#   docker import ctwatchd-base.tar ctwatchd-base:bookworm
#   packaging/build-python.sh dist && python3 -m pip wheel -w dist/wheels "$(ls dist/ctwatchd-*.whl)[metrics]"
#   docker build --network none --build-arg BASE=ctwatchd-base:bookworm --build-arg PIP_NO_INDEX=1 \
#       -f packaging/kubernetes/Containerfile -t ctwatchd:0.1.0 .
# Needs root and the Debian mirror ($DEBIAN_MIRROR, else the one apt uses); debootstrap is installed if
# missing. Timestamps and package versions come from the mirror, so two builds a day apart may differ.
set -euo pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 OUT.tar" >&2; exit 64; }
# shellcheck source-path=SCRIPTDIR source=../lib.sh
source "$(dirname "$0")/../lib.sh"
[[ $EUID -eq 0 ]] || { echo "build-base: debootstrap needs root" >&2; exit 1; }
out=$1
url=$(debian_mirror)
[[ -n $url ]] || { echo "build-base: no Debian mirror found (set DEBIAN_MIRROR)" >&2; exit 1; }
need_debootstrap
work=$(mktemp -d "${TMPDIR:-/tmp}/ctwatchd-base.XXXXXX")
trap 'rm -rf -- "$work"' EXIT

debootstrap --variant=minbase --include=python3,python3-venv,kmod,libudev1 bookworm "$work/root" "$url" \
    >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
# What a container never uses: apt's caches and lists, docs, man pages, locales (like Debian's -slim).
chroot "$work/root" apt-get clean
rm -rf "$work/root/var/lib/apt/lists/"* "$work/root/var/log/"*.log "$work/root/var/cache/debconf/"*-old \
    "$work/root/usr/share/doc/"* "$work/root/usr/share/man/"* "$work/root/usr/share/info/"*
find "$work/root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
# The host's resolver and hostname are not the image's business: the runtime provides them.
: >"$work/root/etc/resolv.conf"
: >"$work/root/etc/hostname"
tar --numeric-owner --xattrs -C "$work/root" -cf "$out.tmp" .
mv -- "$out.tmp" "$out"
echo "built $out ($(du -m -- "$out" | cut -f1) MiB)"
