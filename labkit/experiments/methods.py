"""Notebook 02's "After round-to-nearest": RTN, GPTQ and AWQ on the whole SmolLM2-135M, at settings where RTN
really loses (data/results/methods.json via `python -m labkit results methods`), plus asymmetric against symmetric
at equal bits per weight, and the one-layer comparison the notebook runs live.

Why these settings: SmolLM2's weights were GGUF Q4_1 (asymmetric int4, blocks of 32) before they were dequantized,
so int4 g32 asymmetric reproduces them exactly and RTN has no loss there for a method to recover. int3 with groups
of 64 and int4 per output channel (symmetric) are grids that do not line up with Q4_1, and RTN loses a lot on both.
"""
from __future__ import annotations

import copy
import time

import torch

from .. import awq as A
from .. import quantize as Q
from .. import second_order as SO
from ..evaluate import HEADLINE_TOKENS, gap_closed, perplexity

CALIB = {"n_samples": 64, "seq_len": 256}       # 16,384 train tokens, the same for GPTQ and AWQ
EVAL_TOKENS = HEADLINE_TOKENS                   # held-out validation tokens per perplexity
SETTINGS = {"int3-g64": dict(bits=3, group_size=64), "int4-pc": dict(bits=4)}   # RTN really loses here
# asymmetric vs symmetric at equal bits per weight (3 + 16/32 = 3 + 32/64 = 3.5), and Q4_1's own grid
EQUAL_BITS = {"int3-g32": dict(bits=3, group_size=32), "int3-g64-asym": dict(bits=3, group_size=64, symmetric=False)}
Q41 = {"int4-g32-asym": dict(bits=4, group_size=32, symmetric=False)}
RTN_ONLY = {"bf16": None, "int8-pc": dict(bits=8), "int4-g64": dict(bits=4, group_size=64)}   # the chart's other points
MINILM = {"calib_sentences": 256, "test_sentences": 64}    # KJV verses: train split to calibrate, validation to test
LIVE = {"layer": "model.layers.5.self_attn.q_proj", "n_samples": 8, "test_samples": 4, "seq_len": 256,
        "setting": "int3-g64"}


def config(name: str) -> Q.QuantConfig:
    """The QuantConfig a setting name of this experiment stands for."""
    for table in (SETTINGS, EQUAL_BITS, Q41, RTN_ONLY):
        if name in table:
            return Q.QuantConfig(**table[name])
    raise ValueError(f"unknown setting {name!r}; use one of {sorted({**SETTINGS, **EQUAL_BITS, **Q41, **RTN_ONLY})}")


def point(model, ev, method: str, cfg: Q.QuantConfig | None, max_tokens: int = EVAL_TOKENS) -> dict:
    """Perplexity and the bytes a quantized model holds in RAM (QuantLinear buffers = the packing formula)."""
    from ..memory import model_bytes
    out = dict(method=method, ppl=float(perplexity(model, ev, max_tokens=max_tokens)), model_bytes=model_bytes(model))
    if cfg is not None:
        b = Q.quantized_linear_bytes(model)
        out.update(setting=cfg.name, linear_bytes=b["total_bytes"], bits_per_weight=b["bits_per_weight"],
                   layers=b["layers"])
    return out


def _alphas(report: dict) -> dict:
    """Mean chosen α and layer errors per group (qkv, o, gate_up, down) over the decoder layers."""
    out = {}
    for g in next(iter(report.values())):
        rows = [r[g] for r in report.values()]
        out[g] = {k: sum(r[k] for r in rows) / len(rows) for k in ("alpha", "rtn_error", "error")}
    return out


def _log(msg: str, t0: float) -> None:
    print(f"[methods {time.perf_counter() - t0:6.0f}s] {msg}", flush=True)


