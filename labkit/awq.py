"""AWQ: activation-aware weight quantization — scale the input channels that meet large activations before rounding.

Defined in notebook 02 ("After round-to-nearest: GPTQ and AWQ"). Lin et al. saw that about 1% of a Linear's
input channels — those whose activations are large — carry most of the rounding loss: keeping them in fp16
recovers most of it, but mixed precision is awkward for kernels. Scaling does the same in one format: W·diag(s)
and diag(s)⁻¹·x give the same product, and rounding W·diag(s) with s > 1 on a salient channel shrinks that
channel's relative rounding error. Here s = (mean |x|)^α, with α on a grid in [0, 1] chosen to minimise the
layer's output error ‖X Wᵀ − X Ŵᵀ‖² = n/2 · tr(D H Dᵀ), D = W − Q(W·diag(s))·diag(s)⁻¹, H = 2/n·XᵀX — the same H
as GPTQ's (labkit.second_order), so the whole calibration set is used at the cost of one [in, in] matrix.
α = 0 (s = 1) is round-to-nearest itself, so the search never does worse than RTN on a layer.

1/s is folded into the op that produces x — an RMSNorm's weight (q/k/v, gate/up), v_proj's rows (o_proj; with
grouped-query attention one scale per K/V channel, repeated over the query heads that share it) and up_proj's
rows (down_proj) — so the quantized model costs no extra byte. Where nothing can absorb it, `InputScaled` keeps s
explicitly (in_features fp16 values). Then AWQ's second step, clipping: in each group the range used for the
scale is shrunk when that lowers the group's output error. The quantizer afterwards is plain RTN
(labkit.quantize.quantize_): AWQ only changes which fp32 weights RTN rounds.

One difference from the reference code: the error it minimises is the Linear outputs' (via H), not the output
of the whole attention or MLP block.

AWQ: Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han 2023, https://arxiv.org/abs/2306.00978
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import quantize as Q
from .checks import real_number, torch_module, torch_tensor
from .models import check_llama
from .quantize import QuantConfig
from .second_order import HessianAccumulator, check_stats, collect_stats

ALPHAS = tuple(i / 20 for i in range(21))        # the exponent grid (0 = RTN)
CLIP_RATIOS = tuple(1 - i / 20 for i in range(10))   # shrink the group's range to 100%, 95%, …, 55%


def _check_config(config) -> QuantConfig:
    if not isinstance(config, QuantConfig):
        raise TypeError(f"expected a labkit QuantConfig, got {type(config).__name__}; e.g. QuantConfig(3, group_size=64)")
    return config


_SKIP = object()


def _check_weights(weight, new_weight=_SKIP, H=_SKIP) -> None:
    """A float weight [out, in] without NaN/inf; new_weight of its shape; H [in, in] — before any arithmetic, so a
    mismatch is named instead of broadcast into a wrong number."""
    torch_tensor("weight", weight, "a Linear's weight [out, in]", dims=2, kind="float", finite=True)
    if new_weight is not _SKIP and torch_tensor("new_weight", new_weight, "the changed weight, same shape",
                                               kind="float", finite=True).shape != weight.shape:
        raise ValueError(f"new_weight {tuple(new_weight.shape)} must have weight's shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if H is not _SKIP and torch_tensor("H", H, "the inputs' Hessian [in, in] (HessianAccumulator.hessian)",
                                      kind="float", finite=True).shape != (cols, cols):
        raise ValueError(f"H {tuple(H.shape)} does not match the weight's {cols} input features: it must be "
                         f"[{cols}, {cols}]")


def _check_scales(name: str, s, n: int) -> torch.Tensor:
    torch_tensor(name, s, f"one positive scale per input channel ({n})", dims=1, kind="float", finite=True)
    if s.shape[0] != n or not bool((s > 0).all()):
        raise ValueError(f"{name} must hold {n} positive scales (one per input channel), got shape {tuple(s.shape)}"
                         + ("" if s.shape[0] != n else " with values ≤ 0"))
    return s


def fake_quantize(w: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """Round-to-nearest with `config` and back to floats (float32)."""
    _check_config(config)
    Q.check_float(w, "awq.fake_quantize")
    return Q.fake_quantize(w.float(), config.bits, config.granularity, config.group_size, config.symmetric,
                           config.scale_dtype)


def output_error(weight: torch.Tensor, new_weight: torch.Tensor, H: torch.Tensor,
                 dtype: torch.dtype = torch.float64) -> float:
    """tr(D H Dᵀ) with D = W − Ŵ: the layer's squared output error on the calibration inputs (times 2/n)."""
    _check_weights(weight, new_weight, H)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64 (the precision of the sum), got {dtype!r}")
    D = weight.detach().to(dtype) - new_weight.detach().to(dtype)
    return float(((D @ H.to(dtype)) * D).sum())


