"""NF4 (4-bit NormalFloat) block quantization, byte-compatible with bitsandbytes.

Storage format, identical to what `bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type="nf4")`
produces, so a tensor quantized by either path dequantizes to the same values with either path:

- the tensor is flattened (row-major) and cut into blocks of `blocksize` (64) elements; the last block may
  be shorter;
- `absmax[b]` = max |w| over block b, in float32;
- each element is scaled by the reciprocal of its block's absmax (the last, short block divides instead, as
  bitsandbytes does), clamped to [-1, 1] and mapped to the nearest of the 16 NF4 code values
  (ties go to the lower code);
- codes are packed two per byte, the element with the even flat index in the high nibble;
- double quantization (`double_quant=True`, bitsandbytes' `compress_statistics`): `offset = mean(absmax)`,
  then `absmax - offset` is itself block-quantized to 8 bits with bitsandbytes' signed dynamic map in blocks
  of 256, keeping one float32 scale per 256 absmax values.

`backend="auto"` uses bitsandbytes when the tensor lives on a CUDA device and the package imports (its
kernels are the fast path there); everywhere else (CPU, NPU) the pure-torch path below runs. Both give the
same bytes; tests/peft/test_nf4.py checks it on CPU where bitsandbytes runs.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

__all__ = [
    "NF4_CODE",
    "NF4Tensor",
    "quantize_nf4",
    "dequantize_nf4",
    "dynamic_map_8bit",
    "bitsandbytes_available",
]

# The 16 NF4 values (quantiles of N(0, 1) normalised to [-1, 1], with an exact zero), as float32 literals
# exactly as bitsandbytes ships them.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

DOUBLE_QUANT_BLOCKSIZE = 256
_CHUNK_ELEMENTS = 1 << 22  # even, and a multiple of every valid blocksize
# Dequantization writes into the output in chunks of this many elements, so its temporaries (codes, indices,
# float32 values: ~13 bytes per element) stay ~13 MiB whatever the weight: QLoRA's peak is the dequantized
# weight itself, which is what mindspeed_dsv.plan prices.
_DEQUANT_CHUNK_ELEMENTS = 1 << 20
_VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dynamic_map_8bit() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`): 256 sorted float32 values.

    For exponent step i = 0..6 it holds 2**i fraction values (midpoints of linspace(0.1, 1, 2**i + 1))
    scaled by 10**(i - 6), with both signs, plus 0 and 1.
    """
    values: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (i - 6)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


@dataclasses.dataclass
class NF4Tensor:
    """A quantized tensor. `absmax` is float32 per block, or uint8 codes when double-quantized."""

    packed: torch.Tensor  # uint8 [ceil(numel / 2)]
    absmax: torch.Tensor  # float32 [num_blocks], or uint8 [num_blocks] when double-quantized
    shape: torch.Size
    dtype: torch.dtype  # dtype of the original tensor, and of dequantize's output
    blocksize: int = 64
    # Double quantization only.
    offset: Optional[torch.Tensor] = None  # float32 scalar: mean of the original absmax
    absmax2: Optional[torch.Tensor] = None  # float32 [ceil(num_blocks / 256)]
    code2: Optional[torch.Tensor] = None  # float32 [256], the dynamic map
    blocksize2: int = DOUBLE_QUANT_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def nbytes(self) -> int:
        """Bytes held by this tensor's storage (packed codes plus all block statistics)."""
        tensors = [self.packed, self.absmax, self.offset, self.absmax2, self.code2]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device) -> "NF4Tensor":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(
            self,
            packed=move(self.packed),
            absmax=move(self.absmax),
            offset=move(self.offset),
            absmax2=move(self.absmax2),
            code2=move(self.code2),
        )

    def state_dict(self) -> dict:
        """Plain tensors and ints, for torch.save."""
        out = {
            "packed": self.packed,
            "absmax": self.absmax,
            "shape": torch.tensor(list(self.shape), dtype=torch.int64),
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).replace("torch.", ""),
        }
        if self.double_quant:
            out.update(offset=self.offset, absmax2=self.absmax2, code2=self.code2, blocksize2=self.blocksize2)
        return out

    @classmethod
    def from_state_dict(cls, sd: dict) -> "NF4Tensor":
        return cls(
            packed=sd["packed"],
            absmax=sd["absmax"],
            shape=torch.Size(sd["shape"].tolist()),
            dtype=getattr(torch, sd["dtype"]),
            blocksize=int(sd["blocksize"]),
            offset=sd.get("offset"),
            absmax2=sd.get("absmax2"),
            code2=sd.get("code2"),
            blocksize2=int(sd.get("blocksize2", DOUBLE_QUANT_BLOCKSIZE)),
        )


