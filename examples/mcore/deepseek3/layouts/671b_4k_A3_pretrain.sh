# Layout of pretrain_deepseek3_671b_4k_A3.sh: Atlas 900 A3 SuperPoD, 32 nodes x 16 dies (64 GB), 4K sequences.
# TP2 x EP16 with --moe-tp-extend-ep (8 experts per die), PP8 with dualpipev over 64 layers (61 + noop
# 61,62,63), as MindSpeed-LLM's A3 template: rank r holds virtual stages r and 15-r (rank 0: embedding, first and
# last layers, output layer, loss, MTP). 3840 / DP 32 = 120 micro-batches per step (>= 2 * PP = 16).
# --moe-fb-overlap as MindSpeed-LLM's DUALPIPE_ARGS (forward/backward overlap of the expert all-to-all).
LAYOUT_ARGS=(
    --tensor-model-parallel-size 2
    --pipeline-model-parallel-size 8
    --expert-model-parallel-size 16
    --moe-tp-extend-ep
    --sequence-parallel
    --num-layers 64
    --noop-layers 61,62,63
    --schedules-method dualpipev
    --moe-fb-overlap
    --mtp-num-layers 1
    --first-k-dense-replace 3
    --num-experts 256
    --moe-grouped-gemm
)
LAYOUT_NNODES=32
LAYOUT_DEVICES_PER_NODE=16
LAYOUT_DEVICE_MEMORY_GB=64
PRECISION=bf16   # hf2mcore --params-dtype and training --bf16 both follow this
