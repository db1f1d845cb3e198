"""Quantization: number formats, integer quantizers with real bit packing, quantized Linear layers, outliers.

Defined in notebook 02 (02_quantization.ipynb). Sections of the notebook → functions here:
  1 number formats ............ `float_formats`, `cast_error`
  2 quantizers + packing ...... `quantize`, `dequantize`, `QTensor`, `save_qtensor` (in labkit/qtensor.py),
                                `pack_bits`, `unpack_bits` (lk.compress) — all re-exported here
  3 quantized model ........... `QuantConfig`, `quantize_`, `QuantLinear` (packed in RAM, dequantized tile by tile),
                                `QuantEmbedding`, `skip_tied`, `temporarily_quantized`
  4 the Q4_1 origin ........... `distinct_per_block`
  5 outliers (LLM.int8()) ..... `linear_input_stats`, `fake_quant_per_token`, `mixed_int8_matmul`
  6 real libraries ............ `torchao_int8_weight`, `torchao_config`, `torchao_quantize_` (int8 and int4 on a CPU)
Kernel tables, the bandwidth limit, sweeps, make_results and bench live in labkit/experiments/quantize.py.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import real_number, torch_module, torch_tensor, whole_number

# The quantized tensor (§2) has its own module; everything in it is re-exported (notebook 02 uses Q.quantize,
# Q.dequantize, Q.QTensor, Q.save_qtensor, Q.quant_error, Q.SUPPORTED_BITS), and so is bit packing, whose one home
# is lk.compress, because packed codes are what a quantized tensor stores (notebook 02 uses Q.unpack_bits).
from .compress import pack_bits, unpack_bits  # noqa: F401
from .qtensor import (  # noqa: F401
    GRANULARITIES, SCALE_DTYPES, SUPPORTED_BITS, QTensor, check_bits, check_float, dequantize, fake_quantize,
    qtensor_state, quant_error, quantize, rtn_codes, save_qtensor,
)


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
    check_float(w, "cast_error")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch dtype such as torch.float16 or torch.bfloat16, got "
                        f"{dtype!r}")
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
# 3. Quantized model: QuantLinear + quantize_ (notebook 02, "Quantize the model")
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantConfig:
    """How to quantize each selected Linear weight (mirrors torchao's config objects; frozen, checked here).

    granularity defaults to "group" when group_size is given and to "channel" otherwise."""
    bits: int = 8
    granularity: str | None = None   # "tensor" | "channel" | "group"
    group_size: int | None = None    # needed for "group"
    symmetric: bool = True
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self):
        check_bits(self.bits)
        if self.group_size is not None:
            whole_number("QuantConfig.group_size", self.group_size, 1, "e.g. 32 or 64, or None")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"QuantConfig.symmetric must be True or False, got {self.symmetric!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise TypeError(f"QuantConfig.scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")
        g = self.granularity
        if g is None:   # normalised once, at construction (the object never changes afterwards)
            object.__setattr__(self, "granularity", g := ("group" if self.group_size is not None else "channel"))
        if g not in GRANULARITIES:
            raise ValueError(f"granularity={g!r}; use one of {GRANULARITIES}")
        if g == "group" and self.group_size is None:
            raise ValueError("granularity='group' needs a positive group_size, e.g. QuantConfig(bits=4, group_size=64)")
        if g != "group" and self.group_size is not None:
            raise ValueError(f"group_size={self.group_size} conflicts with granularity={g!r}; drop one of them")

    @property
    def name(self) -> str:
        g = {"tensor": "pt", "channel": "pc"}.get(self.granularity, f"g{self.group_size}")
        return f"int{self.bits}-{g}" + ("" if self.symmetric else "-asym")


TILE_WEIGHTS = 1 << 18   # QuantLinear dequantizes at most this many weights at a time (1 MB of fp32)


class QuantLinear(nn.Module):
    """A Linear whose weight stays packed in RAM (codes + scales [+ zeros] as buffers): `forward` dequantizes one
    tile of output rows at a time (≤ TILE_WEIGHTS weights), multiplies, and drops the tile. RAM = the formula
    numel·bits/8 + groups·(scale [+ zero]) bytes, never the fp32 weight."""

    def __init__(self, q: QTensor, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(q, QTensor):
            raise TypeError(f"QuantLinear needs a QTensor (lk.quantize.quantize(weight, ...)), got {type(q).__name__}")
        if bias is not None and (torch_tensor("bias", bias, "the Linear's bias", dims=1, kind="float")
                                 .shape[0] != q.shape[0]):
            raise ValueError(f"bias must have one value per output row ({q.shape[0]}), got {tuple(bias.shape)}")
        if len(q.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D weight, got shape {q.shape}")
        self.bits, self.group_size, self.symmetric = q.bits, q.group_size, q.symmetric
        self.granularity, self.shape, self.orig_dtype = q.granularity, tuple(q.shape), q.dtype
        self.out_features, self.in_features = q.shape
        self.register_buffer("packed", q.packed)
        self.register_buffer("scales", q.scales)
        self.register_buffer("zeros", q.zeros)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        row_bits = self.in_features * self.bits
        # rows start on a byte boundary → a tile of rows is a slice of `packed` (else dequantize all at once)
        self.tile_rows = max(1, TILE_WEIGHTS // self.in_features) if row_bits % 8 == 0 else self.out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> "QuantLinear":
        q = quantize(linear.weight, config.bits, config.granularity, config.group_size, config.symmetric,
                     config.scale_dtype)
        return cls(q, linear.bias)

    def qtensor(self) -> QTensor:
        return QTensor(self.packed, self.scales, self.zeros, self.bits, self.group_size, self.shape,
                       self.symmetric, self.granularity, self.orig_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed weight (codes, scales, zeros), as the formula says."""
        return self.qtensor().nbytes

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """fp32 weight rows r0:r1, dequantized from the packed codes of those rows only."""
        if (r0, r1) == (0, self.out_features):
            return dequantize(self.qtensor()).float()
        per_row = self.in_features * self.bits // 8
        codes = unpack_bits(self.packed[r0 * per_row: r1 * per_row], self.bits, (r1 - r0) * self.in_features)
        codes = codes.view(r1 - r0, -1, self.group_size if self.granularity == "group" else self.in_features).float()
        sl = slice(None) if self.granularity == "tensor" else slice(r0, r1)
        s = self.scales[sl].float().unsqueeze(-1)
        w = (codes - 2 ** (self.bits - 1)) * s if self.symmetric else codes * s + self.zeros[sl].float().unsqueeze(-1)
        return w.reshape(r1 - r0, self.in_features)

    def weight_dequantized(self) -> torch.Tensor:
        return dequantize(self.qtensor())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, step = self.out_features, self.tile_rows
        y = torch.cat([F.linear(x, self.rows(r, min(r + step, n)).to(x.dtype)) for r in range(0, n, step)], -1)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        g = self.granularity if self.granularity != "group" else f"group={self.group_size}"
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, {g}, "
                f"{'sym' if self.symmetric else 'asym'}")


