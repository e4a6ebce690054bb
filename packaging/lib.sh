# shellcheck shell=bash
# Sourced by the build scripts in this directory: where the tree is, and how to copy it.

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# copy_tree DEST: the source tree without virtualenvs, caches and build output. From a git checkout:
# the tracked files plus new, not ignored ones (so uncommitted work is built, .gitignore'd junk is
# not); otherwise (an unpacked sdist) everything but the usual junk.
copy_tree() {
    local dest=$1 f
    mkdir -p -- "$dest"
    if git -C "$repo_root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        (cd "$repo_root" && git ls-files -z --cached --others --exclude-standard |
            while IFS= read -r -d '' f; do [[ -e $f || -L $f ]] && printf '%s\0' "$f"; done |
            tar --null -T - -cf -) | tar -xf - -C "$dest"
    else
        tar -C "$repo_root" --exclude=.git --exclude=.venv --exclude=.cache --exclude='*.egg-info' \
            --exclude=build --exclude=dist --exclude=__pycache__ -cf - . | tar -xf - -C "$dest"
    fi
}

# The Python with `build` and `twine`: $PYTHON, else the project's .venv, else python3.
find_python() {
    if [[ -n ${PYTHON:-} ]]; then
        printf '%s\n' "$PYTHON"
    elif [[ -x $repo_root/.venv/bin/python ]]; then
        printf '%s\n' "$repo_root/.venv/bin/python"
    else
        command -v python3
    fi
}

# The version the package declares (ctwatchd/__init__.py), for file names and consistency checks.
project_version() {
    sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$repo_root/ctwatchd/__init__.py"
}

need() {  # need TOOL PACKAGE...: fail with one line naming what to install
    local tool=$1; shift
    command -v "$tool" >/dev/null 2>&1 && return 0
    echo "missing $tool: apt-get install $* (or: packaging/install-build-deps.sh)" >&2
    exit 127
}

# The Debian mirror for debootstrap: $DEBIAN_MIRROR, else the first one apt uses here.
debian_mirror() {
    if [[ -n ${DEBIAN_MIRROR:-} ]]; then printf '%s\n' "$DEBIAN_MIRROR"; return; fi
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -e $f ]] || continue
        awk '/^URIs:/ {print $2; exit}' "$f"
        return
    done
    # No apt sources at all: print nothing and succeed, so the caller's "no mirror" message is what
    # the user sees (a failing $(...) under set -e would end the script without a word).
    if [[ -e /etc/apt/sources.list ]]; then
        awk '$1 == "deb" && $2 !~ /^\[/ {print $2; exit}' /etc/apt/sources.list
    fi
}

# debootstrap, installed from apt when missing (a fresh CI machine has none; the callers are root).
need_debootstrap() {
    command -v debootstrap >/dev/null && return 0
    timeout 600 apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
    command -v debootstrap >/dev/null || { echo "apt-get install debootstrap failed" >&2; exit 1; }
}
