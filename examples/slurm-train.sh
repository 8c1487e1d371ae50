#!/bin/bash
# Train one model on several machines with torchrun under Slurm: one task per node, each starting one
# training process per GPU; the processes meet at the first node (c10d rendezvous) and train as one
# run with DistributedDataParallel (NCCL). Process 0 writes the run folder.
#
#   sbatch --export=ALL,DATA_DIR=/data/brats2023,RUN_DIR=/scratch/runs/fold0,EXTRA="--folds 5 --fold 0" \
#       examples/slurm-train.sh
#
# (batch 1 per GPU: 8 GPUs make a global batch of 8; add --learning-rate, --steps and the rest to EXTRA.)
#
# The global batch is --batch-size × GPUs per node × nodes (× --accumulate). The run folder and the
# cache (FACTORIZER_HOME/train-cache, or --cache) must be on a file system every node sees. Requeued or
# resubmitted after a failure or a time limit, the job continues from the run's last saved state
# (--resume) and ends exactly where an uninterrupted run would; it may then have another number of
# nodes or GPUs, as long as the global batch divides among the processes.
#
# The environment: factorizer-cli installed (pip install factorizer-cli, with a CUDA build of PyTorch),
# or the image through Apptainer: PREFIX="apptainer exec --nv factorizer-cli.sif".
#
#SBATCH --job-name=factorizer-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=32
#SBATCH --mem=128G
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=factorizer-train-%j.log

set -euo pipefail

DATA_DIR=${DATA_DIR:?set DATA_DIR to the labelled dataset folder}
RUN_DIR=${RUN_DIR:?set RUN_DIR to the run folder (on a shared file system)}
CARD=${CARD:-examples/brats23-factorizer.json}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}      # as --gres=gpu:N
EXTRA=${EXTRA:-}                       # settings of a new run, e.g. "--folds 5 --fold 0 --steps 250000"
RUN_OPTIONS=${RUN_OPTIONS:---workers 6} # how this job runs (kept on resume), e.g. "--workers 6 --cache /scratch/c"
PREFIX=${PREFIX:-}                     # e.g. "apptainer exec --nv factorizer-cli.sif"

# A new run takes its settings from EXTRA; a requeued one continues with the settings it started with
# (--resume: EXTRA's settings are read back from the run's state, only RUN_OPTIONS apply again).
# shellcheck disable=SC2206  # RUN_OPTIONS and EXTRA are lists of options
options=(--card "${CARD}" ${RUN_OPTIONS})
if [[ -f "${RUN_DIR}/train-state.safetensors" ]]; then
    options+=(--resume)
else
    # shellcheck disable=SC2206
    options+=(--batch-size 1 ${EXTRA})
fi

head_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
# One task per node, with the CPUs Slurm gave it (newer srun does not inherit --cpus-per-task).
# shellcheck disable=SC2086  # PREFIX is a command with its arguments
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" ${PREFIX} python -m torch.distributed.run \
    --nnodes "${SLURM_JOB_NUM_NODES}" --nproc_per_node "${GPUS_PER_NODE}" \
    --rdzv-id "${SLURM_JOB_ID}" --rdzv-backend c10d --rdzv-endpoint "${head_node}:29500" \
    -m factorizer_cli train "${DATA_DIR}" -o "${RUN_DIR}" --device cuda "${options[@]}"
