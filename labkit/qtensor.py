"""The quantized tensor: integer codes packed into bytes, plus the scales (and zero points) that turn them back
into floats — `QTensor`, round-to-nearest `quantize`, `dequantize`, and its size in memory and on disk.

Defined in notebook 02 (02_quantization.ipynb, §2 "Integers and scales: a quantizer, and bytes you can measure");
lk.quantize re-exports every name here and builds the quantized model (QuantLinear, quantize_) on top of it.
Bit packing has one home, lk.compress.pack_bits / unpack_bits (n codes of b bits in ceil(n·b/8) bytes).

    >>> q = lk.quantize.quantize(w, bits=4, group_size=32)      # symmetric, fp16 scales
    >>> q.nbytes == q.expected_nbytes(), q.bits_per_value()      # (True, 4.5)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .checks import torch_tensor, whole_number
from .compress import pack_bits, unpack_bits

SUPPORTED_BITS = (2, 3, 4, 8)
GRANULARITIES = ("tensor", "channel", "group")
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_bits(bits) -> int:
    """bits as an int; TypeError for a non-whole number, ValueError naming SUPPORTED_BITS for another one."""
    if whole_number("bits", bits, 1, f"one of {SUPPORTED_BITS}") not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; use one of {SUPPORTED_BITS}")
    return int(bits)


def check_float(x, who: str) -> None:
    """TypeError unless x is a floating-point tensor; `who` (the caller) names the function in the message."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who} expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{who} expects a floating-point tensor (fp32/fp16/bf16), got {x.dtype}; "
                        f"convert it first, e.g. x.float()")


