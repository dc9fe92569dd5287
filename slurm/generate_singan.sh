#!/bin/bash
# Synthetic shards from the SinGAN models of a train-singan folder, as a Slurm job array.
#
#   CONFIG=/scratch/singan/configs/generate-singan.json sbatch --array=0-7 slurm/generate_singan.sh
#   MODELS=/scratch/singan OUT=/scratch/singan-synthetic EXTRA="--shards 8 --per-shard 250" \
#       sbatch --array=0-3 slurm/generate_singan.sh
#
# `synthbreast submit generate-singan` writes the config and this command line (--dry-run
# prints them), after the train-singan array with --after JOBID. Task k of K makes the
# contiguous block [SHARDS*k/K, SHARDS*(k+1)/K) of the shards (synthbreast reads
# SLURM_ARRAY_TASK_ID, _COUNT and _MIN), so the array must be a range such as 0-7. Shard s's
# noise depends only on (--seed, class, s): a failed task is simply resubmitted and complete
# shards are skipped. All tasks share OUT/manifest.json under a file lock (a file system with
# working flock, as slurm/generate.sh says).
#
# Variables:
#   CONFIG             a generate-singan config (JSON: `synthbreast generate-singan ... --dry-run
#                      > FILE`, or what `submit generate-singan` writes): the whole job; MODELS,
#                      OUT and EXTRA are then not read
#   MODELS             a train-singan --outdir (selection.json, models/)   (required without CONFIG)
#   OUT                folder for the shards and manifest.json             (required without CONFIG)
#   EXTRA              more generate-singan flags, e.g. "--shards 8 --num-models 4" (split into
#                      words, never run as shell code)
#   SYNTHBREAST_IMAGE  an Apptainer image to run in; unset: the installed `synthbreast`
#
# The CPU by default (generate-singan --device cpu: a GPU gives other bits than the CPU, and a
# SinGAN's small convolutions gain little from one).
#SBATCH --job-name=synthbreast-generate-singan
#SBATCH --cpus-per-task=2
#SBATCH --mem=8G
#SBATCH --time=02:00:00
#SBATCH --output=%x-%A_%a.out

set -euo pipefail

if [[ -n "${CONFIG:-}" ]]; then
    args=(generate-singan --config "$CONFIG")
else
    : "${MODELS:?set MODELS to a train-singan --outdir (or CONFIG to a config)}"
    : "${OUT:?set OUT to the folder for the synthetic shards}"
    args=(generate-singan "$MODELS" --out "$OUT")
    read -r -a extra <<< "${EXTRA:-}"
    args+=("${extra[@]}")
fi

echo "task ${SLURM_ARRAY_TASK_ID:-none} of array ${SLURM_ARRAY_JOB_ID:-none} on $(hostname)"
if [[ -n "${SYNTHBREAST_IMAGE:-}" ]]; then
    exec apptainer exec --nv "$SYNTHBREAST_IMAGE" synthbreast "${args[@]}"
else
    exec synthbreast "${args[@]}"
fi
