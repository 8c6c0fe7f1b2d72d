"""The DeepSeek-V4 side of the dry-run planner (``python -m mindspeed_dsv.plan`` picks it from config.json via
models/family.py): tensor shapes and activation estimates of one V4 layer, its MTP module, embedding and output.

Names are the state-dict names of ``models/deepseek4`` (the name map ``models/deepseek4/names.py`` lists them);
the shapes are written out here from the config (a test checks them, name by name, against transformers'
``DeepseekV4ForCausalLM`` through that name map). TP is 1 for V4 (one shared K=V head), so every non-expert
tensor is replicated; routed experts are split over EP.

MTP module (DeepSeek's release, ``inference/model.py`` class MTPBlock): one full decoder layer (sliding-window
attention: the release's compress ratio of the MTP slot is 0; learned routing) plus e_proj and h_proj (D x D),
enorm, hnorm, norm and its own hc_head (fn, base, scale). It shares the embedding and output layer.
"""

from __future__ import annotations

import math

from mindspeed_dsv.models.deepseek4.config import CSA, HASH_MOE, SLIDING, DeepSeekV4Config
from mindspeed_dsv.plan import Inventory, Tensor


def _rep(name: str, shape: tuple[int, ...], group: str, linear: bool = False, trainable: bool = True) -> Tensor:
    return Tensor(name, shape, "rep", group, linear=linear, trainable=trainable)


def _hyper(prefix: str, c: DeepSeekV4Config, n_mix: int, n_scale: int) -> list[Tensor]:
    """mHC parameters: fn [n_mix, hc_mult*D], base [n_mix], scale [n_scale] (fp32 in the release)."""
    return [_rep(prefix + "fn", (n_mix, c.hc_mult * c.hidden_size), "hyper_connection"),
            _rep(prefix + "base", (n_mix,), "hyper_connection"),
            _rep(prefix + "scale", (n_scale,), "hyper_connection")]


def _compressor(prefix: str, c: DeepSeekV4Config, width: int, rate: int, overlap: bool) -> list[Tensor]:
    """kv/gate projections (2*width rows for CSA's two overlapping series), position bias [rate, rows], norm."""
    rows = (2 if overlap else 1) * width
    return [_rep(prefix + "kv_proj.weight", (rows, c.hidden_size), "compressor"),
            _rep(prefix + "gate_proj.weight", (rows, c.hidden_size), "compressor"),
            _rep(prefix + "position_bias", (rate, rows), "compressor"),
            _rep(prefix + "kv_norm.weight", (width,), "norm")]


