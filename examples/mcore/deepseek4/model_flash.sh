# DeepSeek-V4-Flash shape flags. The model is built from config.json; the trainer checks each of these against
# it, so a script meant for another model fails before loading weights.
MODEL_ARGS=(
    --hidden-size 4096
    --num-attention-heads 64
    --moe-ffn-hidden-size 2048
    --moe-router-topk 6
    --q-lora-rank 1024
    --vocab-size 129280
)
