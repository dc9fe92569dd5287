#!/usr/bin/env bash
# Train MSG-GAN with accelerate over every GPU and node of the allocation.
#
#   CONFIG=/scratch/run/configs/gan.json sbatch slurm/train_gan.sh
#   SHARDS=/data/idc-shards CLASS=1 sbatch slurm/train_gan.sh
#   SHARDS=... CLASS=0 EXTRA="--budget small" sbatch --nodes=2 slurm/train_gan.sh
#
# Edit the #SBATCH lines for your cluster; everything else comes from the environment:
#   CONFIG            a train-gan config (JSON; `synthbreast submit all` writes it): the whole
#                     job; SHARDS, CLASS, OUTDIR and EXTRA are then not read
#   SHARDS            folder written by `synthbreast ingest` (required without CONFIG)
#   CLASS             class to train on (the paper trains one GAN per class); unset = all
#   OUTDIR            where numbered run folders go (default: runs)
#   EXTRA             more train-gan flags, e.g. "--kimg 2000 --mixed-precision bf16" (split
#                     into words, never run as shell code)
#   SYNTHBREAST_IMAGE an Apptainer image: run inside it (apptainer exec --nv) if set
#
# Preemption and time limits: Slurm sends SIGUSR1 to this batch script 120 s before the end
# (--signal=B:USR1@120; by hand: scancel --signal=USR1 --batch JOBID). The trap below has
# Slurm send SIGTERM to every process of the training step (`scancel --signal=TERM JOBID`
# spares the batch script). Not `kill -TERM <srun>`: srun answers its own SIGTERM by killing
# the step with SIGKILL, so nothing would be saved. The torchrun agent behind
# `accelerate launch` waits for its workers on SIGTERM; a single process runs without a
# launcher (accelerate's simple launcher would die first and leave it orphaned). Each process
# finishes its step, rank 0 writes a checkpoint, they exit 143, and the job requeues itself.
# The requeued job (after Slurm's requeue delay, AuthInfo cred_expire, 2 min by default) runs
# the same command with --resume auto and continues from that checkpoint with the same data
# order.
#
# CPU-only allocations (--gpus-per-node=0, as the tests' local cluster) train one process per
# node.
#SBATCH --job-name=synthbreast-gan
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

if [[ -n "${CONFIG:-}" ]]; then
  job=(train-gan --config "$CONFIG" --resume auto)
else
  : "${SHARDS:?set SHARDS to a folder written by synthbreast ingest (or CONFIG to a config)}"
  job=(train-gan "$SHARDS" --outdir "${OUTDIR:-runs}" --resume auto)
  if [[ -n "${CLASS:-}" ]]; then
    job+=(--class "$CLASS")
  fi
  read -r -a extra <<< "${EXTRA:-}"
  job+=("${extra[@]}")
fi
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}  # "a100:4" -> "4"
[[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || GPUS_PER_NODE=1  # no GPUs: one CPU process per node
NNODES=${SLURM_NNODES:-1}
# Rendezvous from Slurm: the first node of the allocation, a port derived from the job id.
MAIN_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
MAIN_PORT=$((20000 + ${SLURM_JOB_ID:-0} % 20000))

NPROC=$((NNODES * GPUS_PER_NODE))
if [[ $NPROC -gt 1 ]]; then
  # --machine_rank is each node's own: node_main below puts $SLURM_NODEID there
  launcher=(accelerate launch --num_machines "$NNODES" --machine_rank 0
    --num_processes "$NPROC" --multi_gpu
    --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" -m synthbreast)
else
  launcher=(synthbreast)
fi

# What srun runs on each node. Every word of the command is its own argument ("$@"): a path or
# flag is never parsed as shell code, whatever quotes or semicolons it holds.
# shellcheck disable=SC2016  # expanded by the bash on each node, not here
node_main='args=("$@")
for i in "${!args[@]}"; do
  if [[ ${args[$i]} == --machine_rank ]]; then args[$((i + 1))]=$SLURM_NODEID; break; fi
done
if [[ -n "${SYNTHBREAST_IMAGE:-}" ]]; then
  exec apptainer exec --nv "$SYNTHBREAST_IMAGE" "${args[@]}"
fi
exec "${args[@]}"'

got_signal=0
trap 'got_signal=1; echo "SIGUSR1: checkpointing, then requeue"
  scancel --signal=TERM "$SLURM_JOB_ID" || true' USR1

# One launcher per node (srun), each starting one process per GPU.
srun --kill-on-bad-exit=1 bash -c "$node_main" node "${launcher[@]}" "${job[@]}" &
srun_pid=$!

status=0
wait "$srun_pid" || status=$?
if [[ $got_signal -eq 1 ]]; then
  # the first wait returned when the signal came: let the step checkpoint and exit
  status=0
  wait "$srun_pid" || status=$?
  if [[ $status -ne 0 ]]; then
    echo "checkpoint written; requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
    exit 0
  fi
fi
exit "$status"
