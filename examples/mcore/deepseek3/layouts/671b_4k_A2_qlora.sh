# Layout of tune_deepseek3_671b_4k_xlora_A2.sh with FINETUNE_MODE=qlora: Atlas 800T A2, 4 nodes x 8 NPUs.
# The base linears are stored as NF4 (0.56 bytes/parameter), so 32 devices hold the model: TP1 PP8 EP4,
# stages 7,7,7,8,8,8,8,8, no MTP. hf2mcore writes the ordinary bf16 checkpoint of this layout; training
# quantizes the targeted weights on load (--qlora-nf4 is a training flag here, not a conversion flag).
LAYOUT_ARGS=(
    --tensor-model-parallel-size 1
    --pipeline-model-parallel-size 8
    --expert-model-parallel-size 4
    --num-layers 61
    --num-layer-list 7,7,7,8,8,8,8,8
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
LAYOUT_NNODES=4
LAYOUT_DEVICES_PER_NODE=8
LAYOUT_DEVICE_MEMORY_GB=64
PRECISION=bf16   # hf2mcore --params-dtype and training --bf16 both follow this
