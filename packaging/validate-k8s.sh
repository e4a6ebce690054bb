#!/usr/bin/env bash
# Validate the Kubernetes manifests offline against the OpenAPI schemas that kubernetes-validate
# ships (strict: unknown fields are errors), for the oldest and newest Kubernetes we support.
# Needs: python -m pip install kubernetes-validate (packaging/install-build-deps.sh).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
python=$(find_python)
"$python" -c 'import kubernetes_validate' 2>/dev/null || {
    echo "missing kubernetes-validate for $python: $python -m pip install kubernetes-validate" >&2; exit 127; }
read -ra versions <<<"${KUBE_VERSIONS:-1.28.0 1.33.0}"
manifests=("$repo_root"/packaging/kubernetes/*.yaml)
for v in "${versions[@]}"; do
    timeout 120 "$python" -m kubernetes_validate --strict --kubernetes-version "$v" "${manifests[@]}"
done
