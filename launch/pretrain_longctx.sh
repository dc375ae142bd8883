#!/usr/bin/env bash
#SBATCH --job-name=nemotron-flash-longctx
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
# Nemotron-Flash long-context phase (29k tokens): sbatch launch/pretrain_longctx.sh [trainer flags...]
#
# Continues a phase-1 checkpoint (MF_PHASE1_DIR, default runs/nemotron_flash_${MF_MODEL}/checkpoints; MF_MODEL=1b
# or 3b) at sequence length 29696 (29 x 1024: the paper's 29k, divisible by any TP size and the kernels' chunk
# sizes) on data_prep/mixtures/phase3_long_context.yaml, into its own folder runs/nemotron_flash_${MF_MODEL}_longctx:
#
#   first launch:   --load PHASE1 --save PHASE2 --reset-data-position --override-opt-param-scheduler
#   requeued/later: --load PHASE2 --save PHASE2 (continues this phase, data position included)
#
# Its own LR schedule: a cosine from MF_LR (1e-4) to MF_MIN_LR (1e-5) over this phase's MF_TRAIN_TOKENS (20B), done
# with a WSD schedule whose decay spans exactly this phase (the scheduler keeps counting phase 1's samples, see
# launch/README.md). 64 x 29696 tokens (1.9M) per step with activation recompute; TP 1 for the 1B, TP 2 with
# sequence parallelism for the 3B (MF_TP, MF_RECOMPUTE). Everything else as in pretrain_1b.sh: MF_* variables, sbatch options, extra trainer flags
# after the script name, MF_DRY_RUN=1, SIGUSR1 600 s before the time limit -> save, exit, requeue.
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

mf_recipe longctx
mf_slurm_main "$@"
