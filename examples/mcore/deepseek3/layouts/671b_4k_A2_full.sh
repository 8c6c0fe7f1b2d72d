# Layout of tune_deepseek3_671b_4k_full_A2.sh (full-parameter SFT): Atlas 800T A2, 64 nodes x 8 NPUs.
# EP64 (4 experts per NPU), PP8 with uneven stages (lighter first stages: embedding and dense layers), no MTP.
# Sourced by ckpt_convert_deepseek3_hf2mcore.sh (LAYOUT=671b_4k_A2_full) and by the training script.
LAYOUT_ARGS=(
    --tensor-model-parallel-size 1
    --pipeline-model-parallel-size 8
    --expert-model-parallel-size 64
    --num-layers 61
    --num-layer-list 7,7,7,8,8,8,8,8
    --mtp-num-layers 0
    --first-k-dense-replace 3
    --num-experts 256
    --moe-grouped-gemm
)
# No MTP in this layout: hf2mcore leaves the HF MTP layer (model.layers.61.*) out on purpose, and says so.
HF2MCORE_ARGS=(--allow-unused-weights)
LAYOUT_NNODES=64
LAYOUT_DEVICES_PER_NODE=8
LAYOUT_DEVICE_MEMORY_GB=64
PRECISION=bf16   # hf2mcore --params-dtype and training --bf16 both follow this
