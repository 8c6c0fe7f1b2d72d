"""What the converters do differently for DeepSeek-V4 (everything else is the V3 machinery: rank files, atomic
writes, checksums, streaming one rank file at a time).

* Reading: the rank maps (models/deepseek4/stages.py) ask for transformers' names with routed experts per expert.
  A transformers-spelled directory is read by hf_io.HFReader as it is (stacked experts are served per expert;
  `weight_scale_inv` FP8 is dequantized). The official release's spelling (`layers.N.attn.wq_a.weight`,
  `ffn.experts.E.w1.weight`, block scales in `<name>.scale`) is read through `OfficialV4Reader`, which renames
  and dequantizes on the fly: FP8 e4m3 with 128x128 ue8m0 scales, FP4 e2m1 experts with 1x32 scales. MTP depth K
  (the release's `mtp.K.*`) is served as our transformers-side `model.mtp.K.*`.
* Writing: mcore2hf writes the spelling the checkpoint was converted from (`hf_spelling` in convert.json;
  the official one when none is recorded), routed experts restacked per layer (`to_spelling`).
* verify: `mcore_logits` (ours, main head and MTP depths) against `hf_logits` (transformers, and the release's
  MTPBlock math around transformers' modules for the depths transformers does not build).
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch

from ckpt_convert import hf_io
from ckpt_convert.fp8 import BLOCK, dequantize_block_fp8, dequantize_fp4
from mindspeed_dsv.models import family
from mindspeed_dsv.models.deepseek4.names import (_OFFICIAL_GLOBAL, _OFFICIAL_LAYER, _OFFICIAL_MTP,
                                                 is_official_spelling, transformers_to_official)

OFFICIAL, TRANSFORMERS = "official", "transformers"
_EXPERT_WEIGHTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def is_v4(cfg: dict) -> bool:
    return family.family_of(cfg) == family.DEEPSEEK4


def spelling_of(directory: str) -> str:
    names = hf_io.HFReader(directory, verify_checksums=False).file_of
    return OFFICIAL if is_official_spelling(names) else TRANSFORMERS


def canonical_name(official: str) -> str | None:
    """The name the rank maps use for an official-release tensor (None: not a V4 tensor name). MTP depth K
    (`mtp.K.*`: a decoder layer spelled as `layers.N.*` plus its own enorm/hnorm/e_proj/h_proj/norm/hc_head)
    becomes `model.mtp.K.*`."""
    if official in _OFFICIAL_GLOBAL:
        return _OFFICIAL_GLOBAL[official]
    parts = official.split(".", 2)
    if parts[0] not in ("layers", "mtp") or len(parts) < 3 or not parts[1].isdigit():
        return None
    head, rest = f"model.{parts[0]}.{parts[1]}.", parts[2]
    if rest.startswith("ffn.experts."):
        e, w = rest[len("ffn.experts."):].split(".", 1)
        if e.isdigit() and w.endswith(".weight") and w[:-len(".weight")] in _EXPERT_WEIGHTS:
            return f"{head}mlp.experts.{e}.{_EXPERT_WEIGHTS[w[:-len('.weight')]]}.weight"
        return None
    if parts[0] == "mtp" and rest in _OFFICIAL_MTP:
        return head + _OFFICIAL_MTP[rest]
    return head + _OFFICIAL_LAYER[rest] if rest in _OFFICIAL_LAYER else None


class OfficialV4Reader:
    """The official release's directory, served under the rank maps' names; quantized weights dequantized to
    `fp8_dtype` on read (the whole tensor, then the rows/columns asked for)."""

    def __init__(self, directory: str, fp8_dtype: torch.dtype = torch.bfloat16, verify_checksums: bool = True):
        self.raw = hf_io.HFReader(directory, fp8_dtype=fp8_dtype, verify_checksums=verify_checksums)
        self.dir, self.fp8_dtype = directory, fp8_dtype
        files = self.raw.file_of
        self._src: dict[str, str] = {}
        for name in files:
            if name.endswith(".scale") and name[:-len("scale")] + "weight" in files:
                continue  # part of its weight
            self._src[canonical_name(name) or name] = name

    def _scale_of(self, src: str) -> str | None:
        scale = src[:-len("weight")] + "scale" if src.endswith(".weight") else None
        return scale if scale in self.raw.file_of else None

    def names(self) -> list[str]:
        return list(self._src)

    def __contains__(self, name: str) -> bool:
        return name in self._src

    def _src_of(self, name: str) -> str:
        if name not in self._src:
            raise hf_io.HFCheckpointError(f"{self.dir}: tensor {name} is missing")
        return self._src[name]

    def shape(self, name: str) -> list[int]:
        src = self._src_of(name)
        shape = self.raw.shape(src)
        if self._scale_of(src) and self.raw._raw_dtype(src) == "I8":  # FP4: two values per byte
            shape = shape[:-1] + [2 * shape[-1]]
        return shape

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        src = self._src_of(name)
        scale = self._scale_of(src)
        if scale is None:
            return self.raw.read(src, rows, cols)
        q = self.raw._handle(src).get_tensor(src)
        s = self.raw._handle(scale).get_tensor(scale)
        try:
            if q.dtype == torch.int8:
                w = dequantize_fp4(q, s, self.fp8_dtype)
            elif q.dtype == torch.float8_e4m3fn:
                w = dequantize_block_fp8(q, s, self.fp8_dtype, BLOCK)
            else:
                raise ValueError(f"dtype {q.dtype} with a block scale: expected float8_e4m3fn or int8 (FP4)")
        except ValueError as e:
            raise hf_io.HFCheckpointError(f"{self.dir}: {src}: {e}") from None
        return w[rows or slice(None), cols or slice(None)].contiguous()

    def close(self) -> None:
        self.raw.close()


def hf_reader(directory: str, fp8_dtype: torch.dtype, verify_checksums: bool):
    """The reader for a V4 HF directory of either spelling."""
    if spelling_of(directory) == OFFICIAL:
        return OfficialV4Reader(directory, fp8_dtype, verify_checksums)
    return hf_io.HFReader(directory, fp8_dtype=fp8_dtype, verify_checksums=verify_checksums)


@lru_cache(maxsize=4)
def _hf_shapes(cfg_json: str) -> dict[str, tuple[int, ...]]:
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    hf = json.loads(cfg_json)
    config = DeepseekV4Config(**{k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(config)
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            prefix = name.rsplit(".", 1)[0]
            e, a, b = t.shape
            parts = ("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",)
            for k in range(e):
                for p in parts:
                    out[f"{prefix}.{k}.{p}.weight"] = (a // len(parts), b)
        else:
            out[name] = tuple(t.shape)
    return out


def expected_hf_shape(cfg: dict, name: str) -> tuple[int, ...] | None:
    """The shape transformers' DeepseekV4ForCausalLM gives tensor `name` (rank-map names), built on the meta
    device from config.json. transformers has no MTP: an MTP depth's decoder-layer tensor has the shape of the
    same tensor of a main layer (it is a sliding, learned-routing layer), its hc_head and norm those of the
    model's, enorm/hnorm [D] and e_proj/h_proj [D, D]."""
    shapes = _hf_shapes(json.dumps(cfg, sort_keys=True))
    if not name.startswith("model.mtp."):
        return shapes.get(name)
    rest = name.split(".", 3)[3]
    d = int(cfg["hidden_size"])
    own = {"enorm.weight": (d,), "hnorm.weight": (d,), "e_proj.weight": (d, d), "h_proj.weight": (d, d),
           "norm.weight": shapes.get("model.norm.weight")}
    if rest in own:
        return own[rest]
    if rest.startswith("hc_head."):
        return shapes.get("model." + rest)
    return next((shapes[f"model.layers.{i}.{rest}"] for i in range(int(cfg["num_hidden_layers"]))
                 if f"model.layers.{i}.{rest}" in shapes), None)


