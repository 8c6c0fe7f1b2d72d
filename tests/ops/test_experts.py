"""GroupedMLPExperts against megatron's SequentialMLP (an independent per-expert MLP path) with the same
weights rearranged, and checkpoint interchange with it through megatron's dist_checkpointing."""

import torch

from tests.dist_utils import run_distributed

# (num_local_experts, tokens_per_expert): one expert; several with an empty one; no tokens at all
CASES = [(1, [5]), (3, [4, 0, 3]), (4, [0, 2, 0, 1]), (2, [0, 0])]
HIDDEN, FFN = 16, 8


def _config(num_experts, recompute=False):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    extra = dict(recompute_granularity="selective", recompute_modules=["moe_act"], moe_grouped_gemm=True) if recompute else {}
    return TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=2, ffn_hidden_size=32, moe_ffn_hidden_size=FFN,
        num_moe_experts=num_experts, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        use_cpu_initialization=True, params_dtype=torch.float32, **extra,
    )  # fmt: skip


def _pair(num_experts, recompute=False):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    from mindspeed_dsv.models.experts import GroupedMLPExperts

    pgs = ProcessGroupCollection.use_mpu_process_groups()
    ours = GroupedMLPExperts(num_experts, _config(num_experts, recompute), pg_collection=pgs)
    seq = SequentialMLP(num_experts, _config(num_experts), MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear), pg_collection=pgs)
    w1 = ours.weight1.view(num_experts, HIDDEN, 2 * FFN)  # megatron GroupedMLP's reading of weight1
    w2 = ours.weight2.view(num_experts, FFN, HIDDEN)
    with torch.no_grad():
        for e, expert in enumerate(seq.local_experts):
            expert.linear_fc1.weight.copy_(w1[e].t())  # [gate; up] rows, like weight1's [gate | up] columns
            expert.linear_fc2.weight.copy_(w2[e].t())
    return ours, seq


def _compare_with_sequential():
    from mindspeed_dsv.platform import init_distributed

    init_distributed()
    results = []
    for recompute in (False, True):
        for num_experts, counts in CASES:
            torch.manual_seed(num_experts)
            ours, seq = _pair(num_experts, recompute)
            assert ours.weight1.shape == (HIDDEN, num_experts * FFN * 2)
            assert ours.weight2.shape == (num_experts * FFN, HIDDEN)
            tokens = sum(counts)
            x = torch.randn(tokens, HIDDEN, requires_grad=True)
            probs = torch.rand(tokens, requires_grad=True)
            tpe = torch.tensor(counts)
            out, bias = ours(x, tpe, probs)
            ref, _ = seq(x, tpe, probs)
            assert bias is None and out.shape == (tokens, HIDDEN)
            g = torch.randn_like(ref)
            seq_params = [p for e in seq.local_experts for p in (e.linear_fc1.weight, e.linear_fc2.weight)]
            # .backward(), not autograd.grad: megatron's recompute checkpoint only supports the former
            out.backward(g)
            gx, gp, g1, g2 = x.grad.clone(), probs.grad.clone(), ours.weight1.grad, ours.weight2.grad
            x.grad = probs.grad = None
            ref.backward(g)
            rx, rp = x.grad, probs.grad
            rw = [torch.zeros_like(p) if p.grad is None else p.grad for p in seq_params]
            # weight grads mapped back to GroupedMLP's layout
            r1 = torch.cat([rw[2 * e].t().reshape(-1) for e in range(num_experts)]).view(HIDDEN, -1)
            r2 = torch.cat([rw[2 * e + 1].t() for e in range(num_experts)], dim=0)
            results.append(
                dict(
                    case=(recompute, num_experts, counts),
                    out=(out - ref).abs().max().item() if tokens else 0.0,
                    gx=(gx - rx).abs().max().item() if tokens else 0.0,
                    gp=(gp - rp).abs().max().item() if tokens else 0.0,
                    g1=(g1 - r1).abs().max().item(),
                    g2=(g2 - r2).abs().max().item(),
                    empty_expert_grad=[
                        g1.view(num_experts, HIDDEN, -1)[e].abs().max().item() for e, c in enumerate(counts) if c == 0
                    ],
                )
            )
    return results


def _flatten_sharded(sharded):
    """{key: global tensor} assembled from every ShardedTensor (factories built, as saving does). Shard
    boundaries may differ between modules (one [E, ...] block vs one shard per expert); the global tensor,
    which is what a checkpoint holds, may not."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = {}

    def walk(x):
        if isinstance(x, ShardedTensorFactory):
            walk(x.build())
        elif isinstance(x, ShardedTensor):
            full = out.setdefault(x.key, torch.full(x.global_shape, float("nan")))
            shape = (1,) * x.prepend_axis_num + tuple(x.data.shape)
            region = tuple(slice(o, o + n) for o, n in zip(x.global_offset, shape))
            full[region] = x.data.reshape(shape)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(sharded)
    return out


def _sharded_tensors_match():
    """What a distributed checkpoint would hold: same keys, offsets and numbers for both expert modules."""
    from mindspeed_dsv.platform import init_distributed

    init_distributed()
    torch.manual_seed(0)
    ours, seq = _pair(3)
    a = _flatten_sharded(ours.sharded_state_dict(prefix="mlp."))
    b = _flatten_sharded(seq.sharded_state_dict(prefix="mlp."))
    return sorted(a), sorted(b), all(not a[k].isnan().any() and torch.equal(a[k], b[k]) for k in a if k in b)


def test_grouped_experts_equal_sequential_mlp():
    (results,) = run_distributed(_compare_with_sequential, 1)
    for r in results:
        for key in ("out", "gx", "gp", "g1", "g2"):
            assert r[key] <= 1e-6, (r["case"], key, r[key])
        assert all(v == 0.0 for v in r["empty_expert_grad"]), r


def test_sharded_state_dict_maps_onto_sequential_mlp():
    ((ours, seq, equal),) = run_distributed(_sharded_tensors_match, 1)
    assert ours == seq == ["mlp.experts.linear_fc1.weight", "mlp.experts.linear_fc2.weight"]
    assert equal
