# A 2-process tiny layout (gloo on CPU): PP2, stage 0 = embedding + layers 0-1, stage 1 = layers 2-3 +
# output + MTP. For trying pipeline parallelism on one machine, e.g.
#   LAYOUT=tiny_cpu_pp2 DEVICES_PER_NODE=2 bash examples/mcore/deepseek3/tune_deepseek3_tiny_full_cpu.sh
# (convert with the same LAYOUT first).
LAYOUT_ARGS=(
    --tensor-model-parallel-size 1
    --pipeline-model-parallel-size 2
    --expert-model-parallel-size 1
    --num-layers 4
    # no --mtp-num-layers: conversion keeps the MTP layer the HF checkpoint has (make_tiny_hf_checkpoint.py
    # --mtp: one; without: none) and training takes it from the checkpoint's layout.json
    --first-k-dense-replace 1
    --num-experts 8
)
LORA_ARGS=(
    --lora-r 16
    --lora-alpha 32
    --lora-target-modules linear_q_down_proj linear_q_up_proj linear_kv_down_proj linear_kv_up_proj linear_proj linear_fc1 linear_fc2
)
LAYOUT_NNODES=1
LAYOUT_DEVICES_PER_NODE=2
PRECISION=fp32   # CPU training is fp32 (megatron-core 0.16.1 mixed precision needs cuda/npu)
