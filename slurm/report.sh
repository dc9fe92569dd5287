#!/bin/bash
# Collect every run under RUNS into one report (report.md, report.html, metrics.csv).
#
#   RUNS=/scratch/pipeline OUT=/scratch/pipeline/report \
#       sbatch --dependency=afterany:<classify array job> slurm/report.sh
#
# `synthbreast submit report` writes this command line. afterany rather than afterok: the
# report lists failed or missing scenarios instead of never being written.
#
# Variables:
#   CONFIG             a report config (JSON; `synthbreast submit` writes it); else RUNS and OUT
#   RUNS               folder holding the runs (classify, fidelity, GAN runs, shards)  (required)
#   OUT                folder for the report                                          (required)
#   SYNTHBREAST_IMAGE  an Apptainer image to run in; unset: the installed `synthbreast`
#SBATCH --job-name=synthbreast-report
#SBATCH --cpus-per-task=2
#SBATCH --mem=8G
#SBATCH --time=00:30:00
#SBATCH --output=%x-%j.out

set -euo pipefail

if [[ -n "${CONFIG:-}" ]]; then
    args=(report --config "$CONFIG")
else
    : "${RUNS:?set RUNS to the folder holding the runs (or CONFIG to a report config)}"
    : "${OUT:?set OUT to the folder for the report}"
    args=(report "$RUNS" --out "$OUT")
fi
if [[ -n "${SYNTHBREAST_IMAGE:-}" ]]; then
    exec apptainer exec "$SYNTHBREAST_IMAGE" synthbreast "${args[@]}"
else
    exec synthbreast "${args[@]}"
fi