def relative_error(weight: torch.Tensor, new_weight: torch.Tensor, H: torch.Tensor) -> float:
    """‖XWᵀ − XŴᵀ‖ / ‖XWᵀ‖ computed from H = 2/n·XᵀX (equal to labkit.second_order.layer_error on X)."""
    _check_weights(weight, new_weight, H)
    return (output_error(weight, new_weight, H) / output_error(weight, torch.zeros_like(weight), H)) ** 0.5


def channel_scales(x_abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = (mean |x|)^α per input channel, normalised so that max(s)·min(s) = 1 (as the reference code does)."""
    torch_tensor("x_abs_mean", x_abs_mean, "mean |x| per input channel (HessianAccumulator.abs_mean)", dims=1,
                 kind="float", finite=True)
    if not 0.0 <= real_number("alpha", alpha, "the exponent, in [0, 1]") <= 1.0:
        raise ValueError(f"alpha={alpha!r}: the exponent is searched in [0, 1]")
    s = x_abs_mean.detach().double().clamp_min(1e-4) ** float(alpha)
    return s / (s.max() * s.min()).sqrt()


@dataclass
class ScaleSearch:
    alpha: float                         # the chosen exponent
    scales: torch.Tensor                 # s for the searched channels (float64)
    errors: dict = field(default_factory=dict)   # α → relative output error of RTN(W·s)/s

    @property
    def rtn_error(self) -> float:
        return self.errors[0.0]

    @property
    def error(self) -> float:
        return self.errors[self.alpha]


def scaled_rtn(weight: torch.Tensor, s: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """What the model computes after scaling by s and RTN: Q(W·diag(s))·diag(s)⁻¹ (float64)."""
    _check_weights(weight)
    s = _check_scales("s", s, weight.shape[1]).double()
    return fake_quantize(weight.double() * s, config).double() / s


def search_scale(weights: list[torch.Tensor], x_abs_mean: torch.Tensor, H: torch.Tensor, config: QuantConfig,
                 alphas=ALPHAS, expand: torch.Tensor | None = None) -> ScaleSearch:
    """The grid search of AWQ for Linears that read the same input: for each α, s = channel_scales(mean|x|, α)
    (expanded to the weights' columns by the index `expand`, if given), error = Σ tr(D H Dᵀ) over the weights,
    relative to Σ tr(W H Wᵀ). Returns the α with the smallest error and every α's error."""
    _check_config(config)
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)) or not weights:
        raise TypeError(f"weights must be a non-empty list of weights [out, in] that read the same input, got "
                        f"{type(weights).__name__}" + (" (empty)" if isinstance(weights, (list, tuple)) else ""))
    for w in weights:
        _check_weights(w)
    torch_tensor("x_abs_mean", x_abs_mean, "mean |x| per input channel", dims=1, kind="float", finite=True)
    if expand is not None:
        torch_tensor("expand", expand, "the index of the scale each weight column uses", dims=1, kind="int")
        if int(expand.min()) < 0 or int(expand.max()) >= x_abs_mean.shape[0]:
            raise ValueError(f"expand indexes scales 0 … {x_abs_mean.shape[0] - 1}, got {int(expand.min())} … "
                             f"{int(expand.max())}")
    _check_alphas(alphas)
    W = torch.cat([w.detach().double() for w in weights], 0)
    cols = W.shape[1]
    _check_weights(W, H=H)
    ref = output_error(W, torch.zeros_like(W), H)
    H32 = H.float()                              # the grid's errors in float32: 2-3× faster, ample precision
    errors, best = {}, None
    for a in alphas:
        s = channel_scales(x_abs_mean, a)
        full = s if expand is None else s[expand]
        if full.shape != (cols,):
            raise ValueError(f"{full.numel()} scales for {cols} input features; pass `expand` to map them")
        errors[float(a)] = (output_error(W, scaled_rtn(W, full, config), H32, torch.float32) / ref) ** 0.5
        if best is None or errors[float(a)] < errors[best[0]]:
            best = (float(a), s)
    return ScaleSearch(alpha=best[0], scales=best[1], errors=errors)


