"""A stand-in for `torch_npu` at its API boundary, for tests on machines without an NPU.

Each operator has the signature of torch_npu 2.13.0's schema (tests/ops/torch_npu_schema.txt, checked by
tests/ops/test_npu_schema.py), implements the documented semantics in plain torch (float64 inside where it is
arithmetic), refuses what the documentation rules out for the arguments we pass (layouts, sparse_mode, head-dim
limits, group caps, dtypes, int64 group_list) and records each call.

`make_fake_torch_npu()` builds the operator module alone (op-level tests put it in sys.modules). `install()` turns
a whole process into an emulated NPU host for `MINDSPEED_DSV_DEVICE=npu-emulated`: torch_npu and
torch_npu.contrib.transfer_to_npu importable, a `torch.npu` namespace answering for the host, tensors reporting
`torch.npu.*Tensor` type names (as on hardware, where megatron's `torch.cuda.*Tensor` checks reject them), and
the emulated HCCL refusing float64 collectives (HCCL on Atlas A2/A3 has none).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import sys
import types

import torch
import torch.nn.functional as F

COMPRESSED = 2048
GMM_MAX_LIST = 128  # "列表最大长度为128": weight lists (and group_list with per-expert weights)
GMM_MAX_GROUPS = 1024  # "group_list第1维最大支持1024": one 3-D weight
FA_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32)


class NpuConstraintError(AssertionError):
    """The real operator would reject these arguments (its documentation says so)."""


def _require(ok, op, why):
    if not ok:
        raise NpuConstraintError(f"{op}: {why}")


def make_fake_torch_npu():
    calls: list[tuple[str, dict]] = []
    mod = types.ModuleType("torch_npu")
    mod.__version__ = "2.13.0+fake"
    mod.calls = calls
    mod.counts = lambda: collections.Counter(name for name, _ in calls)

    def _attn_core(q, k, v, scale, mask):  # q [n, sq, d], mask True = masked
        scores = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        return torch.matmul(torch.softmax(scores, -1), v.double())

    def _mask(sparse_mode, atten_mask, sq, sk, device):
        op = "npu_fusion_attention"
        if sparse_mode == 3:  # rightDownCausal: compressed 2048x2048 upper-triangular mask required
            _require(atten_mask is not None and atten_mask.shape == (COMPRESSED, COMPRESSED), op,
                     "sparse_mode=3 takes the compressed 2048x2048 mask")
            _require(atten_mask.dtype == torch.bool, op, "atten_mask must be bool")
            _require(torch.equal(atten_mask, torch.ones(COMPRESSED, COMPRESSED, dtype=torch.bool,
                                                        device=device).triu(1)), op,
                     "sparse_mode=3 mask must be triu(ones(2048, 2048), 1)")
            return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(sk - sq + 1)
        _require(sparse_mode == 0, op, f"the fake models sparse_mode 0 and 3, got {sparse_mode}")
        return atten_mask

    def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                             atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                             next_tockens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
                             actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
                             softmax_layout="", sink=None, dropout_mask=None, seed=0, offset=0):
        op = "npu_fusion_attention"
        calls.append((op, dict(
            head_num=head_num, input_layout=input_layout, atten_mask=atten_mask, scale=scale, keep_prob=keep_prob,
            actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen, sparse_mode=sparse_mode,
            shapes=(tuple(query.shape), tuple(key.shape), tuple(value.shape)), dtype=query.dtype)))
        _require(input_layout in FA_LAYOUTS, op, f"input_layout {input_layout!r} not in {FA_LAYOUTS}")
        _require(input_layout in ("SBH", "TND"), op, f"the fake models SBH and TND, got {input_layout}")
        _require(key.shape == value.shape, op, f"key {tuple(key.shape)} and value {tuple(value.shape)} must match")
        _require(query.dtype in FLOAT_TYPES and key.dtype == query.dtype == value.dtype, op,
                 f"q/k/v dtypes {query.dtype}/{key.dtype}/{value.dtype}")
        _require(isinstance(head_num, int), op, "head_num is an int")
        if input_layout == "SBH":
            sq, b, hq = query.shape
            sk = key.shape[0]
            d = hq // head_num
            _require(d * head_num == hq and 1 <= d <= 768, op, f"head dim {hq}/{head_num} must be 1..768")
            q, k, v = (t.reshape(t.shape[0], b, head_num, d).permute(1, 2, 0, 3) for t in (query, key, value))
            mask = _mask(sparse_mode, atten_mask, sq, sk, query.device)
            out = _attn_core(q, k, v, scale, mask)  # [b, n, s, d]
            out = out.permute(2, 0, 1, 3).reshape(sq, b, hq)
        else:  # TND
            _require(1 <= query.shape[-1] <= 768, op, "head dim 1..768")
            _require(isinstance(actual_seq_qlen, list) and all(isinstance(x, int) for x in actual_seq_qlen), op,
                     "TND needs actual_seq_qlen as a host list of ints")
            _require(actual_seq_qlen[-1] == query.shape[0], op, "actual_seq_qlen is cumulative and ends at T")
            starts = [0] + actual_seq_qlen[:-1]
            outs = []
            for a, e in zip(starts, actual_seq_qlen):
                q, k, v = (t[a:e].permute(1, 0, 2) for t in (query, key, value))  # [n, s, d]
                mask = _mask(sparse_mode, atten_mask, e - a, e - a, query.device)
                outs.append(_attn_core(q, k, v, scale, mask).permute(1, 0, 2))
            out = torch.cat(outs)
        return (out.to(query.dtype), None, None, None, 0, 0, 0)

    def npu_rms_norm(self, gamma, epsilon=1e-06):
        op = "npu_rms_norm"
        calls.append((op, dict(epsilon=epsilon)))
        _require(self.dtype in FLOAT_TYPES and gamma.dtype == self.dtype, op,
                 f"self {self.dtype} and gamma {gamma.dtype}: one of fp16/bf16/fp32, the same")
        x = self
        rstd = torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + epsilon)
        return (x.double() * rstd * gamma.double()).to(x.dtype), rstd.float()

    def npu_rotary_mul(self, r1, r2, rotary_mode="half", rotate=None):
        op = "npu_rotary_mul"
        x = self
        calls.append((op, dict(x_shape=tuple(x.shape), r1_shape=tuple(r1.shape), rotary_mode=rotary_mode)))
        _require(x.dim() == 4 and r1.dim() == 4 and r2.dim() == 4 and r1.shape == r2.shape, op, "4-D input, r1, r2")
        _require(rotary_mode == "half" and rotate is None, op, "the fake models rotary_mode='half' without rotate")
        _require(x.dtype in FLOAT_TYPES and r1.dtype == x.dtype == r2.dtype, op, "one float dtype for x, r1, r2")
        d = x.shape[-1]
        _require(d < 896 and d % 2 == 0, op, f"D={d} must be even and < 896")
        # r1's broadcast pattern must be one the kernel documents for some layout of x (SBND, BSND or BNSD)
        s0, s1, s2, _ = x.shape
        patterns = ((s0, 1, 1), (s0, s1, 1), (s0, s1, s2), (1, s1, 1), (1, 1, s2), (s0, 1, s2))
        _require(tuple(r1.shape[:3]) in patterns and r1.shape[-1] == d, op,
                 f"r1 {tuple(r1.shape)} is no documented broadcast of x {tuple(x.shape)} (S11D, SB1D, SBND, ...)")
        half = d // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * r1 + rotated * r2

    def npu_swiglu(self, dim=-1):
        op = "npu_swiglu"
        calls.append((op, dict(dim=dim)))
        _require(self.dtype in FLOAT_TYPES and self.shape[dim] % 2 == 0, op, "fp32/fp16/bf16, even split dim")
        a, b = self.chunk(2, dim=dim)
        return F.silu(a) * b

    def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                           antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                           activation_quant_scale=None, activation_quant_offset=None, split_item=0,
                           group_type=None, group_list_type=0, act_type=0, tuning_config=None, output_dtype=None,
                           x_dtype=None, weight_dtype=None, scale_dtype=None, per_token_scale_dtype=None):
        op = "npu_grouped_matmul"
        calls.append((op, dict(
            n_x=len(x), n_weight=len(weight), weight_dims=[w.dim() for w in weight], group_list=group_list,
            split_item=split_item, group_type=group_type, group_list_type=group_list_type)))
        _require(isinstance(x, list) and isinstance(weight, list), op, "x and weight are lists")
        _require(len(x) <= GMM_MAX_LIST and len(weight) <= GMM_MAX_LIST, op, "lists hold at most 128 tensors")
        _require(torch.is_tensor(group_list) and group_list.dtype == torch.int64 and group_list.dim() == 1, op,
                 f"group_list must be a 1-D int64 tensor, got {getattr(group_list, 'dtype', type(group_list))}")
        sizes = [int(v) for v in group_list.tolist()]
        if group_list_type == 0:  # cumulative ends
            sizes = [e - s for s, e in zip([0] + sizes[:-1], sizes)]
        else:
            _require(group_list_type == 1, op, f"group_list_type {group_list_type}")
        _require(all(s >= 0 for s in sizes), op, "counts are non-negative")
        dtypes = {t.dtype for t in (*x, *weight)}
        _require(len(dtypes) == 1 and dtypes <= set(FLOAT_TYPES), op, f"one float dtype, got {dtypes}")
        single = len(x) == 1 and len(weight) == 1 and split_item in (2, 3)
        _require(torch.float32 not in dtypes or single, op, "float32 only with single x, weight and y")
        if group_type == 0:  # split M of the single x
            _require(len(x) == 1 and split_item in (2, 3) and x[0].dim() == 2, op, "one 2-D x, split_item 2/3")
            _require(x[0].is_contiguous(), op, "x may not be transposed")
            _require(sum(sizes) == x[0].shape[0], op, f"counts sum {sum(sizes)} != x rows {x[0].shape[0]}")
            if len(weight) == 1 and weight[0].dim() == 3:  # one [E, K, N] weight (may be a transposed view)
                _require(len(sizes) <= GMM_MAX_GROUPS and weight[0].shape[0] == len(sizes), op,
                         f"{len(sizes)} groups for a weight of {weight[0].shape[0]} (max 1024)")
                ws = list(weight[0].unbind(0))
            else:  # a list of [K, N] weights: capped at 128 groups
                _require(all(w.dim() == 2 for w in weight) and len(weight) == len(sizes), op, "one weight per group")
                _require(len(sizes) <= GMM_MAX_LIST, op, "at most 128 groups with a weight list")
                ws = weight
            parts = torch.split(x[0], sizes, dim=0)
            return [torch.cat([(p.double() @ w.double()).to(p.dtype) for p, w in zip(parts, ws)], dim=0)]
        if group_type == 2:  # split K: x [K, M] cols and weight [M, N] rows by group -> [E, K, N]
            _require(len(x) == 1 and len(weight) == 1 and split_item in (2, 3), op, "single x / weight for K split")
            _require(len(sizes) <= GMM_MAX_GROUPS, op, "at most 1024 groups")
            _require(sum(sizes) == x[0].shape[1] == weight[0].shape[0], op, "counts cover the K axis")
            xs = torch.split(x[0], sizes, dim=1)
            ws = torch.split(weight[0], sizes, dim=0)
            return [torch.stack([(a.double() @ b.double()).to(a.dtype) for a, b in zip(xs, ws)])]
        raise NpuConstraintError(f"{op}: the fake does not model group_type {group_type}")

    def npu_moe_token_permute(tokens, indices, num_out_tokens=None, padded_mode=False):
        op = "npu_moe_token_permute"
        calls.append((op, dict(num_out_tokens=num_out_tokens, padded_mode=padded_mode)))
        _require(tokens.dtype == torch.bfloat16 and tokens.dim() == 2, op,
                 f"tokens must be 2-D bfloat16 (this version), got {tokens.dtype} {tuple(tokens.shape)}")
        _require(indices.dtype == torch.int64 and indices.dim() in (1, 2), op, f"indices int64, got {indices.dtype}")
        _require(not padded_mode, op, "padded_mode must be False")
        topk = 1 if indices.dim() == 1 else indices.shape[1]
        _require(topk <= 512, op, "topK <= 512")
        first = torch.argsort(indices.reshape(-1), stable=True)
        sorted_out = torch.argsort(first, stable=True)
        out = tokens.new_zeros(indices.numel(), tokens.shape[1])
        # permute_tokens[sorted_out[i]] = tokens[i // topk]
        out = out.index_copy(0, sorted_out, tokens.repeat_interleave(topk, dim=0))
        return out, sorted_out.to(torch.int32)

    def npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
        op = "npu_moe_token_unpermute"
        calls.append((op, dict(
            sorted_dtype=sorted_indices.dtype, probs_dtype=None if probs is None else probs.dtype)))
        _require(permuted_tokens.dtype == torch.bfloat16, op, f"permuted_tokens bf16, got {permuted_tokens.dtype}")
        _require(probs is None or probs.dtype == torch.bfloat16, op, f"probs bf16, got {probs.dtype}")
        _require(sorted_indices.dtype in (torch.int32, torch.int64), op, "sorted_indices int32/int64")
        _require(not padded_mode, op, "padded_mode must be False")
        topk = 1 if probs is None else probs.shape[1]
        rows = permuted_tokens[sorted_indices.long()].view(-1, topk, permuted_tokens.shape[1])
        if probs is not None:
            rows = rows * probs.unsqueeze(-1)
        return rows.sum(1)

    mod.ops = (npu_fusion_attention, npu_rms_norm, npu_rotary_mul, npu_swiglu, npu_grouped_matmul,
               npu_moe_token_permute, npu_moe_token_unpermute)
    for fn in mod.ops:
        setattr(mod, fn.__name__, fn)
    return mod


# ---------------------------------------------------------------------------------------------------------------
# A whole process as an emulated NPU host.


class _NpuOnHost(types.SimpleNamespace):
    """`torch.npu` for tensors that live in host memory: what the device layer asks of it."""

    def is_available(self):
        return True

    def current_device(self):
        return 0

    def set_device(self, index):
        self.device_index = index

    def device_count(self):
        return 1

    def synchronize(self, *args):
        pass

    def manual_seed_all(self, seed):
        torch.manual_seed(seed)

    def max_memory_allocated(self, *args):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def reset_peak_memory_stats(self, *args):
        pass

    def memory_allocated(self, *args):
        return 0

    def get_device_name(self, *args):
        return "Ascend (emulated on host)"


def _npu_type_name(original):
    """Tensor.type() as on hardware: 'torch.npu.FloatTensor' instead of 'torch.FloatTensor'."""

    @functools.wraps(original)
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            return name.replace("torch.", "torch.npu.", 1) if name.count(".") == 1 else name
        return original(self, dtype, non_blocking, **kwargs)

    return type_


# torch.distributed collectives whose tensors HCCL must support; the first tensor argument (or list) is checked.
HCCL_COLLECTIVES = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "_all_gather_base",
                    "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all",
                    "all_to_all_single")


class HcclDtypeError(RuntimeError):
    """HCCL on Atlas A2/A3 would refuse this collective ("HCCL allreduce: Unsupported data type")."""


def _tensors(value):
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _hccl_checked(name, fn, counter):
    @functools.wraps(fn)
    def collective(*args, **kwargs):
        for t in _tensors(list(args[:2]) + [v for k, v in kwargs.items() if "tensor" in k or k == "output"]):
            if t.dtype in (torch.float64, torch.complex64, torch.complex128):
                raise HcclDtypeError(f"emulated HCCL: {name} of a {t.dtype} tensor {tuple(t.shape)}; HCCL on "
                                     "Atlas A2/A3 supports int8/16/32/64, fp16, bf16, fp32")
        counter[name] += 1
        return fn(*args, **kwargs)

    return collective


def _batch_checked(fn, counter):
    @functools.wraps(fn)
    def batch_isend_irecv(p2p_op_list):
        for p2p in p2p_op_list:
            if p2p.tensor.dtype == torch.float64:
                raise HcclDtypeError(f"emulated HCCL: send/recv of a float64 tensor {tuple(p2p.tensor.shape)}")
        counter["batch_isend_irecv"] += 1
        return fn(p2p_op_list)

    return batch_isend_irecv


def install():
    """Make this process an emulated NPU host (call before megatron is imported); returns the fake torch_npu."""
    fake = make_fake_torch_npu()
    contrib = types.ModuleType("torch_npu.contrib")
    transfer = types.ModuleType("torch_npu.contrib.transfer_to_npu")  # on hardware: torch.cuda -> torch.npu
    fake.contrib, contrib.transfer_to_npu = contrib, transfer
    sys.modules.update({"torch_npu": fake, "torch_npu.contrib": contrib, "torch_npu.contrib.transfer_to_npu": transfer})
    torch.npu = _NpuOnHost()
    torch.Tensor.type = _npu_type_name(torch.Tensor.type)
    fake.collectives = collections.Counter()
    import torch.distributed as dist

    for name in HCCL_COLLECTIVES:
        setattr(dist, name, _hccl_checked(name, getattr(dist, name), fake.collectives))
    dist.batch_isend_irecv = _batch_checked(dist.batch_isend_irecv, fake.collectives)
    return fake


@contextlib.contextmanager
def npu_type_names():
    """Within the block, tensors report torch.npu.* type names (unit tests of the type shims)."""
    original = torch.Tensor.type
    torch.Tensor.type = _npu_type_name(original)
    try:
        yield
    finally:
        torch.Tensor.type = original
