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

    from mindspeed_dsv.models.names import rank_maps

    layout = state.layout
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    out: dict[str, torch.Tensor] = {}
    for chunk, ddp in enumerate(state.models):
        params = dict(ddp.module.named_parameters())
        for m in rank_maps(state.cfg, layout, 0, pp_rank, ep_rank, chunk):
            if m.mcore not in params:
                continue  # buffers (expert bias) have no gradient
            grad = params[m.mcore].main_grad.detach().clone()
            key = "+".join(m.hf)
            if key in out:
                torch.testing.assert_close(out[key], grad, rtol=0, atol=0, msg=f"two copies of {key} differ")
            out[key] = grad
    return out


def train_steps(argv: list[str], steps: int) -> list[dict]:
    """`steps` optimizer steps of the trainer; per step {'loss': float, 'grads': {hf name: array}, 'handovers':
    the --moe-fb-overlap hand-overs (models.comm_points.recording)} (this rank's); the last step also holds
    'eval', the loss of a forward-only pass over the next global batch."""
    from mindspeed_dsv.models import comm_points
    from mindspeed_dsv.training import loop
    from mindspeed_dsv.training.arguments import build_parser
    from mindspeed_dsv.training.data import build_data_iterators

    args = build_parser().parse_args(argv)
    state = loop.setup(args)
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
        ok, _, _ = state.optimizer.step()
        assert ok
        state.scheduler.step(increment=args.global_batch_size)
        # numpy arrays: tensors would travel back to the test through shared memory that dies with the rank
        history.append({"loss": loop._reduce_lm_loss(losses), "grads": {k: v.numpy() for k, v in grads.items()},
                        "handovers": list(handovers)})
    # then one forward-only pass (the schedule evaluate() runs) over the next global batch
    for m in state.models:
        m.eval()
    with torch.no_grad():
        history[-1]["eval"] = loop._reduce_lm_loss(loop._run_schedule(state, iters, num_microbatches, forward_only=True))
    return history
