"""DeepSeek-V4 across ranks (gloo, cpu, fp32): EP2 and PP2 logits against transformers'."""

import torch

from tests.dist_utils import run_distributed
from tests.model.deepseek4_reference import make_hf_v4_model, tiny_v4_config, token_ids


def _compare_ep2_on_rank():
    """EP 2 (gloo): each rank holds half the experts; tokens travel through megatron's alltoall dispatcher.
    The ranks get different token ids, so each rank's routing differs from the other's."""
    import torch.distributed as dist

    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config, DeepSeekV4Model, transformer_config
    from mindspeed_dsv.platform import init_distributed
    from tests.model.deepseek4_reference import hf_v4_to_ours

    init_distributed(ep=2)
    rank = dist.get_rank()
    hf_cfg = tiny_v4_config()
    cfg = DeepSeekV4Config.from_hf(hf_cfg)
    hf = make_hf_v4_model(hf_cfg)
    model = DeepSeekV4Model(cfg, transformer_config(cfg, ep=2)).eval()
    hf_v4_to_ours(hf, model, cfg.n_routed_experts, ep_rank=rank, ep_size=2)
    ids = token_ids(cfg.vocab_size, seq=30, seed=10 + rank)
    with torch.no_grad():
        ref = hf(ids).logits
        got = model(ids)
    return ((got - ref).norm() / ref.norm()).item()


def _compare_pp2_on_rank():
    """PP 2 (gloo) through megatron's 1F1B schedule, forward only: stage 0 holds the embedding and layers 0-1,
    stage 1 layers 2-3 and the head; the streams cross as [S, B, hc_mult * D]. Two micro-batches."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Config, DeepSeekV4Model, stage_tensor_shape, transformer_config
    from mindspeed_dsv.platform import init_distributed
    from tests.model.deepseek4_reference import hf_v4_to_ours

    init_distributed(pp=2)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    hf_cfg = tiny_v4_config()
    cfg = DeepSeekV4Config.from_hf(hf_cfg)
    hf = make_hf_v4_model(hf_cfg)
    half = cfg.num_hidden_layers // 2
    model = DeepSeekV4Model(cfg, transformer_config(cfg, pp=2), pre_process=stage == 0, post_process=stage == 1,
                            layers=range(stage * half, (stage + 1) * half)).eval()
    hf_v4_to_ours(hf, model, cfg.n_routed_experts)
    batches = [token_ids(cfg.vocab_size, batch=2, seq=30, seed=20 + i) for i in range(2)]
    shape = stage_tensor_shape(cfg, 30, 2)

    def forward_step(data_iterator, m):
        ids = next(data_iterator)
        return m(ids), lambda logits: (logits.sum() * 0, {"logits": logits.clone()})

    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[model], num_microbatches=2,
            seq_length=30, micro_batch_size=2, forward_only=True,
            adjust_tensor_shapes_fn=lambda recv, send: ([shape] * len(recv), [shape] * len(send)),
        )
        if stage == 0:
            return None
        refs = [hf(ids).logits for ids in batches]
    assert len(out) == 2
    return max(((o["logits"] - r).norm() / r.norm()).item() for o, r in zip(out, refs))


def _parallel_checks():
    """Both layouts in one pair of spawned ranks (init_distributed re-initialises megatron's groups)."""
    return _compare_ep2_on_rank(), _compare_pp2_on_rank()


def test_expert_and_pipeline_parallel_2_match_transformers():
    (ep0, pp0), (ep1, pp1) = run_distributed(_parallel_checks, 2)
    assert pp0 is None  # only the last stage has logits
    assert max(ep0, ep1) < 1e-5, (ep0, ep1)
    assert pp1 < 1e-5, pp1