def clip_search(weight: torch.Tensor, H: torch.Tensor, config: QuantConfig, ratios=CLIP_RATIOS) -> torch.Tensor:
    """AWQ's clipping: per row and group, shrink the range [min, max] that sets the scale to r·[min, max] (the
    weights beyond it are clamped) with the r that minimises the group's own output error d_g H_gg d_gᵀ (the
    group's block of H; cross-group terms are ignored, as in the reference). Returns the clamped weight."""
    _check_config(config)
    _check_weights(weight, H=H)
    if (not isinstance(ratios, (list, tuple)) or not ratios
            or not all(0 < real_number("ratios", r, "shrink factors in (0, 1]") <= 1 for r in ratios)):
        raise ValueError(f"ratios must be a non-empty list of shrink factors in (0, 1], e.g. (1.0, 0.9, 0.8); got "
                         f"{ratios!r}")
    W = weight.detach().float()
    rows, cols = W.shape
    gs = config.group_size if config.granularity == "group" else cols
    if config.granularity == "tensor":
        raise ValueError("clip_search works per channel or per group, not per tensor")
    G = cols // gs
    Wg = W.view(rows, G, gs)
    Hb = torch.stack([H[g * gs:(g + 1) * gs, g * gs:(g + 1) * gs] for g in range(G)]).float()   # [G, gs, gs]
    hi, lo = Wg.amax(-1, keepdim=True), Wg.amin(-1, keepdim=True)
    if config.symmetric:
        hi = torch.maximum(hi, -lo)
        lo = -hi
    best_err = torch.full((rows, G), float("inf"))
    best = Wg
    for r in ratios:
        c = torch.maximum(torch.minimum(Wg, r * hi), r * lo)
        D = Wg - fake_quantize(c.reshape(rows, cols), config).view(rows, G, gs)
        err = torch.einsum("rgi,gij,rgj->rg", D, Hb, D)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better.unsqueeze(-1), c, best)
    return best.reshape(rows, cols).to(weight.dtype)


# ---------------------------------------------------------------------------------------------------------
# Applying the scales: fold 1/s into the previous op, or keep it explicitly
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def fold_into_norm_(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """norm(x)·γ/s feeds W·diag(s): the product is unchanged (an RMSNorm or LayerNorm; its bias too)."""
    s = s.to(norm.weight.dtype)
    norm.weight.div_(s)
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s)
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype))


@torch.no_grad()
def fold_into_linear_(prev: nn.Linear, linears: list[nn.Linear], s: torch.Tensor,
                      expand: torch.Tensor | None = None) -> None:
    """prev's output channel c divided by s[c] (rows of its weight and its bias); the next Linears' input columns
    multiplied by s[expand] (expand maps their columns to prev's channels, e.g. query heads → K/V heads)."""
    prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(1))
    if prev.bias is not None:
        prev.bias.div_(s.to(prev.bias.dtype))
    full = s if expand is None else s[expand]
    for lin in linears:
        lin.weight.mul_(full.to(lin.weight.dtype))


class InputScaled(nn.Module):
    """A Linear whose input is divided by an explicit scale s (kept as fp16, in_features values): used where no
    previous op can absorb 1/s. `linear` holds W·diag(s) and can itself be quantized by labkit.quantize.quantize_."""

    def __init__(self, linear: nn.Linear, s: torch.Tensor):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        _check_scales("s", s, linear.in_features)
        self.register_buffer("inv_scale", (1.0 / s.double()).to(torch.float16))
        with torch.no_grad():
            linear.weight.mul_((1.0 / self.inv_scale.double()).to(linear.weight.dtype))   # the stored scale
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.inv_scale.to(x.dtype))


def scale_input_(model: nn.Module, fqn: str, s: torch.Tensor) -> InputScaled:
    """Replace the Linear at `fqn` by InputScaled(linear, s) in place; returns the new module."""
    torch_module("model", model, "the model that holds the Linear")
    if not isinstance(fqn, str):
        raise TypeError(f"fqn must be a Linear's name such as 'model.layers.0.mlp.down_proj', got {fqn!r}")
    parent, _, child = fqn.rpartition(".")
    try:
        lin = model.get_submodule(fqn)
    except AttributeError:
        raise ValueError(f"the model has no module {fqn!r}; see [n for n, m in model.named_modules()]") from None
    if not isinstance(lin, nn.Linear):
        raise TypeError(f"{fqn} is a {type(lin).__name__}, not an nn.Linear")
    new = InputScaled(lin, s)
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return new


