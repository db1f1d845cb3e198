"""Quantization: number formats, integer quantizers with real bit packing, quantized Linear layers, outliers.

Defined in notebook 02 (02_quantization.ipynb). Sections of the notebook → functions here:
  1 number formats ............ `float_formats`, `cast_error`
  2 quantizers + packing ...... `quantize`, `dequantize`, `QTensor`, `pack_bits`, `unpack_bits`, `save_qtensor`
  3 quantized model ........... `QuantConfig`, `quantize_`, `QuantLinear`, `skip_tied`
  4 the Q4_1 origin ........... `distinct_per_block`
  5 outliers (LLM.int8()) ..... `linear_input_stats`, `fake_quant_per_token`, `mixed_int8_matmul`
  6 real libraries ............ `torchao_int8_weight`, `time_int8_paths`
  7 physical limit ............ `bandwidth_limit`
Heavy sweeps live in `make_results()` (→ data/results/quantize.json); headline figures in `bench()`.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED_BITS = (2, 3, 4, 8)
GRANULARITIES = ("tensor", "channel", "group")
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------------
# 1. Number formats (notebook 02, "Number formats")
# --------------------------------------------------------------------------------------------------
def float_formats() -> list[dict]:
    """fp32 / fp16 / bf16: bits, exponent and mantissa bits, largest value, smallest normal, machine epsilon."""
    rows = []
    for name, dt, exp_bits, man_bits in (("fp32", torch.float32, 8, 23), ("fp16", torch.float16, 5, 10),
                                         ("bf16", torch.bfloat16, 8, 7)):
        fi = torch.finfo(dt)
        rows.append(dict(name=name, bits=fi.bits, exponent_bits=exp_bits, mantissa_bits=man_bits,
                         max=float(fi.max), smallest_normal=float(fi.smallest_normal), eps=float(fi.eps)))
    return rows


def cast_error(w: torch.Tensor, dtype: torch.dtype) -> dict:
    """Round-trip w → dtype → fp32: max and mean relative error, values that overflow or flush to zero."""
    _check_float(w, "cast_error")
    w = w.detach().float()
    back = w.to(dtype).float()
    nz = w != 0
    rel = ((back - w).abs()[nz] / w.abs()[nz]) if nz.any() else torch.zeros(1)
    finite = torch.isfinite(back)
    return dict(dtype=str(dtype).replace("torch.", ""), max_rel_error=float(rel[torch.isfinite(rel)].max()),
                mean_rel_error=float(rel[torch.isfinite(rel)].mean()),
                overflow=int((~finite).sum()), flushed_to_zero=int((nz & (back == 0)).sum()),
                bytes=w.numel() * torch.tensor([], dtype=dtype).element_size())


# --------------------------------------------------------------------------------------------------
# 2. Bit packing and quantizers (notebook 02, "Integers and scales")
# --------------------------------------------------------------------------------------------------
def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; use one of {SUPPORTED_BITS}")
    return bits


def _check_float(x, who: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who} expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{who} expects a floating-point tensor (fp32/fp16/bf16), got {x.dtype}; "
                        f"convert it first, e.g. x.float()")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer codes (each < 2**bits) into a dense little-endian bit stream of uint8 bytes.

    n codes take exactly ceil(n·bits/8) bytes: two 4-bit codes per byte, four 2-bit codes per byte,
    eight 3-bit codes in three bytes. Works for any 1 ≤ bits ≤ 8.
    """
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"pack_bits: bits must be in 1..8, got {bits}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"pack_bits expects integer codes, got {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= (1 << bits)):
        raise ValueError(f"pack_bits: codes must lie in [0, {(1 << bits) - 1}] for {bits} bits")
    flat = flat.to(torch.uint8)
    n = flat.numel()
    if bits == 8:
        return flat.clone()
    nbytes = (n * bits + 7) // 8
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte
        per = 8 // bits
        pad = (-n) % per
        g = F.pad(flat, (0, pad)).view(-1, per)
        out = torch.zeros(g.shape[0], dtype=torch.uint8)
        for j in range(per):
            out |= g[:, j] << (j * bits)
        return out[:nbytes].contiguous()
    # generic bit stream (3, 5, 6, 7 bits): 8 codes = `bits` bytes exactly
    pad = (-n) % 8
    g = F.pad(flat, (0, pad)).view(-1, 8)
    stream = torch.stack([(g >> b) & 1 for b in range(bits)], dim=-1)  # [chunks, code j, bit k]
    stream = stream.reshape(-1, 8)  # code j's bit k sits at stream position j·bits + k; 8 positions → 1 byte
    out = torch.zeros(stream.shape[0], dtype=torch.uint8)
    for b in range(8):
        out |= stream[:, b] << b
    return out[:nbytes].contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first n codes (uint8) from a packed byte stream."""
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"unpack_bits: bits must be in 1..8, got {bits}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits expects uint8 bytes, got {packed.dtype}")
    if packed.numel() * 8 < n * bits:
        raise ValueError(f"unpack_bits: {packed.numel()} bytes hold fewer than {n} codes of {bits} bits")
    p = packed.reshape(-1)
    if bits == 8:
        return p[:n].clone()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        out = torch.stack([(p >> (j * bits)) & mask for j in range(per)], dim=-1).reshape(-1)
        return out[:n].contiguous()
    pad = (-p.numel()) % bits
    p = F.pad(p, (0, pad))
    stream = torch.stack([(p >> b) & 1 for b in range(8)], dim=-1).reshape(-1, 8 * bits)
    stream = stream.reshape(-1, 8, bits)  # [chunks of 8 codes, code j, bit k]
    out = torch.zeros(stream.shape[0], 8, dtype=torch.uint8)
    for b in range(bits):
        out |= stream[:, :, b] << b
    return out.reshape(-1)[:n].contiguous()


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

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def codes(self) -> torch.Tensor:
        """Unpacked unsigned codes, shape [rows, groups, group_size] (uint8)."""
        return unpack_bits(self.packed, self.bits, self.numel).view(*self.scales.shape, -1)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)

    def nbytes(self) -> int:
        """Bytes actually held: packed codes + scales (+ zeros)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros) if t is not None)

    def bits_per_value(self) -> float:
        """Effective bits per weight, scales included (e.g. 4 + 16/32 = 4.5 for int4 g32 symmetric)."""
        return 8 * self.nbytes() / self.numel

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
    if group_size is None or isinstance(group_size, bool) or int(group_size) < 1:
        raise ValueError(f"granularity='group' needs a positive group_size, got {group_size!r}")
    group_size = int(group_size)
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
    _check_float(x, "quantize")
    bits = _check_bits(bits)
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype}")
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
    packed = pack_bits(q.to(torch.uint8), bits)
    return QTensor(packed=packed, scales=s, zeros=zeros, bits=bits, group_size=gs, shape=tuple(x.shape),
                   symmetric=symmetric, granularity=granularity, dtype=x.dtype)


