#!/usr/bin/env bash
# Build the Debian package from a copy of the tree (packaging/debian becomes debian/), check it with
# lintian, and copy the .deb (and lintian's report) to OUTDIR. Fails on a lintian error; warnings
# are printed, and the accepted ones are overridden with a reason in debian/*lintian-overrides.
# Needs: packaging/install-build-deps.sh (dpkg-dev, debhelper, dh-python, lintian, ...).
set -euo pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 OUTDIR" >&2; exit 64; }
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
need dpkg-buildpackage dpkg-dev
need dh debhelper
need lintian lintian
mkdir -p -- "$1"
out=$(cd "$1" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/ctwatchd-deb.XXXXXX")
trap 'rm -rf -- "$work"' EXIT

src=$work/ctwatchd-$(project_version)
copy_tree "$src"
rm -rf -- "$src/debian"
cp -a -- "$src/packaging/debian" "$src/debian"
# -b: binary only; -us -uc: unsigned; the build is run as plain files, no root needed
# (Rules-Requires-Root: no). Check-builddeps stays on, so a missing Build-Depends fails here.
# The system PATH only: pybuild must find Debian's python3, not a pyenv or virtualenv one.
(cd "$src" && PATH=/usr/sbin:/usr/bin:/sbin:/bin timeout 900 dpkg-buildpackage -b -us -uc) >"$work/build.log" 2>&1 || {
    tail -n 60 "$work/build.log" >&2; echo "dpkg-buildpackage failed (log above)" >&2; exit 1; }

changes=("$work"/ctwatchd_*.changes)
# --fail-on error: warnings do not fail the build (each is overridden or explained).
root=(); [[ $(id -u) -ne 0 ]] || root=(--allow-root)
rc=0
timeout 600 lintian "${root[@]}" --fail-on error --info --display-info "${changes[0]}" >"$work/lintian.txt" 2>&1 || rc=$?
cat "$work/lintian.txt"
cp -- "$work"/ctwatchd_*.deb "$work/lintian.txt" "$out/"
echo "lintian exit status: $rc"
ls -- "$out"/ctwatchd_*.deb
exit "$rc"
