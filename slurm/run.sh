#!/bin/bash
# Run one synthbreast command as a Slurm job: the single-step stages of the chain (ingest,
# demo-data, fidelity) that need no GPU of their own, or an array over a command that splits
# its work by SLURM_ARRAY_TASK_ID (fidelity --features-only).
#
#   sbatch slurm/run.sh ingest /data/idc /scratch/idc-shards --small-patches pad
#   sbatch --array=0-7 slurm/run.sh fidelity --features-only --config fidelity.json
#       (each array task embeds its share of fidelity's feature pass; then `fidelity`)
#
# `synthbreast submit all` uses it. Arguments are passed to `synthbreast` unchanged.
#   SYNTHBREAST_IMAGE  an Apptainer image to run in; unset: the installed `synthbreast`
#SBATCH --job-name=synthbreast
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail

[[ $# -gt 0 ]] || { echo "usage: sbatch slurm/run.sh COMMAND [ARGS...]" >&2; exit 2; }
echo "synthbreast $* (job ${SLURM_JOB_ID:-none} on $(hostname))"
if [[ -n "${SYNTHBREAST_IMAGE:-}" ]]; then
    exec apptainer exec --nv "$SYNTHBREAST_IMAGE" synthbreast "$@"
else
    exec synthbreast "$@"
fi
