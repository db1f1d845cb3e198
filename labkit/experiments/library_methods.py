"""SmoothQuant W8A8 and torchao's prototype GPTQ / AWQ / SmoothQuant beside labkit's teaching versions (notebook 02,
"After round-to-nearest") → data/results/library_methods.json (`python -m labkit results library_methods`, a few
minutes on 2 cores; ~12 minutes on a busy one).

- SmoothQuant (labkit.smoothquant) on SmolLM2's outlier layers — the Linears whose input has the largest max/median
  feature ratio on calibration (train) tokens — against naive W8A8: output error on held-out (validation) inputs,
  activations int8 per token and per tensor; then the whole model (perplexity on the protocol's live budget).
- torchao 0.18's prototypes on the same layer, on the CPU: each one is run, and either its output error and bytes
  are set beside labkit's, or the exception it raised is recorded word for word (type, message, torchao file:line).
"""
from __future__ import annotations

import contextlib
import copy
import io
import time
import traceback
from pathlib import Path

import torch
from torch import nn

from .. import quantize as Q
from .. import smoothquant as SQ

CAL_TOKENS = 256       # calibration tokens from the train books (smoothing factors, α search, torchao observers)
VAL_TOKENS = 256       # held-out validation tokens whose Linear inputs score every layer-level error
N_LAYERS = 4           # outlier layers in the per-layer table
ALPHAS = (0.5, 0.8)    # SmoothQuant's fixed α; "searched" picks one per group from SQ.ALPHAS on calibration inputs
GROUP_SIZE = 64        # int4 settings of the GPTQ / AWQ comparison


# ----------------------------------------------------------------------------------------------- helpers
def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return SQ.relative_error(y, ref)


