#!/usr/bin/env bash
# Step a (pretraining): tokenize raw text (JSONL / JSON / Parquet with a "text" field) into Megatron
# .bin/.idx datasets. Output: ${OUTPUT_PREFIX}_text_document, which the pretrain scripts take as DATA_PATH.
# Usage: bash examples/mcore/deepseek4/data_convert_deepseek4_pretrain.sh [--dry-run] [extra preprocess flags]
# Settings (environment): INPUT, TOKENIZER_PATH, OUTPUT_PREFIX, WORKERS. All flags: docs/en/data.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

INPUT=${INPUT:-./dataset/enwiki.parquet}                  # file, glob, directory, or comma-separated list
TOKENIZER_PATH=${TOKENIZER_PATH:-./model_from_hf/deepseek4-hf}
OUTPUT_PREFIX=${OUTPUT_PREFIX:-./dataset/enwiki}
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
    --handler-name GeneralPretrainHandler \
    --json-keys text \
    --append-eod \
    --workers "${WORKERS}" \
    --log-interval 1000 \
    "${EXTRA_ARGS[@]}"
