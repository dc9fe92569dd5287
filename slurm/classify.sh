#!/bin/bash
# The classification scenarios as a Slurm job array: array index k = the k-th scenario of
# `synthbreast classify --help` (real-real, synth-synth, real-synth, synth-real, real+synth-real).
#
#   CONFIG=/scratch/run/configs/classify.json sbatch --array=0-4 slurm/classify.sh
#   REAL=/scratch/idc-shards SYNTHETIC=/scratch/synthetic OUT=/scratch/classify \
#       sbatch --array=0-4 slurm/classify.sh
#   ... sbatch --array=3 slurm/classify.sh          # rerun one failed scenario
#   FEATURES_ONLY=1 ... sbatch --array=0-7 slurm/classify.sh   # the feature pass, 8 tasks
#
# `synthbreast submit classify` and `submit all` write the config file and this command line
# for you (--dry-run prints them).
# A scenario whose metrics.json exists is skipped, so resubmitting the whole array only redoes
# the missing or failed tasks. A failed task leaves OUT/<scenario>/failed.json for the report.
#
# Variables:
#   CONFIG             a classify config (JSON): task k runs `classify --config CONFIG
#                      --task-id k`; the variables below are then not read
#   REAL               real shards (`synthbreast ingest` output)                   (required)
#   SYNTHETIC          synthetic shard folders, space-separated (generate outputs or their
#                      parent folder)                                              (required)
#   OUT                folder of the scenario run folders                           (required)
#   EXTRA              more classify flags, e.g. "--weights none --epochs 30"
#   FEATURES_ONLY=1    fill the feature cache of every scenario instead (`classify
#                      --features-only`): task k of K embeds the k-th block of the shards;
#                      then the scenario array finds every feature cached
#   SYNTHBREAST_IMAGE  an Apptainer image to run in; unset: the installed `synthbreast`
#
# No --signal/--requeue here: a scenario is minutes to an hour on a GPU with cached features,
# and a killed one is simply rerun (its cached backbone features are kept).
#SBATCH --job-name=synthbreast-classify
#SBATCH --array=0-4
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --output=%x-%A_%a.out

set -euo pipefail

: "${SLURM_ARRAY_TASK_ID:?submit as an array job: sbatch --array=0-4 slurm/classify.sh}"

# the scenario of this task, or (FEATURES_ONLY=1) this task's block of every scenario's shards
if [[ "${FEATURES_ONLY:-0}" == 1 ]]; then
    which=(--features-only)
else
    which=(--task-id "$SLURM_ARRAY_TASK_ID")
fi
if [[ -n "${CONFIG:-}" ]]; then
    args=(classify --config "$CONFIG" "${which[@]}")
else
    : "${REAL:?set REAL to the real shards folder (or CONFIG to a classify config)}"
    : "${SYNTHETIC:?set SYNTHETIC to the synthetic shards folder(s)}"
    : "${OUT:?set OUT to the folder for the scenario runs}"
    args=(classify --real "$REAL" --out "$OUT" "${which[@]}")
    read -r -a folders <<< "$SYNTHETIC"
    for folder in "${folders[@]}"; do
        args+=(--synthetic "$folder")
    done
    # EXTRA is split into words, never run as shell code
    read -r -a extra <<< "${EXTRA:-}"
    args+=("${extra[@]}")
fi

echo "${which[0]#--} task ${SLURM_ARRAY_TASK_ID} of array ${SLURM_ARRAY_JOB_ID:-none} on $(hostname)"
if [[ -n "${SYNTHBREAST_IMAGE:-}" ]]; then
    exec apptainer exec --nv "$SYNTHBREAST_IMAGE" synthbreast "${args[@]}"
else
    exec synthbreast "${args[@]}"
fi
