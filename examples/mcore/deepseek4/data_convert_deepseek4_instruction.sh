#!/usr/bin/env bash
# Step a (fine-tuning): render instruction data with the DeepSeek-V4 chat template and tokenize it into rows of
# at most SEQ_LENGTH tokens, one sample per row (labels -100 outside the answers). Not packed: the V4 trainer
# refuses packed rows (its attention sees a row as one sequence, positions 0..S-1). Output: the three datasets
# ${OUTPUT_PREFIX}_packed_{input_ids,labels,attention_mask}_document; the tune scripts take OUTPUT_PREFIX as
# DATA_PATH. SEQ_LENGTH must equal the training --seq-length (the trainer refuses longer rows).
# Usage: bash examples/mcore/deepseek4/data_convert_deepseek4_instruction.sh [--dry-run] [extra preprocess flags]
# Settings (environment): INPUT, HANDLER (Alpaca/Sharegpt/OpenAI...StyleInstructionHandler), TOKENIZER_PATH,
# OUTPUT_PREFIX, SEQ_LENGTH, WORKERS. All flags: docs/en/data.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

INPUT=${INPUT:-./finetune_dataset/train.jsonl}
HANDLER=${HANDLER:-AlpacaStyleInstructionHandler}
TOKENIZER_PATH=${TOKENIZER_PATH:-./model_from_hf/deepseek4-hf}
OUTPUT_PREFIX=${OUTPUT_PREFIX:-./finetune_dataset/alpaca}
SEQ_LENGTH=${SEQ_LENGTH:-4096}
WORKERS=${WORKERS:-16}

dsv_init "$@"
compgen -G "${INPUT%%,*}" > /dev/null || [ -e "${INPUT%%,*}" ] || dsv_missing "input ${INPUT} does not exist"
dsv_need_tokenizer "${TOKENIZER_PATH}"
mkdir -p "$(dirname "${OUTPUT_PREFIX}")"

dsv_run "${PYTHON}" "${DSV_ROOT}/preprocess_data.py" \
    --input "${INPUT}" \
    --output-prefix "${OUTPUT_PREFIX}" \
    --tokenizer-type PretrainedFromHF \
    --tokenizer-name-or-path "${TOKENIZER_PATH}" \
    --handler-name "${HANDLER}" \
    --prompt-type deepseek4 \
    --seq-length "${SEQ_LENGTH}" \
    --workers "${WORKERS}" \
    --log-interval 1000 \
    "${EXTRA_ARGS[@]}"
