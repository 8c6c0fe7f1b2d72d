# Layout of tune_deepseek3_671b_4k_xlora_A2.sh with FINETUNE_MODE=lora: Atlas 800T A2, 8 nodes x 8 NPUs.
# TP1 PP4 EP16 (16 experts per device), stages 15,15,16,15, no MTP (MindSpeed converts LoRA checkpoints
# without MTP). Experts stay per-expert linears (no --moe-grouped-gemm): the adapters wrap each expert's
# linear_fc1/linear_fc2 and --save-lora-to-hf cannot export grouped weights.
# LORA_ARGS are shared with ckpt_convert_deepseek3_merge_lora2hf.sh, which must use the same rank/alpha/modules.
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
LAYOUT_DEVICE_MEMORY_GB=64
PRECISION=bf16   # hf2mcore --params-dtype and training --bf16 both follow this
