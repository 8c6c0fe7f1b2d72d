# DeepSeek-V3 671B shape flags (MindSpeed-LLM scripts pass them). The model is built from config.json; the
# trainer checks each of these against it, so a script meant for another model fails before loading weights.
MODEL_ARGS=(
    --hidden-size 7168
    --num-attention-heads 128
    --ffn-hidden-size 18432
    --moe-ffn-hidden-size 2048
    --moe-router-topk 8
    --q-lora-rank 1536
    --kv-lora-rank 512
    --qk-head-dim 128
    --qk-pos-emb-head-dim 64
    --v-head-dim 128
    --vocab-size 129280
)