def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes.functional  # noqa: F401
    except Exception:  # ImportError, or a native-library load failure
        return False
    return True


def _use_bitsandbytes(t: torch.Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    if backend == "bitsandbytes":
        if not bitsandbytes_available():
            raise RuntimeError("backend='bitsandbytes' requested but bitsandbytes does not import")
        return True
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'torch' or 'bitsandbytes', got {backend!r}")
    from mindspeed_dsv.platform import current_platform

    return current_platform().device_type == "cuda" and t.device.type == "cuda" and bitsandbytes_available()


def _block_absmax_and_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 absmax per block and the elements scaled into [-1, 1], in bitsandbytes' arithmetic."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    body = flat[:full].reshape(-1, blocksize)
    absmax = body.abs().amax(dim=-1)
    # Full blocks multiply by the reciprocal, the short tail divides: the two round differently and
    # bitsandbytes does exactly this.
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        tail_max = flat[full:].abs().amax()
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max.clamp(min=1e-38), -1, 1)])
    return absmax, scaled


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of a sorted codebook; an exact midpoint goes to the lower value."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True)


def _quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    # Nearest dynamic-map value, the rule of bitsandbytes' torch backend. Its compiled CPU kernel uses an
    # approximate search that can pick the neighbouring code for values within ~1e-4 of a midpoint, so
    # the 8-bit absmax codes of double quantization may differ there by one step; the storage format (and
    # therefore dequantization of either side's output) is identical.
    absmax, scaled = _block_absmax_and_scale(x.reshape(-1).float(), blocksize)
    return _nearest_code(scaled, code).to(torch.uint8), absmax


