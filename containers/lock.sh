#!/bin/bash
# Regenerate containers/requirements.lock: the exact versions of every runtime dependency,
# resolved in a fresh virtual environment from pyproject.toml (no test tools).
set -euo pipefail

cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet .
{
    echo "# synthbreast runtime dependencies, pinned. Made by containers/lock.sh; do not edit."
    echo "# Python $(python3 -c 'import sys; print(sys.version.split()[0])'), $(date -u +%Y-%m-%d)"
    "$venv/bin/pip" freeze --exclude synthbreast
} > containers/requirements.lock.tmp
mv containers/requirements.lock.tmp containers/requirements.lock
rm -rf "$(dirname "$venv")"
echo "wrote containers/requirements.lock"
