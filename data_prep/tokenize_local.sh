#!/usr/bin/env bash
# Tokenize every shard of a corpus folder on this machine, several shards at a time, then merge them into one
# megatron prefix. The local twin of tokenize_shards.sbatch (same layout, same tools).
#
#   data_prep/tokenize_local.sh -i INPUT_DIR -o OUTPUT_PREFIX -t TOKENIZER_TYPE -m TOKENIZER_MODEL \
#       [-j PARALLEL_SHARDS] [-w WORKERS_PER_SHARD] [-k JSON_KEY] [-- EXTRA preprocess_data.py ARGS]
#
# Shards: the .jsonl/.jsonl.gz/.jsonl.zst/.parquet files under INPUT_DIR, in sorted order; shard N is written to
# OUTPUT_PREFIX_shards/shard_NNNNN_KEY_document.bin/.idx, the merge to OUTPUT_PREFIX_KEY_document.bin/.idx.
# Rerunning after an interruption redoes only the shards (and the merge) that are not complete.
# --append-eod is always passed: pretraining documents must be separated by the end-of-document token.
set -euo pipefail

usage() {
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
INPUT_DIR="" OUTPUT_PREFIX="" TOKENIZER_TYPE="" TOKENIZER_MODEL=""
JOBS=2 WORKERS=1 KEY=text

while getopts "i:o:t:m:j:w:k:h" opt; do
    case "$opt" in
        i) INPUT_DIR="$OPTARG" ;;
        o) OUTPUT_PREFIX="$OPTARG" ;;
        t) TOKENIZER_TYPE="$OPTARG" ;;
        m) TOKENIZER_MODEL="$OPTARG" ;;
        j) JOBS="$OPTARG" ;;
        w) WORKERS="$OPTARG" ;;
        k) KEY="$OPTARG" ;;
        h) usage 0 ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
EXTRA_ARGS=("$@")

[[ -n "$INPUT_DIR" && -n "$OUTPUT_PREFIX" && -n "$TOKENIZER_TYPE" ]] || usage
[[ -d "$INPUT_DIR" ]] || { echo "error: input folder '$INPUT_DIR' does not exist" >&2; exit 2; }
[[ "$JOBS" =~ ^[1-9][0-9]*$ && "$WORKERS" =~ ^[1-9][0-9]*$ ]] || {
    echo "error: -j and -w must be positive integers" >&2; exit 2; }

mapfile -t SHARDS < <(find "$INPUT_DIR" -type f \( -name '*.jsonl' -o -name '*.jsonl.gz' -o -name '*.jsonl.zst' \
    -o -name '*.parquet' \) | LC_ALL=C sort)
if [[ ${#SHARDS[@]} -eq 0 ]]; then
    echo "error: no .jsonl/.jsonl.gz/.jsonl.zst/.parquet files under '$INPUT_DIR'" >&2
    exit 2
fi

SHARD_DIR="${OUTPUT_PREFIX}_shards"
mkdir -p "$SHARD_DIR"
TOKENIZER_ARGS=(--tokenizer-type "$TOKENIZER_TYPE")
if [[ -n "$TOKENIZER_MODEL" ]]; then
    TOKENIZER_ARGS+=(--tokenizer-model "$TOKENIZER_MODEL")
fi
echo "tokenizing ${#SHARDS[@]} shard(s) from $INPUT_DIR, $JOBS at a time with $WORKERS worker(s) each" >&2

# A pool of JOBS background jobs; success is judged by the outputs themselves (a shard is done when its .idx has
# been renamed into place), so a failed shard is reported with its log whatever its exit status.
tokenize_one() {
    local index="$1" path="$2"
    "$PYTHON" "$REPO_DIR/tools/preprocess_data.py" --input "$path" --json-keys "$KEY" \
        --output-prefix "$SHARD_DIR/shard_$index" --workers "$WORKERS" --append-eod --no-progress-bar \
        "${TOKENIZER_ARGS[@]}" "${EXTRA_ARGS[@]}" >"$SHARD_DIR/shard_$index.log" 2>&1
}
for i in "${!SHARDS[@]}"; do
    while [[ $(jobs -rp | wc -l) -ge $JOBS ]]; do
        wait -n || true
    done
    tokenize_one "$(printf '%05d' "$i")" "${SHARDS[$i]}" &
done
wait

MISSING=0
for i in "${!SHARDS[@]}"; do
    index=$(printf '%05d' "$i")
    if [[ ! -f "$SHARD_DIR/shard_${index}_${KEY}_document.idx" ]]; then
        echo "error: shard $index (${SHARDS[$i]}) did not complete; its log, $SHARD_DIR/shard_$index.log, ends:" >&2
        tail -n 5 "$SHARD_DIR/shard_$index.log" >&2 || true
        MISSING=$((MISSING + 1))
    fi
done
if [[ $MISSING -gt 0 ]]; then
    echo "error: $MISSING shard(s) failed; rerun this command to retry only those" >&2
    exit 1
fi

MERGE_INPUTS=()
for i in "${!SHARDS[@]}"; do
    MERGE_INPUTS+=("$(printf '%s/shard_%05d_%s_document' "$SHARD_DIR" "$i" "$KEY")")
done
"$PYTHON" "$REPO_DIR/tools/merge_datasets.py" --input "${MERGE_INPUTS[@]}" \
    --output-prefix "${OUTPUT_PREFIX}_${KEY}_document"
