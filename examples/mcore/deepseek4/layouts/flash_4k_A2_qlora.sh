# Layout of tune_deepseek4_flash_4k_xlora_A2.sh with FINETUNE_MODE=qlora: Atlas 800T A2, 4 nodes x 8 devices; NF4 base weights.
# TP1 (DeepSeek-V4 has one shared K=V head: the model refuses TP > 1) x EP8 (32 experts per device) x PP4,
# stages 11,11,11,10 of the 43 layers (the last one also holds the output layer).
# Sourced by ckpt_convert_deepseek4_hf2mcore.sh (LAYOUT=flash_4k_A2_qlora) and by the training script.
LAYOUT_ARGS=(
    --tensor-model-parallel-size 1
    --pipeline-model-parallel-size 4
    --expert-model-parallel-size 8
    --num-layers 43
    --num-layer-list 11,11,11,10
    --mtp-num-layers 0
    --num-experts 256
)
# No MTP in this layout: hf2mcore leaves the HF MTP module out on purpose, and says so.
HF2MCORE_ARGS=(--allow-unused-weights)
# Shared with ckpt_convert_deepseek4_merge_lora2hf.sh, which must use the same rank/alpha/modules. Targets: the
# attention's q down/up, kv and output projections and the shared and routed experts' fc1/fc2 (the grouped o_a
# projection, linear_o_group_proj, is a plain parameter and stays frozen).
LORA_ARGS=(
    --lora-r 8
    --lora-alpha 16
    --lora-target-modules linear_q_down_proj linear_q_up_proj linear_kv_proj linear_proj linear_fc1 linear_fc2
)
LAYOUT_NNODES=4
LAYOUT_DEVICES_PER_NODE=8
LAYOUT_DEVICE_MEMORY_GB=64
PRECISION=bf16   # hf2mcore --params-dtype and training --bf16 both follow this