def make_results() -> dict:
    """RTN, GPTQ (act-order, the paper's sequential pass) and AWQ (scale search + clipping) on SmolLM2-135M for each
    setting: perplexity on the protocol's headline budget, bits per weight with scales and zero points, the share of
    RTN's log-perplexity gap each method closes; at int3 g64 also AWQ's scaling alone and GPTQ from one pass of the
    fp32 model (the statistics AWQ uses); asymmetric vs symmetric at 3.5 bits per weight (RTN); bf16 for the chart;
    the MiniLM control. Calibration: 64 × 256 train tokens. LABKIT_FULL=1 adds the one-pass GPTQ and scaling-alone
    points at int4 per channel, AWQ at 3.5 bits, and the int8/int4-g64 RTN points."""
    from ..repro import threads
    with threads(1):    # one thread: faster on a shared 2-core machine, and the numbers do not depend on it
        return _make_results()


def _make_results() -> dict:
    from ..data import tokens
    from ..evaluate import eval_tokens
    from ..models import load_model
    from ..prune import calibration_batches
    from ..repro import full_mode, seed_everything
    seed_everything(0)
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    ev = eval_tokens(tok)
    calib = calibration_batches(tokens("train", tok), **CALIB)
    fp32 = point(model, ev, "fp32", None)
    _log(f"fp32 {fp32['ppl']:.3f}", t0)
    t = time.perf_counter()
    stats = SO.collect_stats(model, calib)
    stats_s = time.perf_counter() - t
    _log(f"activation statistics and H of every Linear ({stats_s:.0f} s)", t0)
    settings, seconds = {}, {"stats": round(stats_s, 1)}

    def run(name, methods):
        cfg = config(name)
        row = {"config": dict(bits=cfg.bits, granularity=cfg.granularity, group_size=cfg.group_size,
                              symmetric=cfg.symmetric)}
        with Q.temporarily_quantized(model, cfg) as m:
            row["rtn"] = point(m, ev, "rtn", cfg)
        _log(f"{name} rtn {row['rtn']['ppl']:.3f}", t0)
        for method in methods:
            t = time.perf_counter()
            m = copy.deepcopy(model)
            if method == "gptq":               # the paper's pass: each decoder layer on the quantized ones' outputs
                SO.gptq_(m, calib, cfg, act_order=True)
            elif method == "gptq_one_pass":    # every Linear on the fp32 model's inputs (the statistics AWQ uses)
                SO.gptq_(m, stats, cfg, act_order=True)
            else:
                rep = A.awq_(m, stats, cfg, clip=(method == "awq"))
                Q.quantize_(m, cfg)
            seconds[f"{name}/{method}"] = round(time.perf_counter() - t, 1)
            row[method] = point(m, ev, method, cfg)
            if method.startswith("awq"):
                row[method]["per_group"] = _alphas(rep)
            del m
            _log(f"{name} {method} {row[method]['ppl']:.3f} ({seconds[f'{name}/{method}']:.0f} s)", t0)
        for method in methods:
            row[method]["gap_closed"] = gap_closed(fp32["ppl"], row["rtn"]["ppl"], row[method]["ppl"]) \
                if row["rtn"]["ppl"] > fp32["ppl"] else None
        settings[name] = row

    full = full_mode()
    run("int3-g64", ("gptq", "gptq_one_pass", "awq", "awq_scale_only"))
    run("int4-pc", ("gptq", "awq") + (("gptq_one_pass", "awq_scale_only") if full else ()))
    for name in EQUAL_BITS:
        run(name, ("awq",) if full else ())
    run("int4-g32-asym", ())
    del stats
    others = {"bf16": _bf16_point(model, ev)}
    for name in (("int8-pc", "int4-g64") if full else ()):
        with Q.temporarily_quantized(model, config(name)) as m:
            others[name] = point(m, ev, "rtn", config(name))
    _log("bf16 (and with LABKIT_FULL=1 int8-pc, int4-g64): the chart's other points", t0)
    del model
    minilm = minilm_results()
    _log(f"MiniLM {minilm['settings']}", t0)
    return dict(model="smollm2-135m", eval_tokens=EVAL_TOKENS, fp32=fp32,
                calibration=dict(split="train", **CALIB, tokens=CALIB["n_samples"] * CALIB["seq_len"]),
                gptq=dict(act_order=True, blocksize=128, damp=0.01, sequential=True),
                full_mode=full,
                awq=dict(alphas=list(A.ALPHAS), clip_ratios=list(A.CLIP_RATIOS), statistics="fp32 model, one pass"),
                settings=settings, other_points=others, minilm=minilm, seconds=seconds, threads=1,
                wall_seconds=round(time.perf_counter() - t0, 1))


