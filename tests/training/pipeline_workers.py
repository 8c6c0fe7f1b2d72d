"""Rank-side helpers for the pipeline tests: run the trainer's own setup and schedule for a few steps and return,
per step, the reduced loss and every parameter's gradient before clipping, keyed by its HF name (the one name
map, mindspeed_dsv.models.names), so that runs of different layouts can be compared tensor by tensor."""

from __future__ import annotations

import torch


def _hf_grads(state) -> dict[str, torch.Tensor]:
    """HF name -> full gradient of every parameter on this rank (TP = 1 in these tests, so a rank's tensor is the
    whole HF tensor; with EP a rank holds some experts, each its own tensor). A tensor stored twice (the MTP
    chunk's embedding copy) must carry the same gradient."""
    from megatron.core import parallel_state

    from mindspeed_dsv.models.family import rank_maps

    layout = state.layout
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    out: dict[str, torch.Tensor] = {}
    for chunk, ddp in enumerate(state.models):
        params = dict(ddp.module.named_parameters())
        for m in rank_maps(state.hf_config, layout, 0, pp_rank, ep_rank, chunk):
            if m.mcore not in params or not params[m.mcore].requires_grad:
                continue  # buffers (expert bias) and frozen weights (V4's indexers) have no gradient
            grad = params[m.mcore].main_grad.detach().clone()
            key = "+".join(m.hf)
            if key in out:
                torch.testing.assert_close(out[key], grad, rtol=0, atol=0, msg=f"two copies of {key} differ")
            out[key] = grad
    return out


def _set_hf_weights(state, path: str) -> None:
    """Overwrite this rank's weights and buffers with the HF-named tensors in `path` (a torch.save'd dict, experts
    one tensor per expert, TP 1): each stage tensor is its rank-map HF tensors concatenated (an expert's fc1 is
    [gate; up]). For models the converter does not read yet (V4 MTP); the optimizer is built already, so
    its fp32 master copies are refreshed from the weights."""
    from megatron.core import parallel_state

    from mindspeed_dsv.models.family import rank_maps

    hf = torch.load(path)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    with torch.no_grad():
        for chunk, ddp in enumerate(state.models):
            tensors = ddp.module.state_dict(keep_vars=True)
            maps = rank_maps(state.hf_config, state.layout, 0, pp_rank, ep_rank, chunk)
            missing = set(k for k in tensors if not k.endswith("_extra_state")) - {m.mcore for m in maps}
            assert not missing, sorted(missing)[:5]
            for m in maps:
                tensors[m.mcore].copy_(torch.cat([hf[h] for h in m.hf]))
    state.optimizer.reload_model_params()


def train_steps(argv: list[str], steps: int, hf_weights: str | None = None, grad_noise: float = 0.0) -> list[dict]:
    """`steps` optimizer steps of the trainer; per step {'loss': float, 'grads': {hf name: array}, 'handovers':
    the --moe-fb-overlap hand-overs (models.comm_points.recording)} (this rank's); the last step also holds
    'eval', the loss of a forward-only pass over the next global batch. `hf_weights`: start from these weights
    (_set_hf_weights) instead of the run's own. `grad_noise`: after recording them, multiply every gradient
    entry by 1 + uniform(-grad_noise, grad_noise) (seeded) before the optimizer steps: the rounding a summation
    in another order leaves, so that a run shows how much later steps' gradients move under it (a noise floor)."""
    from mindspeed_dsv.models import comm_points
    from mindspeed_dsv.training import loop
    from mindspeed_dsv.training.arguments import build_parser
    from mindspeed_dsv.training.data import build_data_iterators

    args = build_parser().parse_args(argv)
    state = loop.setup(args)
    if hf_weights:
        _set_hf_weights(state, hf_weights)
    dp = loop._world_size() // (state.layout.tp * state.layout.pp)
    num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    iters, _, _ = build_data_iterators(args, state.layout, state.consumed_samples, state.cfg)
    for m in state.models:
        m.train()
    history = []
    for _ in range(steps):
        for m in state.models:
            m.zero_grad_buffer()
        state.optimizer.zero_grad()
        with comm_points.recording() as handovers:
            losses = loop._run_schedule(state, iters, num_microbatches, forward_only=False)
        grads = _hf_grads(state)  # before the optimizer clips them
        if grad_noise:
            gen = torch.Generator().manual_seed(len(history))
            for ddp in state.models:
                for p in ddp.module.parameters():
                    if p.requires_grad:
                        p.main_grad.mul_(1 + grad_noise * (2 * torch.rand(p.main_grad.shape, generator=gen) - 1))
        ok, grad_norm, _ = state.optimizer.step()
        assert ok
        state.scheduler.step(increment=args.global_batch_size)
        # numpy arrays: tensors would travel back to the test through shared memory that dies with the rank
        history.append({"loss": loop._reduce_lm_loss(losses), "grad_norm": grad_norm,
                        "grads": {k: v.numpy() for k, v in grads.items()}, "handovers": list(handovers)})
    # then one forward-only pass (the schedule evaluate() runs) over the next global batch
    for m in state.models:
        m.eval()
    with torch.no_grad():
        history[-1]["eval"] = loop._reduce_lm_loss(loop._run_schedule(state, iters, num_microbatches, forward_only=True))
    return history
