"""A writer of MindSpeed-LLM's DeepSeek-V3 rank files, built from their documented converter
(examples/mcore/deepseek3/convert_ckpt_deepseek3.py; facts in shared/notes/mindspeed-llm-deepseek3.md §2), for tests.

Written on purpose without our name map or layout code (no mindspeed_dsv.layout, no names.py, no ckpt_convert
reader): the placement of layers over pipeline ranks and chunks, the TP/EP slicing and the tensor names are
spelled out here from the notes, so that reading these files with ckpt_convert.mindspeed checks our reader
against an independent statement of their format.
"""

from __future__ import annotations

import os

import torch

from ckpt_convert.hf_io import read_all


def _stages(num_layers, pp, vpp, dualpipev):
    """[(pp_rank, chunk, [global layer ids])] in MindSpeed's placement."""
    if dualpipev:  # V shape: rank r runs virtual stages r and 2P-1-r; L/(2P) layers each
        per = num_layers // (2 * pp)
        out = []
        for r in range(pp):
            out.append((r, 0, list(range(r * per, (r + 1) * per))))
            v = 2 * pp - 1 - r
            out.append((r, 1, list(range(v * per, (v + 1) * per))))
        return out
    if vpp:  # interleaved: chunk c of rank r is virtual stage c*P + r, vpp layers each
        chunks = num_layers // (pp * vpp)
        return [(r, c, list(range((c * pp + r) * vpp, (c * pp + r + 1) * vpp))) for r in range(pp)
                for c in range(chunks)]
    per = num_layers // pp
    return [(r, 0, list(range(r * per, (r + 1) * per))) for r in range(pp)]


def _tp(t, tp, k, dim):
    return torch.chunk(t, tp, dim=dim)[k].clone()


def _glu(gate, up, tp, k):
    """Dense / shared / per-expert fc1: [gate_k; up_k] on TP rank k."""
    return torch.cat([_tp(gate, tp, k, 0), _tp(up, tp, k, 0)], dim=0)


