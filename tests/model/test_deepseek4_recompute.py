"""DeepSeek-V4 whole-layer recompute (--recompute-granularity full, methods uniform and block) changes nothing:
the loss and every gradient equal the plain run's bit for bit (fp32, cpu), and the recomputed layers really run
twice (forward hooks count the calls)."""

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.model.deepseek4_reference import tiny_v4_config, token_ids

CASES = [("uniform", 1), ("uniform", 3), ("block", 2)]


def _grads_and_calls(method, num_layers):
    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config, DeepSeekV4Model
    from mindspeed_dsv.models.deepseek4.config import transformer_config
    from mindspeed_dsv.platform import init_distributed

    init_distributed()
    cfg = DeepSeekV4Config.from_hf(tiny_v4_config())
    torch.manual_seed(0)
    plain = DeepSeekV4Model(cfg, transformer_config(cfg, mtp_num_layers=1), mtp_num_layers=1)
    config = transformer_config(cfg, mtp_num_layers=1, recompute_granularity="full", recompute_method=method,
                                recompute_num_layers=num_layers)
    again = DeepSeekV4Model(cfg, config, mtp_num_layers=1)
    again.load_state_dict(plain.state_dict())
    ids = token_ids(cfg.vocab_size, seq=30)
    labels = torch.roll(ids, -1, dims=1)
    out = {}
    for name, model in (("plain", plain), ("recompute", again)):
        model.train()
        calls = [0] * len(model.layers)
        for i, layer in enumerate(model.layers):
            layer.register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
        loss = model(ids, labels=labels).mean()
        loss.backward()
        out[name] = dict(loss=loss.item(), calls=calls,
                         grads={k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    plain, again = out["plain"]["grads"], out["recompute"]["grads"]
    # tensors do not travel back from a spawned rank: compare here
    for o in out.values():
        o["grads"] = sorted(o["grads"])
    out["differ"] = [k for k in plain if k not in again or not torch.equal(plain[k], again[k])]
    return out


@pytest.mark.parametrize("method,num_layers", CASES)
def test_recompute_equals_plain_run(method, num_layers):
    out = run_distributed(_grads_and_calls, 1, method, num_layers)[0]
    plain, again = out["plain"], out["recompute"]
    assert again["loss"] == plain["loss"]
    assert again["grads"] == plain["grads"] and len(plain["grads"]) > 50
    assert out["differ"] == []
    n = len(plain["calls"])
    assert plain["calls"] == [1] * n
    recomputed = n if method == "uniform" else min(num_layers, n)
    assert again["calls"] == [2] * recomputed + [1] * (n - recomputed)
