# Layout of pretrain_deepseek3_671b_4k_A2.sh: Atlas 800T A2, 64 nodes x 8 NPUs (64 GB), 4K sequences.
# TP4 x EP8 with --moe-tp-extend-ep spreads the 256 experts over 32 ranks (8 per device); PP8 with dualpipev over
# 64 layers (61 + noop 61,62,63), as MindSpeed-LLM's A2 template: 16 virtual stages of 4 layers, rank r holds
# stages r and 15-r, so rank 0 holds the embedding, layers 0-3, layers 60-63 (three of them noop), the output
# layer, the loss and MTP. 3840 / DP 16 = 240 micro-batches per step (dualpipev needs >= 2 * PP = 16).
# --moe-fb-overlap (as MindSpeed-LLM's DUALPIPE_ARGS) runs dualpipev's paired forward and backward together so
# one micro-batch's expert all-to-all hides behind the other's compute; numbers unchanged (docs: dualpipev).
# Sourced by the training script (and by hf2mcore if you continue from an HF checkpoint): one source of truth.
LAYOUT_ARGS=(
    --tensor-model-parallel-size 4
    --pipeline-model-parallel-size 8
    --expert-model-parallel-size 8
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
LAYOUT_NNODES=64
LAYOUT_DEVICES_PER_NODE=8
LAYOUT_DEVICE_MEMORY_GB=64
PRECISION=bf16   # hf2mcore --params-dtype and training --bf16 both follow this
