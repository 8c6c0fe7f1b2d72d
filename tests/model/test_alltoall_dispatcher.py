"""Our all-to-all token dispatcher (experts spread over ranks) against megatron-core's alltoall dispatcher: the same
loss and the same gradient of every parameter, rank by rank (fp32, cpu/gloo), at EP2 and EP2×TP2 (expert TP 2)."""

from collections import Counter

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.model.hf_reference import tiny_hf_config
from tests.model.test_fast_paths import SYNCING_OPS, _RecordOps


MOE_LAYERS = 2  # after the tiny config's one dense layer


def _uneven_all_gather_on_gloo():
    """megatron's dispatcher all-gathers uneven row counts over expert TP with `torch.distributed.all_gather`, which
    gloo refuses ("invalid tensor size"); for the reference run, pad every part to the longest and trim after."""
    import torch.distributed as dist

    plain = dist.all_gather

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        sizes = [t.shape[0] for t in tensor_list]
        if len(set(sizes)) == 1 or async_op:
            return plain(tensor_list, tensor, group=group, async_op=async_op)
        longest = max(sizes)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        plain(parts, padded, group=group)
        for out, part, n in zip(tensor_list, parts, sizes):
            out.copy_(part[:n])

    dist.all_gather = all_gather


def _counted(calls: dict, name: str, fn):
    def counted(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    return counted


def _steps_on_rank(tp: int, ep: int, grouped: bool):
    """One forward + backward of the tiny model (fp32, grouped experts or SequentialMLP; 4 of 8 experts per EP rank, so the
    received rows need sorting by local expert) with our dispatcher, then the same weights and tokens with
    megatron's. Each data-parallel rank reads its own tokens: uneven splits."""
    from megatron.core import parallel_state

    from mindspeed_dsv.models import DeepSeekConfig, build_model, moe_layer
    from mindspeed_dsv.models.builder import default_layout
    from mindspeed_dsv.ops import configure_ops

    from mindspeed_dsv.platform import init_distributed

    init_distributed(tp=tp, ep=ep)
    ops = configure_ops(overrides={"grouped_matmul": "grouped_mm"})
    calls = {"permute": 0, "unpermute": 0}
    for name in calls:  # count the ops layer's permute calls (only our dispatcher makes them)
        setattr(ops, name, _counted(calls, name, getattr(ops, name)))
    _uneven_all_gather_on_gloo()
    cfg = DeepSeekConfig.from_hf(tiny_hf_config(num_nextn_predict_layers=0, num_hidden_layers=1 + MOE_LAYERS))
    layout = default_layout(cfg, moe_grouped_gemm=grouped, sequence_parallel=tp > 1)
    ours = build_model(cfg, layout)
    applies = moe_layer.AllToAllTokenDispatcher.applies
    moe_layer.AllToAllTokenDispatcher.applies = staticmethod(lambda *args: False)
    ref = build_model(cfg, layout)
    moe_layer.AllToAllTokenDispatcher.applies = applies
    ref.load_state_dict(ours.state_dict())

    g = torch.Generator().manual_seed(10 + parallel_state.get_data_parallel_rank())
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
    results = []
    for model in (ours, ref):
        kinds = {type(m.token_dispatcher).__name__ for m in model.modules() if hasattr(m, "token_dispatcher")}
        with _RecordOps() as rec:
            loss = model(ids, torch.arange(24)[None].expand_as(ids), attention_mask=None,
                         labels=torch.roll(ids, -1, dims=1)).mean()
            loss.backward()
        syncs = [n for n in rec.names if n.split(".")[0] in SYNCING_OPS]
        # numpy, not tensors: torch shares tensors between processes through the sender, which may have exited
        grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
        results.append((kinds, syncs, loss.item(), grads, dict(calls)))
    return results


def _compare(tp: int, ep: int, grouped: bool = True):
    runs = run_distributed(_steps_on_rank, tp * ep, tp, ep, grouped)
    for rank, ((kinds, syncs, loss, grads, calls), (ref_kinds, ref_syncs, ref_loss, ref_grads, _)) in enumerate(runs):
        assert kinds == {"AllToAllTokenDispatcher"}, kinds
        assert ref_kinds == {"MoEAlltoAllTokenDispatcher"}, ref_kinds
        # No aten op that makes the host wait (masked_select, nonzero, .item(), unique) comes from our dispatcher:
        # its one host read is the split sizes' `.tolist()` per MoE layer, which the all-to-all needs. megatron's
        # dispatcher without TE syncs through masked_select, which the detector sees. (With sequence parallelism
        # megatron's RNG tracker reads an .item() on cpu, in both runs.)
        assert "masked_select" in {s.split(".")[0] for s in ref_syncs}, ref_syncs
        assert not Counter(syncs) - Counter(ref_syncs), (syncs, ref_syncs)
        assert "masked_select" not in {s.split(".")[0] for s in syncs}, syncs
        if tp == 1:
            assert syncs == [], syncs
        # The dispatcher's permutes are the ops layer's (so --use-fused-moe-token-permute-and-unpermute acts at
        # EP>1): per MoE layer the token permute and the local-expert sort, and their two inverses.
        assert calls == {"permute": 2 * MOE_LAYERS, "unpermute": 2 * MOE_LAYERS}, calls
        assert loss == pytest.approx(ref_loss, rel=1e-6), (rank, loss, ref_loss)
        assert set(grads) == set(ref_grads)
        experts = ".mlp.experts.weight1" if grouped else ".mlp.experts.local_experts.0.linear_fc1.weight"
        assert any(experts in n for n in grads) and any(".mlp.router." in n for n in grads)
        for name, g in grads.items():
            g, ref_g = torch.from_numpy(g), torch.from_numpy(ref_grads[name])
            err = ((g - ref_g).norm() / ref_g.norm().clamp(min=1e-30)).item()
            assert err < 1e-5, f"rank {rank} {name}: relative grad difference {err:.2e}"
    return [ours for ours, _ in runs]


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_experts", "sequential_mlp"])
def test_ep2_matches_megatrons_alltoall_dispatcher(grouped):
    """SequentialMLP (per-expert MLPs: what LoRA wraps) gets routing weights of 1, the weights being applied at
    unpermute."""
    ours = _compare(tp=1, ep=2, grouped=grouped)
    assert ours[0][2] != ours[1][2]  # the ranks saw different tokens: uneven splits were exercised


def test_ep2_tp2_matches_megatrons_alltoall_dispatcher():
    """TP2 with sequence parallelism, EP2, on 4 ranks: expert TP 2 (megatron's default: the TP size), so each row
    goes to both expert-TP ranks of its expert and their partial outputs are summed back."""
    _compare(tp=2, ep=2)
