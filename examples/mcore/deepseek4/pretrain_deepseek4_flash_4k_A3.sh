#!/usr/bin/env bash
# Pretraining of DeepSeek-V4-Flash (284B) from scratch, 4K sequences, Atlas 900 A3 SuperPoD: 16 nodes x 16 devices.
# Order: data_convert_deepseek4_pretrain.sh -> this script on every node (NODE_RANK=0..NNODES-1)
# The layout flags come from layouts/flash_4k_A3_pretrain.sh.
# Usage: bash examples/mcore/deepseek4/pretrain_deepseek4_flash_4k_A3.sh [--dry-run] [--layout NAME] [extra training flags]
#   --dry-run (or DRY_RUN=1): check every flag with the trainer's own parser and validation, print the plan
#   (per-stage layers, parameters, memory per device); launch nothing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# ---- cluster: the same on every node except NODE_RANK
NPUS_PER_NODE=${NPUS_PER_NODE:-16}
NNODES=${NNODES:-16}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
# ---- paths
DATA_PATH=${DATA_PATH:-./dataset/enwiki_text_document}               # prefix written by data_convert_deepseek4_pretrain.sh
TOKENIZER_PATH=${TOKENIZER_PATH:-./model_from_hf/deepseek4-hf}
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-./ckpt/deepseek4-pretrain-A3}
MODEL_CONFIG=${MODEL_CONFIG:-./model_from_hf/deepseek4-hf}           # HF config.json (dir) the model is built from
LOG_FILE=${LOG_FILE:-./logs/pretrain_deepseek4_flash_4k_A3.log}
LAYOUT=${LAYOUT:-flash_4k_A3_pretrain}

dsv_init "$@"
source "${DSV_COMMON_DIR}/env_ascend.sh"   # CANN set_env.sh, HCCL_*, CPU affinity
source "${DSV_EXAMPLES_DIR}/model_flash.sh"
dsv_source_layout "${LAYOUT}"
DEVICES_PER_NODE=${NPUS_PER_NODE}
DEVICE_MEMORY_GB=${LAYOUT_DEVICE_MEMORY_GB:-}
FALLBACK_MODEL_CONFIG=${MODEL_CONFIG:-${DSV_ROOT}/assets/deepseek4_flash}

[ -f "${MODEL_CONFIG}/config.json" ] || [ -f "${MODEL_CONFIG}" ] || { dsv_missing "model config ${MODEL_CONFIG} does not exist"; MODEL_CONFIG="${DSV_ROOT}/assets/deepseek4_flash"; }
dsv_need_dataset "${DATA_PATH}" pretrain
dsv_need_tokenizer "${TOKENIZER_PATH}"

KERNEL_ARGS=()   # none: the fused kernels of the V3 templates do not apply to V4 yet (head dim 512, attention
                 # sinks, compressed keys; SwiGLU with a clamp); see docs/en/deepseek4.md
TRAIN_ARGS=(
    --seq-length 4096
    --micro-batch-size 1
    --global-batch-size 3840
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
    # no --moe-aux-loss-coeff: the V4 trainer balances experts by the selection bias alone (refused otherwise)
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
    --model-config "${MODEL_CONFIG:-${DSV_ROOT}/assets/deepseek4_flash}"
    --save "${CKPT_SAVE_DIR}"
    --save-interval 500
)
OUTPUT_ARGS=(
    --log-interval 1
    --eval-iters 0
)

dsv_train "${DSV_ROOT}/pretrain_gpt.py" "${MODEL_ARGS[@]}" "${LAYOUT_ARGS[@]}" "${KERNEL_ARGS[@]}" \
    "${TRAIN_ARGS[@]}" "${DATA_ARGS[@]}" "${CKPT_ARGS[@]}" "${OUTPUT_ARGS[@]}" "${EXTRA_ARGS[@]}"
