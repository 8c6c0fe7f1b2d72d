#!/usr/bin/env bash
# Pretraining of the tiny DeepSeek-V3 (assets/tiny_deepseek3) from random init on CPU: the 671B pretrain
# script's flow at toy size. Run data_convert_deepseek3_pretrain.sh first, e.g.
#   INPUT=assets/data/pretrain_pydoc.jsonl TOKENIZER_PATH=assets/tiny_deepseek3 OUTPUT_PREFIX=work_dirs/tiny/data/pydoc \
#   WORKERS=1 bash examples/mcore/deepseek3/data_convert_deepseek3_pretrain.sh
# Usage: bash examples/mcore/deepseek3/pretrain_deepseek3_tiny_cpu.sh [--dry-run] [--layout NAME] [extra training flags]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NNODES=1
NODE_RANK=0
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29512}
WORK_DIR=${WORK_DIR:-./work_dirs/tiny}
DATA_PATH=${DATA_PATH:-${WORK_DIR}/data/pydoc_text_document}
TOKENIZER_PATH=${TOKENIZER_PATH:-${DSV_ROOT}/assets/tiny_deepseek3}
MODEL_CONFIG=${MODEL_CONFIG:-${DSV_ROOT}/assets/tiny_deepseek3}
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-${WORK_DIR}/ckpt_pretrain}
TRAIN_ITERS=${TRAIN_ITERS:-100}
LAYOUT=${LAYOUT:-tiny_cpu}

dsv_init "$@"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TORCHDYNAMO_DISABLE=${TORCHDYNAMO_DISABLE:-1}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
dsv_source_layout "${LAYOUT}"
NPROC_PER_NODE=${NPROC_PER_NODE:-${LAYOUT_DEVICES_PER_NODE}}
DEVICES_PER_NODE=${NPROC_PER_NODE}

dsv_need_file "${MODEL_CONFIG}/config.json" "model config"
dsv_need_dataset "${DATA_PATH}" pretrain
dsv_need_tokenizer "${TOKENIZER_PATH}"

TRAIN_ARGS=(
    --seq-length 256
    --micro-batch-size 4
    --global-batch-size 8
    --train-iters "${TRAIN_ITERS}"
    --lr 3e-3
    --min-lr 3e-4
    --lr-decay-style cosine
    --lr-warmup-iters 10
    --weight-decay 0.01
    --clip-grad 1.0
    --seed 1234
    --moe-aux-loss-coeff 0.0001
    --moe-token-dispatcher-type allgather
    --mtp-loss-scaling-factor 0.3
)
[ "${PRECISION}" = "bf16" ] && TRAIN_ARGS+=(--bf16)
DATA_ARGS=(
    --data-path "${DATA_PATH}"
    --tokenizer-name-or-path "${TOKENIZER_PATH}"
    --split 98,2,0
)
CKPT_ARGS=(
    --model-config "${MODEL_CONFIG}"
    --save "${CKPT_SAVE_DIR}"
    --save-interval 50
)
OUTPUT_ARGS=(--log-interval 10 --eval-interval 50 --eval-iters 2)

dsv_train "${DSV_ROOT}/pretrain_gpt.py" "${LAYOUT_ARGS[@]}" "${TRAIN_ARGS[@]}" "${DATA_ARGS[@]}" \
    "${CKPT_ARGS[@]}" "${OUTPUT_ARGS[@]}" "${EXTRA_ARGS[@]}"
