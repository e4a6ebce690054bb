#!/usr/bin/env bash
# Build the sdist and, from that sdist, the wheel (python -m build), check both with twine, and list
# what the sdist must carry for distribution packages (unit, catalog, example config, man sources).
# Needs: python -m pip install build twine (packaging/install-build-deps.sh); PyPI or a pip cache for
# the isolated build environment (setuptools).
set -euo pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 OUTDIR" >&2; exit 64; }
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
python=$(find_python)
"$python" -c 'import build, twine' 2>/dev/null || {
    echo "missing build/twine for $python: $python -m pip install build twine" >&2; exit 127; }
mkdir -p -- "$1"
out=$(cd "$1" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/ctwatchd-py.XXXXXX")
trap 'rm -rf -- "$work"' EXIT

# From a copy, so egg-info and build/ never land in the work tree.
copy_tree "$work/src"
version=$(project_version)
rm -f -- "$out/ctwatchd-$version.tar.gz" "$out/ctwatchd-$version"-*.whl
# No --sdist/--wheel: build makes the sdist, then the wheel from the unpacked sdist, which proves
# the sdist is complete enough to build from.
timeout 600 "$python" -m build --outdir "$out" "$work/src" >"$work/build.log" 2>&1 || {
    tail -n 40 "$work/build.log" >&2; echo "python -m build failed" >&2; exit 1; }
sdist=$out/ctwatchd-$version.tar.gz
wheel=$(ls -- "$out/ctwatchd-$version"-*.whl)
"$python" -m twine check --strict "$sdist" "$wheel"

listing=$(tar -tzf "$sdist")
missing=0
for f in systemd/ctwatchd.service systemd/ctwatchd.catalog packaging/ctwatchd.toml \
         docs/ctwatchd.8.scd docs/ctwatchd.toml.5.scd packaging/rpm/ctwatchd.spec; do
    grep -qxF -- "ctwatchd-$version/$f" <<<"$listing" || { echo "sdist lacks $f" >&2; missing=1; }
done
((missing == 0))
echo "built $sdist"
echo "built $wheel"