def dequantize(q: QTensor) -> torch.Tensor:
    """Floats back from a QTensor (in the original dtype and shape)."""
    codes = q.codes().float()
    s = q.scales.float().unsqueeze(-1)
    if q.symmetric:
        x = (codes - 2 ** (q.bits - 1)) * s
    else:
        x = codes * s + q.zeros.float().unsqueeze(-1)
    return x.reshape(q.shape).to(q.dtype)


def qtensor_state(q: QTensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors a QTensor stores (for safetensors / state_dict)."""
    d = {prefix + "packed": q.packed, prefix + "scales": q.scales}
    if q.zeros is not None:
        d[prefix + "zeros"] = q.zeros
    return d


def save_qtensor(q: QTensor, path) -> int:
    """Write a QTensor to a safetensors file; return its size on disk in bytes (header included)."""
    import os
    from safetensors.torch import save_file
    meta = dict(bits=str(q.bits), group_size=str(q.group_size), shape=",".join(map(str, q.shape)),
                symmetric=str(q.symmetric), granularity=q.granularity)
    save_file({k: v.contiguous() for k, v in qtensor_state(q).items()}, str(path), metadata=meta)
    return os.path.getsize(path)


def quant_error(x: torch.Tensor, q: QTensor) -> dict:
    """How far dequantize(q) is from x: max/mean abs error, relative Frobenius error, SNR in dB."""
    x = x.detach().float()
    d = dequantize(q).float() - x
    rel = float(d.norm() / x.norm().clamp_min(1e-30))
    return dict(max_abs=float(d.abs().max()), mean_abs=float(d.abs().mean()), rel_fro=rel,
                snr_db=float(-20 * math.log10(max(rel, 1e-30))))


# --------------------------------------------------------------------------------------------------
# 3. Quantized model: QuantLinear + quantize_ (notebook 02, "Quantize the model")
# --------------------------------------------------------------------------------------------------
@dataclass
class QuantConfig:
    """How to quantize each selected Linear weight (mirrors torchao's config objects)."""
    bits: int = 8
    granularity: str = "channel"     # "tensor" | "channel" | "group"
    group_size: int | None = None    # needed for "group"
    symmetric: bool = True
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self):
        _check_bits(self.bits)
        if self.group_size is not None and self.granularity != "group":
            self.granularity = "group"
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r}; use one of {GRANULARITIES}")
        if self.granularity == "group" and (self.group_size is None or int(self.group_size) < 1):
            raise ValueError("granularity='group' needs group_size, e.g. QuantConfig(bits=4, group_size=64)")

    @property
    def name(self) -> str:
        g = {"tensor": "pt", "channel": "pc"}.get(self.granularity, f"g{self.group_size}")
        return f"int{self.bits}-{g}" + ("" if self.symmetric else "-asym")


