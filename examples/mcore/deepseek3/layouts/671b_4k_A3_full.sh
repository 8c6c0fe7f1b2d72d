# Layout of tune_deepseek3_671b_4k_full_A3.sh (full-parameter SFT): Atlas 900 A3, 16 nodes x 16 dies.
# TP2 x EP8 with --moe-tp-extend-ep (16 experts per die), PP16 over 64 layers: noop 47,62,63 keeps the last
# stage (output layer + MTP) light. Sourced by hf2mcore (LAYOUT=671b_4k_A3_full) and by the training script.
LAYOUT_ARGS=(
    --tensor-model-parallel-size 2
    --pipeline-model-parallel-size 16
    --expert-model-parallel-size 8
    --moe-tp-extend-ep
    --sequence-parallel
    --num-layers 64
    --noop-layers 47,62,63
    --mtp-num-layers 1
    --first-k-dense-replace 3
    --num-experts 256
    --moe-grouped-gemm
)
LAYOUT_NNODES=16
LAYOUT_DEVICES_PER_NODE=16
LAYOUT_DEVICE_MEMORY_GB=64
PRECISION=bf16   # hf2mcore --params-dtype and training --bf16 both follow this
