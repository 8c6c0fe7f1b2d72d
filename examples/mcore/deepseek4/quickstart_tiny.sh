#!/usr/bin/env bash
# One-command tour of the whole DeepSeek-V4 pipeline on CPU with the tiny DeepSeek-V4 (assets/tiny_deepseek4:
# 4 layers sliding/CSA/HCA/CSA, hash routing in the first two, 4 experts, hc_mult 4; vocabulary 4096 of the
# tiny V4 tokenizer): random-init HF checkpoint -> instruction data (--prompt-type deepseek4) -> hf2mcore ->
# fine-tune -> mcore2hf -> load in transformers and answer training prompts. Each stage is one of the shipped
# scripts with tiny settings.
# Usage: bash examples/mcore/deepseek4/quickstart_tiny.sh
# Settings (environment): OUTPUT_DIR (default ./work_dirs/quickstart_v4), FINETUNE=full|lora|qlora (default full),
#   TRAIN_ITERS (default 150), LAYOUT (default tiny_cpu).
# Ends with the HF checkpoint in $OUTPUT_DIR/hf_out. No MTP module (transformers has none for V4 to load).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "${HERE}/../../.." && pwd)"
OUTPUT_DIR=${OUTPUT_DIR:-./work_dirs/quickstart_v4}
FINETUNE=${FINETUNE:-full}
export LAYOUT=${LAYOUT:-tiny_cpu}
export TRAIN_ITERS=${TRAIN_ITERS:-150}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TORCHDYNAMO_DISABLE=1 PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
export TRANSFORMERS_VERBOSITY=${TRANSFORMERS_VERBOSITY:-error}
if [ -z "${PYTHON:-}" ]; then
    if [ -x "${ROOT}/.venv/bin/python" ]; then PYTHON="${ROOT}/.venv/bin/python"; else PYTHON=python; fi
fi
export PYTHON
SFT_DATA=${SFT_DATA:-${ROOT}/assets/data/alpaca_builtins.jsonl}
case "${FINETUNE}" in full|lora|qlora) ;; *) echo "quickstart: error: FINETUNE must be full, lora or qlora" >&2; exit 2 ;; esac

mkdir -p "${OUTPUT_DIR}"
OUT="$(cd "${OUTPUT_DIR}" && pwd)"
START=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - START ))s] stage $1 ==="; }

stage "1/6: tiny HF DeepSeek-V4 checkpoint (random init, seeded, vocabulary of the tiny V4 tokenizer) -> ${OUT}/hf"
"${PYTHON}" "${ROOT}/scripts/make_tiny_hf_checkpoint.py" --config "${ROOT}/assets/tiny_deepseek4" \
    --vocab-size 4096 --save-dir "${OUT}/hf" --overwrite

stage "2/6: instruction data (${SFT_DATA##*/}, DeepSeek-V4 chat encoding, rows of up to 256 tokens) -> ${OUT}/data"
INPUT="${SFT_DATA}" HANDLER=AlpacaStyleInstructionHandler TOKENIZER_PATH="${OUT}/hf" \
OUTPUT_PREFIX="${OUT}/data/alpaca" SEQ_LENGTH=256 WORKERS=1 \
    bash "${HERE}/data_convert_deepseek4_instruction.sh" --no-progress --overwrite

stage "3/6: hf2mcore (layout ${LAYOUT}) -> ${OUT}/mcore"
rm -rf "${OUT}/mcore"
HF_DIR="${OUT}/hf" SAVE_DIR="${OUT}/mcore" WORKERS=1 bash "${HERE}/ckpt_convert_deepseek4_hf2mcore.sh" --no-progress

rm -rf "${OUT}/ckpt"
if [ "${FINETUNE}" = full ]; then
    stage "4/6: full fine-tune, ${TRAIN_ITERS} steps on CPU -> ${OUT}/ckpt"
    WORK_DIR="${OUT}" CKPT_LOAD_DIR="${OUT}/mcore" CKPT_SAVE_DIR="${OUT}/ckpt" DATA_PATH="${OUT}/data/alpaca" \
        bash "${HERE}/tune_deepseek4_tiny_full_cpu.sh"
    stage "5/6: mcore2hf -> ${OUT}/hf_out"
    rm -rf "${OUT}/hf_out"
    LOAD_DIR="${OUT}/ckpt" SAVE_DIR="${OUT}/hf_out" TOKENIZER_PATH="${OUT}/hf" WORKERS=1 \
        bash "${HERE}/ckpt_convert_deepseek4_mcore2hf.sh" --no-progress
else
    stage "4/6: ${FINETUNE} fine-tune, ${TRAIN_ITERS} steps on CPU (adapters only) -> ${OUT}/ckpt"
    FINETUNE_MODE="${FINETUNE}" WORK_DIR="${OUT}" CKPT_LOAD_DIR="${OUT}/mcore" CKPT_SAVE_DIR="${OUT}/ckpt" \
    DATA_PATH="${OUT}/data/alpaca" bash "${HERE}/tune_deepseek4_tiny_xlora_cpu.sh"
    stage "5/6: merge adapters into the base and write HF -> ${OUT}/hf_out"
    rm -rf "${OUT}/hf_out"
    BASE_DIR="${OUT}/mcore" LORA_DIR="${OUT}/ckpt" SAVE_DIR="${OUT}/hf_out" TOKENIZER_PATH="${OUT}/hf" WORKERS=1 \
        bash "${HERE}/ckpt_convert_deepseek4_merge_lora2hf.sh" --no-progress
fi

stage "6/6: load ${OUT}/hf_out in transformers, greedy answers to training prompts"
"${PYTHON}" "${ROOT}/scripts/generate_check.py" --hf-dir "${OUT}/hf_out" --data "${SFT_DATA}" --num-prompts 4

echo
echo "=== done in $(( $(date +%s) - START ))s: HF checkpoint in ${OUT}/hf_out ==="
