#!/usr/bin/env bash
# Step b: HF DeepSeek-V4 safetensors (bf16, or the official FP8 release: dequantized on the fly) -> Megatron-Core
# rank files + layout.json for the layout of the training script you will run.
# The layout is NOT typed here: LAYOUT names layouts/<LAYOUT>.sh, the same file the training script sources
# (flash_4k_A2_full, flash_4k_A3_full, flash_4k_<A2|A3|gpu>_lora/_qlora, flash_4k_gpu_full, tiny_cpu, ...),
# so conversion and training cannot disagree. The trainer checks layout.json against its flags on load.
# Usage: LAYOUT=flash_4k_A2_full bash examples/mcore/deepseek4/ckpt_convert_deepseek4_hf2mcore.sh [--dry-run] [extra flags]
#   --dry-run: validate the layout against the HF config.json and print the per-stage plan; convert nothing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

LAYOUT=${LAYOUT:-flash_4k_A2_full}
HF_DIR=${HF_DIR:-./model_from_hf/deepseek4-hf}
SAVE_DIR=${SAVE_DIR:-./model_weights/deepseek4-mcore-${LAYOUT#flash_4k_}}
WORKERS=${WORKERS:-4}                                       # rank files written in parallel (memory grows with it)

dsv_init "$@"
dsv_source_layout "${LAYOUT}"
dsv_need_hf_checkpoint "${HF_DIR}"
dsv_need_tokenizer "${HF_DIR}"
dsv_convert_layout_args target

CONFIG="${HF_DIR}/config.json"
if [ "${DRY_RUN}" = "1" ]; then
    [ -f "${CONFIG}" ] || CONFIG="${MODEL_CONFIG:-${DSV_ROOT}/assets/deepseek4_flash}"
    dsv_plan "${CONFIG}"
    dsv_run "${PYTHON}" -m ckpt_convert hf2mcore --load-dir "${HF_DIR}" --save-dir "${SAVE_DIR}" \
        "${CONVERT_LAYOUT_ARGS[@]}" "${HF2MCORE_ARGS[@]}" --params-dtype "${PRECISION:-bf16}" --workers "${WORKERS}" \
        "${EXTRA_ARGS[@]}"
    exit 0
fi
mkdir -p "$(dirname "${SAVE_DIR}")"
dsv_run "${PYTHON}" -m ckpt_convert hf2mcore \
    --model-type-hf deepseek4 \
    --load-dir "${HF_DIR}" \
    --save-dir "${SAVE_DIR}" \
    "${CONVERT_LAYOUT_ARGS[@]}" \
    "${HF2MCORE_ARGS[@]}" \
    --params-dtype "${PRECISION:-bf16}" \
    --workers "${WORKERS}" \
    "${EXTRA_ARGS[@]}"
