#!/bin/bash
# Segment a dataset folder with a Slurm job array: task K of N segments shard K/N of the cases.
#
#   sbatch --export=ALL,INPUT_DIR=/data/isles22,OUTPUT_DIR=/scratch/isles22-seg examples/slurm-array.sh
#
# The shards are a fixed split by case name, so the array needs no coordinator. If tasks die, submit
# the same array again: finished cases are skipped (a task whose cases are all done only skips),
# and every output file is written atomically, so re-runs or two tasks on the same case never leave
# a half-written file. Keep --array=1-N contiguous from 1 (a %limit is fine): the shard is
# SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT.
#
# The image, once per cluster (Apptainer or Singularity, from a registry or the local Docker daemon):
#   apptainer build factorizer-cli.sif docker-daemon://factorizer-cli:0.1.0
# Build it with --build-arg MODELS="isles22-swin-factorizer" so the model is inside, or set MODELS_DIR
# to a writable folder filled once with `factorizer models download NAME` (mounted at /models).
#
#SBATCH --job-name=factorizer
#SBATCH --array=1-8
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --output=factorizer-%A_%a.log

set -euo pipefail

INPUT_DIR=${INPUT_DIR:?set INPUT_DIR to the folder of cases}
OUTPUT_DIR=${OUTPUT_DIR:?set OUTPUT_DIR to the folder for the label maps}
MODEL=${MODEL:-isles22-swin-factorizer}
IMAGE=${IMAGE:-factorizer-cli.sif}      # Docker: the image name, e.g. factorizer-cli:0.1.0
RUNTIME=${RUNTIME:-apptainer}           # apptainer, singularity or docker
MODELS_DIR=${MODELS_DIR:-}              # optional: a model cache to mount at /models

if [[ "${SLURM_ARRAY_TASK_MIN:-1}" != 1 || "${SLURM_ARRAY_TASK_MAX:-1}" != "${SLURM_ARRAY_TASK_COUNT:-1}" ]]; then
    echo "submit with a contiguous --array=1-N: the shard is the task id out of the task count" >&2
    exit 2
fi
: "${SLURM_ARRAY_TASK_ID:?submit with sbatch --array=1-N}"
mkdir -p "${OUTPUT_DIR}"

if [[ "${RUNTIME}" == docker ]]; then
    # Docker runs outside the job's cgroup: hand it the GPUs Slurm gave this job, by their host ids.
    gpus=all
    if [[ -n "${SLURM_JOB_GPUS:-}" ]]; then gpus="\"device=${SLURM_JOB_GPUS}\""; fi
    mounts=(-v "${INPUT_DIR}:/input:ro" -v "${OUTPUT_DIR}:/output")
    if [[ -n "${MODELS_DIR}" ]]; then mounts+=(-v "${MODELS_DIR}:/models"); fi
    # The image's ENTRYPOINT is factorizer; run as the submitting user so that the outputs are theirs.
    uid=$(id -u)
    gid=$(id -g)
    exec docker run --rm --gpus "${gpus}" --user "${uid}:${gid}" "${mounts[@]}" "${IMAGE}" \
        segment /input -o /output --model "${MODEL}" --shard "${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT}"
fi

# Apptainer runs as the submitting user, on a read-only image, with the job's GPUs (--nv).
binds=(--bind "${INPUT_DIR}:/input:ro" --bind "${OUTPUT_DIR}:/output")
if [[ -n "${MODELS_DIR}" ]]; then binds+=(--bind "${MODELS_DIR}:/models"); fi
exec "${RUNTIME}" exec --nv "${binds[@]}" "${IMAGE}" \
    factorizer segment /input -o /output --model "${MODEL}" --shard "${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT}"
