"""Speed paths of the model against the plain ones: the MoE dispatch at EP=1 with grouped experts (no host sync,
megatron's numbers) and the fused cross entropy."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.dist_utils import run_distributed
from tests.model.hf_reference import tiny_hf_config

# aten ops that make the host wait for the device: data-dependent output sizes and reads of device values.
SYNCING_OPS = ("masked_select", "nonzero", "_local_scalar_dense", "unique")


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _step_on_rank(local_dispatcher: bool):
    """Forward + backward of the tiny model (MoE layers, grouped experts on torch._grouped_mm); returns the aten
    ops that sync, the loss, and a few gradients."""
    from mindspeed_dsv.models import DeepSeekConfig, build_model
    from mindspeed_dsv.models import moe_layer
    from mindspeed_dsv.models.builder import default_layout
    from mindspeed_dsv.ops import configure_ops
    from mindspeed_dsv.platform import init_distributed

    init_distributed()
    configure_ops(overrides={"grouped_matmul": "grouped_mm"})
    if not local_dispatcher:
        moe_layer.LocalTokenDispatcher.applies = staticmethod(lambda *args: False)
    cfg = DeepSeekConfig.from_hf(tiny_hf_config(num_nextn_predict_layers=0))
    torch.manual_seed(0)
    model = build_model(cfg, default_layout(cfg, moe_grouped_gemm=True))
    kinds = {type(m.token_dispatcher).__name__ for m in model.modules() if hasattr(m, "token_dispatcher")}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
    pos = torch.arange(24)[None].expand_as(ids)
    labels = torch.roll(ids, -1, dims=1)
    with _RecordOps() as rec:
        loss = model(ids, pos, attention_mask=None, labels=labels).mean()
        loss.backward()
    syncs = sorted({n for n in rec.names if n.split(".")[0] in SYNCING_OPS})
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "layers.1.mlp" in n}
    return kinds, syncs, loss.item(), grads


def test_local_dispatcher_step_has_no_host_sync_and_matches_megatrons():
    (kinds, syncs, loss, grads), = run_distributed(_step_on_rank, 1, True)
    (ref_kinds, ref_syncs, ref_loss, ref_grads), = run_distributed(_step_on_rank, 1, False)
    assert kinds == {"LocalTokenDispatcher"} and ref_kinds == {"MoEAlltoAllTokenDispatcher"}
    assert syncs == [], f"forward+backward synced with the host through {syncs}"
    assert "masked_select" in {s.split(".")[0] for s in ref_syncs}, ref_syncs  # the detector sees megatron's
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert set(grads) == set(ref_grads) and len(grads) >= 4  # router, expert bias?, weight1, weight2, shared
    for name, g in grads.items():
        err = ((g - ref_grads[name]).norm() / ref_grads[name].norm().clamp(min=1e-30)).item()
        assert err < 1e-5, f"{name}: relative grad difference {err:.2e}"


def _loss_and_grad_on_rank(ce_fusion: bool):
    from mindspeed_dsv.models import DeepSeekConfig, build_model
    from mindspeed_dsv.ops import OpsConfig, configure_ops
    from mindspeed_dsv.platform import init_distributed

    init_distributed()
    configure_ops(OpsConfig(cross_entropy_loss_fusion=ce_fusion))
    cfg = DeepSeekConfig.from_hf(tiny_hf_config())  # with an MTP head: its loss goes through the same op
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = model(ids, torch.arange(16)[None].expand(2, -1), attention_mask=None, labels=ids,
                 loss_mask=torch.ones(2, 16))
    loss.mean().backward()
    return loss.detach().numpy().copy(), model.output_layer.weight.grad.numpy().copy()


def test_cross_entropy_loss_fusion_gives_the_same_token_losses_and_grads():
    """--cross-entropy-loss-fusion (ops' two-pass cross entropy) against megatron's, through the whole model."""
    (loss, grad), = run_distributed(_loss_and_grad_on_rank, 1, True)
    (ref_loss, ref_grad), = run_distributed(_loss_and_grad_on_rank, 1, False)
    assert loss.shape == (2, 16)
    torch.testing.assert_close(torch.from_numpy(loss), torch.from_numpy(ref_loss), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(grad), torch.from_numpy(ref_grad), rtol=1e-5, atol=1e-7)