class QuantLinear(nn.Module):
    """A Linear whose weight is stored packed (codes + scales) and dequantized on every forward."""

    def __init__(self, q: QTensor, bias: torch.Tensor | None):
        super().__init__()
        self.bits, self.group_size, self.symmetric = q.bits, q.group_size, q.symmetric
        self.granularity, self.shape, self.orig_dtype = q.granularity, tuple(q.shape), q.dtype
        self.out_features, self.in_features = q.shape
        self.register_buffer("packed", q.packed)
        self.register_buffer("scales", q.scales)
        self.register_buffer("zeros", q.zeros)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> "QuantLinear":
        q = quantize(linear.weight, config.bits, config.granularity, config.group_size, config.symmetric,
                     config.scale_dtype)
        return cls(q, linear.bias)

    def qtensor(self) -> QTensor:
        return QTensor(self.packed, self.scales, self.zeros, self.bits, self.group_size, self.shape,
                       self.symmetric, self.granularity, self.orig_dtype)

    def weight_dequantized(self) -> torch.Tensor:
        return dequantize(self.qtensor())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_dequantized().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        g = self.granularity if self.granularity != "group" else f"group={self.group_size}"
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, {g}, "
                f"{'sym' if self.symmetric else 'asym'}")


def _tied_weight_ids(model: nn.Module) -> set[int]:
    """Storage pointers of weights shared with an nn.Embedding (e.g. a tied lm_head)."""
    return {m.weight.untyped_storage().data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}


