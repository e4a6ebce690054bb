#!/usr/bin/env bash
# Build (once) the Debian bookworm root that tests/vm/systemd boots with
# `vng --systemd`, then (every run, cheaply) link the test kernel's modules in.
#   CTWATCHD_VM_CACHE   cache dir            (default: <repo>/.cache/vm)
#   CTWATCHD_VM_KERNEL  extracted kernel dir (default: $CTWATCHD_VM_CACHE/kernel)
#   DEBIAN_MIRROR       mirror URL           (default: the one apt uses here)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
# shellcheck source-path=SCRIPTDIR source=../../../packaging/lib.sh
source "$repo/packaging/lib.sh"  # debian_mirror, need_debootstrap
cache=${CTWATCHD_VM_CACHE:-$repo/.cache/vm}
root=$cache/sysroot
kdir=${CTWATCHD_VM_KERNEL:-$cache/kernel}
suite=bookworm
pkgs=systemd-sysv,udev,kmod,python3,python3-venv,iproute2,dbus,iptables,nftables,procps,curl
pkgs+=,python3-pyudev,python3-structlog,python3-sdnotify,python3-prometheus-client
# The docker scenarios (test_docker.py): Debian's dockerd, containerd and runc, and busybox-static for
# an image imported offline. Installed disabled: only the docker boot enables them.
pkgs+=,docker.io,busybox-static
# The trigger scenarios (test_triggers.py): firewalld's clean-up, and auditd for attributing removals.
pkgs+=,firewalld,auditd,libpam-systemd  # libpam-systemd: the logind polkitd (firewalld) needs
# Units that only cost boot time under TCG, or wait for things a test VM lacks
# (measured: ~20 s -> ~16 s boot-to-poweroff). udev coldplug stays on (realism);
# boot with systemd.mask=systemd-udev-trigger.service to save ~3 s more.
masks=(apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer
  e2scrub_reap.service fstrim.timer systemd-tmpfiles-clean.timer
  getty@tty1.service serial-getty@ttyS0.service console-getty.service
  systemd-logind.service systemd-user-sessions.service systemd-binfmt.service
  proc-sys-fs-binfmt_misc.automount systemd-journal-flush.service systemd-sysusers.service
  systemd-random-seed.service systemd-update-utmp.service systemd-update-utmp-runlevel.service
  modprobe@drm.service modprobe@dm_mod.service modprobe@efi_pstore.service
  modprobe@fuse.service modprobe@loop.service modprobe@configfs.service)
stamp_want="v3 $suite $pkgs"
stamp=$root/.ctwatchd-sysroot

build() {
  local tmp=$root.tmp url
  [[ $EUID -eq 0 ]] || { echo "build-root: debootstrap needs root" >&2; exit 1; }
  url=$(debian_mirror)
  [[ -n $url ]] || { echo "build-root: no Debian mirror found" >&2; exit 1; }
  need_debootstrap
  rm -rf "$tmp" "$root"
  mkdir -p "$cache"
  echo "build-root: debootstrap $suite from $url into $root" >&2
  debootstrap --variant=minbase --include="$pkgs" "$suite" "$tmp" "$url" >"$cache/debootstrap.log" 2>&1 \
    || { tail -n 30 "$cache/debootstrap.log" >&2; exit 1; }
  chroot "$tmp" systemctl disable docker.service docker.socket containerd.service firewalld.service \
    auditd.service >/dev/null 2>&1 || true
  chroot "$tmp" apt-get clean
  rm -rf "$tmp/var/lib/apt/lists/"* "$tmp/var/log/journal/"*
  echo "$stamp_want" >"$tmp/.ctwatchd-sysroot"
  mv "$tmp" "$root"
}

# Idempotent and cheap, so it runs every time.
configure() {
  echo ctwatchd-vm >"$root/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 ctwatchd-vm\n' >"$root/etc/hosts"
  chroot "$root" passwd -d root >/dev/null
  : >"$root/etc/fstab"
  ln -sf /lib/systemd/system/multi-user.target "$root/etc/systemd/system/default.target"
  local u
  for u in "${masks[@]}"; do ln -sf /dev/null "$root/etc/systemd/system/$u"; done
  mkdir -p "$root/etc/systemd/journald.conf.d" "$root/etc/systemd/system.conf.d"
  # Keep the journal in RAM: the root is shared read-write with every boot.
  printf '[Journal]\nStorage=volatile\n' >"$root/etc/systemd/journald.conf.d/vm.conf"
  printf '[Manager]\nDefaultTimeoutStartSec=60s\nDefaultTimeoutStopSec=10s\n' \
    >"$root/etc/systemd/system.conf.d/vm.conf"
}

link_modules() {
  [[ -s $kdir/VERSION ]] || { echo "build-root: no kernel yet ($kdir/VERSION missing); modules not linked" >&2; return 0; }
  local ver src dst
  ver=$(<"$kdir/VERSION")
  src=$kdir/lib/modules/$ver
  dst=$root/lib/modules/$ver
  [[ -d $src ]] || { echo "build-root: $src missing" >&2; exit 1; }
  if [[ -e $dst/modules.dep && $dst/modules.dep -ef $src/modules.dep ]]; then return 0; fi
  if [[ -e $dst/modules.dep ]] && cmp -s "$dst/modules.dep" "$src/modules.dep"; then return 0; fi
  rm -rf "$dst"
  mkdir -p "$root/lib/modules"
  cp -al "$src" "$dst" 2>/dev/null || { rm -rf "$dst"; cp -a "$src" "$dst"; }
  echo "build-root: linked modules $ver" >&2
}

if [[ ! -e $stamp || $(<"$stamp") != "$stamp_want" ]]; then build; fi
configure
link_modules
echo "$root"