class QuantEmbedding(nn.Module):
    """An embedding table kept packed (a QuantLinear's buffers): a lookup dequantizes only the rows it needs.
    `tied_head()` returns the lm_head that shares these very buffers (SmolLM2 ties lm_head to the embedding)."""

    def __init__(self, q: QTensor):
        super().__init__()
        self.table = QuantLinear(q)
        self.num_embeddings, self.embedding_dim = q.shape

    @property
    def nbytes(self) -> int:
        return self.table.nbytes

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.table
        if t.tile_rows == t.out_features:   # rows not byte-aligned: whole table (small tables only)
            return F.embedding(ids, t.weight_dequantized().float())
        uniq, inv = torch.unique(ids, return_inverse=True)
        rows = torch.stack([t.rows(int(r), int(r) + 1)[0] for r in uniq])
        return rows[inv]

    def tied_head(self) -> QuantLinear:
        head = QuantLinear.__new__(QuantLinear)
        nn.Module.__init__(head)
        head.__dict__.update({k: v for k, v in self.table.__dict__.items() if not k.startswith("_")})
        for name in ("packed", "scales", "zeros"):
            head.register_buffer(name, getattr(self.table, name))   # the same tensors: no copy
        head.bias = None
        return head


def _tied_weight_ids(model: nn.Module) -> set[int]:
    """Storage pointers of weights shared with an nn.Embedding (e.g. a tied lm_head)."""
    return {m.weight.untyped_storage().data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}


