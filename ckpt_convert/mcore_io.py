"""Megatron-Core (MindSpeed-compatible) checkpoint files: paths, the per-rank record, and a reader that serves
HF-named full tensors out of a sharded checkpoint (used by mcore2hf and reshard).

Layout on disk::

    SAVE/latest_checkpointed_iteration.txt      "1"
    SAVE/layout.json                            the ParallelLayout record (mindspeed_dsv.layout)
    SAVE/config.json (+ tokenizer files)        copied from the HF directory
    SAVE/convert.json                           where it came from (source dir, dtype, flags)
    SAVE/iter_0000001/mp_rank_XX[_YYY][_ZZZ]/model_optim_rng.pt
        {'model' | 'model0', 'model1', ...: {megatron name: tensor},
         'checkpoint_version': 3.0, 'iteration': 1, 'args': argparse.Namespace(...)}
    SAVE/iter_0000001/checksums.json            {"sha256": {"mp_rank_00/model_optim_rng.pt": hex digest, ...}}

Writes never leave the tracker pointing at a missing or half-written iteration: the iteration is written under
a temporary name (`iter_N.tmp`, `iter_N.partial-PID`), fsynced and renamed (swapped in atomically where the
iteration already exists), then the tracker moves (temporary file, fsync, rename), then what is replaced goes.
Temporaries an interrupted save left behind are removed by the next save into the same directory.
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import torch

from mindspeed_dsv.files import fsync_path, write_json_atomic
from mindspeed_dsv.layout import ParallelLayout
from mindspeed_dsv.models import family
from mindspeed_dsv.models import names as nm
# The format itself lives where training can import it too (mindspeed_dsv.rankfiles); re-exported here.
from mindspeed_dsv.rankfiles import (CHECKSUMS, CKPT_FILE, TRACKER, McoreCheckpointError,  # noqa: F401
                                     checkpoint_contents, clean_stale_temporaries, iter_dir_name, load_rank_file,
                                     read_iteration, verify_file, verify_iteration, write_checksums, write_tracker)

RECORD = "convert.json"


def rank_file(root: str, layout: ParallelLayout, tp: int, pp: int, ep: int, iteration: int | str = 1) -> str:
    return os.path.join(root, iter_dir_name(iteration), layout.rank_dir_name(tp, pp, ep), CKPT_FILE)


def all_ranks(layout: ParallelLayout) -> list[tuple[int, int, int]]:
    """(tp, pp, ep) of every rank file, pipeline-major so one stage's files are written/read together (at
    expert-TP 1 not the whole TP x EP grid: ParallelLayout.rank_files)."""
    return layout.rank_files()


def args_record(cfg: dict, layout: ParallelLayout, params_dtype: str, mla_mm_split: bool, qlora_nf4: bool = False
                ) -> argparse.Namespace:
    """The `args` of a Megatron checkpoint: what MindSpeed/Megatron look at on load, plus our layout."""
    if family.family_of(cfg) == family.DEEPSEEK4:
        return _v4_args_record(cfg, layout, params_dtype)
    d = nm.dims(cfg)
    return argparse.Namespace(
        expert_tensor_parallel_size=layout.expert_tp,
        noop_layers=",".join(map(str, layout.noop_layers)) or None,
        first_k_dense_replace=layout.first_k_dense_replace,
        num_experts=d.n_routed_experts or None,
        moe_grouped_gemm=layout.moe_grouped_gemm,
        moe_tp_extend_ep=layout.moe_tp_extend_ep,
        mla_mm_split=mla_mm_split,
        qlora_nf4=qlora_nf4,
        multi_latent_attention=True,
        hidden_size=d.hidden_size,
        ffn_hidden_size=d.intermediate_size,
        moe_ffn_hidden_size=d.moe_intermediate_size,
        num_attention_heads=d.num_attention_heads,
        q_lora_rank=d.q_lora_rank,
        kv_lora_rank=d.kv_lora_rank,
        qk_head_dim=d.qk_nope_head_dim,
        qk_pos_emb_head_dim=d.qk_rope_head_dim,
        v_head_dim=d.v_head_dim,
        vocab_size=d.vocab_size,
        padded_vocab_size=layout.padded_vocab_size(d.vocab_size),
        make_vocab_size_divisible_by=layout.make_vocab_size_divisible_by,
        **_common_record(layout, params_dtype),
    )


def _common_record(layout: ParallelLayout, params_dtype: str) -> dict:
    """The `args` entries both families record alike: the layout and the format."""
    return dict(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        num_layers_per_virtual_pipeline_stage=layout.vpp,
        num_layer_list=None if layout.num_layer_list is None else ",".join(map(str, layout.num_layer_list)),
        schedules_method="dualpipev" if layout.dualpipev else None,
        num_layers=layout.num_layers,
        mtp_num_layers=layout.mtp_num_layers,
        params_dtype=params_dtype,
        bf16=params_dtype == "bf16",
        fp16=params_dtype == "fp16",
        use_mcore_models=True,
        ckpt_format="torch",
        iteration=1,
    )


def _v4_args_record(cfg: dict, layout: ParallelLayout, params_dtype: str) -> argparse.Namespace:
    """DeepSeek-V4's `args`: the layout and the model sizes (no MLA, no dense layers, no vocabulary padding)."""
    d = family.model_config(cfg)
    return argparse.Namespace(
        model_family=family.DEEPSEEK4,
        num_experts=d.n_routed_experts,
        hidden_size=d.hidden_size,
        ffn_hidden_size=d.moe_intermediate_size,
        moe_ffn_hidden_size=d.moe_intermediate_size,
        num_attention_heads=d.num_attention_heads,
        kv_channels=d.head_dim,
        q_lora_rank=d.q_lora_rank,
        vocab_size=d.vocab_size,
        padded_vocab_size=d.vocab_size,
        **_common_record(layout, params_dtype),
    )


