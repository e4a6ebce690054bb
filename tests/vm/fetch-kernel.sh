#!/usr/bin/env bash
# Fetch the Debian kernel package that linux-image-amd64 depends on, unpack it and run depmod on it:
#   fetch-kernel.sh DIR            with this machine's apt as it is (bookworm: the tier's 6.1 kernel)
#   fetch-kernel.sh DIR SUITE      from SUITE of this machine's Debian mirror (bullseye: its 5.10), through a
#                                  sources list, package lists and apt cache of its own, so the host's apt
#                                  state is untouched
# DIR/VERSION names the kernel, DIR/boot/vmlinuz-<ver> and DIR/lib/modules/<ver>/modules.dep are there.
# A no-op when DIR/VERSION exists (rm -rf DIR for a newer kernel). Needs root (apt). tests/vm/prepare.sh calls it.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PATH=$PATH:/usr/sbin:/sbin
KDIR=${1:?usage: fetch-kernel.sh DIR [SUITE]}
SUITE=${2:-}

die() { echo "fetch-kernel.sh: $*" >&2; exit 1; }

[[ -s $KDIR/VERSION ]] && exit 0
[[ $(id -u) == 0 ]] || die "fetching the kernel package${SUITE:+ of $SUITE} needs apt as root"

work=$(dirname "$KDIR")/download.$$
rm -rf "$work" && mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
# _apt cannot write into a root-owned dir: let it, so apt stays sandboxed.
chown _apt "$work" 2>/dev/null || true

apt=()
if [[ -n $SUITE ]]; then
    # shellcheck source-path=SCRIPTDIR source=../../packaging/lib.sh
    source "$REPO/packaging/lib.sh"
    mirror=$(debian_mirror)
    [[ -n $mirror ]] || die "no Debian mirror in this machine's apt sources (set DEBIAN_MIRROR=...)"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [[ -s $keyring ]] || die "no $keyring (Debian debian-archive-keyring)"
    mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial"
    echo "deb [signed-by=$keyring] $mirror $SUITE main" > "$work/apt/sources.list"
    apt=(-o "Dir::Etc::sourcelist=$work/apt/sources.list" -o Dir::Etc::sourceparts=-
         -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache")
fi

resolve() {  # succeeds with nothing printed when apt does not know the package (set -e, pipefail)
    { apt-cache "${apt[@]}" depends linux-image-amd64 2>/dev/null || true; } \
        | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1
}
# The host's lists may already know the package; a private list starts empty.
pkg=
[[ -z $SUITE ]] && pkg=$(resolve)
if [[ -z $pkg ]]; then
    timeout 600 apt-get "${apt[@]}" update -qq || die "apt-get update failed${SUITE:+ for $SUITE (on $mirror)}"
    pkg=$(resolve)
fi
[[ -n $pkg ]] || die "cannot resolve linux-image-amd64${SUITE:+ in $SUITE on $mirror} with apt-cache depends"
ver=${pkg#linux-image-}
(cd "$work" && timeout 600 apt-get "${apt[@]}" download -qq "$pkg") || die "apt-get download $pkg failed"
deb=$(find "$work" -maxdepth 1 -name "${pkg}_*.deb" -print -quit)
[[ -n $deb ]] || die "apt-get download $pkg produced no .deb"
dpkg-deb -x "$deb" "$work/root"
[[ -f $work/root/boot/vmlinuz-$ver ]] || die "no boot/vmlinuz-$ver in $pkg"
depmod -b "$work/root" "$ver"
echo "$ver" > "$work/root/VERSION"
rm -rf "$KDIR" && mv "$work/root" "$KDIR"
