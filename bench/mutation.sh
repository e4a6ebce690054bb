#!/bin/bash
# Mutation testing of ctwatchd's decision, config, runner, uevent and executor code with mutmut 3.
#
# Usage: bash bench/mutation.sh [BUDGET]
#
# Leaves the source tree alone: the checkout (tracked and untracked, not ignored files) is copied to
# .cache/mutation/tree, mutmut works in that copy's mutants/, and its own venv is .cache/mutation/venv.
# One worker (--max-children 1): the VM tier may be running on a 2-core machine. Prints the per-file
# table at the end; `cd .cache/mutation/tree && ../venv/bin/mutmut results` lists the survivors and
# `../venv/bin/mutmut show NAME` shows one.
#
# BUDGET (seconds, default 6) caps, per mutated function, the covering tests a mutant is run against to
# the fastest ones summing to BUDGET (at least 3): see bench/mutation_support.py. BUDGET=0 runs every
# covering test (hours on two cores). The unit tier only: tests/vm and tests/packaging never run.
set -euo pipefail
BUDGET=${1:-6}
# MUTATE: the files to mutate (default the decision, config, runner, uevent and executor code), and
# FIRST: one cheap mutant of them that step 1 runs while collecting coverage.
export MUTATE=${MUTATE:-ctwatchd/core.py ctwatchd/config.py ctwatchd/runner.py ctwatchd/uevents.py ctwatchd/executor.py}
FIRST=${FIRST:-ctwatchd.core.x_kernel_version__mutmut_1}
MUTATE_LIST=$(printf '"%s", ' $MUTATE)
MUTATE_LIST=${MUTATE_LIST%, }
MUTMUT_VERSION=3.8.1
here=$(cd "$(dirname "$0")/.." && pwd)
work=$here/.cache/mutation
tree=$work/tree
venv=$work/venv

rm -rf "$tree"
mkdir -p "$tree"
(cd "$here" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf -) | tar -xf - -C "$tree"
if [ ! -x "$venv/bin/mutmut" ]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "mutmut==$MUTMUT_VERSION"
fi
"$venv/bin/python" -m pip install -q -e "${tree}[test]"
cd "$tree"
cat >> pyproject.toml <<EOF

[tool.mutmut]
source_paths = ["ctwatchd/"]
only_mutate = [$MUTATE_LIST]
pytest_add_cli_args_test_selection = ["tests/unit"]
pytest_add_cli_args = ["-p", "no:cacheprovider"]
also_copy = ["systemd"]
EOF
# Fastest covering test first (order changes no verdict, only how soon a killed mutant dies).
"$venv/bin/python" bench/mutation_support.py conftest tests/conftest.py

start=$(date +%s)
# 1: generate the mutants, collect which tests cover which function (the whole unit tier, once) and
#    test one cheap mutant. Tests spawning `python -m ctwatchd` run the mutated copy too (cwd mutants/).
"$venv/bin/mutmut" run --max-children 1 "$FIRST" > "$work/run1.log" 2>&1 || true
# 2: cap the per-function test selection, then run every mutant not yet tested.
if [ "$BUDGET" != 0 ]; then
    "$venv/bin/python" bench/mutation_support.py cap "$BUDGET"
fi
"$venv/bin/python" bench/mutation_support.py unchecked > "$work/todo.txt"
# shellcheck disable=SC2046
"$venv/bin/mutmut" run --max-children 1 $(cat "$work/todo.txt") > "$work/run2.log" 2>&1 || true
echo "mutmut $MUTMUT_VERSION, budget ${BUDGET}s, $(( ($(date +%s) - start) / 60 )) min"
"$venv/bin/python" bench/mutation_support.py table