def skip_tied(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    """filter_fn: every nn.Linear except those whose weight is tied to an embedding (SmolLM2's lm_head)."""
    torch_module("model", model, "a model such as lk.load_model()[0]")
    tied = _tied_weight_ids(model)
    return lambda m, fqn: isinstance(m, nn.Linear) and m.weight.untyped_storage().data_ptr() not in tied


def quantize_(model: nn.Module, config: QuantConfig,
              filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """In place: replace each selected nn.Linear by a QuantLinear (torchao's `quantize_` shape); returns the model.

    filter_fn(module, fqn) picks modules; default `skip_tied(model)`: all Linears except a lm_head tied to
    the embedding (quantizing it would also change the embedding it shares storage with). All or nothing: every
    selected layer is checked and quantized before the first one is swapped, so an error changes nothing. A model
    that already holds QuantLinear layers is refused (quantizing twice would compound the rounding); reload it.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"quantize_ expects a labkit QuantConfig, got {type(config).__name__}; "
                        f"e.g. QuantConfig(bits=4, group_size=64)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_ expects an nn.Module, got {type(model).__name__}")
    done = [fqn for fqn, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    if done:
        raise ValueError(f"the model is already quantized ({len(done)} layers, e.g. {done[0]}); quantize_ works on "
                         f"a float model — reload it (lk.load_model) or use temporarily_quantized for a sweep")
    filter_fn = filter_fn or skip_tied(model)
    chosen = [(fqn, m) for fqn, m in model.named_modules() if fqn and filter_fn(m, fqn)]
    for fqn, m in chosen:  # validate everything before changing anything
        if not isinstance(m, nn.Linear):
            raise TypeError(f"{fqn} is a {type(m).__name__}; quantize_ can only swap nn.Linear layers — "
                            f"make filter_fn return False for it")
        if not m.weight.is_floating_point() or m.weight.device.type == "meta":
            raise TypeError(f"{fqn}.weight is {m.weight.dtype} on {m.weight.device}, not a loaded float weight")
    check_group_size(config, dict(chosen))
    new = {}
    for fqn, m in chosen:  # quantize every layer (may raise: NaN/inf, scale overflow) before swapping any
        try:
            new[fqn] = QuantLinear.from_linear(m, config)
        except ValueError as e:
            raise ValueError(f"{fqn}: {e} (nothing was changed)") from None
    for fqn, q in new.items():
        parent_name, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    return model


def check_group_size(config: QuantConfig, linears: dict[str, nn.Linear]) -> None:
    """ValueError naming the first Linear whose in_features the config's group_size does not divide — checked
    before a transform (quantize_, gptq_, awq_) changes any layer."""
    for fqn, m in linears.items():
        if config.granularity == "group" and m.in_features % config.group_size:
            raise ValueError(f"{fqn}: group_size={config.group_size} does not divide in_features="
                             f"{m.in_features}; pick a divisor (e.g. 32 or 64) or granularity='channel'")


def quantized_linear_bytes(model: nn.Module) -> dict:
    """Bytes of QuantLinear layers (codes, scales, zeros) vs what fp32 would need, for a quantized model."""
    q = [m for m in torch_module("model", model, "a model quantized by quantize_").modules()
         if isinstance(m, QuantLinear)]
    codes = sum(m.packed.numel() for m in q)
    scales = sum(m.scales.numel() * m.scales.element_size() for m in q)
    zeros = sum(m.zeros.numel() * m.zeros.element_size() for m in q if m.zeros is not None)
    n = sum(m.in_features * m.out_features for m in q)
    return dict(layers=len(q), weights=n, codes_bytes=codes, scale_bytes=scales + zeros,
                total_bytes=codes + scales + zeros, fp32_bytes=4 * n,
                bits_per_weight=8 * (codes + scales + zeros) / max(n, 1))


@contextlib.contextmanager
def temporarily_quantized(model: nn.Module, config: QuantConfig,
                          filter_fn: Callable[[nn.Module, str], bool] | None = None):
    """Quantize `model` in place for the `with` block, then put the original Linear modules back.

    Cheaper than deep-copying a 538 MB model for every point of a sweep.
    """
    torch_module("model", model, "a model such as lk.load_model()[0]")
    filter_fn = filter_fn or skip_tied(model)
    originals = [(fqn, m) for fqn, m in model.named_modules() if fqn and filter_fn(m, fqn)]
    quantize_(model, config, filter_fn)
    try:
        yield model
    finally:
        for fqn, m in originals:
            parent_name, _, child = fqn.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, m)


# --------------------------------------------------------------------------------------------------
# 4. The Q4_1 origin of SmolLM2's weights (notebook 02, "Where these weights came from")
# --------------------------------------------------------------------------------------------------
def distinct_per_block(w: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Number of distinct values in each block of `block` consecutive weights along the last dim."""
    check_float(w, "distinct_per_block")
    block = whole_number("block", block, 1, "weights per block, e.g. 32 (GGUF's Q4_1)")
    if w.dim() == 0 or w.shape[-1] % block:
        raise ValueError(f"block={block} must divide the last dimension of w, got shape {tuple(w.shape)}")
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
    from .evaluate import check_token_ids
    check_token_ids("tokens", tokens, model)
    for arg, v in (("names", names), ("keep", keep)):
        if v is not None and (not isinstance(v, (list, tuple, set)) or not all(isinstance(n, str) for n in v)):
            raise TypeError(f"{arg} must be a list of Linear names (e.g. ['model.layers.0.mlp.down_proj']) or None, "
                            f"got {v!r}")
    linears = {fqn for fqn, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}
    unknown = sorted(set(names or []) - linears) + sorted(set(keep or []) - linears)
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a Linear of this model; see [n for n, m in model.named_modules()]")
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


def _check_matmul(x, w) -> None:
    torch_tensor("x", x, "activations [tokens, in_features]", kind="float", finite=True)
    torch_tensor("w", w, "a weight [out, in_features]", dims=2, kind="float", finite=True)
    if x.dim() == 0 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"x must end in the weight's {w.shape[1]} input features, got shape {tuple(x.shape)}")


def mixed_int8_matmul(x: torch.Tensor, w: torch.Tensor, threshold: float = 6.0) -> tuple[torch.Tensor, int]:
    """LLM.int8() decomposition: y = x·wᵀ with input columns having any |x| > threshold kept in float and the
    rest as int8 (per-token activations × per-output-channel weights). Returns (y, number of outlier columns).
    """
    _check_matmul(x, w)
    threshold = real_number("threshold", threshold, "the |x| above which a column is an outlier, e.g. 6.0", low=0)
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
    _check_matmul(x, w)
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, in_features], got shape {tuple(x.shape)}")
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
def quiet_torchao():
    import logging
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*KernelPreference.*")