def _layer(hf, h, pre, tp, k, dense, local_experts, grouped, mm_split, cfg):
    """One decoder layer (HF index h) under key prefix `pre` for TP rank k."""
    p = f"model.layers.{h}."
    nh, dn, dr, dv = (cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"],
                      cfg["v_head_dim"])
    out = {
        pre + "input_layernorm.weight": hf[p + "input_layernorm.weight"],
        # q_a_proj and kv_a_proj_with_mqa fused, replicated on every TP rank
        pre + "self_attention.linear_qkv.weight": torch.cat([hf[p + "self_attn.q_a_proj.weight"],
                                                             hf[p + "self_attn.kv_a_proj_with_mqa.weight"]], 0),
        pre + "self_attention.q_layernorm.weight": hf[p + "self_attn.q_a_layernorm.weight"],
        pre + "self_attention.kv_layernorm.weight": hf[p + "self_attn.kv_a_layernorm.weight"],
        pre + "self_attention.linear_proj.weight": _tp(hf[p + "self_attn.o_proj.weight"], tp, k, 1),
        pre + "pre_mlp_layernorm.weight": hf[p + "post_attention_layernorm.weight"],
    }
    qb, kvb = hf[p + "self_attn.q_b_proj.weight"], hf[p + "self_attn.kv_b_proj.weight"]
    if mm_split:  # q_b reshaped (heads, nope+rope, in) split [nope, rope]; kv_b (heads, nope+v, in) split [nope, v]
        q3, kv3 = qb.reshape(nh, dn + dr, -1), kvb.reshape(nh, dn + dv, -1)
        for name, t in (("linear_qk_nope", q3[:, :dn]), ("linear_qk_rope", q3[:, dn:]),
                        ("linear_kv_nope", kv3[:, :dn]), ("linear_v", kv3[:, dn:])):
            out[pre + f"self_attention.{name}.weight"] = _tp(t.reshape(-1, t.shape[-1]), tp, k, 0)
    else:
        out[pre + "self_attention.linear_q_up_proj.weight"] = _tp(qb, tp, k, 0)
        out[pre + "self_attention.linear_kv_up_proj.weight"] = _tp(kvb, tp, k, 0)
    if dense:
        out[pre + "mlp.linear_fc1.weight"] = _glu(hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"], tp, k)
        out[pre + "mlp.linear_fc2.weight"] = _tp(hf[p + "mlp.down_proj.weight"], tp, k, 1)
        return out
    out[pre + "mlp.router.weight"] = hf[p + "mlp.gate.weight"]
    out[pre + "mlp.router.expert_bias"] = hf[p + "mlp.gate.e_score_correction_bias"]
    e = lambda i, w: hf[f"{p}mlp.experts.{i}.{w}_proj.weight"]  # noqa: E731
    H = cfg["hidden_size"]
    if grouped:  # whole experts per rank (EP, or EP*TP with --moe-tp-extend-ep)
        w1 = torch.stack([torch.cat([e(i, "gate"), e(i, "up")], 0).t() for i in local_experts])  # [E, H, 2F]
        w2 = torch.stack([e(i, "down").t() for i in local_experts])  # [E, F, H]
        out[pre + "mlp.experts.weight1"] = w1.contiguous().view(H, -1)
        out[pre + "mlp.experts.weight2"] = w2.contiguous().view(-1, H)
    else:
        for j, i in enumerate(local_experts):
            out[pre + f"mlp.experts.local_experts.{j}.linear_fc1.weight"] = _glu(e(i, "gate"), e(i, "up"), tp, k)
            out[pre + f"mlp.experts.local_experts.{j}.linear_fc2.weight"] = _tp(e(i, "down"), tp, k, 1)
    if cfg.get("n_shared_experts"):
        s = p + "mlp.shared_experts."
        out[pre + "mlp.shared_experts.linear_fc1.weight"] = _glu(hf[s + "gate_proj.weight"], hf[s + "up_proj.weight"],
                                                                tp, k)
        out[pre + "mlp.shared_experts.linear_fc2.weight"] = _tp(hf[s + "down_proj.weight"], tp, k, 1)
    return out


def write_mindspeed(hf_dir, save_dir, cfg, tp=1, pp=1, ep=1, vpp=None, dualpipev=False, noop_layers=(),
                    num_layers=None, mtp_num_layers=0, grouped=False, tp_extend_ep=False, mm_split=False,
                    iteration=1, save_args=None, nf4_modules=(), expert_tp=None):
    """Write MindSpeed-LLM rank files for the HF model in hf_dir. `save_args`: an argparse.Namespace stored as
    'args' (their training checkpoints have one, their converter's output has none). `nf4_modules`: linears
    stored as their --qlora-nf4 does (bitsandbytes Params4bit defaults: NF4, blocks of 64, nested absmax).
    `expert_tp` 1: what their training saves with --expert-tensor-parallel-size 1 at TP > 1 (master's A2 template):
    megatron's ranks each save their own file, so the files are those of the ranks that exist, and every one holds
    its EP group's experts whole."""
    hf = read_all(hf_dir)
    n_real = cfg["num_hidden_layers"]
    num_layers = num_layers or n_real
    noop = sorted(noop_layers)
    real_ids = [i for i in range(num_layers) if i not in noop]
    hf_index = {g: h for h, g in enumerate(real_ids)}  # global layer id -> HF layer (noop layers have none)
    E = cfg["n_routed_experts"]
    groups = ep * (tp if tp_extend_ep else 1)
    stages = _stages(num_layers, pp, vpp, dualpipev)
    n_chunks = max(c for _, c, _ in stages) + 1
    last = (0, 1) if dualpipev else (pp - 1, n_chunks - 1)  # final norm, output layer and MTP live here
    mtp_stage = last if mtp_num_layers else None
    layer = _layer_extend if tp_extend_ep or expert_tp == 1 else _layer
    etp = tp if expert_tp is None or tp_extend_ep else expert_tp
    it_dir = os.path.join(save_dir, f"iter_{iteration:07d}")
    for r in range(pp):
        # megatron-core's numbering inside one pipeline stage: rank n has attention TP rank n % TP (order
        # tp-cp-dp-pp) and expert-parallel rank (n // expert-TP) % EP (expert order tp-ep-dp-pp). A world of
        # TP*EP ranks per stage holds every file that any world holds; the lowest rank with a name writes it.
        written = set()
        for n in range(tp * ep):
            k, x = n % tp, (n // etp) % ep
            if (k, x) in written:
                continue
            written.add((k, x))
            group = x * tp + k if tp_extend_ep else x
            local = list(range(group * (E // groups), (group + 1) * (E // groups)))
            state = {}
            for rr, c, ids in stages:
                if rr != r:
                    continue
                sd = {}
                if (r, c) == (0, 0) or (r, c) == mtp_stage:
                    sd["embedding.word_embeddings.weight"] = _tp(hf["model.embed_tokens.weight"], tp, k, 0)
                for j, g in enumerate(ids):
                    if g in noop:
                        continue  # noop slot: no weights, the local index is skipped
                    h = hf_index[g]
                    sd.update(layer(hf, h, f"decoder.layers.{j}.", tp, k, h < cfg["first_k_dense_replace"],
                                    local, grouped, mm_split, cfg))
                if (r, c) == last:
                    norm_key = "final_layernorm.weight" if mtp_num_layers else "decoder.final_layernorm.weight"
                    sd[norm_key] = hf["model.norm.weight"]
                    for m in range(mtp_num_layers):
                        h = n_real + m
                        p, q = f"model.layers.{h}.", f"mtp.layers.{m}."
                        sd[q + "enorm.weight"] = hf[p + "enorm.weight"]
                        sd[q + "hnorm.weight"] = hf[p + "hnorm.weight"]
                        sd[q + "eh_proj.weight"] = _tp(hf[p + "eh_proj.weight"], tp, k, 0)
                        sd.update(layer(hf, h, q + "transformer_layer.", tp, k, False, local, grouped,
                                        mm_split, cfg))
                        sd[f"mtp.final_layernorms.{m}.weight"] = hf[p + "shared_head.norm.weight"]
                    sd["output_layer.weight"] = _tp(hf["lm_head.weight"], tp, k, 0)
                if nf4_modules:
                    sd = _bnb_nf4(sd, nf4_modules)
                state["model" if n_chunks == 1 else f"model{c}"] = sd
            name = f"mp_rank_{k:02d}" + (f"_{r:03d}" if pp > 1 else "") + (f"_{x:03d}" if ep > 1 else "")
            state.update(checkpoint_version=3.0, iteration=iteration)
            if save_args is not None:
                state["args"] = save_args
            os.makedirs(os.path.join(it_dir, name), exist_ok=True)
            torch.save(state, os.path.join(it_dir, name, "model_optim_rng.pt"))
    with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))


def _layer_extend(hf, h, pre, tp, k, dense, local, grouped, mm_split, cfg):
    """--moe-tp-extend-ep or expert-TP 1: attention and dense/shared MLPs split over TP as usual, routed experts
    whole."""
    out = _layer(hf, h, pre, tp, k, dense, local, grouped, mm_split, cfg)
    if dense or grouped:
        return out
    whole = _layer(hf, h, pre, 1, 0, dense, local, grouped, mm_split, cfg)
    out.update({key: v for key, v in whole.items() if ".local_experts." in key})
    return out


def _bnb_nf4(sd, modules):
    """Their --qlora-nf4: each targeted weight becomes bitsandbytes' packed uint8 plus every entry of
    QuantState.as_dict(packed=True) under '<key>.<entry>' (quantized by bitsandbytes itself, on the CPU)."""
    import bitsandbytes.functional as F

    out = {}
    for key, w in sd.items():
        if key.endswith(".weight") and key.rsplit(".", 2)[-2] in modules:
            packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            out[key] = packed
            out.update({f"{key}.{k}": v for k, v in state.as_dict(packed=True).items()})
        else:
            out[key] = w
    return out