def _bf16_point(model, ev) -> dict:
    m = copy.deepcopy(model).to(torch.bfloat16)
    out = point(m, ev, "bf16", None)
    del m
    return out


@torch.no_grad()
def minilm_results() -> dict:
    """The key comparison on MiniLM (fp32, never quantized): mean cosine of the sentence embeddings to fp32 on
    KJV validation verses, for RTN, GPTQ (act-order; each Linear from the fp32 model's inputs — an encoder has no
    decoder-layer loop here) and AWQ with explicit input scales (InputScaled: in_features fp16 values each)."""
    from ..models import load_model, sentence_embeddings
    from ..data import kjv_sentences
    enc, etok = load_model("minilm")
    calib = kjv_sentences(MINILM["calib_sentences"], "train")
    test = kjv_sentences(MINILM["test_sentences"])
    ref = sentence_embeddings(enc, etok, test)
    with SO.recording(enc) as stats:
        for i in range(0, len(calib), 32):
            sentence_embeddings(enc, etok, calib[i:i + 32])
    chosen = lambda m, f: f in stats  # noqa: E731  (the Linears the embeddings use: not the pooler)
    cos = lambda m: float((sentence_embeddings(m, etok, test) * ref).sum(-1).mean())  # noqa: E731
    out = {}
    for name in SETTINGS:
        cfg = config(name)
        with Q.temporarily_quantized(enc, cfg, chosen) as m:
            row = {"rtn": cos(m), "bits_per_weight": Q.quantized_linear_bytes(m)["bits_per_weight"]}
        g = SO.gptq_(copy.deepcopy(enc), stats, cfg, act_order=True, filter_fn=chosen)
        row["gptq"] = cos(g)
        a = copy.deepcopy(enc)
        A.awq_explicit_(a, stats, cfg)
        Q.quantize_(a, cfg, lambda m, f: isinstance(m, torch.nn.Linear) and f.removesuffix(".linear") in stats)
        row["awq"] = cos(a)
        qb = Q.quantized_linear_bytes(a)
        extra = sum(m.inv_scale.numel() * m.inv_scale.element_size() for m in a.modules() if isinstance(m, A.InputScaled))
        row["awq_bits_per_weight"] = 8 * (qb["total_bytes"] + extra) / qb["weights"]
        out[name] = row
        del g, a
    return dict(calib_sentences=len(calib), test_sentences=len(test), linears=len(stats), settings=out)


def table(res: dict) -> dict:
    """The `quantize.methods` figures: per setting fp32_ppl, rtn_ppl, gptq_ppl, awq_ppl, bits_per_weight and the
    gap each closes (from data/results/methods.json)."""
    out = {}
    for name, row in res["settings"].items():
        r = {"fp32_ppl": round(res["fp32"]["ppl"], 2), "rtn_ppl": round(row["rtn"]["ppl"], 2),
             "bits_per_weight": round(row["rtn"]["bits_per_weight"], 4)}
        for m in ("gptq", "awq", "awq_scale_only", "gptq_one_pass"):
            if m in row:
                r[f"{m}_ppl"] = round(row[m]["ppl"], 2)
                if row[m].get("gap_closed") is not None:
                    r[f"{m}_gap_closed"] = round(row[m]["gap_closed"], 3)
        out[name] = r
    return out