# ---------------------------------------------------------------------------------------------------------
# One Llama decoder layer, and the whole model
# ---------------------------------------------------------------------------------------------------------
def gqa_expand(attn: nn.Module) -> torch.Tensor:
    """For o_proj's input columns (query head h, dim d): the index of the v_proj channel they read,
    (h // groups)·head_dim + d (Llama's repeat_kv)."""
    if not all(hasattr(attn, a) for a in ("head_dim", "num_key_value_groups", "o_proj")):
        raise TypeError(f"attn must be a Llama attention block (model.model.layers[i].self_attn), got "
                        f"{type(attn).__name__}")
    hd, groups = attn.head_dim, attn.num_key_value_groups
    heads = attn.o_proj.in_features // hd
    return torch.tensor([(h // groups) * hd + d for h in range(heads) for d in range(hd)])


def llama_groups(layer: nn.Module) -> list[dict]:
    """The four places AWQ scales in a Llama decoder layer: which Linears share the input, and what absorbs 1/s."""
    if not all(hasattr(layer, a) for a in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")):
        raise TypeError(f"layer must be a Llama decoder layer (model.model.layers[i]), got {type(layer).__name__}")
    a, m = layer.self_attn, layer.mlp
    return [dict(name="qkv", prev=layer.input_layernorm, linears=[a.q_proj, a.k_proj, a.v_proj]),
            dict(name="o", prev=a.v_proj, linears=[a.o_proj], expand=gqa_expand(a)),
            dict(name="gate_up", prev=layer.post_attention_layernorm, linears=[m.gate_proj, m.up_proj]),
            dict(name="down", prev=m.up_proj, linears=[m.down_proj])]


def awq_layer_(layer: nn.Module, stats: dict[int, HessianAccumulator], config: QuantConfig, clip: bool = True,
               alphas=ALPHAS) -> dict:
    """Search, fold and (optionally) clip one Llama decoder layer in place. `stats` maps id(linear) to its input
    statistics (from the unscaled layer). Returns {group: {"alpha", "rtn_error", "error"}} (relative errors of the
    searched Linears' outputs)."""
    report, col_scale = {}, {}
    for g in llama_groups(layer):
        acc = stats[id(g["linears"][0])]
        x_mean, expand = acc.abs_mean, g.get("expand")
        if expand is not None:   # one statistic per prev channel: mean over the columns that read it
            x_mean = torch.zeros(g["prev"].out_features, dtype=torch.float64).index_add_(0, expand, x_mean)
            x_mean /= torch.bincount(expand, minlength=g["prev"].out_features)
        r = search_scale([lin.weight for lin in g["linears"]], x_mean, acc.hessian, config, alphas, expand)
        if isinstance(g["prev"], nn.Linear):
            fold_into_linear_(g["prev"], g["linears"], r.scales, expand)
        else:
            fold_into_norm_(g["prev"], g["linears"], r.scales)
        full = r.scales if expand is None else r.scales[expand]
        for lin in g["linears"]:
            col_scale[id(lin)] = full
        report[g["name"]] = dict(alpha=r.alpha, rtn_error=r.rtn_error, error=r.error)
    if clip:
        with torch.no_grad():
            for g in llama_groups(layer):
                for lin in g["linears"]:
                    s = col_scale[id(lin)]
                    H = stats[id(lin)].hessian / (s.unsqueeze(0) * s.unsqueeze(1))    # H of the scaled input
                    lin.weight.copy_(clip_search(lin.weight, H, config))
    return report


def awq_(model: nn.Module, calibration, config: QuantConfig, clip: bool = True, alphas=ALPHAS) -> dict:
    """AWQ on a Llama-style model, in place: for each decoder layer, search the scales, fold them, clip. The
    statistics come from the unchanged fp32 model (as in the reference code): pass calibration token batches
    [B, T] or the dict labkit.second_order.collect_stats returned for this model before any change. The model
    stays fp32 — and, without clipping, computes what it did; quantize it afterwards with
    labkit.quantize.quantize_(model, config). Returns {layer name: awq_layer_'s report}."""
    if not isinstance(config, QuantConfig):
        raise TypeError(f"awq_ needs a labkit QuantConfig, got {type(config).__name__}")
    if not isinstance(getattr(getattr(model, "model", None), "layers", None), nn.ModuleList):
        raise TypeError("awq_ folds scales into Llama-style decoder layers (model.model.layers); for another "
                        "model use search_scale + scale_input_ on its Linears")
    check_llama(model)
    _check_awq_args(config, clip, alphas)
    if isinstance(calibration, dict):
        check_stats(calibration, model)
    stats = calibration if isinstance(calibration, dict) else collect_stats(model, calibration)
    names = {id(m): n for n, m in model.named_modules()}
    plan = []
    for layer in model.model.layers:       # every layer's statistics and group size checked before any change
        lname = names[id(layer)]
        try:
            st = {id(m): stats[f"{lname}.{n}"] for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        except KeyError as e:
            raise ValueError(f"no calibration statistics for {e.args[0]}; collect them on this model") from None
        Q.check_group_size(config, {f"{lname}.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)})
        plan.append((lname, layer, st))
    return {lname: awq_layer_(layer, st, config, clip, alphas) for lname, layer, st in plan}


def _check_alphas(alphas) -> None:
    if (not isinstance(alphas, (list, tuple)) or not alphas
            or not all(0 <= real_number("alphas", a, "exponents in [0, 1]") <= 1 for a in alphas)):
        raise ValueError(f"alphas must be a non-empty list of exponents in [0, 1], e.g. (0.0, 0.5, 1.0); got {alphas!r}")


def _check_awq_args(config, clip, alphas) -> None:
    _check_config(config)
    if not isinstance(clip, bool):
        raise TypeError(f"clip must be True or False, got {clip!r}")
    if clip and config.granularity == "tensor":
        raise ValueError("AWQ's clipping works per channel or per group, not per tensor; pass clip=False or "
                         "another granularity")
    _check_alphas(alphas)





def awq_explicit_(model: nn.Module, stats: dict[str, HessianAccumulator], config: QuantConfig, clip: bool = True,
                  alphas=ALPHAS) -> dict:
    """AWQ for any model, without folding: Linears that read the same input (one shared accumulator in `stats`,
    from labkit.second_order.recording on the unchanged model) get one searched s, and each becomes
    InputScaled(linear, s) — the cost is in_features fp16 scales per Linear. Returns {fqn: {"alpha", ...}}."""
    _check_awq_args(config, clip, alphas)
    linears = check_stats(stats, model)    # every name checked before the first Linear is wrapped
    wrapped = [n for n, m in linears.items() if not isinstance(m, nn.Linear)]
    if wrapped:
        raise TypeError(f"{wrapped[0]} is a {type(linears[wrapped[0]]).__name__}, not an nn.Linear (already wrapped? "
                        "reload the model)")
    Q.check_group_size(config, linears)
    groups: dict[int, list[str]] = {}
    for fqn, acc in stats.items():
        groups.setdefault(id(acc), []).append(fqn)
    report = {}
    for fqns in groups.values():
        acc = stats[fqns[0]]
        lins = [model.get_submodule(f) for f in fqns]
        r = search_scale([lin.weight for lin in lins], acc.abs_mean, acc.hessian, config, alphas)
        for f in fqns:
            wrapped = scale_input_(model, f, r.scales)
            if clip:
                s = 1.0 / wrapped.inv_scale.double()
                with torch.no_grad():
                    wrapped.linear.weight.copy_(clip_search(wrapped.linear.weight, acc.hessian / (s[None] * s[:, None]),
                                                            config))
            report[f] = dict(alpha=r.alpha, rtn_error=r.rtn_error, error=r.error)
    return report


def salient_channels(x_abs_mean: torch.Tensor, frac: float = 0.01) -> torch.Tensor:
    """Indices of the top `frac` input channels by mean |x| (AWQ's salient channels)."""
    torch_tensor("x_abs_mean", x_abs_mean, "mean |x| per input channel", dims=1, kind="float", finite=True)
    if not 0 < real_number("frac", frac, "the share of channels, e.g. 0.01 for 1%") <= 1:
        raise ValueError(f"frac must be in (0, 1] (e.g. 0.01 for the top 1% of channels), got {frac!r}")
    k = max(1, round(float(frac) * x_abs_mean.numel()))
    return torch.topk(x_abs_mean, k).indices


def keep_in_fp16(weight: torch.Tensor, channels: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """MIT's ablation: RTN every input channel except `channels`, which stay fp16 (mixed precision)."""
    _check_weights(weight)
    torch_tensor("channels", channels, "input-channel indices, e.g. salient_channels(x_abs_mean)", dims=1,
                 kind="int", empty=True)
    if channels.numel() and (int(channels.min()) < 0 or int(channels.max()) >= weight.shape[1]):
        raise ValueError(f"channels must index the weight's {weight.shape[1]} input channels (0 … "
                         f"{weight.shape[1] - 1}), got {int(channels.min())} … {int(channels.max())}")
    out = fake_quantize(weight, config)
    out[:, channels] = weight.detach()[:, channels].half().float()
    return out
