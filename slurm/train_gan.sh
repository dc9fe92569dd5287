#!/usr/bin/env bash
# Train MSG-GAN with accelerate over every GPU and node of the allocation.
#
#   SHARDS=/data/idc-shards CLASS=1 sbatch slurm/train_gan.sh
#   SHARDS=... CLASS=0 EXTRA="--budget small" sbatch --nodes=2 slurm/train_gan.sh
#
# Edit the #SBATCH lines for your cluster; everything else comes from the environment:
#   SHARDS            folder written by `synthbreast ingest` (required)
#   CLASS             class to train on (the paper trains one GAN per class); unset = all
#   OUTDIR            where numbered run folders go (default: runs)
#   EXTRA             more train-gan flags, e.g. "--kimg 2000 --mixed-precision bf16"
#   SYNTHBREAST_IMAGE an Apptainer image: run inside it (apptainer exec --nv) if set
#
# Preemption and time limits: Slurm sends SIGUSR1 to this batch script 120 s before the end
# (--signal=B:USR1@120). The trap below passes it on as SIGTERM (which srun and the
# accelerate/torchrun launcher forward to every training process; the launcher would die on
# a raw SIGUSR1); each process finishes its step, rank 0 writes a checkpoint, and the job
# requeues itself. The requeued job runs the same command with --resume auto and continues
# from that checkpoint with the same data order.
#SBATCH --job-name=synthbreast-gan
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

: "${SHARDS:?set SHARDS to a folder written by synthbreast ingest}"
OUTDIR=${OUTDIR:-runs}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}  # "a100:4" -> "4"
NNODES=${SLURM_NNODES:-1}
# Rendezvous from Slurm: the first node of the allocation, a port derived from the job id.
MAIN_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
MAIN_PORT=$((20000 + ${SLURM_JOB_ID:-0} % 20000))

run() {
  if [[ -n "${SYNTHBREAST_IMAGE:-}" ]]; then
    exec apptainer exec --nv "$SYNTHBREAST_IMAGE" "$@"
  else
    exec "$@"
  fi
}

class_flag=()
[[ -n "${CLASS:-}" ]] && class_flag=(--class "$CLASS")
multi_gpu=""
[[ $((NNODES * GPUS_PER_NODE)) -gt 1 ]] && multi_gpu="--multi_gpu"

got_signal=0
trap 'got_signal=1; echo "SIGUSR1: checkpointing, then requeue"; kill -TERM "$srun_pid"' USR1

# One launcher per node (srun), each starting one process per GPU.
# shellcheck disable=SC2086  # EXTRA is a list of flags
srun --kill-on-bad-exit=1 bash -c "$(declare -f run); run accelerate launch \
  --num_machines $NNODES --machine_rank \$SLURM_NODEID \
  --num_processes $((NNODES * GPUS_PER_NODE)) $multi_gpu \
  --main_process_ip $MAIN_ADDR --main_process_port $MAIN_PORT \
  -m synthbreast train-gan '$SHARDS' --outdir '$OUTDIR' ${class_flag[*]} \
  --resume auto ${EXTRA:-}" &
srun_pid=$!

status=0
wait "$srun_pid" || status=$?
if [[ $got_signal -eq 1 ]]; then
  wait "$srun_pid" || true  # the first wait returned when the signal came: let it checkpoint
  echo "checkpoint written; requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "${SLURM_JOB_ID}"
  exit 0
fi
exit "$status"
