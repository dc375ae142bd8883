#!/usr/bin/env bash
#SBATCH --job-name=nemotron-flash-1b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# Nemotron-Flash 1B pretraining (phase 1) on 8-GPU H100 nodes: sbatch launch/pretrain_1b.sh [trainer flags...]
#
# Submit from the repository root. The paper's recipe is the default: Adam without weight decay, cosine LR from
# 1e-3, 512 x 4096 tokens (2M) per step, bf16, distributed optimizer, TP 1 (pure data parallelism: the 1B model
# fits on one GPU). Data: data_prep/mixtures/phase1_zyda2.yaml through data_prep/build_blend.py (set MF_DATA_ROOT
# and MF_TOKENIZER_MODEL). Checkpoints and TensorBoard go to runs/nemotron_flash_1b/; --save and --load are that
# same folder, so a resubmitted or requeued job continues from the latest checkpoint.
#
# Every default can be changed from the environment (MF_* variables, launch/README.md), the #SBATCH lines with
# sbatch options (sbatch --nodes=8 --time=2:00:00 launch/pretrain_1b.sh), and any trainer flag by adding it after
# the script name (it comes last, so it wins). MF_DRY_RUN=1 prints what each node would run without running it.
#
# 300 s before the time limit SLURM sends SIGUSR1 to this script (B:), which passes it to srun and so to every
# rank: the ranks finish the iteration, save, and exit; the script then requeues the job (MF_REQUEUE=1).
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

mf_recipe 1b
mf_slurm_main "$@"
