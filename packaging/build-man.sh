#!/usr/bin/env bash
# Build ctwatchd(8) and ctwatchd.toml(5) from their scdoc sources in docs/ into OUTDIR, then render
# each with groff (all warnings on) and fail on any warning.
# Needs: scdoc, groff (Debian: apt-get install scdoc groff; Fedora: dnf install scdoc groff).
set -euo pipefail
usage() { echo "usage: $0 OUTDIR" >&2; exit 64; }
[[ $# -eq 1 ]] || usage
here=$(cd "$(dirname "$0")" && pwd)
docs=$(cd "$here/../docs" && pwd)
out=$1
mkdir -p -- "$out"
# Reproducible dates in .TH: the newest commit if there is one, else the source file's mtime.
if [[ -z ${SOURCE_DATE_EPOCH:-} ]]; then
    SOURCE_DATE_EPOCH=$(git -C "$docs" log -1 --format=%ct 2>/dev/null || true)
    [[ -n $SOURCE_DATE_EPOCH ]] || SOURCE_DATE_EPOCH=$(stat -c %Y -- "$docs/ctwatchd.8.scd")
fi
export SOURCE_DATE_EPOCH

for src in "$docs"/*.scd; do
    page=$(basename -- "$src" .scd)          # ctwatchd.8, ctwatchd.toml.5
    # scdoc puts .nh (no hyphenation) before .TH, which resets it; repeat it after .TH so that
    # field names such as CTWATCHD_EVENT are never split.
    scdoc <"$src" | sed '/^\.TH /a .nh' >"$out/$page.tmp"
    mv -- "$out/$page.tmp" "$out/$page"
    # -ww: all warnings; -z: no output. groff exits 0 on warnings, so any stderr is a failure.
    warnings=$(LC_ALL=C.UTF-8 MANWIDTH=80 timeout 60 groff -man -Tutf8 -ww -z "$out/$page" 2>&1 >/dev/null)
    if [[ -n $warnings ]]; then
        printf '%s: groff warnings:\n%s\n' "$page" "$warnings" >&2
        exit 1
    fi
    echo "built $out/$page"
done
