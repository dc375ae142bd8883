# shellcheck shell=bash
# Shared logic of the launchers, sourced by pretrain_1b.sh, pretrain_3b.sh, pretrain_longctx.sh and local.sh (it is
# not run by itself). The launcher that sources it sets MF_REPO_DIR (the repository root) and MF_SCRIPT (its own
# path, whose #SBATCH header gives the defaults outside an allocation). Every MF_* variable is documented in
# launch/README.md; each has a default that the environment overrides, and extra arguments given to a launcher
# go to the trainer last, so they override the recipe's flags.
#
# Flow: mf_recipe NAME (defaults) -> mf_build_trainer_args "$@" (MF_ARGS) -> mf_slurm_main / mf_local_main
# (environment, command, dry run or run with signal forwarding and automatic requeue).

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
    echo "[launch] error: bash 4.4 or newer is needed (this is $BASH_VERSION)" >&2
    exit 1
fi

MF_TRACKER="latest_checkpointed_iteration.txt"  # megatron_flash.training.checkpointing.TRACKER
MF_ARGS=()
MF_CMD=()
MF_CHILD=""
MF_FORWARD_TO="process"  # process: signal MF_CHILD (srun forwards to its tasks); children: signal its children
MF_GOT_USR1=0
MF_WAIT_INTERRUPTED=0
MF_RC=0

# --- small helpers --------------------------------------------------------------------------------------------

mf_log() { printf '[launch] %s\n' "$*"; }
mf_warn() { printf '[launch] warning: %s\n' "$*" >&2; }
mf_die() {
    printf '[launch] error: %s\n' "$*" >&2
    exit 1
}

mf_quote() {  # the arguments as one line to paste into a shell (quoted only where needed)
    local arg words=()
    for arg in "$@"; do
        [[ $arg =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]] || printf -v arg '%q' "$arg"
        words+=("$arg")
    done
    printf '%s' "${words[*]}"
}

mf_true() {  # mf_true VALUE: 1/true/yes/on
    case "${1,,}" in
        1 | true | yes | on) return 0 ;;
        0 | false | no | off | "") return 1 ;;
        *) mf_die "expected a boolean (1/0, true/false, yes/no, on/off), got '$1'" ;;
    esac
}

mf_require_int() {  # mf_require_int NAME...: each variable holds a positive integer
    local name
    for name in "$@"; do
        [[ ${!name} =~ ^[0-9]+$ && ${!name} -gt 0 ]] || mf_die "$name must be a positive integer, got '${!name}'"
    done
}

mf_has_flag() {  # mf_has_flag FLAG ARGS...: ARGS contain FLAG or FLAG=...
    local flag=$1 arg
    shift
    for arg in "$@"; do
        [[ $arg == "$flag" || $arg == "$flag="* ]] && return 0
    done
    return 1
}

mf_sbatch_default() {  # mf_sbatch_default OPTION FALLBACK: the value of "#SBATCH --OPTION=V" in the launcher
    local value=""
    if [[ -n ${MF_SCRIPT:-} && -r $MF_SCRIPT ]]; then
        value=$(sed -n "s/^#SBATCH --$1[= ]\([^ ]*\).*/\1/p" "$MF_SCRIPT" | head -n 1)
    fi
    printf '%s' "${value:-$2}"
}

mf_latest_iteration() {  # mf_latest_iteration DIR: the iteration in DIR's tracker file, or nothing
    local tracker="$1/$MF_TRACKER" text
    [[ -f $tracker ]] || return 0
    text=$(tr -d '[:space:]' <"$tracker")
    [[ $text =~ ^[0-9]+$ ]] || mf_die "$tracker: expected an iteration number, found '$text'"
    printf '%s' "$text"
}

