# Layout of tune_deepseek4_flash_4k_full_gpu.sh: NVIDIA H100/H200, 16 nodes x 8 GPUs.
# TP1 (DeepSeek-V4 has one shared K=V head: the model refuses TP > 1) x EP32 (8 experts per device) x PP4,
# stages 11,11,11,10 of the 43 layers (the last one also holds the output layer and MTP).
# Sourced by ckpt_convert_deepseek4_hf2mcore.sh (LAYOUT=flash_4k_gpu_full) and by the training script.
LAYOUT_ARGS=(
    --tensor-model-parallel-size 1
    --pipeline-model-parallel-size 4
    --expert-model-parallel-size 32
    --num-layers 43
    --num-layer-list 11,11,11,10
    --mtp-num-layers 1
    --num-experts 256
)
LAYOUT_NNODES=16
LAYOUT_DEVICES_PER_NODE=8
LAYOUT_DEVICE_MEMORY_GB=80
PRECISION=bf16   # hf2mcore --params-dtype and training --bf16 both follow this
