#!/usr/bin/env bash
# Step d (optional, LoRA/QLoRA): merge the adapters saved by tune_deepseek4_flash_4k_xlora_*.sh
# (--lora-ckpt-filter: adapters only) into the hf2mcore base checkpoint and write HF safetensors
# (W + alpha/r * B A per rank), or with MODE=peft write a PEFT adapter (adapter_config.json +
# adapter_model.safetensors) instead. Rank, alpha and target modules come from LORA_ARGS of the same layout
# file the tune script used; layout flags are checked against both checkpoints' layout.json.
# For QLoRA, the base is the bf16 hf2mcore output (training quantized it only in memory).
# Usage: LAYOUT=flash_4k_A2_lora bash examples/mcore/deepseek4/ckpt_convert_deepseek4_merge_lora2hf.sh [--dry-run] [extra flags]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

LAYOUT=${LAYOUT:-flash_4k_A2_lora}
MODE=${MODE:-merge}                                         # merge | peft
BASE_DIR=${BASE_DIR:-./model_weights/deepseek4-mcore-${LAYOUT#flash_4k_}}   # hf2mcore output the tuning started from
LORA_DIR=${LORA_DIR:-./ckpt/deepseek4-lora-A2}              # the tune script's --save directory
SAVE_DIR=${SAVE_DIR:-./model_from_hf/deepseek4-hf-lora-merged}
TOKENIZER_PATH=${TOKENIZER_PATH:-./model_from_hf/deepseek4-hf}
WORKERS=${WORKERS:-4}

dsv_init "$@"
dsv_source_layout "${LAYOUT}"
[ "${#LORA_ARGS[@]}" -gt 0 ] || dsv_die "layout ${LAYOUT} defines no LORA_ARGS (use the layout of the LoRA tune script)"
dsv_need_mcore_checkpoint "${LORA_DIR}"
dsv_need_tokenizer "${TOKENIZER_PATH}"
dsv_convert_layout_args source

case "${MODE}" in
    merge) dsv_need_mcore_checkpoint "${BASE_DIR}"
           SRC_ARGS=(--load-dir "${BASE_DIR}" --lora-load "${LORA_DIR}") ;;
    peft)  SRC_ARGS=(--load-dir "${LORA_DIR}" --save-lora-to-hf) ;;
    *) dsv_die "MODE must be merge or peft, got '${MODE}'" ;;
esac
if [ "${DRY_RUN}" = "1" ]; then
    CONFIG="${BASE_DIR}/config.json"
    [ -f "${CONFIG}" ] || CONFIG="${MODEL_CONFIG:-${DSV_ROOT}/assets/deepseek4_flash}"
    dsv_plan "${CONFIG}"
fi
dsv_run "${PYTHON}" -m ckpt_convert mcore2hf \
    "${SRC_ARGS[@]}" \
    --save-dir "${SAVE_DIR}" \
    "${CONVERT_LAYOUT_ARGS[@]}" \
    "${LORA_ARGS[@]}" \
    --tokenizer-dir "${TOKENIZER_PATH}" \
    --workers "${WORKERS}" \
    "${EXTRA_ARGS[@]}"