def _dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, n: int):
    """float32 code[codes[i]] * absmax[i // blocksize] for the first n elements."""
    values = code[codes[:n].to(torch.int32)]
    rem = n % blocksize
    full = n - rem
    out = torch.empty(n, dtype=torch.float32, device=values.device)
    out[:full] = (values[:full].view(-1, blocksize) * absmax[: full // blocksize].view(-1, 1)).reshape(-1)
    if rem:
        out[full:] = values[full:] * absmax[full // blocksize]
    return out


def quantize_nf4(
    w: torch.Tensor, blocksize: int = 64, double_quant: bool = False, backend: str = "auto"
) -> NF4Tensor:
    """Quantize `w` (float32/bf16/fp16, any shape) to NF4. See the module docstring for the format."""
    if blocksize not in _VALID_BLOCKSIZES:
        raise ValueError(f"quantize_nf4: blocksize must be one of {_VALID_BLOCKSIZES}, got {blocksize}")
    if w.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantize_nf4: tensor of shape {tuple(w.shape)} has dtype {w.dtype}; need one of {_FLOAT_DTYPES}")
    if w.numel() == 0:
        raise ValueError(f"quantize_nf4: empty tensor of shape {tuple(w.shape)}")
    w = w.detach()
    if _use_bitsandbytes(w, backend):
        return _quantize_bitsandbytes(w, blocksize, double_quant)

    code = NF4_CODE.to(w.device)
    flat = w.reshape(-1)
    # Work in chunks of whole blocks so the float32 temporaries stay small for large weights; blocks never
    # straddle a chunk, so the bytes are the same as one pass.
    chunk = blocksize * max(1, _CHUNK_ELEMENTS // blocksize)
    packed_parts, absmax_parts = [], []
    for start in range(0, flat.numel(), chunk):
        absmax_c, scaled = _block_absmax_and_scale(flat[start : start + chunk].float(), blocksize)
        q = _nearest_code(scaled, code).to(torch.uint8)
        if q.numel() % 2:
            q = torch.cat([q, q.new_full((1,), 7)])  # bitsandbytes pads with a scaled 0.0: code index 7
        packed_parts.append((q[0::2] << 4) | q[1::2])
        absmax_parts.append(absmax_c)
    packed = torch.cat(packed_parts) if len(packed_parts) > 1 else packed_parts[0]
    absmax = torch.cat(absmax_parts) if len(absmax_parts) > 1 else absmax_parts[0]
    out = NF4Tensor(packed=packed, absmax=absmax, shape=torch.Size(w.shape), dtype=w.dtype, blocksize=blocksize)
    if double_quant:
        code2 = dynamic_map_8bit().to(w.device)
        offset = absmax.mean()
        qabsmax, absmax2 = _quantize_blockwise_8bit(absmax - offset, code2, DOUBLE_QUANT_BLOCKSIZE)
        out = dataclasses.replace(out, absmax=qabsmax, offset=offset, absmax2=absmax2, code2=code2)
    return out


def block_absmax(t: NF4Tensor) -> torch.Tensor:
    """float32 absmax per 4-bit block (undoing double quantization when present)."""
    if not t.double_quant:
        return t.absmax
    absmax = _dequantize_blockwise(t.absmax, t.absmax2, t.code2, t.blocksize2, t.absmax.numel())
    return absmax + t.offset


def dequantize_nf4(t: NF4Tensor, dtype: Optional[torch.dtype] = None, backend: str = "auto") -> torch.Tensor:
    """The dequantized tensor, shape `t.shape`, dtype `dtype` (default: the original dtype).

    Values are computed in float32 (code value times block absmax) and cast once at the end, as
    bitsandbytes does.
    """
    dtype = dtype or t.dtype
    if _use_bitsandbytes(t.packed, backend):
        return _dequantize_bitsandbytes(t, dtype)
    n = t.numel()
    device = t.packed.device
    absmax = block_absmax(t)
    code = NF4_CODE.to(device)
    out = torch.empty(n, dtype=dtype, device=device)
    # Chunks of whole blocks (so of whole bytes too): each element's float32 value and its cast are the same as
    # in one pass.
    chunk = t.blocksize * max(1, _DEQUANT_CHUNK_ELEMENTS // t.blocksize)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        packed = t.packed[start // 2 : (stop + 1) // 2]
        codes = torch.empty(packed.numel() * 2, dtype=torch.uint8, device=device)
        codes[0::2] = packed >> 4
        codes[1::2] = packed & 0xF
        out[start:stop] = _dequantize_blockwise(codes, absmax[start // t.blocksize :], code, t.blocksize, stop - start)
    return out.view(t.shape)


# --- bitsandbytes path ----------------------------------------------------------------------------------


def _quantize_bitsandbytes(w: torch.Tensor, blocksize: int, double_quant: bool) -> NF4Tensor:
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4", quant_storage=torch.uint8
    )
    out = NF4Tensor(
        packed=packed.reshape(-1),
        absmax=state.absmax,
        shape=torch.Size(w.shape),
        dtype=w.dtype,
        blocksize=blocksize,
    )
    if double_quant:
        out = dataclasses.replace(
            out,
            offset=state.offset.float(),
            absmax2=state.state2.absmax,
            code2=state.state2.code,
            blocksize2=state.state2.blocksize,
        )
    return out


def to_bitsandbytes_state(t: NF4Tensor):
    """(packed [N, 1] uint8, bitsandbytes QuantState) describing the same quantized tensor."""
    import bitsandbytes.functional as bnbf

    state2 = None
    if t.double_quant:
        state2 = bnbf.QuantState(absmax=t.absmax2, code=t.code2, blocksize=t.blocksize2, dtype=torch.float32)
    state = bnbf.QuantState(
        absmax=t.absmax,
        shape=t.shape,
        dtype=t.dtype,
        blocksize=t.blocksize,
        code=NF4_CODE.to(t.packed.device),
        quant_type="nf4",
        offset=t.offset,
        state2=state2,
    )
    return t.packed.view(-1, 1), state


def _dequantize_bitsandbytes(t: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    packed, state = to_bitsandbytes_state(t)
    state.dtype = dtype
    return bnbf.dequantize_4bit(packed, state).view(t.shape)
