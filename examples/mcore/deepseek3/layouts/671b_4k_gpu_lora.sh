# Layout of tune_deepseek3_671b_4k_xlora_gpu.sh with FINETUNE_MODE=lora: 8 nodes x 8 H100/H200.
# TP1 PP4 EP16, stages 15,15,16,15, no MTP, per-expert linears (adapters wrap each expert).
LAYOUT_ARGS=(
    --tensor-model-parallel-size 1
    --pipeline-model-parallel-size 4
    --expert-model-parallel-size 16
    --num-layers 61
    --num-layer-list 15,15,16,15
    --mtp-num-layers 0
    --first-k-dense-replace 3
    --num-experts 256
)
# No MTP in this layout: hf2mcore leaves the HF MTP layer (model.layers.61.*) out on purpose, and says so.
HF2MCORE_ARGS=(--allow-unused-weights)
LORA_ARGS=(
    --lora-r 8
    --lora-alpha 16
    --lora-target-modules linear_q_down_proj linear_q_up_proj linear_kv_down_proj linear_kv_up_proj linear_proj linear_fc1 linear_fc2
)
LAYOUT_NNODES=8
LAYOUT_DEVICES_PER_NODE=8
LAYOUT_DEVICE_MEMORY_GB=80
PRECISION=bf16   # hf2mcore --params-dtype and training --bf16 both follow this
