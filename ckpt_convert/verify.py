"""verify: logits of the HF model (transformers) against the Megatron checkpoint loaded into our model.

The checkpoint is loaded in its recorded layout (layout.json): one process per rank, TP*PP*EP ranks. Under
torchrun (WORLD_SIZE set) this process is one of them; otherwise, for a multi-rank layout, the ranks are
spawned here as local gloo processes (torch.multiprocessing), the way torchrun would start them.

Each rank builds its model chunk(s) (mindspeed_dsv.models.build_model), loads its own rank file strictly and
runs the token ids through megatron's pipeline schedule (get_forward_backward_func, forward_only). megatron
0.16.1 cannot run an MTP model forward without labels, so the model gets shifted labels and the main logits
are taken from the output layer's last call on the last stage (MTP heads call it first), cloned before the
cross-entropy edits them in place, then gathered over TP (the output layer is vocab-parallel). One rank
compares them with transformers' logits.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from functools import partial

import torch

WORLD_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class VerifyError(ValueError):
    pass


def world_size_of(layout) -> int:
    """Ranks needed to hold every rank file once: PP * lcm(TP, expert-TP * EP) (ParallelLayout.min_world_size;
    EP ranks are data-parallel ranks of the dense part)."""
    return layout.min_world_size()


def read_tokens(path: str) -> torch.Tensor:
    try:
        data = json.load(open(path))
    except (OSError, json.JSONDecodeError) as e:
        raise VerifyError(f"--tokens-file {path}: cannot be read as JSON ({e})") from None
    if not (isinstance(data, list) and data and all(isinstance(r, list) and r for r in data)):
        raise VerifyError(f"--tokens-file {path}: expected a non-empty JSON list of non-empty lists of token ids")
    lengths = {len(r) for r in data}
    if len(lengths) != 1:
        raise VerifyError(f"--tokens-file {path}: rows have different lengths {sorted(lengths)}; pad them")
    try:
        return torch.tensor(data, dtype=torch.long)
    except (TypeError, ValueError, RuntimeError) as e:
        raise VerifyError(f"--tokens-file {path}: token ids must be integers ({e})") from None


def check_token_ids(tokens: torch.Tensor, vocab_size: int, path: str) -> None:
    """Every id in [0, vocab_size): the embedding lookup would otherwise fail inside megatron without the id."""
    bad = ((tokens < 0) | (tokens >= vocab_size)).nonzero()
    if len(bad):
        row, col = (int(x) for x in bad[0])
        raise VerifyError(f"--tokens-file {path}: token id {int(tokens[row, col])} at row {row}, position {col} is "
                          f"outside the vocabulary [0, {vocab_size}) of config.json ({len(bad)} such id(s))")


def check_layout(layout, mcore_dir: str):
    if layout.dualpipev:
        raise VerifyError(f"{mcore_dir}: verify does not run the dualpipev schedule (training does); "
                          "reshard to a layout without --schedules-method dualpipev and verify that")
    return layout


# --------------------------------------------------------------------------------------------- one rank
def _load_chunks(mcore_dir: str, layout, cfg, dtype: torch.dtype) -> list:
    """This rank's model chunks with the weights of its rank file (strict: every key must match)."""
    from megatron.core import parallel_state as ps

    from ckpt_convert.mcore_io import dense_state, load_rank_file, rank_file, read_iteration
    from mindspeed_dsv.models import build_model, model_transformer_config
    from mindspeed_dsv.models import names as nm

    chunks = layout.num_model_chunks
    tconfig = model_transformer_config(cfg, layout, params_dtype=dtype)
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    ep = layout.file_ep_rank(ps.get_expert_model_parallel_rank())
    path = rank_file(mcore_dir, layout, tp, pp, ep, read_iteration(mcore_dir))
    state = load_rank_file(path, verify=False)  # run_verify checked the whole iteration first
    models = []
    for c in range(chunks):
        if chunks > 1:
            ps.set_virtual_pipeline_model_parallel_rank(c)
        model = build_model(cfg, layout, vp_stage=c if chunks > 1 else None, config=tconfig)
        key = nm.chunk_key(layout, c)
        if key not in state:
            raise VerifyError(f"{path}: no '{key}' entry; the checkpoint does not match its layout.json")
        missing, unexpected = model.load_state_dict(dense_state(state[key]), strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise VerifyError(f"{path} [{key}]: does not fit the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
        models.append(model.eval())
    if chunks > 1:
        ps.set_virtual_pipeline_model_parallel_rank(0)
    return models


def _forward_step(tokens, data_iterator, model):
    next(data_iterator)
    pos = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    # Labels only because megatron 0.16.1 needs them to run MTP; the logits come from the output-layer hook.
    out = model(tokens, pos, attention_mask=None, labels=torch.roll(tokens, -1, dims=1))
    return out, lambda t: (t.float().sum() * 0.0, {})


def mcore_logits(mcore_dir: str, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Run on every rank of an initialised world: the full float32 logits [b, s, vocab] on the one rank that
    reports them (last pipeline stage, TP rank 0, data-parallel rank 0), None on the others."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mindspeed_dsv.layout import ParallelLayout
    from mindspeed_dsv.models import DeepSeekConfig
    from mindspeed_dsv.platform import init_distributed

    layout = check_layout(ParallelLayout.load(mcore_dir), mcore_dir)
    chunks = layout.num_model_chunks
    ep, etp = layout.megatron_expert_sizes()
    init_distributed(tp=layout.tp, pp=layout.pp, ep=ep, etp=etp, vpp=chunks if chunks > 1 else None)
    world = dist.get_world_size()
    if world % world_size_of(layout):
        raise VerifyError(f"world size {world} is not a multiple of PP*lcm(TP, expert-TP*EP) = "
                          f"{world_size_of(layout)} of {mcore_dir}/layout.json")
    cfg = DeepSeekConfig.from_hf(mcore_dir)
    models = _load_chunks(mcore_dir, layout, cfg, dtype)

    calls = []
    last = models[-1]
    if ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=chunks - 1 if chunks > 1 else None):
        last.output_layer.register_forward_hook(lambda m, i, o: calls.append(o[0].detach().float().clone()))
    b, s = tokens.shape
    # The interleaved schedule needs at least PP micro-batches: run the same batch PP times (forward only).
    micro = layout.pp if chunks > 1 else 1
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=partial(_forward_step, tokens),
            data_iterator=[iter([None] * micro) for _ in models] if chunks > 1 else iter([None]),
            model=models if chunks > 1 else models[0],
            num_microbatches=micro,
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
        )
    if not calls:
        return None
    local = calls[-1]  # [s, b, vocab / tp]; the main head runs after the MTP heads (of the last micro-batch)
    if layout.tp > 1:
        parts = [torch.empty_like(local) for _ in range(layout.tp)]
        dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
        local = torch.cat(parts, dim=-1)
    local = local[..., : cfg.vocab_size]  # without the padded ids of --make-vocab-size-divisible-by
    if ps.get_tensor_model_parallel_rank() != 0 or ps.get_data_parallel_rank() != 0:
        return None
    return local.transpose(0, 1).contiguous()


# --------------------------------------------------------------------------------------------- compare
def hf_logits(hf_dir: str, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def compare(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    if ours.shape != ref.shape:
        raise VerifyError(f"logit shapes differ: Megatron {list(ours.shape)} vs transformers {list(ref.shape)}")
    diff = (ours - ref).abs()
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
            "relative": (diff.norm() / ref.norm()).item(),  # ||ours - ref|| / ||ref|| over all logits
            "max_relative": (diff.max() / ref.abs().max()).item()}


def report(ns, ours: torch.Tensor, tokens: torch.Tensor, dtype: torch.dtype, layout_text: str, ref_fn=None) -> int:
    """Compare and print the statistics. With `ref_fn` (DeepSeek-V4) `ours` and the reference are stacked
    [1 + MTP depths, B, S, V]: the main logits' statistics, and per MTP depth under "mtp"."""
    if ref_fn is None:
        ours, ref = ours[None], hf_logits(ns.hf_dir, tokens, dtype)[None]
    else:
        ref = ref_fn(ns.hf_dir, tokens, dtype)
    if ours.shape[0] != ref.shape[0]:
        raise VerifyError(f"{ours.shape[0] - 1} MTP depth(s) in the checkpoint, {ref.shape[0] - 1} in the reference")
    stats = compare(ours[0], ref[0])
    if len(ours) > 1:
        stats["mtp"] = [compare(o, r) for o, r in zip(ours[1:], ref[1:])]
    stats.update(layout=layout_text, dtype=ns.dtype, tolerance=ns.tolerance, shape=list(ours[0].shape))
    print(json.dumps(stats))
    if ns.save_logits:
        tmp = ns.save_logits + ".tmp"
        torch.save(ours[0], tmp)
        os.replace(tmp, ns.save_logits)
    worst = max(s["max_abs"] for s in [stats, *stats.get("mtp", [])])
    if worst > ns.tolerance:
        print(f"error: max abs logit difference {worst:.3e} exceeds --tolerance {ns.tolerance:g}",
              file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------- ranks
def _rank_logits(mcore_dir, tokens, dtype):
    ours = mcore_logits(mcore_dir, tokens, dtype)
    # numpy, not a tensor: torch's queue would share the storage with a process that is about to exit
    return None if ours is None else ours.numpy()


def spawn_logits(mcore_dir: str, tokens: torch.Tensor, dtype: torch.dtype, world: int,
                 timeout: float = 600) -> torch.Tensor:
    """Start `world` local gloo ranks, return the logits the reporting rank computed."""
    from mindspeed_dsv.platform.spawn import RankError, spawn_ranks

    try:
        results = spawn_ranks(_rank_logits, world, mcore_dir, tokens, dtype, timeout=timeout)
    except RankError as e:
        raise VerifyError(str(e)) from None
    found = [torch.from_numpy(r) for r in results if r is not None]
    if not found:
        raise VerifyError("no rank produced logits")
    return found[0]


@contextlib.contextmanager
def one_rank_world():
    """This process as a world of one rank (the environment init_distributed reads); torch.distributed and
    megatron's groups torn down and the environment restored afterwards."""
    from mindspeed_dsv.platform import destroy_distributed
    from mindspeed_dsv.platform.spawn import free_port

    saved = {k: os.environ.get(k) for k in WORLD_ENV}
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        yield
    finally:
        destroy_distributed()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_verify(ns) -> int:
    from ckpt_convert.hf2mcore import layout_str
    from ckpt_convert.hf_io import read_config
    from mindspeed_dsv.layout import ParallelLayout
    from mindspeed_dsv.models.family import DEEPSEEK4, family_of

    v4 = family_of(read_config(ns.mcore_dir)) == DEEPSEEK4
    # V4 gathers the checkpoint into one model (any layout); V3 runs the layout's ranks and schedule
    layout = ParallelLayout.load(ns.mcore_dir) if v4 else check_layout(ParallelLayout.load(ns.mcore_dir), ns.mcore_dir)
    if not ns.no_verify_checksums:
        from ckpt_convert.mcore_io import verify_iteration

        verify_iteration(ns.mcore_dir)
    tokens = read_tokens(ns.tokens_file)
    check_token_ids(tokens, int(read_config(ns.mcore_dir)["vocab_size"]), ns.tokens_file)
    dtype = torch.bfloat16 if ns.dtype == "bf16" else torch.float32
    world = world_size_of(layout)
    text = layout_str(layout)
    logits_fn, ref_fn = mcore_logits, None
    if v4:
        from ckpt_convert import deepseek4

        logits_fn, world = deepseek4.mcore_logits, 1  # gathered into one model in this process
        ref_fn = partial(deepseek4.hf_logits, mtp_num_layers=layout.mtp_num_layers or 0)  # main + MTP logits

    if world > 1 and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:  # one rank of torchrun
        import torch.distributed as dist

        from mindspeed_dsv.platform import destroy_distributed

        ours = mcore_logits(ns.mcore_dir, tokens, dtype)
        code = report(ns, ours, tokens, dtype, text) if ours is not None else 0
        flag = torch.tensor([code], dtype=torch.long)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank exits with the reporting rank's status
        destroy_distributed()
        return int(flag.item())
    if world == 1:  # in this process
        with one_rank_world():
            ours = logits_fn(ns.mcore_dir, tokens, dtype)
        return report(ns, ours, tokens, dtype, text, ref_fn)
    ours = spawn_logits(ns.mcore_dir, tokens, dtype, world)
    return report(ns, ours, tokens, dtype, text)
