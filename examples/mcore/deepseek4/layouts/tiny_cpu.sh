# Layout of the tiny CPU templates (assets/tiny_deepseek4: 4 layers sliding/CSA/HCA/CSA, hash routing in the
# first two, 4 experts): one process, no model parallelism. Used by quickstart_tiny.sh, tune_deepseek4_tiny_full_cpu.sh
# and by the conversion scripts with LAYOUT=tiny_cpu.
LAYOUT_ARGS=(
    --tensor-model-parallel-size 1
    --pipeline-model-parallel-size 1
    --expert-model-parallel-size 1
    --num-layers 4
    # no --mtp-num-layers: conversion keeps the MTP module the HF checkpoint has and training takes it from
    # the checkpoint's layout.json
    --num-experts 4
)
LORA_ARGS=(
    --lora-r 16
    --lora-alpha 32
    --lora-target-modules linear_q_down_proj linear_q_up_proj linear_kv_proj linear_proj linear_fc1 linear_fc2
)
LAYOUT_NNODES=1
LAYOUT_DEVICES_PER_NODE=1
PRECISION=fp32   # CPU training is fp32 (megatron-core 0.16.1 mixed precision needs cuda/npu)
