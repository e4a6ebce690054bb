#!/usr/bin/env bash
# Build the binary RPM with rpmbuild -bb from the sdist (Source0) and copy it to OUTDIR.
# SDIST=path/to/ctwatchd-VERSION.tar.gz reuses an sdist; otherwise one is built (python -m build).
# Needs: rpm (Debian's package provides rpmbuild), scdoc, groff, python3-build, python3-installer.
set -euo pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 OUTDIR" >&2; exit 64; }
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
need rpmbuild rpm
need scdoc scdoc
mkdir -p -- "$1"
out=$(cd "$1" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/ctwatchd-rpm.XXXXXX")
trap 'rm -rf -- "$work"' EXIT
version=$(project_version)
spec_version=$(sed -n 's/^Version: *//p' "$repo_root/packaging/rpm/ctwatchd.spec")
[[ $spec_version == "$version" ]] || {
    echo "ctwatchd.spec says Version: $spec_version, ctwatchd/__init__.py says $version" >&2; exit 1; }

mkdir -p "$work/SOURCES"
if [[ -n ${SDIST:-} ]]; then
    cp -- "$SDIST" "$work/SOURCES/ctwatchd-$version.tar.gz"
else
    copy_tree "$work/src"
    timeout 600 "$(find_python)" -m build --sdist --outdir "$work/SOURCES" "$work/src" >"$work/sdist.log" 2>&1 || {
        tail -n 40 "$work/sdist.log" >&2; exit 1; }
fi

# --nodeps: on a non-RPM distribution the rpm database is empty, so BuildRequires cannot be
# checked by rpm (install-build-deps.sh installs their Debian equivalents). The system PATH only,
# so the build uses /usr/bin/python3 like %__python3. HOME: no ~/.rpmmacros from the user.
(cd "$work" && HOME=$work PATH=/usr/sbin:/usr/bin:/sbin:/bin timeout 900 rpmbuild -bb --nodeps \
    --define "_topdir $work" --define "_sourcedir $work/SOURCES" \
    "$repo_root/packaging/rpm/ctwatchd.spec") >"$work/rpmbuild.log" 2>&1 || {
    tail -n 60 "$work/rpmbuild.log" >&2; echo "rpmbuild failed (log above)" >&2; exit 1; }
cp -- "$work"/RPMS/noarch/ctwatchd-"$version"-*.noarch.rpm "$out/"
ls -- "$out"/ctwatchd-"$version"-*.noarch.rpm
