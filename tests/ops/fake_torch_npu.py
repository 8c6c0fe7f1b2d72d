"""A stand-in for `torch_npu` at its API boundary: each operator implements its documented semantics in plain
torch (float64 inside) and records how it was called. Installed into sys.modules by the tests only."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

COMPRESSED = 2048


def make_fake_torch_npu():
    calls: list[tuple[str, dict]] = []
    mod = types.ModuleType("torch_npu")
    mod.calls = calls

    def _attn_core(q, k, v, scale, mask):  # q [n, sq, d], mask True = masked
        scores = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        return torch.matmul(torch.softmax(scores, -1), v.double())

    def _mask(sparse_mode, atten_mask, sq, sk, device):
        if sparse_mode == 3:  # rightDownCausal: compressed 2048x2048 upper-triangular mask required
            assert atten_mask is not None and atten_mask.shape == (COMPRESSED, COMPRESSED)
            assert atten_mask.dtype == torch.bool
            assert torch.equal(atten_mask, torch.ones(COMPRESSED, COMPRESSED, dtype=torch.bool).triu(1).to(device))
            return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(sk - sq + 1)
        assert sparse_mode == 0, f"fake supports sparse_mode 0 and 3, got {sparse_mode}"
        return atten_mask

    def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                             atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                             next_tockens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
                             actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False):
        calls.append(("npu_fusion_attention", dict(
            head_num=head_num, input_layout=input_layout, atten_mask=atten_mask, scale=scale, keep_prob=keep_prob,
            actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen, sparse_mode=sparse_mode,
            shapes=(tuple(query.shape), tuple(key.shape), tuple(value.shape)))))
        assert query.shape[-1] == key.shape[-1] == value.shape[-1], "one head dim for q, k, v"
        if input_layout == "SBH":
            sq, b, hq = query.shape
            sk = key.shape[0]
            d = hq // head_num
            q, k, v = (t.reshape(t.shape[0], b, head_num, d).permute(1, 2, 0, 3) for t in (query, key, value))
            mask = _mask(sparse_mode, atten_mask, sq, sk, query.device)
            out = _attn_core(q, k, v, scale, mask)  # [b, n, s, d]
            out = out.permute(2, 0, 1, 3).reshape(sq, b, hq)
        elif input_layout == "TND":
            assert isinstance(actual_seq_qlen, list) and all(isinstance(x, int) for x in actual_seq_qlen)
            assert actual_seq_qlen[-1] == query.shape[0], "actual_seq_qlen is cumulative and ends at T"
            starts = [0] + actual_seq_qlen[:-1]
            outs = []
            for a, e in zip(starts, actual_seq_qlen):
                q, k, v = (t[a:e].permute(1, 0, 2) for t in (query, key, value))  # [n, s, d]
                mask = _mask(sparse_mode, atten_mask, e - a, e - a, query.device)
                outs.append(_attn_core(q, k, v, scale, mask).permute(1, 0, 2))
            out = torch.cat(outs)
        else:
            raise AssertionError(f"fake does not model layout {input_layout}")
        return (out.to(query.dtype), None, None, None, 0, 0, 0)

    def npu_rms_norm(x, gamma, epsilon=1e-6):
        calls.append(("npu_rms_norm", dict(epsilon=epsilon)))
        rstd = torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + epsilon)
        return (x.double() * rstd * gamma.double()).to(x.dtype), rstd.float()

    def npu_rotary_mul(x, r1, r2):
        calls.append(("npu_rotary_mul", dict(x_shape=tuple(x.shape), r1_shape=tuple(r1.shape))))
        assert x.dim() == 4 and r1.dim() == 4 and r2.dim() == 4
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * r1 + rotated * r2

    def npu_swiglu(x, dim=-1):
        calls.append(("npu_swiglu", dict(dim=dim)))
        a, b = x.chunk(2, dim=dim)
        return F.silu(a) * b

    def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                           antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                           activation_quant_scale=None, activation_quant_offset=None, split_item=0,
                           group_type=-1, group_list_type=0, act_type=0, output_dtype=None):
        calls.append(("npu_grouped_matmul", dict(
            n_x=len(x), n_weight=len(weight), group_list=group_list, split_item=split_item,
            group_type=group_type, group_list_type=group_list_type)))
        assert isinstance(x, list) and isinstance(weight, list)
        sizes = [int(v) for v in (group_list.tolist() if torch.is_tensor(group_list) else group_list)]
        if group_list_type == 0:  # cumulative ends
            sizes = [e - s for s, e in zip([0] + sizes[:-1], sizes)]
        else:
            assert group_list_type == 1, group_list_type  # per-group counts
        if group_type == 0:  # split M of the single x; one weight per group; single y (split_item 2/3)
            assert len(x) == 1 and split_item in (2, 3) and len(weight) == len(sizes)
            parts = torch.split(x[0], sizes, dim=0)
            return [torch.cat([p @ w for p, w in zip(parts, weight)], dim=0)]
        if group_type == 2:  # split K: x [K, M] cols and weight [M, N] rows by group -> [E, K, N]
            assert len(x) == 1 and len(weight) == 1 and split_item in (2, 3)
            xs = torch.split(x[0], sizes, dim=1)
            ws = torch.split(weight[0], sizes, dim=0)
            return [torch.stack([a @ b for a, b in zip(xs, ws)])]
        raise AssertionError(f"fake does not model group_type {group_type}")

    def npu_moe_token_permute(tokens, indices, num_out_tokens=None, padded_mode=False):
        calls.append(("npu_moe_token_permute", dict(num_out_tokens=num_out_tokens, padded_mode=padded_mode)))
        topk = 1 if indices.dim() == 1 else indices.shape[1]
        first = torch.argsort(indices.reshape(-1), stable=True)
        sorted_out = torch.argsort(first, stable=True)
        out = tokens.new_zeros(indices.numel(), tokens.shape[1])
        # permute_tokens[sorted_out[i]] = tokens[i // topk]
        out = out.index_copy(0, sorted_out, tokens.repeat_interleave(topk, dim=0))
        return out, sorted_out.to(torch.int32)

    def npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
        calls.append(("npu_moe_token_unpermute", dict(
            sorted_dtype=sorted_indices.dtype, probs_dtype=None if probs is None else probs.dtype)))
        topk = 1 if probs is None else probs.shape[1]
        rows = permuted_tokens[sorted_indices.long()].view(-1, topk, permuted_tokens.shape[1])
        if probs is not None:
            rows = rows * probs.unsqueeze(-1)
        return rows.sum(1)

    for fn in (npu_fusion_attention, npu_rms_norm, npu_rotary_mul, npu_swiglu, npu_grouped_matmul,
               npu_moe_token_permute, npu_moe_token_unpermute):
        setattr(mod, fn.__name__, fn)
    return mod