def save_rank_file(path: str, chunks: dict[str, dict[str, torch.Tensor]], args: argparse.Namespace,
                   iteration: int = 1) -> int:
    """torch.save through a temporary name, fsynced. Returns bytes of tensor data written."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = dict(chunks)
    state.update(checkpoint_version=3.0, iteration=iteration, args=args)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    return sum(_nbytes(t) for c in chunks.values() for t in c.values())


def _nbytes(value) -> int:
    if isinstance(value, dict):  # an NF4 entry (--qlora-nf4)
        return sum(_nbytes(v) for v in value.values())
    return value.numel() * value.element_size() if torch.is_tensor(value) else 0


def dense(value) -> torch.Tensor:
    """A rank-file entry as a tensor: NF4 entries (a dict, NF4Tensor.state_dict()) are dequantized to their
    original dtype; tensors are returned as they are."""
    if isinstance(value, dict):
        from mindspeed_dsv.peft.nf4 import NF4Tensor, dequantize_nf4

        return dequantize_nf4(NF4Tensor.from_state_dict(value), backend="torch")
    return value


def dense_state(sd: dict) -> dict:
    return {k: dense(v) for k, v in sd.items()}


class McoreReader:
    """Serves full HF-named tensors from a sharded Megatron checkpoint: gathers the TP shards of the entry
    that holds the name (names.rank_maps), optionally merges LoRA per rank, and unshards (names.unshard).

    Rank files are memory-mapped (torch.load(mmap=True)); only the entry being converted is materialised, plus a
    small cache of the HF tensors of the current layer (a GLU entry yields gate and up together)."""

    def __init__(self, load_dir: str, layout: ParallelLayout, cfg: dict, mla_mm_split: bool = False,
                 lora_dir: str | None = None, lora_alpha: float | None = None, lora_r: int | None = None,
                 merge_lora_in_base: bool = True, verify_checksums: bool = True,
                 lora_target_modules: list[str] | None = None):
        self.dir = load_dir
        self.verify_checksums = verify_checksums
        self._verified: set[str] = set()  # hashed once, however often the LRU below reloads a file
        self.layout = layout
        self.cfg = cfg
        # Each directory has its own latest iteration (adapters are saved at the training step, the base at 1).
        self.iterations = {load_dir: read_iteration(load_dir)}
        if lora_dir is not None:
            self.iterations[lora_dir] = read_iteration(lora_dir)
        self.iteration = self.iterations[load_dir]
        self.lora_dir = lora_dir
        self.lora_alpha, self.lora_r = lora_alpha, lora_r
        self.lora_target_modules = set(lora_target_modules) if lora_target_modules else None  # None: all
        self.merge_lora_in_base = merge_lora_in_base
        self._mm_split = mla_mm_split
        # HF name -> list of (tp, pp, ep, chunk key, TensorMap); the first stage holding it wins
        self.entries: dict[str, list] = {}
        self.copies: dict[str, list] = {}  # key -> (tp, pp, ep, chunk key, TensorMap) of the other stages' copies
        for tp, pp, ep in all_ranks(layout):
            for c in range(layout.num_model_chunks):
                ck = nm.chunk_key(layout, c)
                for m in family.rank_maps(cfg, layout, tp, pp, ep, c, mla_mm_split):
                    key = m.hf[0] if m.split != nm.HEAD_PART else f"{m.hf[0]}#{m.head_part[2]}"
                    owner = self.entries.setdefault(key, [])
                    if owner and (owner[0][1], owner[0][3]) != (pp, ck):
                        # the embedding's second copy on the MTP stage: same values (check_embedding_copies)
                        self.copies.setdefault(key, []).append((tp, pp, ep, ck, m))
                        continue
                    owner.append((tp, pp, ep, ck, m))
        self.hf_of_name = {}
        for key, lst in self.entries.items():
            for h in lst[0][4].hf:
                self.hf_of_name.setdefault(h, key)
        self._files: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._cache: dict[str, torch.Tensor] = {}
        self._cache_layer = object()
        self.lora_used: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ files
    def _file(self, root: str, tp: int, pp: int, ep: int) -> dict:
        path = rank_file(root, self.layout, tp, pp, ep, self.iterations[root])
        f = self._files.get(path)
        if f is None:
            f = self._load(path, tp, pp, ep)
            self._files[path] = f
            while len(self._files) > max(8, 2 * self.layout.tp * self.layout.ep):
                self._files.popitem(last=False)
        else:
            self._files.move_to_end(path)
        return f

    def _load(self, path: str, tp: int, pp: int, ep: int) -> dict:
        """One rank file's state as served to the name map (a subclass may rename what it reads)."""
        state = load_rank_file(path, verify=self.verify_checksums and path not in self._verified)
        self._verified.add(path)
        return state

    def _chunk(self, root: str, tp: int, pp: int, ep: int, ck: str) -> dict:
        state = self._file(root, tp, pp, ep)
        if ck not in state:
            raise McoreCheckpointError(f"{rank_file(root, self.layout, tp, pp, ep, self.iterations[root])}: no '{ck}' "
                                       f"entry (keys {sorted(k for k in state if k.startswith('model'))}); "
                                       "the checkpoint's VPP/dualpipev layout differs from layout.json")
        return state[ck]

    def rank_tensor(self, tp, pp, ep, ck, m: nm.TensorMap) -> torch.Tensor:
        sd = self._chunk(self.dir, tp, pp, ep, ck)
        if m.mcore not in sd:
            raise McoreCheckpointError(
                f"{rank_file(self.dir, self.layout, tp, pp, ep, self.iteration)} [{ck}]: missing tensor {m.mcore} "
                f"(HF {m.hf[0]})")
        w = dense(sd[m.mcore])  # QLoRA NF4 base: LoRA merges into the dequantized weight
        if m.lora_module is not None:
            w = self._merge_lora(w, tp, pp, ep, ck, m, sd)
        return w

    def _merge_lora(self, w, tp, pp, ep, ck, m, base_sd):
        from ckpt_convert.lora import merge_lora_weight

        a_key, b_key = m.lora_module + ".lora_A.weight", m.lora_module + ".lora_B.weight"
        if self.lora_dir is not None:
            sd = self._chunk(self.lora_dir, tp, pp, ep, ck)
        elif self.merge_lora_in_base:
            sd = base_sd
        else:
            return w
        if a_key not in sd and b_key not in sd:
            return w
        if self.lora_target_modules is not None and m.lora_module.rsplit(".", 1)[-1] not in self.lora_target_modules:
            return w
        if a_key not in sd or b_key not in sd:
            raise McoreCheckpointError(f"LoRA for {m.lora_module}: only one of lora_A/lora_B is present")
        if self.lora_alpha is None or self.lora_r is None:
            raise McoreCheckpointError(f"the checkpoint has LoRA weights ({a_key}); give --lora-r and --lora-alpha")
        rank = sd[a_key].shape[0]
        if rank != self.lora_r:
            where = rank_file(self.lora_dir or self.dir, self.layout, tp, pp, ep,
                              self.iterations[self.lora_dir or self.dir])
            raise McoreCheckpointError(f"{where} [{ck}]: {a_key} has LoRA rank {rank} (shape "
                                       f"{list(sd[a_key].shape)}) but --lora-r is {self.lora_r}; pass --lora-r "
                                       f"{rank}, the rank the adapters were trained with")
        self.lora_used.add((f"{tp},{pp},{ep},{ck}", m.lora_module))
        return merge_lora_weight(w, sd[a_key], sd[b_key], self.lora_alpha, self.lora_r)

    def check_embedding_copies(self) -> None:
        """The MTP stage's copy of the embedding must equal the first stage's bit for bit: the readers serve
        the first stage's, so a differing copy would be dropped silently. Raises McoreCheckpointError naming
        both rank files and the first differing row."""
        for key, copies in self.copies.items():
            owner = {(tp, ep): (pp, ck) for tp, pp, ep, ck, _ in self.entries[key]}
            for tp, pp, ep, ck, m in copies:
                if (tp, ep) not in owner:
                    continue
                mpp, mck = owner[(tp, ep)]
                a = dense(self._chunk(self.dir, tp, mpp, ep, mck)[m.mcore])
                b = dense(self._chunk(self.dir, tp, pp, ep, ck)[m.mcore])
                if a.shape != b.shape or not torch.equal(a, b):
                    row = "shape" if a.shape != b.shape else \
                        f"row {int((a != b).reshape(a.shape[0], -1).any(1).nonzero()[0, 0])}"
                    raise McoreCheckpointError(
                        f"{rank_file(self.dir, self.layout, tp, pp, ep, self.iteration)} [{ck}]: {m.mcore} (the MTP "
                        f"stage's copy of the embedding) differs from the one of "
                        f"{rank_file(self.dir, self.layout, tp, mpp, ep, self.iteration)} [{mck}] (first at {row}); "
                        "training keeps the two equal, so the checkpoint is inconsistent")

    def adapter_only(self) -> bool:
        """True when the rank files record lora_only (training's --lora-ckpt-filter): adapters, no base weights."""
        return bool(self._file(self.dir, 0, 0, 0).get("lora_only"))

    # ------------------------------------------------------------------ HF view
    def names(self) -> list[str]:
        return list(self.hf_of_name)

    def __contains__(self, name: str) -> bool:
        return name in self.hf_of_name

    def _entry_tensors(self, first: str) -> dict[str, torch.Tensor]:
        owner = self.entries[first]
        m0 = owner[0][4]
        # one member per TP shard, from the lowest ep rank holding it (non-expert tensors repeat on every ep rank
        # file; at expert-TP 1 a TP rank's files need not include ep rank 0)
        by_shard = {}
        for o in sorted(owner, key=lambda o: (o[2], o[0])):
            by_shard.setdefault(o[4].tp_rank, o)
        members = [by_shard[r] for r in sorted(by_shard)]
        shards = [self.rank_tensor(tp, pp, ep, ck, m) for tp, pp, ep, ck, m in members]
        return nm.unshard(m0, shards)

    def read_full(self, name: str) -> torch.Tensor:
        if name not in self.hf_of_name:
            raise McoreCheckpointError(f"{self.dir}: no tensor of this layout maps to HF {name}")
        first = self.hf_of_name[name]
        m0 = self.entries[first][0][4]
        if m0.hf_layer != self._cache_layer:
            self._cache = {}
            self._cache_layer = m0.hf_layer
        if name not in self._cache:
            if m0.split == nm.HEAD_PART:
                parts = {}
                for key, lst in self.entries.items():
                    mm = lst[0][4]
                    if mm.split == nm.HEAD_PART and mm.hf[0] == name:
                        parts[mm.head_part[2]] = self._entry_tensors(key)[name]
                self._cache[name] = nm.merge_head_parts(m0.head_part, parts)
            else:
                self._cache.update(self._entry_tensors(first))
        return self._cache[name]

    def shape(self, name: str) -> list[int]:
        return list(self.read_full(name).shape)

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        t = self.read_full(name)
        if rows is not None:
            t = t[rows]
        if cols is not None:
            t = t[:, cols]
        return t.contiguous()

    def unexpected_keys(self, lora_prefixes: bool = True) -> list[str]:
        """Tensors in the rank files that no map entry consumes (LoRA keys excepted): a layout/model mismatch."""
        out = []
        for tp, pp, ep in all_ranks(self.layout):
            state = self._file(self.dir, tp, pp, ep)
            for c in range(self.layout.num_model_chunks):
                ck = nm.chunk_key(self.layout, c)
                want = {m.mcore for m in family.rank_maps(self.cfg, self.layout, tp, pp, ep, c, self._mm_split)}
                for k in state.get(ck, {}):
                    if k in want or k.endswith("_extra_state") or (lora_prefixes and ".lora_" in k):
                        continue
                    out.append(f"{self.layout.rank_dir_name(tp, pp, ep)}[{ck}]: {k}")
        return out

    def close(self) -> None:
        self._files.clear()
        self._cache = {}


def write_record(save_dir: str, record: dict) -> None:
    write_json_atomic(os.path.join(save_dir, RECORD), record, default=str)


def read_record(load_dir: str) -> dict:
    path = os.path.join(load_dir, RECORD)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)