def layer_tensors(c: DeepSeekV4Config, attention: str, hash_routing: bool, prefix: str = "") -> list[Tensor]:
    """One decoder layer of type `attention` (sliding / CSA / HCA) with hash or learned routing."""
    D, H, d, N = c.hidden_size, c.num_attention_heads, c.head_dim, c.hc_mult
    mix = (2 + N) * N
    sa, mlp = prefix + "self_attention.", prefix + "mlp."
    out = _hyper(prefix + "attn_hc.", c, mix, 3) + _hyper(prefix + "ffn_hc.", c, mix, 3)
    out += [
        _rep(prefix + "input_layernorm.weight", (D,), "norm"),
        _rep(prefix + "pre_mlp_layernorm.weight", (D,), "norm"),
        _rep(sa + "linear_q_down_proj.weight", (c.q_lora_rank, D), "attention", linear=True),
        _rep(sa + "q_layernorm.weight", (c.q_lora_rank,), "norm"),
        _rep(sa + "linear_q_up_proj.weight", (H * d, c.q_lora_rank), "attention", linear=True),
        _rep(sa + "linear_kv_proj.weight", (d, D), "attention", linear=True),
        _rep(sa + "kv_layernorm.weight", (d,), "norm"),
        _rep(sa + "linear_o_group_proj", (c.o_groups * c.o_lora_rank, H * d // c.o_groups), "attention"),
        _rep(sa + "linear_proj.weight", (D, c.o_groups * c.o_lora_rank), "attention", linear=True),
        _rep(sa + "attn_sink", (H,), "attention"),
        _rep(mlp + "router.weight", (c.n_routed_experts, D), "router"),
    ]
    if hash_routing:  # token -> experts table: integers, not a parameter
        out.append(_rep(mlp + "router.tid2eid", (c.vocab_size, c.num_experts_per_tok), "router", trainable=False))
    else:  # updated by the load-balancing rule, not by the optimizer
        out.append(_rep(mlp + "router.expert_bias", (c.n_routed_experts,), "router", trainable=False))
    if attention != SLIDING:
        rate = c.csa_rate if attention == CSA else c.hca_rate
        out += _compressor(sa + "compressor.window.", c, d, rate, overlap=attention == CSA)
    if attention == CSA:
        idx, ci = sa + "compressor.indexer.", c.index_head_dim
        out += _compressor(idx + "compressor.", c, ci, c.csa_rate, overlap=True)
        out += [_rep(idx + "q_b_proj.weight", (c.index_n_heads * ci, c.q_lora_rank), "indexer"),
                _rep(idx + "weights_proj.weight", (c.index_n_heads, D), "indexer")]
    I = c.moe_intermediate_size
    out += [_rep(mlp + "shared_experts.linear_fc1.weight", (2 * I, D), "shared_experts", linear=True),
            _rep(mlp + "shared_experts.linear_fc2.weight", (D, I), "shared_experts", linear=True),
            Tensor(mlp + "experts.linear_fc1", (2 * I, D), "expert_col", "routed_experts", c.n_routed_experts, True),
            Tensor(mlp + "experts.linear_fc2", (D, I), "expert_row", "routed_experts", c.n_routed_experts, True)]
    return out


def hf_layer_tensors(c: DeepSeekV4Config, i: int) -> list[Tensor]:
    """Layer `i` of the checkpoint (HF numbering)."""
    return layer_tensors(c, c.layer_types[i], c.mlp_layer_types[i] == HASH_MOE)


def embedding_tensors(c: DeepSeekV4Config, rows: tuple[int, int] | None = None) -> list[Tensor]:
    return [Tensor("embedding", ((rows or (c.vocab_size,))[-1], c.hidden_size), "vocab", "embedding")]


def output_tensors(c: DeepSeekV4Config, rows: tuple[int, int] | None = None) -> list[Tensor]:
    out = _hyper("hc_head.hc_", c, c.hc_mult, 1) + [_rep("final_layernorm.weight", (c.hidden_size,), "norm")]
    if not c.tie_word_embeddings:
        out.append(Tensor("output_layer", ((rows or (c.vocab_size,))[-1], c.hidden_size), "vocab", "output"))
    return out


def mtp_tensors(c: DeepSeekV4Config) -> list[Tensor]:
    D = c.hidden_size
    own = [_rep("mtp.e_proj.weight", (D, D), "mtp", linear=True), _rep("mtp.h_proj.weight", (D, D), "mtp", linear=True)]
    own += [_rep(f"mtp.{n}.weight", (D,), "norm") for n in ("enorm", "hnorm", "norm")]
    own += _hyper("mtp.hc_head_", c, c.hc_mult, 1)
    return own + layer_tensors(c, SLIDING, hash_routing=False, prefix="mtp.")


def activated_numel(tensors: list[Tensor], c: DeepSeekV4Config) -> int:
    """Parameters one token touches: top-k of the routed experts; the hash table is not a parameter."""
    return sum(math.prod(t.shape) * c.num_experts_per_tok if t.group == "routed_experts" else t.numel
               for t in tensors if t.name.split(".")[-1] != "tid2eid")


def param_numel(tensors: list[Tensor]) -> int:
    """Parameter elements (the integer hash table tid2eid is a buffer, not counted)."""
    return sum(t.numel for t in tensors if t.name.split(".")[-1] != "tid2eid")


def layer_activation(c: DeepSeekV4Config, attention: str, tokens: float) -> tuple[float, float]:
    """(elements kept for backward by one V4 layer for one micro-batch, extra fp32 bytes).

    T tokens (TP 1: nothing is split). Counted tensors, each once:
      mHC, per sub-block (2): the stream input (T*N*D) and its fp32 normalised copy (T*N*D*4 bytes), the
        collapsed input (T*D).
      attention: norm input (T*D), q down output and its norm output (2*T*q_lora), q up output and the normed,
        rotated q (2*T*H*d), kv projection output, its norm and the rotated kv (3*T*d), attention output and
        its inverse-rotated copy (2*T*H*d), grouped o_a output (T*g*o_lora). A fused attention kernel is
        assumed (no scores kept; the sliding window is 128 keys).
      compressor (CSA / HCA): kv and gate projections (2*T*rows) and the fp32 window softmax (T*rows*4 bytes);
        the indexer gets no gradient (top-k is not differentiable) and keeps nothing.
      MoE: as V3's (models/plan.py): norm input, fp32 router logits and probabilities, top_k*T expert copies
        each keeping input and output (2*D) plus fc1 and SwiGLU outputs (3*I), shared expert 3*T*I.
    """
    T, D, N, H, d = tokens, c.hidden_size, c.hc_mult, c.num_attention_heads, c.head_dim
    I, k = c.moe_intermediate_size, c.num_experts_per_tok
    hyper = 2 * (T * N * D + T * D)
    hyper_fp32 = 2 * T * N * D * 4
    attn = T * D + 2 * T * c.q_lora_rank + 2 * T * H * d + 3 * T * d + 2 * T * H * d + T * c.o_groups * c.o_lora_rank
    comp, comp_fp32 = 0.0, 0.0
    if attention != SLIDING:
        rows = (2 if attention == CSA else 1) * d
        comp, comp_fp32 = 2 * T * rows, T * rows * 4
    moe = 2 * T * D + k * T * (2 * D + 3 * I) + 3 * T * I
    router = 2 * T * c.n_routed_experts * 4
    return hyper + attn + comp + moe, hyper_fp32 + comp_fp32 + router


def mtp_activation(c: DeepSeekV4Config, tokens: float) -> tuple[float, float]:
    """The MTP layer (sliding attention) plus its embedding norm, hidden norm and e/h projections (4*T*D)."""
    e, extra = layer_activation(c, SLIDING, tokens)
    return e + 4 * tokens * c.hidden_size, extra


def deepseek4_inventory(c: DeepSeekV4Config) -> Inventory:
    """The planner's view of a V4 model: every layer MoE (first_k_dense_replace 0), layer i's attention type
    and routing from the config, hc_mult*hidden elements per token between layers."""
    def tokens(layout, train):
        return train.micro_batch_size * train.seq_length / layout.cp

    def activation(i, dense, layout, train):
        e, extra = layer_activation(c, c.layer_types[i], tokens(layout, train))
        return e, extra

    return Inventory(
        model=c,
        cfg_view={"num_attention_heads": c.num_attention_heads, "vocab_size": c.vocab_size,
                  "n_routed_experts": c.n_routed_experts, "num_hidden_layers": c.num_hidden_layers,
                  "first_k_dense_replace": 0, "num_nextn_predict_layers": c.num_nextn_predict_layers,
                  "moe_intermediate_size": c.moe_intermediate_size},
        vocab_size=c.vocab_size, stream_width=c.hc_mult * c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        first_k_dense_replace=0, num_nextn_predict_layers=c.num_nextn_predict_layers,
        layer_tensors=lambda i, dense: hf_layer_tensors(c, i), layer_activation=activation,
        embedding=lambda rows: embedding_tensors(c, rows), output=lambda rows: output_tensors(c, rows),
        mtp=lambda: mtp_tensors(c), mtp_activation=lambda layout, train: mtp_activation(c, tokens(layout, train)),
        numel=param_numel, activated=lambda ts: activated_numel(ts, c),
        hf_params_per_mtp_copy=0,  # the release's MTP shares embed and head with the main model
        tp_refusal="DeepSeek-V4 runs at TP 1 (one shared K=V head; the model refuses TP > 1); use EP and PP")
