"""--use-fused-rotary-pos-emb, --use-fused-swiglu and --use-fused-rmsnorm reach every place of the model they concern:
with the flags resolved for npu (torch_npu faked on cpu: tests/ops/fake_torch_npu.py), each MLA rotary (queries and
keys), each SwiGLU (dense MLP, shared experts, grouped experts) and each RMSNorm (layer norms, MLA's q/kv norms,
final norm, MTP's norms) calls its torch_npu kernel, and the logits equal the flags-off model's and transformers'
(fp32)."""

import sys

import torch

from tests.dist_utils import run_distributed
from tests.model.hf_reference import hf_to_megatron_tp1, make_hf_model, tiny_hf_config

FLAGS = dict(use_fused_rotary_pos_emb=True, use_fused_swiglu=True, use_fused_rmsnorm=True)


def _logits(model, ids):
    """Main-head logits (megatron runs an MTP model only with labels; the output layer's last call is the main
    head's; cloned because the cross entropy edits them in place)."""
    calls = []
    hook = model.output_layer.register_forward_hook(lambda m, i, out: calls.append(out[0].transpose(0, 1).clone()))
    with torch.no_grad():
        model(ids, torch.arange(ids.shape[1])[None].expand_as(ids), attention_mask=None, labels=ids)
    hook.remove()
    return calls[-1]


def _on_rank():
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    from mindspeed_dsv.models import DeepSeekConfig, build_model
    from mindspeed_dsv.models.builder import default_layout
    from mindspeed_dsv.models.experts import GroupedMLPExperts
    from mindspeed_dsv.models.layers import RMSNorm, SwiGLU
    from mindspeed_dsv.ops import OpsConfig, configure_ops
    from mindspeed_dsv.platform import init_distributed
    from tests.ops.fake_torch_npu import make_fake_torch_npu

    init_distributed()
    hf_cfg = tiny_hf_config()  # q_lora, YaRN, a dense layer, MoE layers with a shared expert, an MTP head
    cfg = DeepSeekConfig.from_hf(hf_cfg)
    hf = make_hf_model(hf_cfg)
    layout = default_layout(cfg, moe_grouped_gemm=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf_logits = hf(ids).logits

    configure_ops()  # flags off: the torch references
    plain = build_model(cfg, layout)
    hf_to_megatron_tp1(hf, plain, cfg, grouped=True)
    plain_logits = _logits(plain.eval(), ids)

    fake = make_fake_torch_npu()
    sys.modules["torch_npu"] = fake
    configure_ops(OpsConfig(**FLAGS), platform="npu")  # as the trainer does: before the model is built
    fused = build_model(cfg, layout)
    hf_to_megatron_tp1(hf, fused, cfg, grouped=True)
    fused_logits = _logits(fused.eval(), ids)

    modules = list(fused.modules())
    norm_classes = {type(m).__name__ for m in modules if "norm" in type(m).__name__.lower()}
    places = dict(
        rotary=2 * sum(isinstance(m, MLASelfAttention) for m in modules),  # queries and keys
        swiglu=sum(isinstance(m, (SwiGLU, GroupedMLPExperts)) for m in modules),
        rms_norm=sum(isinstance(m, RMSNorm) for m in modules),
        mtp_norms=sum(isinstance(m, RMSNorm) for n, m in fused.named_modules() if n.startswith("mtp.")),
        mla_norms=sum(isinstance(m, RMSNorm) for n, m in fused.named_modules() if "self_attention." in n),
    )
    kernels = {name: sum(n == name for n, _ in fake.calls) for name in ("npu_rotary_mul", "npu_swiglu", "npu_rms_norm")}
    # numpy, not tensors: torch shares tensors between processes through the sender, which may have exited
    logits = (t.numpy().copy() for t in (plain_logits, fused_logits, hf_logits))
    return (norm_classes, places, kernels, *logits)


def test_fused_rotary_swiglu_rmsnorm_reach_every_place():
    ((norm_classes, places, kernels, *logits),) = run_distributed(_on_rank, 1)
    plain, fused, hf = (torch.from_numpy(x) for x in logits)
    assert norm_classes == {"RMSNorm"}  # no other norm module anywhere (megatron's, torch's)
    layers, mtp = 4, 1  # tiny config
    assert places["rotary"] == 2 * (layers + mtp)
    assert places["mtp_norms"] >= 3 + 4 and places["mla_norms"] == 2 * (layers + mtp)  # enorm/hnorm/final + layer's
    assert places["swiglu"] == 1 + 2 * (layers - 1 + mtp)  # dense MLP; per MoE layer shared + grouped experts
    assert kernels == {
        "npu_rotary_mul": places["rotary"],
        "npu_swiglu": places["swiglu"],
        "npu_rms_norm": places["rms_norm"],
    }
    assert ((fused - plain).norm() / plain.norm()).item() < 5e-6  # the fake computes in float64
    assert ((fused - hf).norm() / hf.norm()).item() < 1e-5
