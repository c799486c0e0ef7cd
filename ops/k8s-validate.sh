#!/usr/bin/env bash
# Validates the Kubernetes manifests in ops/kubernetes/ offline (ops/k8s-validate.py says
# what is checked). The packages come from PyPI, pinned, into a virtualenv under target/;
# once they are there, no network is needed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# kubernetes-validate bundles the Kubernetes JSON schemas; cloudcoil.models.keda holds
# pydantic models generated from KEDA's CRDs (2.16.1.0 is the newest for Python 3.11).
pins=("kubernetes-validate==1.37.0" "cloudcoil.models.keda==2.16.1.0" "cloudcoil==0.6.0")

venv=target/k8s-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
installed() {
  "$venv/bin/python" - "${pins[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    sys.exit(any(version(name) != wanted for name, wanted in (p.split("==") for p in sys.argv[1:])))
except PackageNotFoundError:
    sys.exit(1)
PY
}
installed || "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
exec "$venv/bin/python" ops/k8s-validate.py "$@"