mf_abs() {  # mf_abs PATH: absolute (relative paths are taken from the repository root)
    if [[ $1 == /* ]]; then printf '%s' "$1"; else printf '%s' "$MF_REPO_DIR/$1"; fi
}

# --- recipes --------------------------------------------------------------------------------------------------

mf_recipe() {  # mf_recipe 1b|3b|longctx: the recipe's defaults, each kept when already set in the environment
    MF_RECIPE_NAME=$1
    case "$1" in
        1b)
            : "${MF_PRESET:=nemotron_flash_1b}" "${MF_RUN_NAME:=nemotron_flash_1b}"
            # ~52 GiB per H100 at DP 32 by the H200 measurements (launch/README.md, "Memory per GPU")
            : "${MF_TP:=1}" "${MF_MICRO_BATCH:=8}"
            ;;
        3b)
            : "${MF_PRESET:=nemotron_flash_3b}" "${MF_RUN_NAME:=nemotron_flash_3b}"
            : "${MF_TP:=1}" "${MF_MICRO_BATCH:=2}"
            ;;
        longctx)
            : "${MF_MODEL:=1b}"
            [[ $MF_MODEL == 1b || $MF_MODEL == 3b ]] || mf_die "MF_MODEL=$MF_MODEL: choose 1b or 3b"
            : "${MF_PRESET:=nemotron_flash_$MF_MODEL}" "${MF_RUN_NAME:=nemotron_flash_${MF_MODEL}_longctx}"
            : "${MF_PHASE1_DIR:=${MF_OUTPUT_ROOT:-$MF_REPO_DIR/runs}/nemotron_flash_$MF_MODEL/checkpoints}"
            : "${MF_PHASE1_GLOBAL_BATCH:=512}" "${MF_PHASE1_SAMPLES:=}"
            # 29 x 1024 tokens: the paper's 29k, divisible by every TP size and by the DeltaNet/Mamba2 chunk sizes
            : "${MF_SEQ_LENGTH:=29696}" "${MF_GLOBAL_BATCH:=64}" "${MF_MICRO_BATCH:=1}"
            # TP 1 for the 1B (~40 GB estimated with recompute), TP 2 + sequence parallelism for the 3B
            if [[ $MF_MODEL == 3b ]]; then : "${MF_TP:=2}"; else : "${MF_TP:=1}"; fi
            : "${MF_RECOMPUTE:=1}"
            : "${MF_LR:=1e-4}" "${MF_MIN_LR:=1e-5}" "${MF_TRAIN_TOKENS:=20000000000}"
            : "${MF_MIXTURE:=data_prep/mixtures/phase3_long_context.yaml}"
            : "${MF_SAVE_INTERVAL:=200}" "${MF_EVAL_INTERVAL:=500}"
            ;;
        *) mf_die "unknown recipe '$1': choose 1b, 3b or longctx" ;;
    esac
    # the paper's recipe: Adam without weight decay, cosine from 1e-3, 512 x 4096 = 2M tokens per step, bf16
    : "${MF_PP:=1}" "${MF_SP:=auto}" "${MF_GLOBAL_BATCH:=512}" "${MF_SEQ_LENGTH:=4096}"
    : "${MF_TRAIN_TOKENS:=4500000000000}" "${MF_TRAIN_ITERS:=}"
    : "${MF_LR:=1e-3}" "${MF_MIN_LR:=1e-5}" "${MF_LR_DECAY_STYLE:=cosine}" "${MF_WARMUP_ITERS:=2000}"
    : "${MF_WEIGHT_DECAY:=0}" "${MF_BF16:=1}" "${MF_DIST_OPT:=1}" "${MF_RECOMPUTE:=0}"
    : "${MF_OVERLAP_GRAD_REDUCE:=1}" "${MF_OVERLAP_PARAM_GATHER:=0}"
    : "${MF_MIXTURE:=data_prep/mixtures/phase1_zyda2.yaml}" "${MF_DATA_ROOT:=}" "${MF_BLEND:=}"
    : "${MF_SPLIT:=99,1,0}" "${MF_TOKENIZER_TYPE:=HuggingFaceTokenizer}" "${MF_TOKENIZER_MODEL:=}"
    : "${MF_OUTPUT_ROOT:=$MF_REPO_DIR/runs}" "${MF_RUN_DIR:=$MF_OUTPUT_ROOT/$MF_RUN_NAME}"
    : "${MF_CHECKPOINT_DIR:=$MF_RUN_DIR/checkpoints}" "${MF_TENSORBOARD_DIR:=$MF_RUN_DIR/tensorboard}"
    : "${MF_SAVE_INTERVAL:=500}" "${MF_EVAL_INTERVAL:=2000}" "${MF_EVAL_ITERS:=10}" "${MF_LOG_INTERVAL:=10}"
    : "${MF_KEEP_LAST:=3}" "${MF_PYTHON:=python}" "${MF_DRY_RUN:=0}" "${MF_REQUEUE:=1}"
    : "${MF_CONTAINER_IMAGE:=}" "${MF_CONTAINER_MOUNTS:=}" "${MF_SRUN_ARGS:=}"
    local name
    for name in MF_OUTPUT_ROOT MF_RUN_DIR MF_CHECKPOINT_DIR MF_TENSORBOARD_DIR MF_DATA_ROOT MF_BLEND \
        MF_TOKENIZER_MODEL MF_PHASE1_DIR MF_PRESET_FILE; do  # relative paths are relative to the repository root
        [[ -z ${!name:-} ]] || printf -v "$name" '%s' "$(mf_abs "${!name}")"
    done
    [[ -z ${MF_PRESET_FILE:-} || -f $MF_PRESET_FILE ]] || mf_die "MF_PRESET_FILE=$MF_PRESET_FILE: no such file"
    mf_require_int MF_TP MF_PP MF_MICRO_BATCH MF_GLOBAL_BATCH MF_SEQ_LENGTH MF_SAVE_INTERVAL MF_EVAL_INTERVAL \
        MF_LOG_INTERVAL
    [[ -z $MF_TRAIN_ITERS ]] || mf_require_int MF_TRAIN_ITERS
    [[ $MF_RECIPE_NAME == longctx ]] || [[ $MF_WARMUP_ITERS =~ ^[0-9]+$ ]] ||
        mf_die "MF_WARMUP_ITERS must be a number, got '$MF_WARMUP_ITERS'"
}

# --- trainer flags --------------------------------------------------------------------------------------------

mf_build_trainer_args() {  # mf_build_trainer_args USER_ARGS...: fills MF_ARGS (the user's arguments come last)
    local sp=0
    # the model shape: a preset, or a file of preset fields (e.g. an architecture-search candidate.json)
    MF_ARGS=(--preset "$MF_PRESET")
    [[ -z ${MF_PRESET_FILE:-} ]] || MF_ARGS=(--preset-file "$MF_PRESET_FILE")
    MF_ARGS+=(
        --tensor-model-parallel-size "$MF_TP" --pipeline-model-parallel-size "$MF_PP"
        --micro-batch-size "$MF_MICRO_BATCH" --global-batch-size "$MF_GLOBAL_BATCH" --seq-length "$MF_SEQ_LENGTH"
        --lr "$MF_LR" --min-lr "$MF_MIN_LR" --weight-decay "$MF_WEIGHT_DECAY"
        --save "$MF_CHECKPOINT_DIR" --save-interval "$MF_SAVE_INTERVAL" --keep-last "$MF_KEEP_LAST"
        --eval-interval "$MF_EVAL_INTERVAL" --eval-iters "$MF_EVAL_ITERS" --log-interval "$MF_LOG_INTERVAL"
        --tensorboard-dir "$MF_TENSORBOARD_DIR" --data-cache-path "$MF_RUN_DIR/data_cache")
    if [[ $MF_SP == auto ]]; then
        ((MF_TP > 1)) && sp=1
    elif mf_true "$MF_SP"; then
        sp=1
    fi
    ((sp)) && MF_ARGS+=(--sequence-parallel)
    mf_true "$MF_BF16" && MF_ARGS+=(--bf16)
    mf_true "$MF_DIST_OPT" && MF_ARGS+=(--use-distributed-optimizer)
    mf_true "$MF_OVERLAP_GRAD_REDUCE" && MF_ARGS+=(--overlap-grad-reduce)
    mf_true "$MF_OVERLAP_PARAM_GATHER" && MF_ARGS+=(--overlap-param-gather)
    mf_true "$MF_RECOMPUTE" && MF_ARGS+=(--recompute-activations)

    if [[ $MF_RECIPE_NAME == longctx ]]; then
        mf_longctx_args "$@"
    else
        MF_ARGS+=(--lr-decay-style "$MF_LR_DECAY_STYLE" --lr-warmup-iters "$MF_WARMUP_ITERS")
        if ! mf_has_flag --train-iters "$@" && ! mf_has_flag --train-tokens "$@"; then
            if [[ -n $MF_TRAIN_ITERS ]]; then
                MF_ARGS+=(--train-iters "$MF_TRAIN_ITERS")
            else
                MF_ARGS+=(--train-tokens "$MF_TRAIN_TOKENS")
            fi
        fi
        # --save and --load the same folder: a new run starts from scratch, a requeued one resumes
        MF_ARGS+=(--load "$MF_CHECKPOINT_DIR")
    fi
    mf_data_args "$@"
    MF_ARGS+=("$@")
}

mf_longctx_args() {  # the long-context phase: continue from phase 1 with its own LR schedule
    local flag p1 p2 s1 w resume record="$MF_RUN_DIR/phase1_iteration.txt"
    for flag in --train-iters --train-tokens --lr-decay-style --lr-decay-iters --lr-warmup-iters \
        --lr-wsd-decay-iters --load; do
        mf_has_flag "$flag" "$@" && mf_die "pretrain_longctx.sh computes $flag itself (see launch/README.md): set" \
            "MF_TRAIN_ITERS / MF_TRAIN_TOKENS (this phase's length), MF_LR, MF_MIN_LR or MF_PHASE1_DIR instead"
    done
    resume=$(mf_latest_iteration "$MF_CHECKPOINT_DIR")
    if [[ -f $record ]]; then
        p1=$(tr -d '[:space:]' <"$record")
    else
        p1=$(mf_latest_iteration "$MF_PHASE1_DIR")
        [[ -n $p1 ]] || mf_die "MF_PHASE1_DIR=$MF_PHASE1_DIR has no $MF_TRACKER: train phase 1 first" \
            "(pretrain_1b.sh / pretrain_3b.sh) or point MF_PHASE1_DIR at its checkpoint folder"
        if ! mf_true "$MF_DRY_RUN"; then
            mkdir -p "$MF_RUN_DIR"
            printf '%s\n' "$p1" >"$record"
        fi
    fi
    [[ $p1 =~ ^[0-9]+$ ]] || mf_die "$record: expected phase 1's final iteration, found '$p1'"
    if [[ -n $MF_TRAIN_ITERS ]]; then
        p2=$MF_TRAIN_ITERS
    else
        p2=$(((MF_TRAIN_TOKENS + MF_GLOBAL_BATCH * MF_SEQ_LENGTH - 1) / (MF_GLOBAL_BATCH * MF_SEQ_LENGTH)))
    fi
    # The scheduler keeps counting samples from phase 1 (s1 of them), also under --override-opt-param-scheduler.
    # A WSD schedule whose decay spans exactly this phase is a cosine from MF_LR down to MF_MIN_LR over the phase:
    # decay length = phase 1 (in this phase's batches) + this phase, WSD decay = this phase.
    s1=${MF_PHASE1_SAMPLES:-$((p1 * MF_PHASE1_GLOBAL_BATCH))}
    w=$(((s1 + MF_GLOBAL_BATCH - 1) / MF_GLOBAL_BATCH))
    MF_ARGS+=(--train-iters "$((p1 + p2))" --lr-decay-style wsd --lr-warmup-iters 0
        --lr-decay-iters "$((w + p2))" --lr-wsd-decay-iters "$p2" --override-opt-param-scheduler)
    if [[ -n $resume ]]; then
        MF_ARGS+=(--load "$MF_CHECKPOINT_DIR")  # a requeued phase 2: continue it (data position included)
    else
        MF_ARGS+=(--load "$MF_PHASE1_DIR" --reset-data-position)
    fi
    MF_LONGCTX_NOTE="long-context phase: phase 1 ended at iteration $p1; this phase trains $p2 iterations (to"
    MF_LONGCTX_NOTE+=" $((p1 + p2))) at sequence length $MF_SEQ_LENGTH, LR cosine $MF_LR -> $MF_MIN_LR; "
    if [[ -n $resume ]]; then
        MF_LONGCTX_NOTE+="resuming this phase from $MF_CHECKPOINT_DIR"
    else
        MF_LONGCTX_NOTE+="starting from $MF_PHASE1_DIR with --reset-data-position"
    fi
}

mf_data_args() {  # the data blend and tokenizer, unless the user's arguments give the data
    local words=()
    if mf_has_flag --data-path "$@" || mf_has_flag --per-split-data-args-path "$@" || mf_has_flag --mock-data "$@"
    then
        MF_DATA_NOTE="data from the command line"
        return 0
    fi
    if ! mf_has_flag --tokenizer-model "$@"; then
        [[ -n $MF_TOKENIZER_MODEL ]] || mf_die "set MF_TOKENIZER_MODEL to the tokenizer the data was tokenized" \
            "with (e.g. the Mistral-NeMo-Minitron-8B-Base tokenizer folder), or pass --tokenizer-model"
        MF_ARGS+=(--tokenizer-type "$MF_TOKENIZER_TYPE" --tokenizer-model "$MF_TOKENIZER_MODEL")
    fi
    if [[ -n $MF_BLEND ]]; then
        [[ -f $MF_BLEND ]] || mf_die "MF_BLEND=$MF_BLEND: no such file"
        MF_DATA_NOTE="blend $MF_BLEND"
        if [[ $MF_BLEND == *.json ]]; then
            MF_ARGS+=(--per-split-data-args-path "$MF_BLEND")
        else
            read -r -a words <"$MF_BLEND"
            ((${#words[@]})) || mf_die "MF_BLEND=$MF_BLEND is empty"
            MF_ARGS+=(--data-path "${words[@]}" --split "$MF_SPLIT")
        fi
        return 0
    fi
    mf_build_blend
}

mf_host_python() {  # python on the batch node (in the container when MF_CONTAINER_IMAGE is set)
    if [[ -n $MF_CONTAINER_IMAGE ]]; then
        srun --nodes=1 --ntasks=1 "${MF_CONTAINER_ARGS[@]}" "$MF_PYTHON" "$@"
    else
        "$MF_PYTHON" "$@"
    fi
}

mf_build_blend() {  # data_prep/build_blend.py: the mixture's per-split JSON, or --data-path + --split
    local mixture out_dir
    mixture=$(mf_abs "$MF_MIXTURE")
    [[ -f $mixture ]] || mf_die "MF_MIXTURE=$MF_MIXTURE: no such file (see data_prep/mixtures/)"
    MF_DATA_NOTE="mixture $MF_MIXTURE (data root ${MF_DATA_ROOT:-from the mixture or \$MF_DATA_ROOT})"
    if ! mf_true "$MF_DRY_RUN"; then
        mkdir -p "$MF_RUN_DIR"
        _mf_blend_into "$mixture" "$MF_RUN_DIR"
    elif [[ -n $MF_CONTAINER_IMAGE && -z ${SLURM_JOB_ID:-} ]]; then
        mf_warn "dry run: the blend is built in the container at launch; shown as $MF_RUN_DIR/blend.json"
        MF_ARGS+=(--per-split-data-args-path "$MF_RUN_DIR/blend.json")
    else  # check the data and pick the format, but write nothing
        out_dir=$(mktemp -d)
        _mf_blend_into "$mixture" "$out_dir" || true
        rm -rf "$out_dir"
    fi
}

_mf_blend_into() {  # _mf_blend_into MIXTURE OUT_DIR (OUT_DIR is the run folder, or a scratch folder in a dry run)
    local json="$MF_RUN_DIR/blend.json" txt="$MF_RUN_DIR/blend_train.txt" words=() cmd
    cmd=(data_prep/build_blend.py "$1")
    [[ -n $MF_DATA_ROOT ]] && cmd+=(--data-root "$MF_DATA_ROOT")
    mf_log "building the data blend: $(mf_quote "$MF_PYTHON" "${cmd[@]}" --format per-split-json --output "$json")"
    if ! (cd "$MF_REPO_DIR" && mf_host_python "${cmd[@]}" --format per-split-json --output "$2/blend.json"); then
        mf_true "$MF_DRY_RUN" || mf_die "building the data blend failed (see above): tokenize the data" \
            "(docs/data.md), set MF_DATA_ROOT or MF_MIXTURE, or give a ready blend with MF_BLEND"
        mf_warn "dry run: the data is not there yet (see above); the blend below is planned with --estimate"
        cmd+=(--estimate)
        if ! (cd "$MF_REPO_DIR" && mf_host_python "${cmd[@]}" --format per-split-json --output "$2/blend.json" \
            2>/dev/null); then
            MF_ARGS+=(--per-split-data-args-path "$json")
            return 0
        fi
    fi
    if (cd "$MF_REPO_DIR" && mf_host_python -c \
        'import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get("valid") else 1)' "$2/blend.json"); then
        MF_ARGS+=(--per-split-data-args-path "$json")
        return 0
    fi
    # no held-out sources in the mixture: Megatron's --split carves validation documents out of the blend
    (cd "$MF_REPO_DIR" && mf_host_python "${cmd[@]}" --format data-args --output "$2/blend_train.txt" 2>/dev/null) ||
        mf_die "build_blend.py --format data-args failed"
    read -r -a words <"$2/blend_train.txt"
    MF_ARGS+=(--data-path "${words[@]}" --split "$MF_SPLIT")
    MF_DATA_NOTE+=", validation: --split $MF_SPLIT of the blend (written to $txt)"
}

# --- environment ----------------------------------------------------------------------------------------------

mf_export_env() {  # NVIDIA's settings for Megatron on Hopper; a value already in the environment wins
    # (fabric settings such as NCCL_IB_HCA or NCCL_SOCKET_IFNAME are site configuration: export them before
    # sbatch, or keep them in /etc/nccl.conf; srun passes the environment on to every task)
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
    export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
    export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
    export PYTHONUNBUFFERED=1
    # /tmp is local to each node: one Triton kernel cache per node and job (a shared filesystem cache races)
    export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/${USER:-user}-triton-${SLURM_JOB_ID:-local-$$}}"
    export PYTHONPATH="$MF_REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
    MF_ENV_NAMES=(CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_AVOID_RECORD_STREAMS
        NCCL_NVLS_ENABLE PYTORCH_CUDA_ALLOC_CONF OMP_NUM_THREADS
        TOKENIZERS_PARALLELISM PYTHONUNBUFFERED TRITON_CACHE_DIR PYTHONPATH)
}

mf_container_args() {  # pyxis flags when MF_CONTAINER_IMAGE is set (MF_CONTAINER_ARGS)
    local mounts=$MF_CONTAINER_MOUNTS dir
    MF_CONTAINER_ARGS=()
    [[ -n $MF_CONTAINER_IMAGE ]] || return 0
    if [[ -z $mounts ]]; then
        for dir in "$MF_REPO_DIR" "$MF_OUTPUT_ROOT" "$MF_RUN_DIR" "$MF_DATA_ROOT" "$MF_TOKENIZER_MODEL"; do
            [[ -n $dir ]] || continue
            dir=$(mf_abs "$dir")
            [[ -f $dir ]] && dir=$(dirname "$dir")
            [[ ,$mounts, == *",$dir:$dir,"* ]] || mounts+="${mounts:+,}$dir:$dir"
        done
    fi
    MF_CONTAINER_ARGS=(--container-image="$MF_CONTAINER_IMAGE" --container-mounts="$mounts"
        --container-workdir="$MF_REPO_DIR")
}

# --- running --------------------------------------------------------------------------------------------------

_mf_on_signal() {  # trap handler: remember the signal and pass it on to the training processes
    local sig=$1 target=${2:-$1}
    [[ $sig == USR1 ]] && MF_GOT_USR1=1
    MF_WAIT_INTERRUPTED=1
    if [[ -z $MF_CHILD ]]; then
        mf_log "received SIG$sig before the training started"
        return 0
    fi
    mf_log "received SIG$sig: passing SIG$target to the training processes (they save a checkpoint and exit)"
    if [[ $MF_FORWARD_TO == children ]]; then
        pkill "-$target" -P "$MF_CHILD" || true
    else
        kill -s "$target" "$MF_CHILD" 2>/dev/null || true
    fi
}

mf_install_traps() {
    trap '_mf_on_signal USR1' USR1
    trap '_mf_on_signal TERM' TERM
    trap '_mf_on_signal INT TERM' INT
}

mf_run_forwarding_signals() {  # run "$@" in the background, pass signals on, wait for it; status in MF_RC
    if ((MF_WAIT_INTERRUPTED)); then  # signalled before the start: do not start
        MF_RC=143
        return 0
    fi
    "$@" &
    MF_CHILD=$!
    while :; do
        MF_WAIT_INTERRUPTED=0
        if wait "$MF_CHILD"; then MF_RC=0; else MF_RC=$?; fi
        ((MF_WAIT_INTERRUPTED)) || break  # a trap interrupted the wait: wait again for the real exit
    done
    MF_CHILD=""
}

mf_check_layout() {  # mf_check_layout WORLD USER_ARGS...: catch layout errors before starting every process
    local world=$1 dp
    shift
    mf_has_flag --tensor-model-parallel-size "$@" && return 0
    mf_has_flag --pipeline-model-parallel-size "$@" && return 0
    mf_has_flag --micro-batch-size "$@" && return 0
    mf_has_flag --global-batch-size "$@" && return 0
    ((world % (MF_TP * MF_PP) == 0)) ||
        mf_die "$world processes are not divisible by MF_TP=$MF_TP x MF_PP=$MF_PP"
    dp=$((world / (MF_TP * MF_PP)))
    ((MF_GLOBAL_BATCH % (MF_MICRO_BATCH * dp) == 0)) || mf_die "MF_GLOBAL_BATCH=$MF_GLOBAL_BATCH is not" \
        "divisible by MF_MICRO_BATCH=$MF_MICRO_BATCH x data-parallel size $dp ($world processes / TP $MF_TP / PP $MF_PP)"
    MF_LAYOUT_NOTE="TP $MF_TP x PP $MF_PP x DP $dp, $((MF_GLOBAL_BATCH / (MF_MICRO_BATCH * dp))) micro-batches of"
    MF_LAYOUT_NOTE+=" $MF_MICRO_BATCH per step"
}

mf_print_summary() {  # what is about to run, for the job log
    local latest
    latest=$(mf_latest_iteration "$MF_CHECKPOINT_DIR")
    mf_log "recipe $MF_RECIPE_NAME: model ${MF_PRESET_FILE:-$MF_PRESET}, $1," \
        "${MF_LAYOUT_NOTE:-layout from the command line}"
    mf_log "data: ${MF_DATA_NOTE:-}"
    [[ -z ${MF_LONGCTX_NOTE:-} ]] || mf_log "$MF_LONGCTX_NOTE"
    if [[ -n $latest ]]; then
        mf_log "checkpoints: $MF_CHECKPOINT_DIR (resuming from iteration $latest)"
    else
        mf_log "checkpoints: $MF_CHECKPOINT_DIR (none yet)"
    fi
    mf_log "TensorBoard: $MF_TENSORBOARD_DIR (tensorboard --logdir $MF_TENSORBOARD_DIR)"
}

mf_print_environment() {
    local name
    for name in "${MF_ENV_NAMES[@]}"; do
        printf '  export %s=%q\n' "$name" "${!name}"
    done
}

mf_slurm_main() {  # the SLURM launchers: pretrain_1b.sh, pretrain_3b.sh, pretrain_longctx.sh
    local nodes tasks_per_node world node first hosts=() task_cmd
    mf_install_traps
    nodes=${MF_NODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-$(mf_sbatch_default nodes 1)}}}
    tasks_per_node=${MF_GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(mf_sbatch_default ntasks-per-node 8)}}}
    [[ $nodes =~ ^[0-9]+$ && $nodes -gt 0 ]] || mf_die "number of nodes '$nodes' is not a positive integer (MF_NODES)"
    [[ $tasks_per_node =~ ^[0-9]+$ && $tasks_per_node -gt 0 ]] ||
        mf_die "tasks per node '$tasks_per_node' is not a positive integer (MF_GPUS_PER_NODE)"
    world=$((nodes * tasks_per_node))
    if [[ -z ${SLURM_JOB_ID:-} ]] && ! mf_true "$MF_DRY_RUN"; then
        mf_die "not inside a SLURM allocation: submit with 'sbatch ${MF_SCRIPT#"$MF_REPO_DIR"/}', preview with" \
            "MF_DRY_RUN=1, or run on one node with launch/local.sh"
    fi
    mf_check_layout "$world" "$@"
    mf_export_env
    mf_container_args
    mf_build_trainer_args "$@"
    task_cmd=("$MF_PYTHON" -u -m megatron_flash.pretrain "${MF_ARGS[@]}")
    MF_CMD=(srun --nodes="$nodes" --ntasks-per-node="$tasks_per_node" --ntasks="$world" --kill-on-bad-exit=1
        --export=ALL "${MF_CONTAINER_ARGS[@]}")
    if [[ -n $MF_SRUN_ARGS ]]; then
        local extra=()
        read -r -a extra <<<"$MF_SRUN_ARGS"
        MF_CMD+=("${extra[@]}")
    fi
    MF_CMD+=("${task_cmd[@]}")
    mf_print_summary "$nodes node(s) x $tasks_per_node task(s) = $world processes"

    if mf_true "$MF_DRY_RUN"; then
        mf_log "dry run (MF_DRY_RUN=1): nothing is started. Environment exported to every task:"
        mf_print_environment
        mf_log "the batch script runs (in $MF_REPO_DIR):"
        printf '  %s\n' "$(mf_quote "${MF_CMD[@]}")"
        if [[ -n ${SLURM_JOB_NODELIST:-} ]] && command -v scontrol >/dev/null 2>&1; then
            mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null || true)
        fi
        for ((node = 0; node < nodes; node++)); do
            first=$((node * tasks_per_node))
            mf_log "node $node${hosts[node]:+ (${hosts[node]})} starts $tasks_per_node task(s), SLURM_PROCID" \
                "$first-$((first + tasks_per_node - 1)), SLURM_LOCALID 0-$((tasks_per_node - 1)), each running:"
            printf '  %s\n' "$(mf_quote "${task_cmd[@]}")"
        done
        return 0
    fi

    mkdir -p "$MF_RUN_DIR" "$MF_CHECKPOINT_DIR" "$MF_TENSORBOARD_DIR"
    printf '%s job %s: %s\n' "$(date '+%F %T')" "${SLURM_JOB_ID:-}" "$(mf_quote "${MF_CMD[@]}")" \
        >>"$MF_RUN_DIR/launch_commands.log"
    mf_log "running: $(mf_quote "${MF_CMD[@]}")"
    cd "$MF_REPO_DIR" || mf_die "cannot enter $MF_REPO_DIR"
    MF_FORWARD_TO=process  # srun passes the signals it receives on to every task
    mf_run_forwarding_signals "${MF_CMD[@]}"
    mf_log "training processes exited with status $MF_RC"
    if ((MF_GOT_USR1)); then
        if ! mf_true "$MF_REQUEUE"; then
            mf_log "pre-timeout signal: MF_REQUEUE=0, not requeueing; resubmit to continue from the checkpoint"
        elif ! command -v scontrol >/dev/null 2>&1; then
            mf_warn "scontrol not found: cannot requeue; resubmit to continue from the checkpoint"
        else
            mf_log "pre-timeout signal: requeueing job $SLURM_JOB_ID; it resumes from the latest checkpoint" \
                "($(mf_latest_iteration "$MF_CHECKPOINT_DIR"))"
            scontrol requeue "$SLURM_JOB_ID" || mf_warn "scontrol requeue failed: resubmit to continue"
        fi
    fi
    return "$MF_RC"
}

mf_local_main() {  # launch/local.sh: one node, torchrun
    local nproc
    mf_install_traps
    nproc=${MF_NPROC:-${MF_GPUS_PER_NODE:-}}
    if [[ -z $nproc ]]; then
        nproc=1
        if command -v nvidia-smi >/dev/null 2>&1; then
            nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
            ((nproc > 0)) || nproc=1
        fi
    fi
    [[ $nproc =~ ^[0-9]+$ && $nproc -gt 0 ]] || mf_die "MF_NPROC '$nproc' is not a positive integer"
    mf_check_layout "$nproc" "$@"
    mf_export_env
    MF_CONTAINER_ARGS=()
    [[ -z $MF_CONTAINER_IMAGE ]] || mf_warn "MF_CONTAINER_IMAGE is for the SLURM launchers (pyxis); local.sh" \
        "runs in the current environment"
    MF_CONTAINER_IMAGE=""
    mf_build_trainer_args "$@"
    MF_CMD=("$MF_PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$nproc"
        -m megatron_flash.pretrain "${MF_ARGS[@]}")
    mf_print_summary "1 node x $nproc process(es)"
    if mf_true "$MF_DRY_RUN"; then
        mf_log "dry run (MF_DRY_RUN=1): nothing is started. Environment:"
        mf_print_environment
        mf_log "this node runs (in $MF_REPO_DIR):"
        printf '  %s\n' "$(mf_quote "${MF_CMD[@]}")"
        return 0
    fi
    mkdir -p "$MF_RUN_DIR" "$MF_CHECKPOINT_DIR" "$MF_TENSORBOARD_DIR"
    printf '%s local: %s\n' "$(date '+%F %T')" "$(mf_quote "${MF_CMD[@]}")" >>"$MF_RUN_DIR/launch_commands.log"
    mf_log "running: $(mf_quote "${MF_CMD[@]}")"
    cd "$MF_REPO_DIR" || mf_die "cannot enter $MF_REPO_DIR"
    MF_FORWARD_TO=children  # torchrun does not pass SIGUSR1 on: signal its worker processes directly
    mf_run_forwarding_signals "${MF_CMD[@]}"
    mf_log "training processes exited with status $MF_RC"
    return "$MF_RC"
}
