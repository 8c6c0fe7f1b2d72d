# Layout of pretrain_deepseek3_671b_4k_gpu.sh: 32 nodes x 8 NVIDIA H100/H200 (80/141 GB), 4K sequences.
# TP2 (inside a node, NVLink) x EP16 with --moe-tp-extend-ep (8 experts per GPU), PP8 over 64 layers
# (noop 61,62,63) with VPP 4.
LAYOUT_ARGS=(
    --tensor-model-parallel-size 2
    --pipeline-model-parallel-size 8
    --expert-model-parallel-size 16
    --moe-tp-extend-ep
    --sequence-parallel
    --num-layers 64
    --noop-layers 61,62,63
    --num-layers-per-virtual-pipeline-stage 4
    --mtp-num-layers 1
    --first-k-dense-replace 3
    --num-experts 256
    --moe-grouped-gemm
)
LAYOUT_NNODES=32
LAYOUT_DEVICES_PER_NODE=8
LAYOUT_DEVICE_MEMORY_GB=80
PRECISION=bf16   # hf2mcore --params-dtype and training --bf16 both follow this