def skip_tied(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    """filter_fn: every nn.Linear except those whose weight is tied to an embedding (SmolLM2's lm_head)."""
    tied = _tied_weight_ids(model)
    return lambda m, fqn: isinstance(m, nn.Linear) and m.weight.untyped_storage().data_ptr() not in tied


def quantize_(model: nn.Module, config: QuantConfig,
              filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """In place: replace each selected nn.Linear by a QuantLinear (torchao's `quantize_` shape).

    filter_fn(module, fqn) picks modules; default `skip_tied(model)`: all Linears except a lm_head tied to
    the embedding (quantizing it would also change the embedding it shares storage with).
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"quantize_ expects a labkit QuantConfig, got {type(config).__name__}; "
                        f"e.g. QuantConfig(bits=4, group_size=64)")
    filter_fn = filter_fn or skip_tied(model)
    chosen = [(fqn, m) for fqn, m in model.named_modules() if fqn and filter_fn(m, fqn)]
    for fqn, m in chosen:  # validate everything before changing anything
        if isinstance(m, QuantLinear):
            raise ValueError(f"{fqn} is already quantized ({m.extra_repr()}); reload the model first")
        if not isinstance(m, nn.Linear):
            raise TypeError(f"{fqn} is a {type(m).__name__}; quantize_ can only swap nn.Linear layers — "
                            f"make filter_fn return False for it")
        if not m.weight.is_floating_point():
            raise TypeError(f"{fqn}.weight is {m.weight.dtype}, not a float weight")
        if config.granularity == "group" and m.in_features % int(config.group_size):
            raise ValueError(f"{fqn}: group_size={config.group_size} does not divide in_features="
                             f"{m.in_features}; pick a divisor (e.g. 32 or 64) or granularity='channel'")
    for fqn, m in chosen:
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(m, config))
    return model


def quantized_linear_bytes(model: nn.Module) -> dict:
    """Bytes of QuantLinear layers (codes, scales, zeros) vs what fp32 would need, for a quantized model."""
    q = [m for m in model.modules() if isinstance(m, QuantLinear)]
    codes = sum(m.packed.numel() for m in q)
    scales = sum(m.scales.numel() * m.scales.element_size() for m in q)
    zeros = sum(m.zeros.numel() * m.zeros.element_size() for m in q if m.zeros is not None)
    n = sum(m.in_features * m.out_features for m in q)
    return dict(layers=len(q), weights=n, codes_bytes=codes, scale_bytes=scales + zeros,
                total_bytes=codes + scales + zeros, fp32_bytes=4 * n,
                bits_per_weight=8 * (codes + scales + zeros) / max(n, 1))


# --------------------------------------------------------------------------------------------------
# 4. The Q4_1 origin of SmolLM2's weights (notebook 02, "Where these weights came from")
# --------------------------------------------------------------------------------------------------
def distinct_per_block(w: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Number of distinct values in each block of `block` consecutive weights along the last dim."""
    _check_float(w, "distinct_per_block")
    rows = w.detach().reshape(-1, block)
    s, _ = rows.sort(dim=1)
    return 1 + (s[:, 1:] != s[:, :-1]).sum(dim=1)


# --------------------------------------------------------------------------------------------------
# 5. Outliers, LLM.int8() (notebook 02, "Outlier features")
# --------------------------------------------------------------------------------------------------
def linear_input_stats(model: nn.Module, tokens: torch.Tensor, names: list[str] | None = None,
                       keep: list[str] | None = None) -> dict:
    """Run tokens [B, T] once; for each nn.Linear (or those in `names`) record per-feature max |input|.

    Returns {fqn: {"feature_absmax": [in_features], "inputs": [N, in] (only for fqns in `keep`)}}.
    """
    out, hooks = {}, []
    keep = set(keep or [])

    def hook(fqn):
        def fn(mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            d = out.setdefault(fqn, {"feature_absmax": torch.zeros(x.shape[-1])})
            d["feature_absmax"] = torch.maximum(d["feature_absmax"], x.abs().amax(0))
            if fqn in keep:
                d["inputs"] = x.clone()
        return fn

    for fqn, m in model.named_modules():
        if isinstance(m, (nn.Linear, QuantLinear)) and (names is None or fqn in names):
            hooks.append(m.register_forward_pre_hook(hook(fqn)))
    try:
        with torch.no_grad():
            model(tokens.reshape(1, -1) if tokens.dim() == 1 else tokens)
    finally:
        for h in hooks:
            h.remove()
    return out


def fake_quant_per_tensor(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric absmax quantize → dequantize with ONE scale for the whole tensor."""
    return dequantize(quantize(x, bits, "tensor", scale_dtype=torch.float32))


def fake_quant_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric absmax quantize → dequantize with one scale per row (token) — LLM.int8()'s vector-wise."""
    return dequantize(quantize(x, bits, "channel", scale_dtype=torch.float32))


def mixed_int8_matmul(x: torch.Tensor, w: torch.Tensor, threshold: float = 6.0) -> tuple[torch.Tensor, int]:
    """LLM.int8() decomposition: y = x·wᵀ with input columns having any |x| > threshold kept in float and the
    rest as int8 (per-token activations × per-output-channel weights). Returns (y, number of outlier columns).
    """
    _check_float(x, "mixed_int8_matmul")
    _check_float(w, "mixed_int8_matmul")
    x2 = x.reshape(-1, x.shape[-1]).float()
    outl = (x2.abs() > threshold).any(dim=0)
    xr, wr = x2.clone(), w.float().clone()
    xr[:, outl] = 0
    wr[:, outl] = 0
    y = fake_quant_per_token(xr) @ fake_quant_per_token(wr).T
    y = y + x2[:, outl] @ w.float()[:, outl].T
    return y.reshape(*x.shape[:-1], w.shape[0]), int(outl.sum())


def int8_matmul_errors(x: torch.Tensor, w: torch.Tensor, threshold: float = 6.0) -> dict:
    """What outlier features do to int8 activations (x: [tokens, in], w: [out, in]).

    Output errors ‖ŷ − y‖/‖y‖ with int8 weights (per channel) and int8 activations per tensor, per token,
    and per token with the outlier columns kept in float (LLM.int8()). Plus the error that the NORMAL
    features suffer from one per-tensor scale, with and without the outlier columns setting that scale,
    and the share of normal values that the outlier-set scale rounds to zero.
    """
    x, w = x.detach().float(), w.detach().float()
    ref = x @ w.T
    wq = fake_quant_per_token(w)
    rel = lambda y: float((y - ref).norm() / ref.norm())  # noqa: E731
    mixed, n_out = mixed_int8_matmul(x, w, threshold)
    outl = (x.abs() > threshold).any(dim=0)
    normal = x[:, ~outl]
    xq = fake_quant_per_tensor(x)[:, ~outl]
    nq = fake_quant_per_tensor(normal)
    nrel = lambda y: float((y - normal).norm() / normal.norm())  # noqa: E731
    return dict(per_tensor=rel(fake_quant_per_tensor(x) @ wq.T), per_token=rel(fake_quant_per_token(x) @ wq.T),
                mixed=rel(mixed), outlier_columns=n_out, in_features=x.shape[-1],
                normal_error_scale_with_outliers=nrel(xq), normal_error_scale_without_outliers=nrel(nq),
                normal_zeroed_with_outliers=float(((xq == 0) & (normal != 0)).float().mean()))


# --------------------------------------------------------------------------------------------------
# 6. Real libraries: torchao and torch.ao (notebook 02, "What a real library does")
# --------------------------------------------------------------------------------------------------
def _quiet_torchao():
    import logging
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)


def torchao_int8_weight(linear: nn.Linear) -> dict:
    """torchao Int8WeightOnlyConfig on a copy of `linear`: its int8 codes, scales and dequantized weight."""
    import copy
    _quiet_torchao()
    from torchao.quantization import Int8WeightOnlyConfig
    from torchao.quantization import quantize_ as ao_quantize_
    m = nn.Sequential(copy.deepcopy(linear))
    ao_quantize_(m, Int8WeightOnlyConfig())
    w = m[0].weight
    return dict(module=m[0], qdata=w.qdata, scale=w.scale.reshape(-1), dequantized=w.dequantize())


def try_int4_weight_only(linear: nn.Linear, group_size: int = 128) -> tuple[bool, str]:
    """Try torchao Int4WeightOnlyConfig (its kernels need CUDA): (worked, message) — never raises."""
    import copy
    _quiet_torchao()
    try:
        from torchao.quantization import Int4WeightOnlyConfig
        from torchao.quantization import quantize_ as ao_quantize_
        m = nn.Sequential(copy.deepcopy(linear))
        ao_quantize_(m, Int4WeightOnlyConfig(group_size=group_size))
        m(torch.randn(1, linear.in_features, device=linear.weight.device))
        return True, f"Int4WeightOnlyConfig ran on {linear.weight.device}"
    except Exception as e:  # noqa: BLE001 — the point is to show the failure, not crash
        return False, (f"Int4WeightOnlyConfig did not run here: its int4 kernels are CUDA-only in torchao 0.18 "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:120]})")


def _time(fn, reps: int, warmup: int = 2) -> float:
    """Median seconds of fn() over reps runs."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def time_int8_paths(in_features: int = 2048, out_features: int = 2048, batch: int = 1, reps: int = 20,
                    compile: bool = False, threads: int = 1, seed: int = 0) -> dict:
    """Time one Linear in fp32 and through int8 paths, in ONE run on `threads` threads; ratios vs fp32.

    Paths: labkit QuantLinear (dequantize on the fly), torchao Int8WeightOnly, torchao Int8DynamicActivation-
    Int8Weight (each optionally under torch.compile), torch.ao.quantization.quantize_dynamic (deprecated).
    Returns {"ms": {path: ms}, "speedup": {path: fp32_ms / ms}, "max_rel_err": {path: vs fp32 output}}.
    """
    import copy
    _quiet_torchao()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
    from torchao.quantization import quantize_ as ao_quantize_
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_features, out_features)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_features, in_features, generator=g) * 0.02)
    x = torch.randn(batch, in_features, generator=g)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        variants = {"fp32": nn.Sequential(copy.deepcopy(base))}
        variants["labkit int8"] = quantize_(nn.Sequential(copy.deepcopy(base)), QuantConfig(8),
                                            lambda m, f: isinstance(m, nn.Linear))
        for name, cfg in (("torchao int8 weight-only", Int8WeightOnlyConfig()),
                          ("torchao int8 dynamic", Int8DynamicActivationInt8WeightConfig())):
            m = nn.Sequential(copy.deepcopy(base))
            ao_quantize_(m, cfg)
            variants[name] = m
            if compile:
                variants[name + " + compile"] = torch.compile(m)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated (kept as a baseline)
            variants["quantize_dynamic (deprecated)"] = torch.ao.quantization.quantize_dynamic(
                nn.Sequential(copy.deepcopy(base)), {nn.Linear}, dtype=torch.qint8)
        ms, err = {}, {}
        with torch.no_grad():
            ref = variants["fp32"](x)
            for name, m in variants.items():
                y = m(x)  # warm-up (and compile, if any)
                err[name] = float((y.float() - ref).norm() / ref.norm())
                ms[name] = 1e3 * _time(lambda: m(x), reps)
    finally:
        torch.set_num_threads(old)
    return dict(shape=[batch, in_features, out_features], threads=threads,
                ms={k: round(v, 4) for k, v in ms.items()},
                speedup={k: round(ms["fp32"] / v, 3) for k, v in ms.items()},
                max_rel_err={k: round(v, 5) for k, v in err.items()})


# --------------------------------------------------------------------------------------------------
# 7. The physical limit: weight-bound matrix-vector products (notebook 02, "How fast can it be?")
# --------------------------------------------------------------------------------------------------
def bandwidth_limit(weight_mb: float = 256, reps: int = 5, threads: int = 1, seed: int = 0) -> dict:
    """y = W·x with W of `weight_mb` MB in fp32 (and the same shape in bf16 and int8): achieved GB/s.

    Achieved GB/s = bytes of W / time (W is read once per product). Compared with a measured copy
    bandwidth (read + write bytes / time) over a buffer of the same size. bound_speedup = 32/bits is what
    the bytes alone allow over fp32; achieved_speedup is what the run shows.
    """
    n = int(math.sqrt(weight_mb * 1e6 / 4))
    n -= n % 64
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(seed)
        w32 = torch.empty(n, n).uniform_(-1, 1, generator=g)
        x = torch.randn(1, n, generator=g)
        res = {}
        dst = torch.empty_like(w32)
        t = _time(lambda: dst.copy_(w32), reps, warmup=1)
        copy_gbs = 2 * w32.nbytes / t / 1e9
        del dst
        t = _time(lambda: torch.mv(w32, x[0]), reps, warmup=1)
        res["fp32"] = dict(bits=32, bytes=w32.nbytes, ms=1e3 * t)
        w16 = w32.to(torch.bfloat16)
        x16 = x.to(torch.bfloat16)
        t = _time(lambda: torch.mv(w16, x16[0]), reps, warmup=1)
        res["bf16"] = dict(bits=16, bytes=w16.nbytes, ms=1e3 * t)
        del w16
        lin = nn.Linear(n, n, bias=False)
        lin.weight.data = w32  # shares storage, no copy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated; its fbgemm kernel is still fast
            qlin = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
        del lin
        t = _time(lambda: qlin(x), reps, warmup=1)
        res["int8 (fbgemm, quantize_dynamic)"] = dict(bits=8, bytes=n * n, ms=1e3 * t)
        del qlin
        w8 = torch.clamp(torch.round(w32 * 127), -127, 127).to(torch.int8)
        del w32
        scales = torch.full((n,), 1 / 127, dtype=torch.bfloat16)
        t = _time(lambda: torch.ops.aten._weight_int8pack_mm(x16, w8, scales), reps, warmup=1)
        res["int8 weight-only (torchao's CPU kernel)"] = dict(bits=8, bytes=w8.nbytes, ms=1e3 * t)
        del w8
    finally:
        torch.set_num_threads(old)
    for k, r in res.items():
        r["gb_per_s"] = r["bytes"] / (r["ms"] / 1e3) / 1e9
        r["fraction_of_copy_bw"] = r["gb_per_s"] / copy_gbs
        r["bound_speedup"] = 32 / r["bits"]
        r["achieved_speedup"] = res["fp32"]["ms"] / r["ms"]
        r["bound_ms"] = r["bytes"] / (copy_gbs * 1e9) * 1e3
    return dict(n=n, weight_mb_fp32=round(res["fp32"]["bytes"] / 1e6, 1), threads=threads,
                copy_gb_per_s=round(copy_gbs, 2),
                paths={k: {kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in r.items()}
                       for k, r in res.items()})


# --------------------------------------------------------------------------------------------------
# 8. Sweeps on the real models (notebook 02, "Perplexity against bits"); make_results and bench
# --------------------------------------------------------------------------------------------------
import contextlib  # noqa: E402


@contextlib.contextmanager
def temporarily_quantized(model: nn.Module, config: QuantConfig,
                          filter_fn: Callable[[nn.Module, str], bool] | None = None):
    """Quantize `model` in place for the `with` block, then put the original Linear modules back.

    Cheaper than deep-copying a 538 MB model for every point of a sweep.
    """
    filter_fn = filter_fn or skip_tied(model)
    originals = [(fqn, m) for fqn, m in model.named_modules() if fqn and filter_fn(m, fqn)]
    quantize_(model, config, filter_fn)
    try:
        yield model
    finally:
        for fqn, m in originals:
            parent_name, _, child = fqn.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, m)


def kjv_sentences(n: int = 16, split: str = "validation") -> list[str]:
    """n KJV verses spread evenly over a split's books (MiniLM's test sentences)."""
    from .data import books, verses
    wanted = set(books(split))
    vs = [v["text"] for v in verses() if v["book"] in wanted]
    step = max(1, len(vs) // n)
    return vs[::step][:n]


def embedding_cosine(model, tokenizer, sentences: list[str], config: QuantConfig | None,
                     reference: torch.Tensor | None = None) -> dict:
    """Mean/min cosine between MiniLM sentence embeddings under `config` and fp32 (config=None: fp32)."""
    from .models import sentence_embeddings
    ref = sentence_embeddings(model, tokenizer, sentences) if reference is None else reference
    if config is None:
        return dict(mean=1.0, min=1.0)
    with temporarily_quantized(model, config) as m:
        emb = sentence_embeddings(m, tokenizer, sentences)
        nbytes = quantized_linear_bytes(m)
    cos = (emb * ref).sum(-1)
    return dict(mean=float(cos.mean()), min=float(cos.min()), linear_bytes=nbytes["total_bytes"],
                bits_per_weight=nbytes["bits_per_weight"])


def perplexity_point(model, tokens, config: QuantConfig | None | str, max_tokens: int) -> dict:
    """Perplexity and bytes of `model` under one config (None → fp32, "bf16" → a bf16 copy)."""
    from .evaluate import perplexity
    from .memory import model_bytes
    if config is None:
        return dict(name="fp32", ppl=perplexity(model, tokens, max_tokens=max_tokens),
                    model_bytes=model_bytes(model), bits_per_weight=32.0)
    if config == "bf16":
        import copy
        m = copy.deepcopy(model).to(torch.bfloat16)
        out = dict(name="bf16", ppl=perplexity(m, tokens, max_tokens=max_tokens), model_bytes=model_bytes(m),
                   bits_per_weight=16.0)
        del m
        return out
    with temporarily_quantized(model, config) as m:
        b = quantized_linear_bytes(m)
        return dict(name=config.name, ppl=perplexity(m, tokens, max_tokens=max_tokens), model_bytes=model_bytes(m),
                    linear_bytes=b["total_bytes"], bits_per_weight=b["bits_per_weight"], bits=config.bits,
                    granularity=config.granularity, group_size=config.group_size, symmetric=config.symmetric)


SMOL_GROUPS = (None, 192, 64, 32)   # 576 and 1536 are multiples of 192, 64, 32 — but not of 128
MINILM_GROUPS = (None, 128, 64, 32)  # 384 and 1536 are multiples of 128
LIVE_CHECK = dict(config=dict(bits=4, group_size=64), max_tokens=256)


def _configs(groups, bits_list=(8, 4, 3, 2)):
    out = []
    for bits in bits_list:
        for g in groups:
            out.append(QuantConfig(bits) if g is None else QuantConfig(bits, group_size=g))
    return out


def q41_origin(model) -> dict:
    """SmolLM2's GGUF Q4_1 origin: distinct values per block of 32, and how exactly 4-bit g32 asymmetric
    re-quantization reproduces each decoder Linear weight (relative error)."""
    filt = skip_tied(model)
    lin = [(fqn, m) for fqn, m in model.named_modules() if filt(m, fqn)]
    distinct = torch.cat([distinct_per_block(m.weight, 32) for _, m in lin])
    rel = {}
    for fqn, m in lin:
        w = m.weight.detach()
        rel[fqn] = float((dequantize(quantize(w, 4, group_size=32, symmetric=False)) - w).norm() / w.norm())
    emb = distinct_per_block(model.get_input_embeddings().weight, 32)
    hist = torch.bincount(distinct, minlength=33)[:33]
    return dict(blocks=int(distinct.numel()), max_distinct=int(distinct.max()),
                mean_distinct=float(distinct.float().mean()), distinct_hist=hist.tolist(),
                embedding_mean_distinct=float(emb.float().mean()), embedding_max_distinct=int(emb.max()),
                requant_rel_error_max=max(rel.values()), requant_rel_error_mean=sum(rel.values()) / len(rel))


def make_results() -> dict:
    """The cached sweeps of notebook 02 (→ data/results/quantize.json via `python -m labkit results quantize`).

    SmolLM2-135M perplexity at fp32/bf16 and bits × granularity (1,024 validation tokens, or 8,192 with
    LABKIT_FULL=1); MiniLM cosine vs fp32 for the same grid; the live-check point the notebook recomputes;
    int8 CPU timings incl. torch.compile; the bandwidth limit.
    """
    from .evaluate import eval_tokens
    from .models import load_model
    from .repro import full_mode, seed_everything
    seed_everything(0)
    t0 = time.time()
    budget = 8192 if full_mode() else 1024
    model, tok = load_model("smollm2-135m")
    tokens = eval_tokens(tok)
    smol = [perplexity_point(model, tokens, None, budget), perplexity_point(model, tokens, "bf16", budget)]
    configs = _configs(SMOL_GROUPS) + [QuantConfig(4, group_size=32, symmetric=False),
                                       QuantConfig(3, group_size=32, symmetric=False)]
    for cfg in configs:
        smol.append(perplexity_point(model, tokens, cfg, budget))
        print(f"  {smol[-1]['name']:<16} ppl {smol[-1]['ppl']:.3f}  ({time.time() - t0:.0f} s)", flush=True)
    live_cfg = QuantConfig(**LIVE_CHECK["config"])
    live = dict(LIVE_CHECK, ppl=perplexity_point(model, tokens, live_cfg, LIVE_CHECK["max_tokens"])["ppl"],
                fp32_ppl=perplexity_point(model, tokens, None, LIVE_CHECK["max_tokens"])["ppl"])
    origin = q41_origin(model)
    del model
    enc, etok = load_model("minilm")
    sents = kjv_sentences(16)
    from .models import sentence_embeddings
    ref = sentence_embeddings(enc, etok, sents)
    mini = []
    for cfg in _configs(MINILM_GROUPS) + [QuantConfig(4, group_size=32, symmetric=False)]:
        mini.append(dict(name=cfg.name, bits=cfg.bits, granularity=cfg.granularity, group_size=cfg.group_size,
                         symmetric=cfg.symmetric, **embedding_cosine(enc, etok, sents, cfg, ref)))
    mini_origin = distinct_per_block(enc.encoder.layer[0].attention.self.query.weight, 32)
    speed = time_int8_paths(2048, 2048, batch=1, reps=20, compile=True)
    speed64 = time_int8_paths(2048, 2048, batch=64, reps=10, compile=True)
    bw = bandwidth_limit(256)
    return dict(tokens=budget, smollm2=smol, live_check=live, q41=origin, minilm=mini,
                minilm_mean_distinct_per_32=float(mini_origin.float().mean()), sentences=len(sents),
                speed_batch1=speed, speed_batch64=speed64, bandwidth=bw, seconds=round(time.time() - t0, 1))


def bench() -> dict:
    """Headline figures of notebook 02 (≈ 60–90 s): perplexity and bytes per format, MiniLM cosine, int8 CPU
    speed ratios vs fp32 (one thread), achieved GB/s vs copy bandwidth. 512 validation tokens."""
    from .evaluate import eval_tokens
    from .models import load_model, sentence_embeddings
    model, tok = load_model("smollm2-135m")
    tokens = eval_tokens(tok)
    out = {"tokens": 512, "note": "SmolLM2 dims (576) are not multiples of 128: g64 stands in for g128"}
    points = [(None, "fp32"), ("bf16", "bf16"), (QuantConfig(8), "int8"), (QuantConfig(4, group_size=64), "int4_g64"),
              (QuantConfig(4), "int4_per_channel"), (QuantConfig(3, group_size=64), "int3_g64")]
    for cfg, key in points:
        p = perplexity_point(model, tokens, cfg, 512)
        out[f"ppl_{key}"] = round(p["ppl"], 2)
        out[f"mb_{key}"] = round(p["model_bytes"] / 1e6, 1)
    del model
    enc, etok = load_model("minilm")
    sents = kjv_sentences(16)
    ref = sentence_embeddings(enc, etok, sents)
    for cfg, key in ((QuantConfig(8), "int8"), (QuantConfig(4, group_size=128), "int4_g128"),
                     (QuantConfig(4), "int4_per_channel")):
        out[f"minilm_cosine_{key}"] = round(embedding_cosine(enc, etok, sents, cfg, ref)["mean"], 4)
    sp = time_int8_paths(2048, 2048, batch=1, reps=10, compile=False)
    out["speedup_vs_fp32_batch1"] = sp["speedup"]
    bw = bandwidth_limit(256, reps=3)
    out["copy_gb_per_s"] = bw["copy_gb_per_s"]
    out["matvec_gb_per_s"] = {k: round(v["gb_per_s"], 2) for k, v in bw["paths"].items()}
    out["matvec_speedup_vs_fp32"] = {k: round(v["achieved_speedup"], 2) for k, v in bw["paths"].items()}
    return out


# --------------------------------------------------------------------------------------------------
# 9. "Try it" (notebook 02): one config → error histogram, perplexity, bytes
# --------------------------------------------------------------------------------------------------
def explore(model, tokens, bits: int = 4, group_size: int = 64, symmetric: bool = True,
            layer: str = "model.layers.0.self_attn.q_proj", max_tokens: int = 256, fp32_ppl: float | None = None,
            ) -> dict:
    """Quantize every decoder Linear with (bits, group_size [0 = per channel], symmetric): the error histogram
    of one layer's weights, perplexity on `max_tokens` tokens, and bytes of the Linear weights."""
    from .evaluate import perplexity
    cfg = QuantConfig(bits) if not group_size else QuantConfig(bits, group_size=int(group_size))
    cfg.symmetric = bool(symmetric)
    w = model.get_submodule(layer).weight.detach()
    q = quantize(w, cfg.bits, cfg.granularity, cfg.group_size, cfg.symmetric)
    err = (dequantize(q) - w).flatten()
    if fp32_ppl is None:
        fp32_ppl = perplexity(model, tokens, max_tokens=max_tokens)
    with temporarily_quantized(model, cfg) as m:
        ppl = perplexity(m, tokens, max_tokens=max_tokens)
        b = quantized_linear_bytes(m)
    return dict(name=cfg.name, layer=layer, errors=err, scale_max=float(q.scales.float().max()),
                rel_error=float(err.norm() / w.norm()), ppl=ppl, fp32_ppl=fp32_ppl,
                linear_bytes=b["total_bytes"], fp32_bytes=b["fp32_bytes"], bits_per_weight=b["bits_per_weight"])


def layer_error_table(w: torch.Tensor, bits_list=(8, 4, 3, 2), groups=(None, 192, 64, 32)) -> list[dict]:
    """Relative error and bytes of one weight matrix for each (bits, granularity), symmetric."""
    rows = []
    for bits in bits_list:
        for g in groups:
            q = quantize(w, bits) if g is None else quantize(w, bits, group_size=g)
            rows.append(dict(bits=bits, granularity="per-channel" if g is None else f"g{g}",
                             bits_per_weight=q.bits_per_value(), bytes=q.nbytes(), **quant_error(w, q)))
    return rows
