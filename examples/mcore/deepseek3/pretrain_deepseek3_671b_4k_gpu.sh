#!/usr/bin/env bash
# Pretraining of DeepSeek-V3 671B from scratch, 4K sequences, NVIDIA 8xH100/H200 nodes: 32 nodes x 8 devices.
# Order: data_convert_deepseek3_pretrain.sh -> this script on every node (NODE_RANK=0..NNODES-1)
# The layout flags come from layouts/671b_4k_gpu_pretrain.sh.
# Usage: bash examples/mcore/deepseek3/pretrain_deepseek3_671b_4k_gpu.sh [--dry-run] [--layout NAME] [extra training flags]
#   --dry-run (or DRY_RUN=1): check every flag with the trainer's own parser and validation, print the plan
#   (per-stage layers, parameters, memory per device); launch nothing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# ---- cluster: the same on every node except NODE_RANK
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-32}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
# ---- paths
DATA_PATH=${DATA_PATH:-./dataset/enwiki_text_document}               # prefix written by data_convert_deepseek3_pretrain.sh
TOKENIZER_PATH=${TOKENIZER_PATH:-./model_from_hf/deepseek3-hf}
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-./ckpt/deepseek3-pretrain-gpu}
MODEL_CONFIG=${MODEL_CONFIG:-./model_from_hf/deepseek3-hf}           # HF config.json (dir) the model is built from
LOG_FILE=${LOG_FILE:-./logs/pretrain_deepseek3_671b_4k_gpu.log}
LAYOUT=${LAYOUT:-671b_4k_gpu_pretrain}

dsv_init "$@"
source "${DSV_EXAMPLES_DIR}/env_gpu.sh"   # NCCL / allocator settings
source "${DSV_EXAMPLES_DIR}/model_671b.sh"
dsv_source_layout "${LAYOUT}"
DEVICES_PER_NODE=${GPUS_PER_NODE}
DEVICE_MEMORY_GB=${LAYOUT_DEVICE_MEMORY_GB:-}
FALLBACK_MODEL_CONFIG=${MODEL_CONFIG:-${DSV_ROOT}/assets/deepseek3_671b}

[ -f "${MODEL_CONFIG}/config.json" ] || [ -f "${MODEL_CONFIG}" ] || { dsv_missing "model config ${MODEL_CONFIG} does not exist"; MODEL_CONFIG="${DSV_ROOT}/assets/deepseek3_671b"; }
dsv_need_dataset "${DATA_PATH}" pretrain
dsv_need_tokenizer "${TOKENIZER_PATH}"

KERNEL_ARGS=(   # the kernel flags that paid on H200 (docs/en/performance.md); --moe-grouped-gemm is in the layout
    --use-flash-attn
    --use-fused-rmsnorm
    --use-fused-swiglu
    --use-fused-rotary-pos-emb
    --use-fused-moe-token-permute-and-unpermute
    --cross-entropy-loss-fusion
)
TRAIN_ARGS=(
    --seq-length 4096
    --micro-batch-size 1
    --global-batch-size 1024
    --train-iters 20000
    --lr 1.0e-4
    --min-lr 1.0e-5
    --lr-decay-style cosine
    --lr-warmup-fraction 0.01
    --weight-decay 1e-2
    --adam-beta1 0.9
    --adam-beta2 0.95
    --clip-grad 1.0
    --seed 42
    --use-distributed-optimizer
    --recompute-granularity full
    --recompute-method uniform
    --recompute-num-layers 1
    --moe-router-load-balancing-type seq_aux_loss
    --moe-aux-loss-coeff 0.0001
    --moe-router-bias-update-rate 0.001
    --moe-token-dispatcher-type alltoall
    --mtp-loss-scaling-factor 0.3
)
[ "${PRECISION}" = "bf16" ] && TRAIN_ARGS+=(--bf16)   # PRECISION comes from the layout file (hf2mcore uses it too)
DATA_ARGS=(
    --data-path "${DATA_PATH}"
    --tokenizer-type PretrainedFromHF
    --tokenizer-name-or-path "${TOKENIZER_PATH}"
    --split 100,0,0
)
CKPT_ARGS=(
    --model-config "${MODEL_CONFIG:-${DSV_ROOT}/assets/deepseek3_671b}"
    --save "${CKPT_SAVE_DIR}"
    --save-interval 500
)
OUTPUT_ARGS=(
    --log-interval 1
    --eval-iters 0
)

dsv_train "${DSV_ROOT}/pretrain_gpt.py" "${MODEL_ARGS[@]}" "${LAYOUT_ARGS[@]}" "${KERNEL_ARGS[@]}" \
    "${TRAIN_ARGS[@]}" "${DATA_ARGS[@]}" "${CKPT_ARGS[@]}" "${OUTPUT_ARGS[@]}" "${EXTRA_ARGS[@]}"
