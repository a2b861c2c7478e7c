#!/usr/bin/env bash
# Infrastructure checks' tools: checkov, which tests/test_infra.py runs on infra/*.bicep and
# infra/worker.Dockerfile. checkov pins many dependencies exactly, so it gets its own venv
# (.venv-checkov) instead of sharing the project's. Idempotent: a second run only checks the
# installed version. Runs from the repository root (scripts/test calls it).
set -euo pipefail
cd "$(dirname "$0")/../.."

CHECKOV_VERSION="3.3.30"
VENV=".venv-checkov"

installed_version() {
    "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("checkov"))' 2>/dev/null || true
}

if [ -x "$VENV/bin/checkov" ] && [ "$(installed_version)" = "$CHECKOV_VERSION" ]; then
    exit 0
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --quiet --disable-pip-version-check \
    "checkov==$CHECKOV_VERSION"

if [ "$(installed_version)" != "$CHECKOV_VERSION" ]; then
    echo "20-infra-tools.sh: checkov $CHECKOV_VERSION did not install into $VENV" >&2
    exit 1
fi
