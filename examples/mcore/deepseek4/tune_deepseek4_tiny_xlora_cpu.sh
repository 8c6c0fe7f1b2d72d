#!/usr/bin/env bash
# LoRA (FINETUNE_MODE=lora) or QLoRA (qlora) fine-tuning of the tiny DeepSeek-V4 (assets/tiny_deepseek4) on CPU: the V4-Flash tune script's
# flow at a size one laptop runs in minutes. Run it after
#   data_convert_deepseek4_instruction.sh (SEQ_LENGTH=256) and ckpt_convert_deepseek4_hf2mcore.sh (LAYOUT=tiny_cpu).
# The layout flags come from layouts/tiny_cpu.sh.
# Usage: bash examples/mcore/deepseek4/tune_deepseek4_tiny_xlora_cpu.sh [--dry-run] [--layout NAME] [extra training flags]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

FINETUNE_MODE=${FINETUNE_MODE:-lora}   # lora | qlora

# ---- "cluster": one machine, gloo
NNODES=1
NODE_RANK=0
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29511}
# ---- paths
WORK_DIR=${WORK_DIR:-./work_dirs/tiny}
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-${WORK_DIR}/mcore}
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-${WORK_DIR}/ckpt_${FINETUNE_MODE}}
DATA_PATH=${DATA_PATH:-${WORK_DIR}/data/alpaca}
TOKENIZER_PATH=${TOKENIZER_PATH:-${CKPT_LOAD_DIR}}
TRAIN_ITERS=${TRAIN_ITERS:-60}
LAYOUT=${LAYOUT:-tiny_cpu}

dsv_init "$@"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TORCHDYNAMO_DISABLE=${TORCHDYNAMO_DISABLE:-1}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}             # megatron's "no Transformer Engine/Apex" warnings
dsv_source_layout "${LAYOUT}"
NPROC_PER_NODE=${NPROC_PER_NODE:-${LAYOUT_DEVICES_PER_NODE}}
DEVICES_PER_NODE=${NPROC_PER_NODE}
FALLBACK_MODEL_CONFIG=${DSV_ROOT}/assets/tiny_deepseek4

dsv_need_mcore_checkpoint "${CKPT_LOAD_DIR}"
dsv_need_dataset "${DATA_PATH}" instruction
dsv_need_tokenizer "${TOKENIZER_PATH}"

TRAIN_ARGS=(
    --seq-length 256                 # = SEQ_LENGTH of the data conversion
    --micro-batch-size 4
    --global-batch-size 4
    --train-iters "${TRAIN_ITERS}"
    --lr 1e-2                        # adapters from zero (B = 0) take a larger step
    --min-lr 1e-3
    --lr-decay-style cosine
    --lr-warmup-iters 5
    --weight-decay 0.0
    --clip-grad 1.0
    --seed 1234
)
[ "${PRECISION}" = "bf16" ] && TRAIN_ARGS+=(--bf16)
DATA_ARGS=(
    --data-path "${DATA_PATH}"
    --is-instruction-dataset
    --tokenizer-name-or-path "${TOKENIZER_PATH}"
)
# LoRA flags from the layout file (LORA_ARGS): the merge script reads the same ones.
PEFT_ARGS=("${LORA_ARGS[@]}" --lora-ckpt-filter)
case "${FINETUNE_MODE}" in
    lora) ;;
    qlora) PEFT_ARGS+=(--qlora-nf4) ;;
    *) dsv_die "FINETUNE_MODE must be lora or qlora, got '${FINETUNE_MODE}'" ;;
esac
CKPT_ARGS=(
    --load "${CKPT_LOAD_DIR}"
    --finetune
    --save "${CKPT_SAVE_DIR}"
    --no-save-optim
)
OUTPUT_ARGS=(--log-interval 5)

dsv_train "${DSV_ROOT}/posttrain_gpt.py" "${LAYOUT_ARGS[@]}" "${TRAIN_ARGS[@]}" "${PEFT_ARGS[@]}" "${DATA_ARGS[@]}" \
    "${CKPT_ARGS[@]}" "${OUTPUT_ARGS[@]}" "${EXTRA_ARGS[@]}"
