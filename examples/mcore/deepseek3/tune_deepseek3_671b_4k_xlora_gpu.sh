#!/usr/bin/env bash
# LoRA / QLoRA fine-tuning of DeepSeek-V3 671B, 4K sequences, NVIDIA 8xH100/H200 nodes: 8 nodes x 8 devices for
# LoRA (half that for QLoRA: see layouts/671b_4k_gpu_qlora.sh). FINETUNE_MODE=lora|qlora picks the layout.
# Order: data_convert_deepseek3_instruction.sh -> ckpt_convert_deepseek3_hf2mcore.sh (LAYOUT=671b_4k_gpu_lora or _qlora)
#        -> this script on every node -> ckpt_convert_deepseek3_merge_lora2hf.sh (same LAYOUT)
# The layout flags come from layouts/671b_4k_gpu_${FINETUNE_MODE}.sh (LAYOUT_ARGS and LORA_ARGS), the same file hf2mcore and the merge script read.
# Usage: bash examples/mcore/deepseek3/tune_deepseek3_671b_4k_xlora_gpu.sh [--dry-run] [--layout NAME] [extra training flags]
#   --dry-run (or DRY_RUN=1): check every flag with the trainer's own parser and validation, print the plan
#   (per-stage layers, parameters, memory per device); launch nothing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

FINETUNE_MODE=${FINETUNE_MODE:-lora}   # lora | qlora (picks layouts/671b_4k_<cluster>_<mode>.sh)

# ---- cluster: the same on every node except NODE_RANK
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-$( [ "${FINETUNE_MODE}" = qlora ] && echo 4 || echo 8 )}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
# ---- paths
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-./model_weights/deepseek3-mcore-gpu-${FINETUNE_MODE}}   # hf2mcore output (has layout.json)
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-./ckpt/deepseek3-${FINETUNE_MODE}-gpu}                  # adapters only (--lora-ckpt-filter)
DATA_PATH=${DATA_PATH:-./finetune_dataset/alpaca}
TOKENIZER_PATH=${TOKENIZER_PATH:-./model_from_hf/deepseek3-hf}
LOG_FILE=${LOG_FILE:-./logs/tune_deepseek3_671b_4k_xlora_gpu.log}
LAYOUT=${LAYOUT:-671b_4k_gpu_${FINETUNE_MODE}}

dsv_init "$@"
source "${DSV_EXAMPLES_DIR}/env_gpu.sh"   # NCCL / allocator settings
source "${DSV_EXAMPLES_DIR}/model_671b.sh"
dsv_source_layout "${LAYOUT}"
DEVICES_PER_NODE=${GPUS_PER_NODE}
DEVICE_MEMORY_GB=${LAYOUT_DEVICE_MEMORY_GB:-}
FALLBACK_MODEL_CONFIG=${MODEL_CONFIG:-${DSV_ROOT}/assets/deepseek3_671b}

dsv_need_mcore_checkpoint "${CKPT_LOAD_DIR}"
dsv_need_dataset "${DATA_PATH}" instruction
dsv_need_tokenizer "${TOKENIZER_PATH}"

KERNEL_ARGS=(   # the kernel flags that paid on H200 (docs/en/performance.md); --moe-grouped-gemm is in the layout
    --use-flash-attn
    --use-fused-rmsnorm
    --use-fused-swiglu
    --use-fused-rotary-pos-emb
    --use-fused-moe-token-permute-and-unpermute
    --cross-entropy-loss-fusion
)
# LoRA flags come from the layout file (LORA_ARGS), shared with ckpt_convert_deepseek3_merge_lora2hf.sh.
# --lora-ckpt-filter saves the adapters only; merge them into the hf2mcore base with the merge script.
PEFT_ARGS=("${LORA_ARGS[@]}" --lora-ckpt-filter)
case "${FINETUNE_MODE}" in
    lora) ;;
    qlora) PEFT_ARGS+=(--qlora-nf4) ;;   # base linears quantized to NF4 on load; the checkpoint stays bf16
    *) dsv_die "FINETUNE_MODE must be lora or qlora, got '${FINETUNE_MODE}'" ;;
esac
[ "${#LORA_ARGS[@]}" -gt 0 ] || dsv_die "layout ${LAYOUT} defines no LORA_ARGS"
TRAIN_ARGS=(
    --seq-length 4096
    --micro-batch-size 1
    --global-batch-size 256
    --train-iters 2000
    --lr 1.0e-4
    --min-lr 1.0e-6
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
)
[ "${PRECISION}" = "bf16" ] && TRAIN_ARGS+=(--bf16)   # PRECISION comes from the layout file (hf2mcore uses it too)
DATA_ARGS=(
    --data-path "${DATA_PATH}"
    --is-instruction-dataset
    --tokenizer-type PretrainedFromHF
    --tokenizer-name-or-path "${TOKENIZER_PATH}"
    --split 100,0,0
)
CKPT_ARGS=(
    --load "${CKPT_LOAD_DIR}"
    --finetune
    --no-load-optim
    --no-load-rng
    --save "${CKPT_SAVE_DIR}"
    --save-interval 500
)
OUTPUT_ARGS=(
    --log-interval 1
    --eval-iters 0
)

dsv_train "${DSV_ROOT}/posttrain_gpt.py" "${MODEL_ARGS[@]}" "${LAYOUT_ARGS[@]}" "${KERNEL_ARGS[@]}" \
    "${TRAIN_ARGS[@]}" "${PEFT_ARGS[@]}" "${DATA_ARGS[@]}" "${CKPT_ARGS[@]}" "${OUTPUT_ARGS[@]}" "${EXTRA_ARGS[@]}"
