"""Rank functions for tests/peft (module-level so run_distributed can pickle them).

Every check compares against a direct formula computed at full (TP=1) size on the same rank:
y = x W^T + b + (alpha/r) x A^T B^T, and its autograd gradients.
"""

from __future__ import annotations

import torch
from torch import nn

IN, OUT, R, ALPHA = 12, 8, 4, 8.0
SEQ, BATCH = 6, 2


def _config(tp: int = 1, sp: bool = False, ep: int = 1, moe: bool = False):
    from megatron.core.transformer import TransformerConfig

    kw = dict(
        num_layers=1,
        hidden_size=IN,
        num_attention_heads=2,
        use_cpu_initialization=True,
        perform_initialization=True,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        sequence_parallel=sp,
        params_dtype=torch.float32,
    )
    if moe:
        kw.update(num_moe_experts=4, moe_ffn_hidden_size=OUT, ffn_hidden_size=OUT, add_bias_linear=False)
    return TransformerConfig(**kw)


def _full_tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        W_col=torch.randn(OUT, IN, generator=g),
        b_col=torch.randn(OUT, generator=g),
        W_row=torch.randn(OUT, IN, generator=g),
        b_row=torch.randn(OUT, generator=g),
        A=torch.randn(R, IN, generator=g),
        B=torch.randn(OUT, R, generator=g),
        x=torch.randn(SEQ, BATCH, IN, generator=g),
        gy=torch.randn(SEQ, BATCH, OUT, generator=g),
    )


class _Block(nn.Module):
    """Two linears carrying MindSpeed target names."""

    def __init__(self, config, gather_output=False, input_is_parallel=True):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        init = nn.init.zeros_
        self.linear_qkv = ColumnParallelLinear(
            IN, OUT, config=config, init_method=init, bias=True, gather_output=gather_output
        )
        self.linear_proj = RowParallelLinear(
            IN, OUT, config=config, init_method=init, bias=True, input_is_parallel=input_is_parallel,
            skip_bias_add=True,
        )


def _reference(t, which: str):
    """Full-size output and gradients (x, A, B) of base + LoRA, by autograd on the direct formula."""
    W, b = (t["W_col"], t["b_col"]) if which == "column" else (t["W_row"], t["b_row"])
    x = t["x"].clone().requires_grad_(True)
    A = t["A"].clone().requires_grad_(True)
    B = t["B"].clone().requires_grad_(True)
    y = x @ W.t() + b + (x @ A.t() @ B.t()) * (ALPHA / R)
    (y * t["gy"]).sum().backward()
    return y.detach(), x.grad, A.grad, B.grad


