#!/bin/bash
# Build the synthbreast Apptainer image from the repository root, then run its %test.
#
#   containers/build.sh                  -> synthbreast-<version>.sif
#   containers/build.sh /scratch/images  -> /scratch/images/synthbreast-<version>.sif
#
# Needs apptainer (or singularity) with --fakeroot or root, and network access to Docker Hub
# and PyPI. Regenerate containers/requirements.lock with containers/lock.sh after changing
# dependencies in pyproject.toml.
set -euo pipefail

cd "$(dirname "$0")/.."
builder=$(command -v apptainer || command -v singularity || true)
if [[ -z "$builder" ]]; then
    echo "apptainer not found: install it (https://apptainer.org/docs/admin/main/installation.html)" >&2
    exit 1
fi
version=$(python3 -c "import tomllib; print(tomllib.load(open('pyproject.toml','rb'))['project']['version'])")
out_dir=${1:-.}
image="$out_dir/synthbreast-$version.sif"
fakeroot=()
[[ $(id -u) -ne 0 ]] && fakeroot=(--fakeroot)
"$builder" build "${fakeroot[@]}" "$image.tmp" Apptainer.def
"$builder" test "$image.tmp"
mv "$image.tmp" "$image"
echo "built $image"
