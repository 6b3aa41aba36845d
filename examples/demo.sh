#!/usr/bin/env bash
# The main job end to end on CPU, from nothing (no downloads), in a few minutes on 2 cores:
#   stdlib docstrings -> byte-level BPE tokenizer -> `mindspeed preprocess` -> pretrain a tiny
#   DeepSeek-V3-style model (MLA, MoE with expert parallelism, MTP) on 2 processes -> SFT on a
#   generated instruction set -> `mindspeed convert mcore-to-hf` -> verify -> generate with transformers.
# Everything goes to $DEMO_DIR (default: a fresh temporary directory). Knobs: DEMO_PRETRAIN_ITERS,
# DEMO_SFT_ITERS. `nox -s demo` installs the packages and runs this; the parameter tools' tour is
# examples/args_tour.sh.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python}
DEMO_DIR=${DEMO_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/mindspeed-demo.XXXXXX")}
PRETRAIN_ITERS=${DEMO_PRETRAIN_ITERS:-120}
SFT_ITERS=${DEMO_SFT_ITERS:-50}
mkdir -p "$DEMO_DIR"
if [ -n "$(ls -A "$DEMO_DIR")" ]; then echo "demo: DEMO_DIR=$DEMO_DIR is not empty; pass a new directory" >&2; exit 2; fi
DEMO_DIR=$(cd "$DEMO_DIR" && pwd)
mkdir -p "$DEMO_DIR/logs" "$DEMO_DIR/data"
# Offline, and without megatron's "Apex/Transformer Engine not installed" warnings on every rank.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore
echo "demo: outputs go to $DEMO_DIR"

# step KEY TITLE CMD...: run CMD with its output shown and logged to logs/KEY.log; record its wall time.
step() {
  local key=$1 title=$2; shift 2
  printf '\n=== %s: %s\n$ %s\n' "$key" "$title" "$*"
  local t0; t0=$(date +%s.%N)
  "$@" 2>&1 | tee "$DEMO_DIR/logs/$key.log"
  printf '%s\t%s\n' "$key" "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')" >> "$DEMO_DIR/timings.tsv"
}
D=$DEMO_DIR MODEL=$DEMO_DIR/model
# Shared by both runs: 2 processes, experts split over them (EP=2, so DP=2), fp32, Adam; one
# microbatch of 8 x 256 tokens per rank per step (fewer, larger microbatches run faster on CPU).
COMMON=(--nproc 2 --model "$MODEL" --expert-model-parallel-size 2 --seq-length 256 --micro-batch-size 8
        --global-batch-size 16 --weight-decay 0.1 --clip-grad 1.0 --seed 1234 --log-interval 10)

step corpus "standard-library docstrings" "$PY" "$HERE/demo/corpus.py" "$D/data/corpus.jsonl"
step tokenizer "byte-level BPE, 2048 tokens" "$PY" "$HERE/demo/tokenizer.py" "$D/data/corpus.jsonl" "$MODEL"
step model "DeepSeek-V3-style config.json" "$PY" "$HERE/demo/model_config.py" "$MODEL" "$MODEL"
step preprocess "pretraining corpus" mindspeed preprocess --input "$D/data/corpus.jsonl" --json-keys text --append-eod \
    --tokenizer-name-or-path "$MODEL" --output-prefix "$D/data/corpus" --log-interval 100000
step pretrain "$PRETRAIN_ITERS steps, EP=2 x DP=2" mindspeed train "${COMMON[@]}" \
    --data-path "$D/data/corpus_text_document" --split 98,2,0 --eval-interval 50 --eval-iters 2 \
    --train-iters "$PRETRAIN_ITERS" --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 10 \
    --save "$D/pretrain/ckpt" --output-dir "$D/pretrain" --tensorboard-dir "$D/tensorboard/pretrain"
step sft-data "alpaca-style questions about the same docstrings" "$PY" "$HERE/demo/sft_data.py" "$D/data/sft.jsonl"
step preprocess-sft "ChatML, neat packs of 256 tokens" mindspeed preprocess --input "$D/data/sft.jsonl" \
    --handler-name AlpacaStyleInstructionHandler --prompt-type chatml --seq-length 256 --neat-pack \
    --tokenizer-name-or-path "$MODEL" --output-prefix "$D/data/sft" --log-interval 100000
step sft "$SFT_ITERS steps from the pretrained weights" mindspeed train "${COMMON[@]}" \
    --is-instruction-dataset --neat-pack --data-path "$D/data/sft" \
    --train-iters "$SFT_ITERS" --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 5 \
    --load "$D/pretrain/ckpt" --finetune --save "$D/sft/ckpt" --output-dir "$D/sft" --tensorboard-dir "$D/tensorboard/sft"
# --hf-config: the model directory also holds the tokenizer, so the export gets it too.
step export "Megatron torch_dist -> Hugging Face" mindspeed convert mcore-to-hf --mcore-dir "$D/sft/ckpt" \
    --hf-config "$MODEL" --out "$D/export"
step verify "transformers vs megatron-core logits" mindspeed convert verify --hf-dir "$D/export" --mcore-dir "$D/sft/ckpt"
step generate "transformers, greedy" "$PY" "$HERE/demo/generate.py" "$D/export"
printf '\n=== summary\n'
"$PY" "$HERE/demo/summary.py" "$DEMO_DIR"