@dataclass
class QTensor:
    """A quantized tensor: packed integer codes plus what it takes to turn them back into floats.

    x ≈ (code − 2**(bits−1))·scale            (symmetric; codes centred on zero)
    x ≈ code·scale + zero                      (asymmetric; `zero` = the value code 0 stands for, i.e. a
                                                float zero point — GGUF's Q4_1 "min", torchao's FLOAT domain)
    Scales/zeros have one entry per group: shape [rows, groups] ([1, 1] per tensor, [rows, 1] per channel).
    """
    packed: torch.Tensor           # uint8 bit stream, ceil(numel·bits/8) bytes
    scales: torch.Tensor           # [rows, groups], fp16 by default
    zeros: torch.Tensor | None     # [rows, groups] (asymmetric) or None (symmetric)
    bits: int
    group_size: int                # elements per group along the last dim (= numel for per-tensor)
    shape: tuple
    symmetric: bool
    granularity: str               # "tensor" | "channel" | "group"
    dtype: torch.dtype = torch.float32  # dtype of the original tensor (what dequantize returns)

    def __post_init__(self):
        """Checked when made: the parts must describe one another (a hand-built or loaded QTensor too)."""
        torch_tensor("QTensor.packed", self.packed, "the uint8 bit stream of the codes", dims=1, empty=True)
        if self.packed.dtype != torch.uint8:
            raise TypeError(f"QTensor.packed must be uint8 (lk.compress.pack_bits), got {self.packed.dtype}")
        torch_tensor("QTensor.scales", self.scales, "[rows, groups] scales", dims=2, kind="float")
        check_bits(self.bits)
        if not (isinstance(self.shape, (tuple, list, torch.Size)) and self.shape
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in self.shape)):
            raise TypeError(f"QTensor.shape must be the original tensor's shape, a tuple of ints, got {self.shape!r}")
        self.shape = tuple(self.shape)
        whole_number("QTensor.group_size", self.group_size, 1, "elements per scale")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"QTensor.symmetric must be True or False, got {self.symmetric!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"QTensor.granularity={self.granularity!r}; use one of {GRANULARITIES}")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise TypeError(f"QTensor.dtype must be a floating-point torch dtype, got {self.dtype!r}")
        if self.symmetric != (self.zeros is None):
            raise ValueError("QTensor.zeros must be None for symmetric codes and a tensor like scales otherwise")
        if self.zeros is not None and (not isinstance(self.zeros, torch.Tensor) or self.zeros.shape != self.scales.shape):
            raise ValueError(f"QTensor.zeros must have the scales' shape {tuple(self.scales.shape)}")
        n = math.prod(self.shape)
        if self.packed.numel() != math.ceil(n * self.bits / 8) or self.scales.numel() * self.group_size != n:
            raise ValueError(f"QTensor parts do not fit its shape {self.shape}: {self.packed.numel()} packed bytes "
                             f"(need {math.ceil(n * self.bits / 8)}) and {self.scales.numel()} scales of "
                             f"{self.group_size} values (need {n} values)")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def codes(self) -> torch.Tensor:
        """Unpacked unsigned codes, shape [rows, groups, group_size] (uint8)."""
        return unpack_bits(self.packed, self.bits, self.numel).view(*self.scales.shape, -1)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)

    @property
    def nbytes(self) -> int:
        """Bytes actually held: packed codes + scales (+ zeros)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros) if t is not None)

    def bits_per_value(self) -> float:
        """Effective bits per weight, scales included (e.g. 4 + 16/32 = 4.5 for int4 g32 symmetric)."""
        return 8 * self.nbytes / self.numel

    def expected_nbytes(self) -> int:
        """The formula: numel·bits/8 (rounded up) + groups·(scale [+ zero]) bytes."""
        per_group = self.scales.element_size() * (1 if self.symmetric else 2)
        return math.ceil(self.numel * self.bits / 8) + self.scales.numel() * per_group


def _groups_view(x: torch.Tensor, granularity: str, group_size: int | None) -> tuple[torch.Tensor, int]:
    """Reshape x to [rows, groups, group_size] for the chosen granularity (groups run along the last dim)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}; use one of {GRANULARITIES}")
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError("cannot quantize an empty or 0-d tensor")
    if granularity == "tensor":
        return x.reshape(1, 1, -1), x.numel()
    rows = x.shape[0] if x.dim() > 1 else 1
    x2 = x.reshape(rows, -1)
    cols = x2.shape[1]
    if granularity == "channel":
        return x2.view(rows, 1, cols), cols
    if group_size is None:
        raise ValueError("granularity='group' needs a positive group_size, e.g. group_size=64")
    group_size = whole_number("group_size", group_size, 1, "values per scale, e.g. 32 or 64")
    if cols % group_size:
        divisors = [d for d in (16, 32, 64, 96, 128, 192, 256) if cols % d == 0]
        raise ValueError(f"group_size={group_size} does not divide the last dimension ({cols}); "
                         f"pick one that does, e.g. {divisors or [cols]}, or use granularity='channel'")
    return x2.view(rows, cols // group_size, group_size), group_size


def _round_scale(s: torch.Tensor, dtype: torch.dtype, top: torch.Tensor, qmax: int) -> torch.Tensor:
    """Store scales in `dtype`; bump a scale up one ulp where rounding it down would clip by > scale/2."""
    tiny = torch.finfo(dtype).tiny if dtype != torch.float16 else 2.0 ** -24
    sd = s.to(dtype)
    if not torch.isfinite(sd).all():
        raise ValueError(f"values up to {float(top.max()):.3g} overflow {dtype} scales; "
                         f"pass scale_dtype=torch.float32")
    bad = (top - qmax * sd.float()) > sd.float() / 2
    if bad.any():
        sd = torch.where(bad, torch.nextafter(sd, torch.full_like(sd, float("inf"))), sd)
    return torch.clamp(sd, min=tiny)


def quantize(x: torch.Tensor, bits: int = 8, granularity: str = "channel", group_size: int | None = None,
             symmetric: bool = True, scale_dtype: torch.dtype = torch.float16) -> QTensor:
    """Round-to-nearest quantization of x to `bits`-bit integers with one scale per tensor/row/group.

    symmetric: scale = max|x|/(2**(bits−1)−1), codes in [−qmax, qmax] (stored offset by 2**(bits−1)).
    asymmetric: zero = min(x) (rounded down), scale = (max − zero)/(2**bits − 1), codes in [0, 2**bits − 1].
    Either way |dequantize(q) − x| ≤ scale/2 element-wise. Rows = dim 0 (output channels of a Linear weight).
    """
    q, s, zeros, gs, granularity = rtn_codes(x, bits, granularity, group_size, symmetric, scale_dtype)
    packed = pack_bits(q.to(torch.uint8), bits)
    return QTensor(packed=packed, scales=s, zeros=zeros, bits=bits, group_size=gs, shape=tuple(x.shape),
                   symmetric=symmetric, granularity=granularity, dtype=x.dtype)


def fake_quantize(x: torch.Tensor, bits: int = 8, granularity: str = "channel", group_size: int | None = None,
                  symmetric: bool = True, scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """dequantize(quantize(x, …)) without packing the codes: the same values, faster (for searches that try many
    candidates, e.g. AWQ's scales and clipping; notebook 02, "After round-to-nearest")."""
    q, s, zeros, _, _ = rtn_codes(x, bits, granularity, group_size, symmetric, scale_dtype)
    s = s.float().unsqueeze(-1)
    out = (q - 2 ** (bits - 1)) * s if symmetric else q * s + zeros.float().unsqueeze(-1)
    return out.reshape(x.shape).to(x.dtype)


def rtn_codes(x, bits, granularity, group_size, symmetric, scale_dtype):
    """The rounding behind quantize: (codes [rows, groups, group_size] as floats, scales, zeros, group size,
    granularity)."""
    check_float(x, "quantize")
    bits = check_bits(bits)
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}; use one of {GRANULARITIES}")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be True or False, got {symmetric!r}")
    if granularity != "group" and group_size is not None:
        granularity = "group"
    if not torch.isfinite(x).all():
        raise ValueError("quantize: the tensor contains inf or NaN; fix the values first")
    g, gs = _groups_view(x.detach().float(), granularity, group_size)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = g.abs().amax(dim=-1)
        s = _round_scale(amax / qmax, scale_dtype, amax, qmax)
        q = torch.clamp(torch.round(g / s.float().unsqueeze(-1)), -qmax, qmax) + 2 ** (bits - 1)
        zeros = None
    else:
        qmax = 2 ** bits - 1
        lo = g.amin(dim=-1)
        zd = lo.to(scale_dtype)
        if not torch.isfinite(zd).all():
            raise ValueError(f"values overflow {scale_dtype} zero points; pass scale_dtype=torch.float32")
        zd = torch.where(zd.float() > lo, torch.nextafter(zd, torch.full_like(zd, float("-inf"))), zd)
        span = g.amax(dim=-1) - zd.float()
        s = _round_scale(span / qmax, scale_dtype, span, qmax)
        q = torch.clamp(torch.round((g - zd.float().unsqueeze(-1)) / s.float().unsqueeze(-1)), 0, qmax)
        zeros = zd
    return q, s, zeros, gs, granularity


