#!/usr/bin/env bash
# GPU check of --bf16 --use-distributed-optimizer on 2 GPUs (DP=2): a 6-step run straight, and the same run
# stopped at step 3 (saved) and resumed with its optimizer state (distrib_optim.pt); prints the loss curves, which
# must agree.
# GPU_FLAGS can be overridden (e.g. GPU_FLAGS="" to try the script on cpu with one process: NPROC=1).
set -euo pipefail
W=${WORK:-/tmp/distopt}
rm -rf "$W" && mkdir -p "$W"
PY=${PYTHON:-python3}
NPROC=${NPROC:-2}
GPU_FLAGS=${GPU_FLAGS---bf16 --use-distributed-optimizer --use-flash-attn}
export TORCHDYNAMO_DISABLE=1 NCCL_NVLS_ENABLE=0
$PY preprocess_data.py --input assets/data/alpaca_builtins.jsonl --output-prefix "$W/sft" \
    --tokenizer-name-or-path assets/tiny_deepseek3 --handler-name AlpacaStyleInstructionHandler \
    --prompt-type deepseek3 --seq-length 128 --pack --no-progress > "$W/pre.log"
$PY scripts/make_tiny_hf_checkpoint.py --save-dir "$W/hf" --mtp > /dev/null
$PY -m ckpt_convert hf2mcore --load-dir "$W/hf" --save-dir "$W/base" --no-progress --moe-grouped-gemm > /dev/null
COMMON=(--data-path "$W/sft" --is-instruction-dataset --seq-length 128 --micro-batch-size 2 --global-batch-size 8
        --train-iters 6 --lr 2e-3 --lr-warmup-iters 1 --moe-grouped-gemm --log-interval 1 $GPU_FLAGS)
run() { $PY -m torch.distributed.run --nproc-per-node "$NPROC" --master-port 29555 -m mindspeed_dsv.train "$@" 2>&1 \
        | tee -a "$W/train.log" | grep -E "^iteration|error|Error" | sed 's/ | grad norm.*//' ; }  # whole logs: $W/train.log
echo "== straight";   run "${COMMON[@]}" --load "$W/base" --finetune
echo "== first half"; run "${COMMON[@]}" --load "$W/base" --finetune --save "$W/run" --exit-interval 3
echo "== resumed (optimizer state reloaded)"; run "${COMMON[@]}" --load "$W/run"