def bench() -> dict:
    """The whole-model comparison from data/results/methods.json (the calibration takes minutes: not rerun)."""
    from ..repro import load_results
    res = load_results("methods")
    return {"eval_tokens": res["eval_tokens"], "calibration_tokens": res["calibration"]["tokens"],
            "wall_seconds": res["wall_seconds"], **table(res)}


# ----------------------------------------------------------------------------------------- one layer, live
@torch.no_grad()
def layer_inputs(model, tokens_1d: torch.Tensor, layer: str = LIVE["layer"], n_samples: int = LIVE["n_samples"],
                 seq_len: int = LIVE["seq_len"]) -> torch.Tensor:
    """The inputs [n_samples·seq_len, in] that one Linear sees on calibration windows of the train tokens (the
    model runs up to that layer only)."""
    from ..prune import calibration_batches
    batches = calibration_batches(tokens_1d, n_samples, seq_len)
    lin, got = model.get_submodule(layer), []

    class _Done(Exception):
        pass

    def hook(mod, a):
        got.append(a[0].reshape(-1, a[0].shape[-1]).detach().clone())
        raise _Done

    h = lin.register_forward_pre_hook(hook)
    try:
        for b in batches.split(4):
            try:
                model(b, use_cache=False)
            except _Done:
                pass
    finally:
        h.remove()
    return torch.cat(got)


def one_layer(weight: torch.Tensor, x_calib: torch.Tensor, x_test: torch.Tensor, cfg: Q.QuantConfig,
              frac: float = 0.01, seed: int = 0) -> dict:
    """One Linear, one setting: GPTQ and AWQ calibrated on x_calib, every error measured on x_test (held out):
    relative output error ‖XWᵀ − XŴᵀ‖/‖XWᵀ‖ of RTN, GPTQ (act-order), AWQ (scaling alone, then + clipping), and
    MIT's ablation — the top `frac` input channels by mean |x| kept in fp16, a random `frac` kept in fp16, the
    top `frac` by weight magnitude kept in fp16."""
    acc, test = SO.HessianAccumulator(x_calib.shape[-1]), SO.HessianAccumulator(x_test.shape[-1])
    acc.add(x_calib)
    test.add(x_test)
    H, xm = acc.hessian, acc.abs_mean
    err = lambda w_hat: A.relative_error(weight, w_hat, test.hessian)  # noqa: E731
    grid = SO.Grid(cfg.bits, cfg.group_size, cfg.symmetric)
    t = time.perf_counter()
    g = SO.gptq(weight, H, grid, act_order=True).dequantize()
    gptq_s = time.perf_counter() - t
    r = A.search_scale([weight], xm, H, cfg)
    Hs = H / (r.scales.unsqueeze(0) * r.scales.unsqueeze(1))
    clipped = A.clip_search((weight.double() * r.scales).float(), Hs, cfg)
    awq_clip = A.fake_quantize(clipped, cfg).double() / r.scales
    k = max(1, round(frac * x_calib.shape[-1]))
    rand = torch.randperm(x_calib.shape[-1], generator=torch.Generator().manual_seed(seed))[:k]
    by_w = torch.topk(weight.abs().sum(0), k).indices
    return dict(setting=cfg.name, calib_tokens=x_calib.shape[0], test_tokens=x_test.shape[0], channels_kept=k,
                alpha=r.alpha, alpha_errors=r.errors, rtn=err(A.fake_quantize(weight, cfg)), gptq=err(g),
                gptq_in_sample=A.relative_error(weight, g, H), rtn_in_sample=A.relative_error(weight, A.fake_quantize(weight, cfg), H),
                gptq_seconds=gptq_s, awq_scale=err(A.scaled_rtn(weight, r.scales, cfg)), awq=err(awq_clip),
                keep_salient=err(A.keep_in_fp16(weight, A.salient_channels(xm, frac), cfg)),
                keep_random=err(A.keep_in_fp16(weight, rand, cfg)), keep_by_weight=err(A.keep_in_fp16(weight, by_w, cfg)),
                x_abs_mean=xm)