def to_spelling(tensors: dict[str, torch.Tensor], spelling: str, cfg: dict) -> dict[str, torch.Tensor]:
    """One layer's (or the globals') tensors under the rank maps' names -> `spelling`: transformers' stacked
    experts (`mlp.experts.gate_up_proj` [E, 2I, D] = [gate_e; up_e], `mlp.experts.down_proj` [E, D, I]),
    or the official names (per-expert w1/w3/w2)."""
    out, experts = {}, {}
    for name, t in tensors.items():
        head, sep, tail = name.partition(".mlp.experts.")
        if sep and tail.split(".")[0].isdigit():
            e, part = tail.split(".")[:2]
            experts.setdefault(head, {})[(int(e), part)] = t
        else:
            out[name] = t
    for head, parts in experts.items():
        n = 1 + max(e for e, _ in parts)
        out[f"{head}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]], 0) for e in range(n)])
        out[f"{head}.mlp.experts.down_proj"] = torch.stack([parts[(e, "down_proj")] for e in range(n)])
    if spelling == OFFICIAL:
        return transformers_to_official(out, family.model_config(cfg))
    return out


def mcore_logits(mcore_dir: str, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """verify for V4: the checkpoint (any recorded layout) gathered whole through the same McoreReader that
    mcore2hf uses, loaded strictly into one DeepSeekV4Model (with the checkpoint's MTP layers) in this process,
    run on `tokens` -> logits [1 + mtp_num_layers, B, S, V] (float32): the main head's, then MTP depth k's
    (position t predicting token t + k + 2). The per-rank placement itself is what the rank maps / build_stage
    guarantee."""
    from ckpt_convert.mcore_io import McoreReader
    from mindspeed_dsv.layout import ParallelLayout
    from mindspeed_dsv.models.deepseek4 import DeepSeekV4Model, transformer_config
    from mindspeed_dsv.models.deepseek4.names import hf_to_mcore
    from mindspeed_dsv.platform import init_distributed

    init_distributed()
    cfg_dict = hf_io.read_config(mcore_dir)
    cfg = family.model_config(cfg_dict)
    layout = ParallelLayout.load(mcore_dir)
    depths = layout.mtp_num_layers or 0
    reader = McoreReader(mcore_dir, layout, cfg_dict)
    reader.check_embedding_copies()
    hf = to_spelling({n: reader.read_full(n) for n in reader.names()}, TRANSFORMERS, cfg_dict)
    reader.close()
    model = DeepSeekV4Model(cfg, transformer_config(cfg, params_dtype=dtype, mtp_num_layers=depths),
                            mtp_num_layers=depths).to(dtype).eval()
    missing, unexpected = model.load_state_dict(hf_to_mcore(hf, cfg, depths), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"{mcore_dir}: the checkpoint does not fill the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        streams = model.decode(tokens)
        heads = [model.final_layernorm(model.hc_head(streams))]
        if depths:
            heads += model.mtp(streams, tokens, model.embedding)
        return torch.stack([model.output_layer(h)[0].float() for h in heads])


def hf_logits(hf_dir: str, tokens: torch.Tensor, dtype: torch.dtype, mtp_num_layers: int) -> torch.Tensor:
    """The reference for mcore_logits: transformers' DeepseekV4ForCausalLM on `hf_dir` for the main logits and,
    since transformers has no MTP, depth k computed as the release's MTPBlock does around transformers' own
    modules (a one-layer DeepseekV4 model holding the depth's sliding, learned-routing decoder layer, its
    hc_head and norm, loaded from `model.mtp.k.*` / `mtp.k.*` of either spelling):
        e = enorm(embed(tokens shifted k + 1)); x = e_proj(e)[:, :, None] + h_proj(hnorm(streams))
        streams = layer(x); logits = lm_head(norm(hc_head(streams)))
    with streams the main model's last decoder-layer output for depth 0 and the previous depth's after it."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, DeepseekV4ForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
    captured = {}
    hook = model.model.layers[-1].register_forward_hook(lambda _m, _i, out: captured.__setitem__("streams", out))
    with torch.no_grad():
        outs = [model(tokens).logits.float()]
    hook.remove()
    if not mtp_num_layers:
        return torch.stack(outs)
    reader = hf_reader(hf_dir, dtype, verify_checksums=False)
    eps = model.config.rms_norm_eps
    block_cfg = model.config.__class__.from_dict(dict(model.config.to_dict(), num_hidden_layers=1,
                                                      layer_types=["sliding_attention"], mlp_layer_types=["moe"]))

    def rms(x, w):
        x32 = x.float()
        return (w.float() * (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps))).to(x.dtype)

    dtypes = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        dtypes.setdefault(_layer_suffix(name), t.dtype)
    streams = captured["streams"]
    for k in range(mtp_num_layers):
        p = f"model.mtp.{k}."
        own = to_spelling({n: reader.read(n) for n in reader.names() if n.startswith(p)}, TRANSFORMERS, {})
        own = {n[len(p):]: t for n, t in own.items()}  # experts stacked as transformers holds them
        block = DeepseekV4ForCausalLM(block_cfg).eval()
        for name, t in [*block.named_parameters(), *block.named_buffers()]:  # from_pretrained's dtypes (fp32 kept)
            if t.is_floating_point():
                t.data = t.data.to(dtypes.get(_layer_suffix(name), dtype))
        sd = {("model." if r.startswith(("hc_head.", "norm.")) else "model.layers.0.") + r: t for r, t in own.items()
              if r.split(".")[0] not in ("enorm", "hnorm", "e_proj", "h_proj")}
        sd["model.embed_tokens.weight"], sd["lm_head.weight"] = model.model.embed_tokens.weight, model.lm_head.weight
        missing, unexpected = block.load_state_dict(sd, strict=False)
        if [m for m in missing if "rotary_emb" not in m] or unexpected:
            raise ValueError(f"{hf_dir}: MTP depth {k} does not fill a decoder layer: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        ids = torch.cat([tokens[:, k + 1:], torch.zeros_like(tokens[:, :k + 1])], dim=1)
        with torch.no_grad():
            e = rms(model.model.embed_tokens(ids), own["enorm.weight"])
            x = F.linear(e, own["e_proj.weight"].to(dtype)).unsqueeze(2) + F.linear(
                rms(streams, own["hnorm.weight"]), own["h_proj.weight"].to(dtype))
            layer = block.model.layers[0]
            swap = layer.register_forward_pre_hook(lambda _m, a, kw, x=x: ((x,) + a[1:], kw), with_kwargs=True)
            keep = layer.register_forward_hook(lambda _m, _i, out: captured.__setitem__("streams", out))
            h = block.model(inputs_embeds=e).last_hidden_state
            swap.remove()
            keep.remove()
            streams = captured["streams"]
            outs.append(model.lm_head(h).float())
    reader.close()
    return torch.stack(outs)


def _layer_suffix(name: str) -> str:
    """`model.layers.N.rest` -> `rest`; other names as they are."""
    return name.split(".", 3)[3] if name.startswith("model.layers.") else name
