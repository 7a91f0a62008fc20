#!/usr/bin/env bash
# Static checks of the deployment files, offline once the tools are
# installed (a Python venv, cached in $TALLY_TOOLS_DIR):
# - deploy/*.yaml against the Kubernetes schemas (kubernetes-validate, which
#   carries them); PodMonitor and ScaledObject are CRDs it has no schema for,
#   and tests/deploy.rs checks their fields against the binary instead;
# - docker-compose.yml against the compose specification (check-jsonschema's
#   copy of it);
# - the Dockerfile, the dashboards and the alert rules are checked by
#   tests/ops.rs (make test).
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS="${TALLY_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tally-tools}"
VENV="$TOOLS/venv"
if [ ! -x "$VENV/bin/kubernetes-validate" ] || [ ! -x "$VENV/bin/check-jsonschema" ]; then
  mkdir -p "$TOOLS"
  if ! python3 -m venv "$VENV" 2>/dev/null; then
    # Debian's python3 keeps venv in a separate package.
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/pip" install -q "kubernetes-validate==1.37.0" "check-jsonschema==0.39.0"
fi

echo "== Kubernetes manifests (deploy/)"
out=$("$VENV/bin/kubernetes-validate" --strict deploy/*.yaml 2>&1) || { echo "$out"; exit 1; }
echo "$out"
# Only the CRDs and the kustomization may lack a schema.
if echo "$out" | grep "Couldn't find schema" | grep -v -E 'kind (Kustomization|PodMonitor|ScaledObject) ' ; then
  echo "a manifest kind has no schema" >&2
  exit 1
fi
echo "== docker-compose.yml"
"$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
