#!/usr/bin/env bash
#SBATCH --job-name=nemotron-flash-3b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# Nemotron-Flash 3B pretraining (phase 1) on 8-GPU H100 nodes: sbatch launch/pretrain_3b.sh [trainer flags...]
#
# Submit from the repository root. Same recipe as pretrain_1b.sh (Adam without weight decay, cosine LR from 1e-3,
# 512 x 4096 tokens per step, bf16, distributed optimizer) with micro-batch 2 and TP 1: the 2.75B parameters
# (bf16 weights, fp32 gradients, optimizer states sharded over data parallelism) and the activations of 2 x 4096
# tokens fit in 80 GB, and TP 2 would split hidden size 3072 into narrow GEMMs and add two tensor-parallel
# collectives per layer (launch/README.md has the arithmetic). MF_TP=2 is the fallback (it turns on sequence
# parallelism). Checkpoints and TensorBoard go to runs/nemotron_flash_3b/ (--save = --load: requeued jobs resume).
#
# Every default can be changed from the environment (MF_* variables, launch/README.md), the #SBATCH lines with
# sbatch options, and any trainer flag by adding it after the script name. MF_DRY_RUN=1 prints what each node would
# run. 600 s before the time limit (a 3B checkpoint with its optimizer state is ~40 GB) SIGUSR1 makes every rank save and exit, and the job
# is requeued.
set -euo pipefail

# sbatch runs a copy of this script from its spool folder: find the repository (MF_REPO_DIR, this script's
# folder, or the submit folder)
for MF_REPO_DIR in "${MF_REPO_DIR:-}" "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" "${SLURM_SUBMIT_DIR:-}"; do
    [[ -n $MF_REPO_DIR && -f $MF_REPO_DIR/launch/common.sh ]] && break
done
[[ -f $MF_REPO_DIR/launch/common.sh ]] || {
    echo "[launch] error: cannot find launch/common.sh: submit from the repository root or set MF_REPO_DIR" >&2
    exit 1
}
MF_REPO_DIR=$(cd "$MF_REPO_DIR" && pwd)
MF_SCRIPT=${BASH_SOURCE[0]}
# shellcheck source=launch/common.sh
source "$MF_REPO_DIR/launch/common.sh"

mf_recipe 3b
mf_slurm_main "$@"
