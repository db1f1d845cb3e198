"""SmoothQuant: int8 weights AND int8 activations (W8A8), with the activations' outliers migrated into the weights.

Defined in notebook 02 ("SmoothQuant: int8 activations too"). Weights are easy to quantize; activations are not:
a few input channels of a Linear carry values hundreds of times the rest (notebook 02, "Outlier features"), so one
int8 scale per token or per tensor must stretch to cover them and the ordinary channels round to zero. Xiao et al.
noticed that the outliers sit in fixed CHANNELS, and that x·Wᵀ = (x·diag(s)⁻¹)·(W·diag(s))ᵀ for any s > 0: dividing
channel j of the activation by s_j and multiplying column j of the weight by s_j changes nothing in exact
arithmetic, but moves quantization difficulty from the activation to the weight. With

    s_j = max|X_j|^α / max|W_j|^(1−α)

channel j's activation range becomes (max|X_j|·max|W_j|)^(1−α) and its weight range (max|X_j|·max|W_j|)^α: α = 0.5
gives both the same range, α → 1 flattens the activation's channels (the paper uses 0.5, and up to 0.8–0.85 for
models with stronger outliers). 1/s is folded into the op that produces x (an RMSNorm's weight for
q/k/v and gate/up; up_proj's rows for down_proj, since down_proj's input is silu(gate)·up), so the W8A8 model
costs no extra byte and no extra operation. o_proj is left unsmoothed (its input comes out of attention, where a
per-channel scale would have to be shared across the query heads of a KV group).

Everything here is SIMULATED with fake quantization (labkit.quantize.fake_quantize with fp32 scales — the values of
fake_quant_per_token / fake_quant_per_tensor, without packing: rounded to the int8 grid, arithmetic in fp32): weights int8 with one scale per output channel, activations
int8 with one scale per token ("token") or one for the whole tensor ("tensor"), computed on every call (dynamic).
A real W8A8 kernel multiplies the int8 codes in int32 and rescales — the same numbers.

SmoothQuant: Xiao, Lin, Seznec, Wu, Demouth, Han 2023, https://arxiv.org/abs/2211.10438
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import quantize as Q
from .checks import real_number, torch_module, torch_tensor
from .models import check_llama

ACTS = ("token", "tensor")
ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))   # the grid search_alpha tries
EPS = 1e-5                                              # floor of max|X_j|, max|W_j| and s (as the reference code)


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------
def check_alpha(alpha) -> float:
    """alpha as a float; TypeError for a non-number, ValueError outside [0, 1]."""
    if not 0 <= real_number("alpha", alpha, "in [0, 1]; SmoothQuant's default is 0.5") <= 1:
        raise ValueError(f"alpha={alpha!r} must be a number in [0, 1] (the share of the activation's range that "
                         f"moves into the weights; 1 flattens the activation); SmoothQuant's default is 0.5")
    return float(alpha)


def check_act(act) -> str:
    if act not in ACTS:
        raise ValueError(f"act={act!r}; use 'token' (one int8 scale per token) or 'tensor' (one per tensor)")
    return act


def _as_weights(weights) -> list[torch.Tensor]:
    if not isinstance(weights, (torch.Tensor, list, tuple)):
        raise TypeError(f"weights must be one 2-D weight [out, in] or a list of them, got {type(weights).__name__}")
    ws = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    if not ws or not all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in ws):
        raise ValueError("weights must be one 2-D weight [out, in] or a list of them that read the same input")
    for w in ws:
        torch_tensor("weights", w, "Linear weights [out, in]", kind="float", finite=True)
    if len({w.shape[1] for w in ws}) != 1:
        raise ValueError(f"the weights read inputs of different widths {[w.shape[1] for w in ws]}; only Linears that "
                         f"read the same input share a smoothing factor")
    return ws


# --------------------------------------------------------------------------------------------------
# One Linear: smoothing factors and W8A8 outputs (notebook 02, "SmoothQuant")
# --------------------------------------------------------------------------------------------------
def _check_x(x) -> torch.Tensor:
    torch_tensor("x", x, "activations [..., in_features]", kind="float", finite=True)
    if x.dim() == 0:
        raise ValueError("x must have a last dimension of input features, got a 0-d tensor")
    return x


def smoothing_factors(x_absmax: torch.Tensor, weights, alpha: float = 0.5) -> torch.Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1−α) per input channel j (fp32 [in]). `weights`: one [out, in] weight or a list
    of weights that read the same input (then max|W_j| is taken over all their rows). x_absmax: max |input| per
    channel over calibration tokens (labkit.quantize.linear_input_stats' "feature_absmax")."""
    alpha = check_alpha(alpha)
    ws = _as_weights(weights)
    torch_tensor("x_absmax", x_absmax, "max |input| per channel", kind="float")
    if not isinstance(x_absmax, torch.Tensor) or x_absmax.dim() != 1 or x_absmax.numel() != ws[0].shape[1]:
        got = tuple(x_absmax.shape) if isinstance(x_absmax, torch.Tensor) else type(x_absmax).__name__
        raise ValueError(f"x_absmax must be 1-D with one value per input channel ({ws[0].shape[1]}), got {got}")
    x = x_absmax.detach().float()
    if not torch.isfinite(x).all() or (x < 0).any():
        raise ValueError("x_absmax must be finite and ≥ 0 (a max of |input|); recompute the calibration statistics")
    w = torch.cat([w.detach().float().abs() for w in ws]).amax(0)
    return (x.clamp_min(EPS).pow(alpha) / w.clamp_min(EPS).pow(1 - alpha)).clamp_min(EPS)


