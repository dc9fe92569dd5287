#!/bin/bash
# The augmentation study as a Slurm job array: array index k = task k of the study's ordered
# list (seed-major, then fold, then synthetic ratio; `synthbreast study --dry-run` counts them).
#
#   REAL=/scratch/idc-shards SYNTHETIC=/scratch/synthetic STUDY=/scratch/study \
#       EXTRA="--folds 5 --synth-ratio 0,0.25,0.5,1,2 --seeds 0,1,2" \
#       sbatch --array=0-74%8 slurm/study.sh
#   ... sbatch --array=17 slurm/study.sh           # rerun one failed task
#
# `synthbreast submit study` writes this command line, and the summary and report jobs after it
# (--dry-run prints them). A task whose result exists in STUDY/tasks/ is skipped, so
# resubmitting the whole array only redoes the missing or failed tasks. Every task must get the
# same EXTRA: the study refuses a task of another config in the same STUDY folder.
#
# Variables:
#   REAL               real shards (`synthbreast ingest` output)                   (required)
#   SYNTHETIC          synthetic shard folders, space-separated (generate outputs or their
#                      parent folder); may be empty when every ratio is 0
#   STUDY              the study folder (config.json, tasks/, features/)            (required)
#   EXTRA              the study's flags, e.g. "--folds 5 --synth-ratio 0,1 --epochs 30"
#   SYNTHBREAST_IMAGE  an Apptainer image to run in; unset: the installed `synthbreast`
#
# No --signal/--requeue: a task is seconds to minutes with cached features, and a killed one is
# simply rerun (the cached backbone features are kept).
#SBATCH --job-name=synthbreast-study
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=02:00:00
#SBATCH --output=%x-%A_%a.out

set -euo pipefail

: "${REAL:?set REAL to the real shards folder}"
: "${STUDY:?set STUDY to the study folder}"
: "${SLURM_ARRAY_TASK_ID:?submit as an array job: sbatch --array=0-N slurm/study.sh}"

args=(study --real "$REAL" --out "$STUDY" --task-id "$SLURM_ARRAY_TASK_ID")
read -r -a folders <<< "${SYNTHETIC:-}"
for folder in "${folders[@]}"; do
    args+=(--synthetic "$folder")
done
# EXTRA is split into words, never run as shell code
read -r -a extra <<< "${EXTRA:-}"
args+=("${extra[@]}")

echo "study task ${SLURM_ARRAY_TASK_ID} of array ${SLURM_ARRAY_JOB_ID:-none} on $(hostname)"
if [[ -n "${SYNTHBREAST_IMAGE:-}" ]]; then
    exec apptainer exec --nv "$SYNTHBREAST_IMAGE" synthbreast "${args[@]}"
else
    exec synthbreast "${args[@]}"
fi