def _check_q(q) -> QTensor:
    if not isinstance(q, QTensor):
        raise TypeError(f"q must be a QTensor (from lk.quantize.quantize(w, bits=4)), got {type(q).__name__}")
    return q


def dequantize(q: QTensor) -> torch.Tensor:
    """Floats back from a QTensor (in the original dtype and shape)."""
    _check_q(q)
    codes = q.codes().float()
    s = q.scales.float().unsqueeze(-1)
    if q.symmetric:
        x = (codes - 2 ** (q.bits - 1)) * s
    else:
        x = codes * s + q.zeros.float().unsqueeze(-1)
    return x.reshape(q.shape).to(q.dtype)


def qtensor_state(q: QTensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors a QTensor stores (for safetensors / state_dict)."""
    _check_q(q)
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str put before each name (e.g. 'layer0.'), got {prefix!r}")
    d = {prefix + "packed": q.packed, prefix + "scales": q.scales}
    if q.zeros is not None:
        d[prefix + "zeros"] = q.zeros
    return d


def save_qtensor(q: QTensor, path) -> int:
    """Write a QTensor to a safetensors file; return its size on disk in bytes (header included)."""
    _check_q(q)
    import os
    from safetensors.torch import save_file
    meta = dict(bits=str(q.bits), group_size=str(q.group_size), shape=",".join(map(str, q.shape)),
                symmetric=str(q.symmetric), granularity=q.granularity)
    save_file({k: v.contiguous() for k, v in qtensor_state(q).items()}, str(path), metadata=meta)
    return os.path.getsize(path)


def quant_error(x: torch.Tensor, q: QTensor) -> dict:
    """How far dequantize(q) is from x: max/mean abs error, relative Frobenius error, SNR in dB."""
    _check_q(q)
    torch_tensor("x", x, "the tensor q was made from", kind="float", finite=True)
    if tuple(x.shape) != q.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but q was made from a tensor of shape {q.shape}; pass the "
                         "tensor you quantized")
    x = x.detach().float()
    d = dequantize(q).float() - x
    rel = float(d.norm() / x.norm().clamp_min(1e-30))
    return dict(max_abs=float(d.abs().max()), mean_abs=float(d.abs().mean()), rel_fro=rel,
                snr_db=float(-20 * math.log10(max(rel, 1e-30))))