def fake_quant_activations(x: torch.Tensor, act: str = "token") -> torch.Tensor:
    """x [..., in] rounded to int8 with one scale per token (row) or one for the whole tensor, back in fp32."""
    check_act(act)
    _check_x(x)
    q = Q.fake_quantize(x.reshape(-1, x.shape[-1]), 8, "channel" if act == "token" else "tensor",
                        scale_dtype=torch.float32)
    return q.reshape(x.shape)


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """W [out, in] rounded to int8 with one scale per output channel, back in fp32."""
    torch_tensor("w", w, "a weight [out, in]", dims=2, kind="float", finite=True)
    return Q.fake_quantize(w.detach().float(), 8, "channel", scale_dtype=torch.float32)


def w8a8_matmul(x: torch.Tensor, w: torch.Tensor, act: str = "token", s: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ in simulated W8A8: Q_act(x·diag(s)⁻¹) · Q_w(W·diag(s))ᵀ, weights int8 per output channel. s=None is
    naive W8A8 (no smoothing)."""
    check_act(act)
    _check_x(x)
    torch_tensor("w", w, "a weight [out, in]", dims=2, kind="float", finite=True)
    if s is not None:
        torch_tensor("s", s, "the smoothing factors, one per input channel", dims=1, kind="float", finite=True)
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} features but the weight reads {w.shape[-1]}")
    x2, w = x.detach().reshape(-1, x.shape[-1]).float(), w.detach().float()
    if s is not None:
        if s.shape != (w.shape[1],):
            raise ValueError(f"s must have one factor per input channel ({w.shape[1]}), got shape {tuple(s.shape)}")
        x2, w = x2 / s, w * s
    y = fake_quant_activations(x2, act) @ fake_quant_weight(w).T
    return y.reshape(*x.shape[:-1], w.shape[0])


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """‖y − ref‖_F / ‖ref‖_F."""
    torch_tensor("ref", ref, "the exact output", kind="float", finite=True)
    if torch_tensor("y", y, "the approximate output, ref's shape", kind="float", finite=True).shape != ref.shape:
        raise ValueError(f"y {tuple(y.shape)} and ref {tuple(ref.shape)} must have one shape")
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def search_alpha(x: torch.Tensor, weights, x_absmax: torch.Tensor | None = None, act: str = "token",
                 alphas=ALPHAS) -> tuple[float, dict[float, float]]:
    """The α of `alphas` whose W8A8 outputs are closest to fp32 on inputs x [n, in], summed over `weights` (the
    Linears that share the input and therefore s). Returns (best α, {α: relative error})."""
    ws = _as_weights(weights)
    _check_x(x)
    if x.shape[-1] != ws[0].shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but the weights read {ws[0].shape[1]}")
    if not isinstance(alphas, (list, tuple)) or not alphas:
        raise ValueError(f"alphas must be a non-empty list of values in [0, 1], got {alphas!r}")
    x = x.detach().reshape(-1, x.shape[-1]).float()
    x_absmax = x.abs().amax(0) if x_absmax is None else x_absmax
    refs = [x @ w.detach().float().T for w in ws]
    total = math.sqrt(sum(float(r.norm()) ** 2 for r in refs))
    errs = {}
    for a in alphas:
        s = smoothing_factors(x_absmax, ws, a)
        errs[float(a)] = math.sqrt(sum(float((w8a8_matmul(x, w, act, s) - r).norm()) ** 2
                                       for w, r in zip(ws, refs))) / total
    return min(errs, key=errs.get), errs


# --------------------------------------------------------------------------------------------------
# The model: fold the smoothing into the previous ops, then W8A8 Linears
# --------------------------------------------------------------------------------------------------
class W8A8Linear(nn.Module):
    """A Linear simulated in W8A8: the weight rounded to int8 with one scale per output channel (kept as its fp32
    values on the int8 grid: a simulation), the input rounded to int8 per token or per tensor on every call.
    `input_scale` (1/s) is multiplied in first where no previous op absorbed the smoothing."""

    def __init__(self, linear: nn.Linear, act: str = "token", input_scale: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if input_scale is not None and torch_tensor("input_scale", input_scale, "1/s, one per input channel", dims=1,
                                                    kind="float", finite=True).shape[0] != linear.in_features:
            raise ValueError(f"input_scale must hold {linear.in_features} values, got {tuple(input_scale.shape)}")
        self.act = check_act(act)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", fake_quant_weight(linear.weight))
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().float())
        self.bias = linear.bias

    @property
    def nbytes(self) -> int:
        """What a real W8A8 layer stores: int8 codes + one fp16 scale per output channel (+ fp32 input scales)."""
        extra = 0 if self.input_scale is None else 4 * self.input_scale.numel()
        return self.in_features * self.out_features + 2 * self.out_features + extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale
        return F.linear(fake_quant_activations(x, self.act).to(x.dtype), self.weight.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, act=int8 per {self.act}"


def llama_groups(model: nn.Module) -> list[dict]:
    """The smoothable groups of a Llama: {"prev": module whose output channels absorb 1/s, "kind": "norm" (an
    RMSNorm's weight) or "rows" (a Linear's output rows), "linears": [fqn, ...] reading that output}."""
    check_llama(model)
    groups = []
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        groups += [dict(prev=layer.input_layernorm, kind="norm",
                        linears=[p + f"self_attn.{n}_proj" for n in "qkv"]),
                   dict(prev=layer.post_attention_layernorm, kind="norm", linears=[p + "mlp.gate_proj", p + "mlp.up_proj"]),
                   dict(prev=layer.mlp.up_proj, kind="rows", linears=[p + "mlp.down_proj"])]
    return groups


@torch.no_grad()
def smooth_(model: nn.Module, stats: dict, alpha: float | dict = 0.5) -> dict[str, torch.Tensor]:
    """In place and exact in fp32: for every group of llama_groups, s from the calibration statistics, the previous
    op's output channels ÷ s, the group's weight columns × s. `stats`: Q.linear_input_stats(model, tokens) of the
    model BEFORE smoothing; `alpha`: one α, or {fqn of a group's first Linear: α} (e.g. from search_alpha).
    Returns {first fqn: s}. Smoothing twice compounds: reload the model first."""
    groups = llama_groups(model)
    if not isinstance(stats, dict):
        raise TypeError(f"stats must be the dict Q.linear_input_stats(model, tokens) returned, got "
                        f"{type(stats).__name__}")
    if isinstance(alpha, dict):
        missing = [g["linears"][0] for g in groups if g["linears"][0] not in alpha]
        if missing:
            raise ValueError(f"alpha has no value for {len(missing)} groups (e.g. {missing[0]}); give one per group")
        for a in alpha.values():
            check_alpha(a)
    else:
        check_alpha(alpha)
    missing = [n for g in groups for n in g["linears"][:1] if n not in stats]
    if missing:
        raise ValueError(f"stats lack {missing[0]}; compute them with Q.linear_input_stats(model, tokens) first")
    plan = []
    for g in groups:                         # everything checked and computed before the first weight changes
        lins = [model.get_submodule(n) for n in g["linears"]]
        a = alpha[g["linears"][0]] if isinstance(alpha, dict) else alpha
        entry = stats[g["linears"][0]]
        if not isinstance(entry, dict) or "feature_absmax" not in entry:
            raise ValueError(f"stats[{g['linears'][0]!r}] lacks 'feature_absmax'; compute stats with "
                             "Q.linear_input_stats(model, tokens)")
        plan.append((g, lins, smoothing_factors(entry["feature_absmax"], [m.weight for m in lins], a)))
    out = {}
    for g, lins, s in plan:
        prev = g["prev"]
        if g["kind"] == "norm":
            prev.weight.div_(s.to(prev.weight.dtype))
        else:
            prev.weight.div_(s.to(prev.weight.dtype)[:, None])
            if prev.bias is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
        for m in lins:
            m.weight.mul_(s.to(m.weight.dtype))
        out[g["linears"][0]] = s
    return out


def w8a8_(model: nn.Module, act: str = "token",
          filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """In place: every selected nn.Linear (default: all but a lm_head tied to the embedding, as quantize_) becomes a
    W8A8Linear. Returns the model. A model that already holds W8A8Linear layers is refused."""
    check_act(act)
    torch_module("model", model, "a model such as lk.load_model()[0]")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a function (module, fqn) -> bool, or None; got {filter_fn!r}")
    if any(isinstance(m, W8A8Linear) for m in model.modules()):
        raise ValueError("the model already holds W8A8Linear layers; reload it (lk.load_model) before w8a8_ again")
    filter_fn = filter_fn or Q.skip_tied(model)
    chosen = [(fqn, m) for fqn, m in model.named_modules() if fqn and isinstance(m, nn.Linear) and filter_fn(m, fqn)]
    for fqn, m in chosen:
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, W8A8Linear(m, act))
    return model


def w8a8_bytes(model: nn.Module) -> int:
    """Bytes the W8A8 Linears of a model would store (int8 codes + fp16 scales per output channel)."""
    return sum(m.nbytes for m in torch_module("model", model, "a model after w8a8_").modules() if isinstance(m, W8A8Linear))