def _median_token(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Median over tokens of ‖ŷ_t − y_t‖/‖y_t‖: what an ordinary token sees (the Frobenius error is dominated by the
    few tokens with huge activations)."""
    return float(((y.float() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).median())


def _failure(e: BaseException, step: str) -> dict:
    """The exception exactly as raised: type, message, and the innermost torchao frame (file:line)."""
    frames = traceback.extract_tb(e.__traceback__)
    ao = [f for f in frames if "torchao" in f.filename] or frames
    where = ao[-1]
    path = Path(where.filename)
    rel = "/".join(path.parts[path.parts.index("torchao"):]) if "torchao" in path.parts else path.name
    return {"runs_on_cpu": False, "step": step, "exception": type(e).__name__, "message": str(e),
            "raised_at": f"{rel}:{where.lineno}"}


def fake_quant_torchao_grid(m: torch.Tensor) -> torch.Tensor:
    """torchao's symmetric int8 rounding, per row: scale = max|row|/127.5, codes clamped to [−128, 127] — so the row's
    largest value (127.5 steps) is clipped by half a step. labkit's grid is max/127 over [−127, 127] (no clipping)."""
    scale = m.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127.5
    return torch.clamp(torch.round(m / scale), -128, 127) * scale


def outlier_layers(stats: dict, k: int = N_LAYERS, smoothable: set[str] | None = None) -> list[dict]:
    """The k Linears (among `smoothable`) whose input has the largest max/median per-feature |x|."""
    rows = [{"layer": n, "in_features": v["feature_absmax"].numel(),
             "input_absmax": float(v["feature_absmax"].max()),
             "max_over_median": float(v["feature_absmax"].max() / v["feature_absmax"].median().clamp_min(1e-12))}
            for n, v in stats.items() if smoothable is None or n in smoothable]
    return sorted(rows, key=lambda r: -r["max_over_median"])[:k]


def _group_of(model: nn.Module) -> dict[str, list[str]]:
    """fqn of every smoothable Linear → the fqns of its group (Linears reading the same input)."""
    return {n: g["linears"] for g in SQ.llama_groups(model) for n in g["linears"]}


# ----------------------------------------------------------------------------------------------- SmoothQuant, per layer
def layer_rows(model: nn.Module, stats: dict, cal_inputs: dict, val_inputs: dict, layers: list[dict]) -> list[dict]:
    """Per outlier layer and activation granularity: W8A8 output error on validation inputs, naive vs SmoothQuant
    at each α of ALPHAS and at the α searched on the calibration inputs (s from the calibration max |x|, over the
    weights of the layer's group, as smooth_ folds it)."""
    groups = _group_of(model)
    out = []
    for info in layers:
        name = info["layer"]
        first = groups[name][0]
        ws = [model.get_submodule(n).weight for n in groups[name]]
        w = model.get_submodule(name).weight
        x = val_inputs[name]
        ref = x @ w.detach().T
        row = dict(info, group=groups[name])
        for act in SQ.ACTS:
            best, _ = SQ.search_alpha(cal_inputs[first], ws, stats[first]["feature_absmax"], act)
            ys = {"naive": SQ.w8a8_matmul(x, w, act)}
            for key, a in [(f"alpha={a}", a) for a in ALPHAS] + [("searched", best)]:
                ys[key] = SQ.w8a8_matmul(x, w, act, SQ.smoothing_factors(stats[first]["feature_absmax"], ws, a))
            row[f"act_per_{act}"] = {k: _rel(y, ref) for k, y in ys.items()} | {"searched_alpha": best}
            row[f"act_per_{act}_median_token"] = {k: _median_token(y, ref) for k, y in ys.items()}
        out.append(row)
    return out


# ----------------------------------------------------------------------------------------------- SmoothQuant, whole model
def searched_alphas(model: nn.Module, stats: dict, cal_inputs: dict, act: str) -> dict[str, float]:
    """One α per smoothing group, the best of SQ.ALPHAS on that group's calibration inputs."""
    out = {}
    for g in SQ.llama_groups(model):
        first = g["linears"][0]
        ws = [model.get_submodule(n).weight for n in g["linears"]]
        out[first], _ = SQ.search_alpha(cal_inputs[first], ws, stats[first]["feature_absmax"], act)
    return out


def model_ppl(model: nn.Module, tokens: torch.Tensor, stats: dict, act: str | None, alpha, max_tokens: int) -> float:
    """Perplexity of a copy of `model`: smoothed with `alpha` (None: not smoothed), then W8A8 (act None: fp32)."""
    from ..evaluate import perplexity
    m = copy.deepcopy(model)
    try:
        if alpha is not None:
            SQ.smooth_(m, stats, alpha)
        if act is not None:
            SQ.w8a8_(m, act)
        return float(perplexity(m, tokens, max_tokens=max_tokens))
    finally:
        del m


# ----------------------------------------------------------------------------------------------- torchao prototypes
def torchao_smoothquant(lin: nn.Linear, x_cal: torch.Tensor, x_val: torch.Tensor, alpha: float) -> dict:
    """torchao.prototype.smoothquant.SmoothQuantConfig over Int8DynamicActivationInt8WeightConfig (int8 weights per
    row, int8 activations per token, 1/s kept as the weight's act_pre_scale) on a copy of `lin`: prepare, one
    calibration pass, convert; output error on x_val and bytes."""
    Q.quiet_torchao()
    from torchao.prototype.smoothquant import SmoothQuantConfig
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    from ..memory import tensor_bytes
    step = "import"
    try:
        m = nn.Sequential(copy.deepcopy(lin))
        step = "prepare"
        quantize_(m, SmoothQuantConfig(base_config=Int8DynamicActivationInt8WeightConfig(), step="prepare", alpha=alpha))
        step = "calibrate"
        with torch.no_grad():
            m(x_cal)
        step = "convert"
        quantize_(m, SmoothQuantConfig(base_config=Int8DynamicActivationInt8WeightConfig(), step="convert", alpha=alpha))
        step = "forward"
        with torch.no_grad():
            y = m(x_val)
    except Exception as e:  # noqa: BLE001 — recorded word for word, that is the measurement
        return _failure(e, step)
    return {"runs_on_cpu": True, "weight_type": type(m[0].weight).__name__, "bytes": tensor_bytes(m),
            "error": _rel(y, x_val @ lin.weight.detach().T)}


def torchao_gptq(lin: nn.Linear, x_cal: torch.Tensor, x_val: torch.Tensor, base: str) -> dict:
    """torchao.prototype.gptq.GPTQConfig (observe → calibrate → convert) over Int8WeightOnlyConfig ("int8") or
    Int4WeightOnlyConfig(group_size=GROUP_SIZE) ("int4") on a copy of `lin`."""
    Q.quiet_torchao()
    step = "config"
    try:
        from torchao.prototype.gptq import GPTQConfig
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
        cfg = Int8WeightOnlyConfig() if base == "int8" else Int4WeightOnlyConfig(group_size=GROUP_SIZE)
        observe = GPTQConfig(step="observe", base_config=cfg)
        m = nn.Sequential(copy.deepcopy(lin))
        step = "observe"
        quantize_(m, observe)
        with torch.no_grad():
            m(x_cal)
        step = "convert"
        with contextlib.redirect_stdout(io.StringIO()):          # torchao prints a progress counter here
            quantize_(m, GPTQConfig(step="convert", base_config=cfg))
        step = "forward"
        with torch.no_grad():
            y = m(x_val)
    except Exception as e:  # noqa: BLE001
        return _failure(e, step)
    from ..memory import tensor_bytes
    return {"runs_on_cpu": True, "weight_type": type(m[0].weight).__name__, "bytes": tensor_bytes(m),
            "error": _rel(y, x_val @ lin.weight.detach().T)}


def torchao_awq(lin: nn.Linear, x_cal: torch.Tensor, x_val: torch.Tensor, base: str, awq: bool = True) -> dict:
    """torchao.prototype.awq.AWQConfig (prepare → calibrate → convert) over Int8WeightOnlyConfig on the fp32 layer
    ("int8"), the CPU int4 config PrototypeInt4WeightOnlyConfig(group_size=GROUP_SIZE) on a bf16 copy ("int4-cpu")
    or Int4WeightOnlyConfig ("int4"); awq=False applies the base config alone (round-to-nearest)."""
    Q.quiet_torchao()
    step = "config"
    try:
        from torchao.prototype.awq import AWQConfig
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
        dtype = torch.float32 if base == "int8" else torch.bfloat16
        if base == "int8":
            cfg = Int8WeightOnlyConfig()
        elif base == "int4-cpu":
            cfg = Q.torchao_config("int4 weight-only", GROUP_SIZE)
        else:
            cfg = Int4WeightOnlyConfig(group_size=GROUP_SIZE)
        m = nn.Sequential(copy.deepcopy(lin).to(dtype))
        if awq:
            step = "prepare"
            quantize_(m, AWQConfig(cfg, step="prepare"))
            step = "calibrate"
            with torch.no_grad():
                m(x_cal.to(dtype))
            step = "convert"
            quantize_(m, AWQConfig(cfg, step="convert"))
        else:
            step = "quantize"
            quantize_(m, cfg)
        step = "forward"
        with torch.no_grad():
            y = m(x_val.to(dtype)).float()
    except Exception as e:  # noqa: BLE001
        return _failure(e, step)
    from ..memory import tensor_bytes
    return {"runs_on_cpu": True, "weight_type": type(m[0].weight).__name__, "bytes": tensor_bytes(m),
            "activation_dtype": str(dtype).replace("torch.", ""), "error": _rel(y, x_val @ lin.weight.detach().T)}


def labkit_gptq(lin: nn.Linear, x_cal: torch.Tensor, x_val: torch.Tensor, config: Q.QuantConfig) -> dict:
    """labkit.second_order.gptq and round-to-nearest with the same grid: output error on x_val and bytes."""
    from ..second_order import Grid, gptq, hessian
    w = lin.weight.detach()
    grid = Grid(config.bits, config.group_size, config.symmetric)
    q = gptq(w, hessian(x_cal), grid, act_order=True)
    rtn = Q.quantize(w, config.bits, config.granularity, config.group_size, config.symmetric)
    ref = x_val @ w.T
    return {"setting": config.name, "bytes": q.nbytes, "rtn_bytes": rtn.nbytes,
            "gptq_error": _rel(x_val @ q.dequantize().T, ref), "rtn_error": _rel(x_val @ rtn.dequantize().T, ref)}


def labkit_awq(lin: nn.Linear, x_cal: torch.Tensor, x_val: torch.Tensor, config: Q.QuantConfig) -> dict:
    """labkit.awq's scale search (no clipping: torchao's AWQ has none) on the same layer, if labkit.awq exists."""
    try:
        from .. import awq as A
        from ..second_order import hessian
        w = lin.weight.detach()
        found = A.search_scale([w], x_cal.abs().mean(0), hessian(x_cal), config)
        new = A.scaled_rtn(w, found.scales, config).float()
    except (ImportError, AttributeError, TypeError) as e:
        return {"available": False, "reason": f"{type(e).__name__}: {e}"}
    ref = x_val @ w.T
    return {"available": True, "setting": config.name, "alpha": found.alpha,
            "bytes": Q.quantize(w, config.bits, config.granularity, config.group_size, config.symmetric).nbytes,
            "awq_error": _rel(x_val @ new.T, ref), "rtn_error": _rel(x_val @ A.fake_quantize(w, config).T, ref)}


def library_rows(lin: nn.Linear, x_cal: torch.Tensor, x_val: torch.Tensor, s_by_alpha: dict) -> dict:
    """Every torchao prototype on one layer beside labkit's version of the same method."""
    from ..memory import tensor_bytes
    ref = x_val @ lin.weight.detach().T
    sq = {}
    for a in ALPHAS:
        wl = SQ.W8A8Linear(lin, "token")
        s = s_by_alpha[a]
        xs, ws = x_val / s, lin.weight.detach() * s
        sq[f"alpha={a}"] = {
            "torchao": torchao_smoothquant(lin, x_cal, x_val, a),
            "labkit": {"error": _rel(SQ.w8a8_matmul(x_val, lin.weight, "token", s), ref),
                       "error_on_torchao_grid": _rel(fake_quant_torchao_grid(xs) @ fake_quant_torchao_grid(ws).T, ref),
                       "bytes": wl.nbytes, "bytes_if_not_folded": wl.nbytes + 4 * lin.in_features}}
    sq["naive"] = {"labkit": {"error": _rel(SQ.w8a8_matmul(x_val, lin.weight, "token"), ref)}}
    int4 = Q.QuantConfig(4, group_size=GROUP_SIZE, symmetric=False)
    return {
        "smoothquant": sq,
        "gptq": {"torchao_int8": torchao_gptq(lin, x_cal, x_val, "int8"),
                 "torchao_int4": torchao_gptq(lin, x_cal, x_val, "int4"),
                 "labkit": [labkit_gptq(lin, x_cal, x_val, c) for c in (Q.QuantConfig(8), Q.QuantConfig(4), int4)]},
        "awq": {"torchao_int8": torchao_awq(lin, x_cal, x_val, "int8"),
                "torchao_int4_cpu": torchao_awq(lin, x_cal, x_val, "int4-cpu"),
                "torchao_int4_cpu_rtn": torchao_awq(lin, x_cal, x_val, "int4-cpu", awq=False),
                "torchao_int4": torchao_awq(lin, x_cal, x_val, "int4"),
                "bf16_only_error": _rel(nn.Sequential(copy.deepcopy(lin).to(torch.bfloat16))(x_val.bfloat16()).float(),
                                        ref),
                "fp32_bytes": tensor_bytes(lin),
                "labkit": labkit_awq(lin, x_cal, x_val, int4)},
    }


# ----------------------------------------------------------------------------------------------- the command
@torch.no_grad()
def make_results(log=print) -> dict:
    """SmolLM2-135M: calibration on CAL_TOKENS train tokens, layer errors on VAL_TOKENS validation tokens, perplexity
    on the protocol's live budget (lk.evaluate.LIVE_TOKENS) of validation tokens."""
    import torchao

    from ..data import tokens as data_tokens
    from ..evaluate import LIVE_TOKENS, eval_tokens, ppl_label
    from ..models import load_model
    from ..repro import seed_everything
    seed_everything(0)
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    cal = data_tokens("train", tok)[:CAL_TOKENS].reshape(1, -1)
    val_tokens = eval_tokens(tok)
    val = val_tokens[:VAL_TOKENS].reshape(1, -1)
    groups = SQ.llama_groups(model)
    firsts = [g["linears"][0] for g in groups]
    smoothable = {n for g in groups for n in g["linears"]}
    stats = Q.linear_input_stats(model, cal, keep=firsts)          # group members share their first one's input
    layers = outlier_layers(stats, N_LAYERS, smoothable)
    names = [r["layer"] for r in layers]
    cal_in = {n: v["inputs"] for n, v in stats.items() if "inputs" in v}
    val_in = {n: v["inputs"] for n, v in Q.linear_input_stats(model, val, names=names, keep=names).items()}
    shown = ", ".join(f"{r['layer']} ({r['max_over_median']:.0f}×)" for r in layers)
    log(f"outlier layers: {shown} ({time.perf_counter() - t0:.0f} s)")
    rows = layer_rows(model, stats, cal_in, val_in, layers)
    for r in rows:
        errs = {a: r["act_per_" + a] for a in SQ.ACTS}
        log(f"{r['layer']:32s} " + " · ".join(f"per-{a}: naive {e['naive']:.4f} → α=0.5 {e['alpha=0.5']:.4f}"
                                               for a, e in errs.items()))
    ppl = {"fp32": model_ppl(model, val_tokens, stats, None, None, LIVE_TOKENS)}
    alphas = {}
    for act in SQ.ACTS:
        alphas[act] = searched_alphas(model, stats, cal_in, act)
        ppl[f"w8a8 per-{act}, naive"] = model_ppl(model, val_tokens, stats, act, None, LIVE_TOKENS)
        for a in ALPHAS:
            ppl[f"w8a8 per-{act}, smoothquant α={a}"] = model_ppl(model, val_tokens, stats, act, a, LIVE_TOKENS)
        ppl[f"w8a8 per-{act}, smoothquant α searched"] = model_ppl(model, val_tokens, stats, act, alphas[act],
                                                                   LIVE_TOKENS)
        log(f"ppl per-{act}: " + ", ".join(f"{k.split(', ')[-1]} {v:.2f}" for k, v in ppl.items() if act in k)
            + f" ({time.perf_counter() - t0:.0f} s)")
    worst = names[0]
    lin = model.get_submodule(worst)
    first = _group_of(model)[worst][0]
    s_by = {a: SQ.smoothing_factors(stats[first]["feature_absmax"], lin.weight, a) for a in ALPHAS}
    lib = library_rows(lin, cal_in[first], val_in[worst], s_by)
    log(f"torchao prototypes on {worst} done ({time.perf_counter() - t0:.0f} s)")
    chosen = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and Q.skip_tied(model)(m, n)]
    return {"model": "smollm2-135m", "torch": torch.__version__, "torchao": torchao.__version__,
            "calibration": {"split": "train", "tokens": CAL_TOKENS},
            "layer_inputs": {"split": "validation", "tokens": VAL_TOKENS},
            "eval": {"split": "validation", "max_tokens": LIVE_TOKENS, "label": ppl_label(LIVE_TOKENS)},
            "alphas": list(ALPHAS), "alpha_grid": list(SQ.ALPHAS),
            "layers": rows, "ppl": ppl,
            "searched_alpha_counts": {act: {str(a): sum(v == a for v in al.values()) for a in SQ.ALPHAS}
                                      for act, al in alphas.items()},
            "bytes": {"fp32_linears": sum(4 * m.in_features * m.out_features for m in chosen),
                      "w8a8_linears": sum(m.in_features * m.out_features + 2 * m.out_features for m in chosen)},
            "library_layer": worst, "library": lib,
            "note": "W8A8 is simulated (fake quantization: int8 grids, fp32 arithmetic): weights one scale per output "
                    "channel, activations one scale per token or per tensor computed on every call. SmoothQuant's "
                    "1/s is folded into the RMSNorms (q/k/v, gate/up) and up_proj's rows (down_proj); o_proj and the "
                    "tied lm_head are not smoothed (lm_head stays fp32). Layer errors: ‖ŷ − y‖/‖y‖ on validation "
                    "inputs, s and searched α from calibration (train) inputs; *_median_token: the median over "
                    "tokens of the per-token relative error. torchao int4 rows run in bf16 (bf16_only_error is the "
                    "floor of that alone). error_on_torchao_grid: labkit's SmoothQuant with torchao's int8 rounding "
                    "(max/127.5, codes −128…127: each row's and token's largest value clipped by half a step).",
            "seconds": round(time.perf_counter() - t0, 1)}


def bench() -> dict:
    """Headline figures from data/results/library_methods.json."""
    from ..repro import load_results
    r = load_results("library_methods")
    worst = r["layers"][0]
    lib = r["library"]
    return {"layer": worst["layer"], "max_over_median": round(worst["max_over_median"], 1),
            **{f"{a}_{k}": round(v, 5) for a in SQ.ACTS for k, v in worst[f"act_per_{a}"].items()
               if k in ("naive", "alpha=0.5", "alpha=0.8", "searched")},
            "ppl": {k: round(v, 2) for k, v in r["ppl"].items()},
            "torchao_runs_on_cpu": {"smoothquant": lib["smoothquant"]["alpha=0.5"]["torchao"]["runs_on_cpu"],
                                    "gptq": lib["gptq"]["torchao_int8"]["runs_on_cpu"],
                                    "awq": lib["awq"]["torchao_int4_cpu"]["runs_on_cpu"]}}
