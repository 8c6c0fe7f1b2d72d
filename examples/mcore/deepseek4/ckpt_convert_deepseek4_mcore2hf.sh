#!/usr/bin/env bash
# Step d (optional): a trained Megatron-Core checkpoint (full fine-tune or pretrain) -> HF safetensors that
# transformers / vLLM load. The layout is read from the checkpoint's layout.json; the flags of LAYOUT
# (layouts/<LAYOUT>.sh, the training script's file) are passed too, so a checkpoint of another layout fails
# with the differing flag named.
# Usage: LAYOUT=flash_4k_A2_full bash examples/mcore/deepseek4/ckpt_convert_deepseek4_mcore2hf.sh [--dry-run] [extra flags]
#   extra flags e.g. --save-fp8 (write the official FP8 e4m3 format).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

LAYOUT=${LAYOUT:-flash_4k_A2_full}
LOAD_DIR=${LOAD_DIR:-./ckpt/deepseek4-full-A2}              # the training --save directory
SAVE_DIR=${SAVE_DIR:-./model_from_hf/deepseek4-hf-tuned}
TOKENIZER_PATH=${TOKENIZER_PATH:-./model_from_hf/deepseek4-hf}
WORKERS=${WORKERS:-4}

dsv_init "$@"
dsv_source_layout "${LAYOUT}"
dsv_need_mcore_checkpoint "${LOAD_DIR}"
dsv_need_tokenizer "${TOKENIZER_PATH}"
dsv_convert_layout_args source

if [ "${DRY_RUN}" = "1" ]; then
    CONFIG="${LOAD_DIR}/config.json"
    [ -f "${CONFIG}" ] || CONFIG="${MODEL_CONFIG:-${DSV_ROOT}/assets/deepseek4_flash}"
    dsv_plan "${CONFIG}"
fi
dsv_run "${PYTHON}" -m ckpt_convert mcore2hf \
    --load-dir "${LOAD_DIR}" \
    --save-dir "${SAVE_DIR}" \
    "${CONVERT_LAYOUT_ARGS[@]}" \
    --tokenizer-dir "${TOKENIZER_PATH}" \
    --workers "${WORKERS}" \
    "${EXTRA_ARGS[@]}"
