#!/usr/bin/env bash
# One node, any number of GPUs or CPU processes, the same recipes and MF_* variables as the SLURM launchers:
#
#   launch/local.sh [trainer flags...]                      # MF_RECIPE=1b (default), 3b or longctx
#   MF_NPROC=2 MF_PRESET=tiny MF_BF16=0 launch/local.sh --mock-data --train-iters 20     # CPU smoke run
#
# Starts torchrun (python -m torch.distributed.run --standalone --nproc-per-node N); N is MF_NPROC, else the
# number of GPUs (nvidia-smi), else 1 (a CPU process, gloo). --save and --load are the same folder, so running it
# again resumes. SIGUSR1, SIGTERM or Ctrl-C make the workers save a checkpoint and exit. MF_DRY_RUN=1 prints the
# command instead of running it. See launch/README.md.
set -euo pipefail

for MF_REPO_DIR in "${MF_REPO_DIR:-}" "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"; do
    [[ -n $MF_REPO_DIR && -f $MF_REPO_DIR/launch/common.sh ]] && break
done
[[ -f $MF_REPO_DIR/launch/common.sh ]] || {
    echo "[launch] error: cannot find launch/common.sh: run launch/local.sh from the repository or set MF_REPO_DIR" >&2
    exit 1
}
MF_REPO_DIR=$(cd "$MF_REPO_DIR" && pwd)
MF_SCRIPT=${BASH_SOURCE[0]}
# shellcheck source=launch/common.sh
source "$MF_REPO_DIR/launch/common.sh"

mf_recipe "${MF_RECIPE:-1b}"
mf_local_main "$@"