def single_rank_checks():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from mindspeed_dsv.peft.lora import LoraConfig, LoraParallelLinear, apply_lora, lora_state_dict
    from mindspeed_dsv.platform import init_distributed

    init_distributed(tp=1)
    t = _full_tensors()
    block = _Block(_config())
    base_keys = sorted(block.state_dict().keys())
    apply_lora(block, LoraConfig(lora_r=R, lora_alpha=ALPHA, lora_target_modules=["linear_qkv", "linear_proj"]))
    res = {}
    res["types"] = [type(block.linear_qkv).__name__, type(block.linear_proj).__name__]
    res["base_types"] = [type(block.linear_qkv.base_layer) is ColumnParallelLinear,
                         type(block.linear_proj.base_layer) is RowParallelLinear]
    # B starts at zero: output equals the base output.
    with torch.no_grad():
        res["init_B_zero"] = bool((block.linear_qkv.lora_B.weight == 0).all())
        a = block.linear_qkv.lora_A.weight
        bound = 1 / IN**0.5  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
        res["init_A_bound"] = (float(a.abs().max()), bound)
        for name, W, b in (("linear_qkv", t["W_col"], t["b_col"]), ("linear_proj", t["W_row"], t["b_row"])):
            m = getattr(block, name)
            m.base_layer.weight.copy_(W)
            m.base_layer.bias.copy_(b)
            m.lora_A.weight.copy_(t["A"])
            m.lora_B.weight.copy_(t["B"])
    out_c, bias_c = block.linear_qkv(t["x"])
    out_r, bias_r = block.linear_proj(t["x"])
    res["col_bias_none"] = bias_c is None
    res["row_bias"] = bias_r.detach().clone()
    res["out_col"] = out_c.detach().clone()
    res["out_row"] = out_r.detach().clone()
    res["state_keys"] = sorted(block.state_dict().keys())
    res["base_keys"] = base_keys
    res["lora_keys"] = sorted(lora_state_dict(block).keys())
    res["trainable"] = sorted(n for n, p in block.named_parameters() if p.requires_grad)

    # Backward + one optimizer step: only adapters get grads and change.
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    opt = torch.optim.AdamW([p for p in block.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    loss = block.linear_qkv(t["x"])[0].square().sum() + block.linear_proj(t["x"])[0].square().sum()
    loss.backward()
    opt.step()
    res["has_grad"] = sorted(n for n, p in block.named_parameters() if p.grad is not None)
    res["changed"] = sorted(n for n, p in block.named_parameters() if not torch.equal(before[n], p.detach()))

    # A base state dict (Megatron names) loads into the wrapped model; adapter keys are then missing.
    fresh = _Block(_config())
    missing, unexpected = block.load_state_dict(fresh.state_dict(), strict=False)
    res["load_missing"] = sorted(missing)
    res["load_unexpected"] = sorted(unexpected)
    res["loaded_weight_equal"] = torch.equal(block.linear_qkv.base_layer.weight, fresh.linear_qkv.weight)
    res["is_wrapper"] = isinstance(block.linear_qkv, LoraParallelLinear)
    return res


def tp_case(mode: str, sp: bool = False, gather_output: bool = False, input_is_parallel: bool = True):
    """Run one column or row LoRA linear under the current TP size; return output and grads vs reference."""
    from megatron.core import parallel_state as ps

    from mindspeed_dsv.peft.lora import LoraConfig, apply_lora
    from mindspeed_dsv.platform import init_distributed

    tp = int(__import__("os").environ["WORLD_SIZE"])
    init_distributed(tp=tp)
    rank = ps.get_tensor_model_parallel_rank()
    t = _full_tensors()
    block = _Block(_config(tp=tp, sp=sp), gather_output=gather_output, input_is_parallel=input_is_parallel)
    name = "linear_qkv" if mode == "column" else "linear_proj"
    apply_lora(block, LoraConfig(lora_r=R, lora_alpha=ALPHA, lora_target_modules=[name]))
    m = getattr(block, name)
    W, b = (t["W_col"], t["b_col"]) if mode == "column" else (t["W_row"], t["b_row"])
    o_n, i_n = OUT // tp, IN // tp
    with torch.no_grad():
        if mode == "column":
            m.base_layer.weight.copy_(W[rank * o_n:(rank + 1) * o_n])
            m.base_layer.bias.copy_(b[rank * o_n:(rank + 1) * o_n])
            m.lora_A.weight.copy_(t["A"])
            m.lora_B.weight.copy_(t["B"][rank * o_n:(rank + 1) * o_n])
        else:
            m.base_layer.weight.copy_(W[:, rank * i_n:(rank + 1) * i_n])
            m.base_layer.bias.copy_(b)
            m.lora_A.weight.copy_(t["A"][:, rank * i_n:(rank + 1) * i_n])
            m.lora_B.weight.copy_(t["B"])

    s_n = SEQ // tp
    x = t["x"]
    if mode == "column" and sp:
        x = x[rank * s_n:(rank + 1) * s_n]
    if mode == "row" and input_is_parallel:
        x = x[..., rank * i_n:(rank + 1) * i_n]
    x = x.clone().requires_grad_(True)
    out, bias = m(x)
    if mode == "row":
        out = out + bias  # skip_bias_add=True on the row layer
    gy = t["gy"]
    if mode == "column" and not gather_output:
        gy = gy[..., rank * o_n:(rank + 1) * o_n]
    if mode == "row" and sp:
        gy = gy[rank * s_n:(rank + 1) * s_n]
    # Column with gather_output / row without SP: every rank holds the full output, and Megatron's loss
    # is computed identically on each TP rank; its backward starts from the same full gradient.
    (out * gy).sum().backward()
    gA, gB = m.lora_A.weight.grad, m.lora_B.weight.grad
    if sp:
        # Megatron's finalize_model_grads sums grads of params tagged sequence_parallel over TP.
        for p in (m.lora_A.weight, m.lora_B.weight):
            if getattr(p, "sequence_parallel", False):
                torch.distributed.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    return dict(rank=rank, out=out.detach(), dx=x.grad.detach(), dA=gA.detach(), dB=gB.detach(),
                sp_tags=[bool(getattr(m.lora_A.weight, "sequence_parallel", False)),
                         bool(getattr(m.lora_B.weight, "sequence_parallel", False))],
                tp_attr=[bool(getattr(m.lora_A.weight, "tensor_model_parallel", False)),
                         bool(getattr(m.lora_B.weight, "tensor_model_parallel", False))])


def expert_adapters(ep: int):
    """SequentialMLP experts under EP: adapters exist for the local experts only; init is layout-independent."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.experts import SequentialMLP

    from mindspeed_dsv.peft.lora import LoraConfig, apply_lora, lora_state_dict
    from mindspeed_dsv.platform import init_distributed

    init_distributed(tp=1, ep=ep)
    cfg = _config(ep=ep, moe=True)
    n_local = 4 // ep

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = SequentialMLP(
                n_local, cfg, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
            )

    model = Holder()
    apply_lora(model, LoraConfig(lora_r=R, lora_alpha=ALPHA, lora_target_modules=["linear_fc1", "linear_fc2"]))
    sd = lora_state_dict(model)
    allreduce = [getattr(p, "allreduce", None) for n, p in model.named_parameters() if "lora_" in n]
    return dict(
        ep_rank=ps.get_expert_model_parallel_rank(),
        keys=sorted(sd),
        shapes={k: tuple(v.shape) for k, v in sd.items()},
        A={k: v.clone() for k, v in sd.items() if k.endswith("lora_A.weight")},
        allreduce=allreduce,
    )


def qlora_checks():
    from mindspeed_dsv.peft.lora import LoraConfig, lora_state_dict
    from mindspeed_dsv.peft.nf4 import quantize_nf4, dequantize_nf4
    from mindspeed_dsv.peft.qlora import apply_qlora, dequantize_model_weights, nf4_state_dict
    from mindspeed_dsv.platform import init_distributed

    init_distributed(tp=1)
    t = _full_tensors()
    block = _Block(_config())
    with torch.no_grad():
        block.linear_qkv.weight.copy_(t["W_col"])
        block.linear_qkv.bias.copy_(t["b_col"])
    apply_qlora(block, LoraConfig(lora_r=R, lora_alpha=ALPHA, lora_target_modules=["linear_qkv"]), blocksize=32)
    m = block.linear_qkv
    with torch.no_grad():
        m.lora_A.weight.copy_(t["A"])
        m.lora_B.weight.copy_(t["B"])
    x = t["x"].clone().requires_grad_(True)
    out, _ = m(x)
    out.square().sum().backward()
    res = dict(
        out=out.detach(),
        W_deq=dequantize_nf4(quantize_nf4(t["W_col"], blocksize=32, backend="torch"), backend="torch"),
        params=sorted(n for n, _ in block.named_parameters()),
        trainable=sorted(n for n, p in block.named_parameters() if p.requires_grad),
        grads=sorted(n for n, p in block.named_parameters() if p.grad is not None),
        nf4_keys=sorted(nf4_state_dict(block)),
        lora_keys=sorted(lora_state_dict(block)),
        x_grad=x.grad is not None,
    )
    dequantize_model_weights(block)
    sd = block.state_dict()
    res["dequant_keys"] = sorted(sd)
    res["dequant_weight"] = sd["linear_qkv.weight"].clone()
    out2, _ = block.linear_qkv(t["x"])
    res["out_after_dequant"] = out2.detach()
    return res


def qlora_saved_tensors():
    """Column and row QLoRA linears: every dequantized weight made in forward is gone before the backward
    (weakrefs to all outputs of dequantize_nf4 are dead), the backward dequantizes again, and the gradients
    equal autograd on the direct formula with the dequantized weight."""
    import gc
    import weakref

    import mindspeed_dsv.peft.qlora as qlora
    from mindspeed_dsv.peft.lora import LoraConfig
    from mindspeed_dsv.peft.nf4 import dequantize_nf4, quantize_nf4
    from mindspeed_dsv.platform import init_distributed

    init_distributed(tp=1)
    t = _full_tensors()
    block = _Block(_config())
    with torch.no_grad():
        for name, W, b in (("linear_qkv", t["W_col"], t["b_col"]), ("linear_proj", t["W_row"], t["b_row"])):
            getattr(block, name).weight.copy_(W)
            getattr(block, name).bias.copy_(b)
    originals = [weakref.ref(block.linear_qkv.weight), weakref.ref(block.linear_proj.weight)]
    qlora.apply_qlora(block, LoraConfig(lora_r=R, lora_alpha=ALPHA, lora_target_modules=["linear_qkv", "linear_proj"]),
                      blocksize=32, device="cpu")
    gc.collect()
    res = {"originals_released": [r() is None for r in originals]}
    for name in ("linear_qkv", "linear_proj"):
        m = getattr(block, name)
        with torch.no_grad():
            m.lora_A.weight.copy_(t["A"])
            m.lora_B.weight.copy_(t["B"])

    made = []  # weakrefs to every dequantized weight; observation only, the function is unchanged

    def recording(nf4, *args, **kwargs):
        out = dequantize_nf4(nf4, *args, **kwargs)
        made.append(weakref.ref(out))
        return out

    qlora.dequantize_nf4 = recording
    for name, which in (("linear_qkv", "column"), ("linear_proj", "row")):
        m = getattr(block, name)
        made.clear()
        x = t["x"].clone().requires_grad_(True)
        out, bias = m(x)
        if bias is not None:
            out = out + bias  # the row layer skips its bias add
        gc.collect()
        alive_before_backward = sum(r() is not None for r in made)
        made_in_forward = len(made)
        (out * t["gy"]).sum().backward()
        W = t["W_col"] if which == "column" else t["W_row"]
        W_deq = dequantize_nf4(quantize_nf4(W, blocksize=32, backend="torch"), backend="torch")
        ref = dict(t, W_col=W_deq, W_row=W_deq)
        y, dx, dA, dB = _reference(ref, which)
        res[which] = dict(alive=alive_before_backward, made_forward=made_in_forward, made_total=len(made),
                          out=(out.detach(), y), dx=(x.grad, dx), dA=(m.lora_A.weight.grad, dA),
                          dB=(m.lora_B.weight.grad, dB))
    qlora.dequantize_nf4 = dequantize_nf4
    return res
