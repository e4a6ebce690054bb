#!/usr/bin/env bash
# Install what the VM test tier needs; idempotent, and a no-op once cached.
#   - Debian packages qemu-system-x86, busybox-static, kmod, file, iptables, nftables, curl (apt-get, as root)
#   - virtme-ng (vng) in the project venv ($VENV, default <repo>/.venv)
#   - Debian bookworm's generic amd64 kernel, extracted to <repo>/.cache/vm/kernel
#     (VERSION there names it; modules.dep built with depmod)
#   - Debian bullseye's (5.10: no nftables owner tables) the same way, to <repo>/.cache/vm/kernel-bullseye,
#     from this machine's Debian mirror through a private apt list (tests/vm/fetch-kernel.sh). Where it
#     cannot be fetched only test_bullseye.py is skipped; with CI set that is a failure here.
# To move to a newer kernel: rm -rf .cache/vm/kernel (or kernel-bullseye) && bash tests/vm/prepare.sh
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${VENV:-$REPO/.venv}
CACHE=$REPO/.cache/vm
KDIR=$CACHE/kernel
VNG_SPEC='virtme-ng==1.42'  # the version this harness was proven with
export PATH=$PATH:/usr/sbin:/sbin

die() { echo "prepare.sh: $*" >&2; exit 1; }

apt_updated=
apt_update() {
    [[ -n $apt_updated ]] && return 0
    timeout 600 apt-get update -qq
    apt_updated=1
}

# 1. Debian packages, by the command each provides.
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v busybox >/dev/null || missing+=(busybox-static)
{ command -v modprobe && command -v depmod; } >/dev/null || missing+=(kmod)
command -v file >/dev/null || missing+=(file)
# The traffic scenario runs them inside the guest (the guest's root is this machine's filesystem).
command -v iptables >/dev/null || [[ -x /usr/sbin/iptables ]] || missing+=(iptables)
command -v nft >/dev/null || [[ -x /usr/sbin/nft ]] || missing+=(nftables)
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || die "missing ${missing[*]}: run as root, or: sudo apt-get install ${missing[*]}"
    apt_update
    DEBIAN_FRONTEND=noninteractive timeout 1200 \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. virtme-ng in the venv.
[[ -x $VENV/bin/python ]] || die "no virtualenv at $VENV (set VENV=...)"
if [[ ! -x $VENV/bin/vng ]]; then
    timeout 600 "$VENV/bin/python" -m pip install -q "$VNG_SPEC"
fi
# virtme-ng adds audit=off to every --systemd boot, and the kernel cannot enable audit after that
# (audit_initialized stays AUDIT_DISABLED whatever a later audit=1 says). The attribution scenarios
# need the kernel's audit records, so that one argument goes; the kernel's default is audit off
# until auditctl -e 1, as on Debian without auditd. One exact line of the pinned version, or a failure.
vng_run=$("$VENV/bin/python" -c 'import virtme.commands.run as r; print(r.__file__)')
if grep -q 'kernelargs.append("audit=off")' "$vng_run"; then
    sed -i 's/kernelargs.append("audit=off")/pass  # ctwatchd tests\/vm\/prepare.sh: keep audit usable/' "$vng_run"
fi
grep -q 'pass  # ctwatchd tests/vm/prepare.sh: keep audit usable' "$vng_run" \
    || die "$vng_run: the audit=off line of $VNG_SPEC was not found; check the boot arguments"

# 3. The kernels: dpkg-deb -x and depmod -b of the package linux-image-amd64 depends on.
# Each is a no-op once cached (VERSION there).
bash "$REPO/tests/vm/fetch-kernel.sh" "$KDIR" || die "the bookworm kernel could not be fetched"
if ! bash "$REPO/tests/vm/fetch-kernel.sh" "$CACHE/kernel-bullseye" bullseye; then
    [[ -z ${CI:-} ]] || die "the bullseye (5.10) kernel could not be fetched, and CI is set"
    echo "prepare.sh: no bullseye (5.10) kernel: tests/vm/test_bullseye.py will be skipped" >&2
fi

ver=$(cat "$KDIR/VERSION")
echo "vm kernel: $KDIR/boot/vmlinuz-$ver"
if [[ -s $CACHE/kernel-bullseye/VERSION ]]; then
    echo "vm kernel (bullseye): $CACHE/kernel-bullseye/boot/vmlinuz-$(cat "$CACHE/kernel-bullseye/VERSION")"
fi