def torchao_int8_weight(linear: nn.Linear) -> dict:
    """torchao Int8WeightOnlyConfig on a copy of `linear`: its int8 codes, scales and dequantized weight."""
    import copy
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear (e.g. model.model.layers[0].mlp.up_proj), got "
                        f"{type(linear).__name__}")
    quiet_torchao()
    from torchao.quantization import Int8WeightOnlyConfig
    from torchao.quantization import quantize_ as ao_quantize_
    m = nn.Sequential(copy.deepcopy(linear))
    ao_quantize_(m, Int8WeightOnlyConfig())
    w = m[0].weight
    return dict(module=m[0], qdata=w.qdata, scale=w.scale.reshape(-1), dequantized=w.dequantize())


TORCHAO_CPU = ("int8 weight-only", "int8 dynamic", "int4 weight-only")


def torchao_config(kind: str, group_size: int = 64):
    """The torchao 0.18 config that runs on a CPU for `kind` (one of TORCHAO_CPU).

    int4 weight-only on a CPU is `torchao.prototype.quantization.int4.PrototypeInt4WeightOnlyConfig`: it needs a
    bf16 Linear and packs it as an `Int4OpaqueTensor` (two codes per byte + bf16 scale and zero per group) for
    `aten._weight_int4pack_mm_for_cpu`. (The non-prototype `Int4WeightOnlyConfig` packings target CUDA.)"""
    group_size = whole_number("group_size", group_size, 1, "values per int4 scale, e.g. 32, 64 or 128")
    quiet_torchao()
    if kind == "int8 weight-only":
        from torchao.quantization import Int8WeightOnlyConfig
        return Int8WeightOnlyConfig()
    if kind == "int8 dynamic":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig
        return Int8DynamicActivationInt8WeightConfig()
    if kind == "int4 weight-only":
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        return PrototypeInt4WeightOnlyConfig(group_size=group_size)
    raise ValueError(f"kind={kind!r}; use one of {TORCHAO_CPU}")


def torchao_quantize_(model: nn.Module, kind: str, group_size: int = 64,
                      filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """torchao's quantize_ with the CPU config for `kind` on the Linears filter_fn picks (default skip_tied);
    int4 converts the chosen Linears to bf16 first (the CPU int4 kernel takes bf16 activations). Returns model."""
    from torchao.quantization import quantize_ as ao_quantize_
    torch_module("model", model, "a model such as lk.load_model()[0]")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a function (module, fqn) -> bool, or None; got {filter_fn!r}")
    cfg = torchao_config(kind, group_size)
    filter_fn = filter_fn or skip_tied(model)
    chosen = {fqn for fqn, m in model.named_modules() if fqn and filter_fn(m, fqn)}
    if kind == "int4 weight-only":
        for fqn in chosen:
            model.get_submodule(fqn).to(torch.bfloat16)
    ao_quantize_(model, cfg, filter_fn=lambda m, fqn: fqn in chosen)
    return model
