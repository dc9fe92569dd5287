#!/usr/bin/env bash
# The GPU bench (bench/gpu_paper.py) in one device call.
#
#   bash bench/gpu_run.sh prepare   # here, once: the real sample and the wheels the device
#                                   # image lacks (webdataset, braceexpand) into .gpu-carry/
#   device run: command "bash bench/gpu_run.sh", carry [".gpu-carry"], timeout_s 540
#
# On the device its python3 holds torch; results.json and results.md land in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == prepare ]]; then
    grep -qx '/.gpu-carry/' .git/info/exclude 2>/dev/null || echo '/.gpu-carry/' >> .git/info/exclude
    mkdir -p .gpu-carry/whl
    rm -rf .gpu-carry/idc && cp -r /work/shared/real-sample/idc .gpu-carry/idc
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 --platform any \
        -d .gpu-carry/whl webdataset==1.0.2 braceexpand==0.1.7
    du -sh .gpu-carry
    exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu-carry/whl/*.whl
PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 python3 bench/gpu_paper.py \
    --out "${OUT:-gpu-results}" --real .gpu-carry/idc --work /tmp/gpu-paper-work "$@"
