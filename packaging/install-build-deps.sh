#!/usr/bin/env bash
# Install what the packaging scripts and tests/packaging need: Debian packages with apt-get (as
# root) and build, twine and kubernetes-validate with pip into the project's Python (PYTHON, else
# .venv, else python3). Idempotent: installs only what is missing, so a second run takes a second.
# --check: install nothing; exit 1 with one line naming what is missing.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
check_only=0
[[ ${1:-} != --check ]] || check_only=1

debs=(
    build-essential dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all
    python3-setuptools python3-build python3-installer lintian    # .deb
    rpm                                                           # rpmbuild, rpm -qp
    scdoc groff-base man-db                                       # man pages
    shellcheck                                                    # the scripts themselves
    prometheus prometheus-node-exporter                           # promtool; node_exporter scraping ctwatchd
    python3-venv python3-pyudev python3-structlog python3-sdnotify kmod libudev1  # run what we built
)
missing=()
for p in "${debs[@]}"; do
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) == installed ]] || missing+=("$p")
done
python=$(find_python)
pips_ok=1
"$python" -c 'import build, twine, kubernetes_validate' 2>/dev/null || pips_ok=0
if ((check_only)); then
    ((pips_ok)) || missing+=("pip:build,twine,kubernetes-validate")
    ((${#missing[@]} == 0)) || { echo "missing: ${missing[*]}" >&2; exit 1; }
    echo "packaging build dependencies are installed"
    exit 0
fi

if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "as root: apt-get install ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -qq
    timeout 1200 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    echo "apt-get installed: ${missing[*]}"
fi

if ((pips_ok == 0)); then
    timeout 600 "$python" -m pip install -q --disable-pip-version-check \
        'build>=1.0' 'twine>=5' 'kubernetes-validate>=1.33'
    echo "pip installed build, twine, kubernetes-validate into $python"
fi
echo "packaging build dependencies are installed"
