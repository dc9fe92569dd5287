#!/usr/bin/env bash
# Train SinGAN models as an array job: task k trains model k of the selection (one image each).
#
#   SHARDS=/data/mias-shards CLASS=2 IMAGES=8 sbatch --array=0-7 slurm/train_singan.sh
#   CONFIG=singan.json sbatch --array=0-7%4 slurm/train_singan.sh   # at most 4 at once
#
# `synthbreast submit train-singan SHARDS --class 2 --images 8 ...` writes the config to
# OUTDIR/configs/train-singan.json and this command line (--dry-run prints them); `submit
# generate-singan OUTDIR --out DIR --after JOBID` then makes the shards (generate_singan.sh).
#
# Everything but the resources comes from the environment:
#   CONFIG            a train-singan config (JSON: `synthbreast train-singan ... --dry-run >
#                     FILE`): the whole job; SHARDS, CLASS, IMAGES, OUTDIR and EXTRA not read
#   SHARDS            folder written by `synthbreast ingest` (required without CONFIG)
#   CLASS             the class whose images get a model each (required without CONFIG)
#   IMAGES            models in the job (default 4); the array must be 0..IMAGES-1
#   OUTDIR            selection.json, config.json and models/ (default: singan)
#   EXTRA             more train-singan flags, e.g. "--budget small" (split into words)
#   SYNTHBREAST_IMAGE an Apptainer image: run inside it (apptainer exec --nv) if set
#
# Each task depends on its index alone: every task makes the same seeded selection (the
# first writes OUTDIR/selection.json, the others check it), then trains its own model in
# OUTDIR/models/<k>-<key>/. A task that fails leaves the others' models as they are; resubmit
# it alone (sbatch --array=K ...): it resumes at the scale and iteration it reached. A complete
# model is skipped. SIGUSR1 120 s before the time limit -> SIGTERM to the step -> the scale is
# checkpointed, exit 143 -> the task requeues itself.
#SBATCH --job-name=synthbreast-singan
#SBATCH --ntasks=1
#SBATCH --gpus=1
#SBATCH --cpus-per-task=2
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

: "${SLURM_ARRAY_TASK_ID:?submit as an array job: sbatch --array=0-<IMAGES-1> ...}"
if [[ -n "${CONFIG:-}" ]]; then
  job=(train-singan --config "$CONFIG")
else
  : "${SHARDS:?set SHARDS to a folder written by synthbreast ingest (or CONFIG to a config)}"
  : "${CLASS:?set CLASS to the class whose images get a model each}"
  job=(train-singan "$SHARDS" --class "$CLASS" --images "${IMAGES:-4}"
    --outdir "${OUTDIR:-singan}")
  read -r -a extra <<< "${EXTRA:-}"
  job+=("${extra[@]}")
fi
job+=(--task-id "$SLURM_ARRAY_TASK_ID")
if [[ -n "${SYNTHBREAST_IMAGE:-}" ]]; then
  job=(apptainer exec --nv "$SYNTHBREAST_IMAGE" synthbreast "${job[@]}")
else
  job=(synthbreast "${job[@]}")
fi

got_signal=0
trap 'got_signal=1; echo "SIGUSR1: checkpointing, then requeue"
  scancel --signal=TERM "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" || true' USR1

srun --kill-on-bad-exit=1 "${job[@]}" &
srun_pid=$!
status=0
wait "$srun_pid" || status=$?
if [[ $got_signal -eq 1 ]]; then
  status=0
  wait "$srun_pid" || status=$?
  if [[ $status -ne 0 ]]; then
    echo "scale checkpointed; requeueing ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    exit 0
  fi
fi
exit "$status"
