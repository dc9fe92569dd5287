#!/bin/bash
# Synthetic shards from a trained generator, as a Slurm job array: one GPU per array task.
#
#   CONFIG=/scratch/run/configs/generate-class1.json sbatch --array=0-7 slurm/generate.sh
#   CHECKPOINT=runs/00003-gan-class1 OUT=/scratch/synthetic-class1 sbatch slurm/generate.sh
#   CHECKPOINT=... OUT=... SHARDS=152 sbatch --array=0-15%4 slurm/generate.sh
#
# Task k of K makes the contiguous block [SHARDS*k/K, SHARDS*(k+1)/K) of the shards
# (synthbreast reads SLURM_ARRAY_TASK_ID, _COUNT and _MIN), so the array must be a range such as
# 0-7 (optionally capped with %P). Shard i depends only on (--seed, i): a failed task is simply
# resubmitted (sbatch --array=<k> slurm/generate.sh) and complete shards are skipped, damaged
# ones redone. All tasks share OUT/manifest.json under a file lock, so OUT must be on a file
# system with working flock (NFS v4, Lustre, GPFS and local disks are; some NFS v3 mounts are not).
#
# Variables:
#   CONFIG             a generate config (JSON; `synthbreast submit all` writes it): the whole
#                      job; the variables below are then not read
#   CHECKPOINT         run folder of `synthbreast train-gan` (its latest checkpoint) or ckpt-*.json
#   OUT                folder for the shards and manifest.json (one job per folder)
#   SHARDS             total shards of the whole job, over all tasks        [76]
#   PER_SHARD          images per shard                                     [1000]
#   SEED               base seed                                            [0]
#   CLASS              label of the images   [the class the GAN was trained on]
#   OUTPUT_SIZE        side of the saved images, e.g. 50 = real IDC patches [model's]
#   SYNTHBREAST_IMAGE  an Apptainer image to run in; unset: the installed `synthbreast`
#
#SBATCH --job-name=synthbreast-generate
#SBATCH --array=0-7
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=02:00:00
#SBATCH --output=%x-%A_%a.out

set -euo pipefail

if [[ -n "${CONFIG:-}" ]]; then
    args=(generate --config "$CONFIG")
else
    : "${CHECKPOINT:?set CHECKPOINT to a training run folder or a ckpt-*.json (or CONFIG)}"
    : "${OUT:?set OUT to the folder for the synthetic shards}"
    args=(
        generate
        --checkpoint "$CHECKPOINT"
        --out "$OUT"
        --shards "${SHARDS:-76}"
        --per-shard "${PER_SHARD:-1000}"
        --seed "${SEED:-0}"
    )
    if [[ -n "${CLASS:-}" ]]; then
        args+=(--class "$CLASS")
    fi
    if [[ -n "${OUTPUT_SIZE:-}" ]]; then
        args+=(--output-size "$OUTPUT_SIZE")
    fi
fi

echo "task ${SLURM_ARRAY_TASK_ID:-none} of array ${SLURM_ARRAY_JOB_ID:-none} on $(hostname)"
if [[ -n "${SYNTHBREAST_IMAGE:-}" ]]; then
    # --nv: the host's NVIDIA driver inside the container
    exec apptainer exec --nv "$SYNTHBREAST_IMAGE" synthbreast "${args[@]}"
else
    exec synthbreast "${args[@]}"
fi
