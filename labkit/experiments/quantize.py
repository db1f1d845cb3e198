"""Experiments of notebook 02 (quantization): kernel tables, the bandwidth limit, the sweeps behind
data/results/quantize.json (`python -m labkit results quantize`), bench figures and the "Try it" helper.

The ideas live in labkit/quantize.py; this module runs them on SmolLM2, MiniLM and large random matrices.
"""
from __future__ import annotations

import copy
import math
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import quantize as Q
from ..data import kjv_sentences  # noqa: F401  (notebook 02 calls X.kjv_sentences)
from ..memory import tensor_bytes
from ..repro import threads, time_call


# ----------------------------------------------------------------------------------------- kernels, one table
def _linear(in_features: int, out_features: int, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_features, in_features, generator=g) * 0.02)
    return lin


def kernel_variants(base: nn.Linear, compile: bool = False, group_size: int = 64) -> dict[str, dict]:
    """One Linear as fp32, bf16, labkit's teaching QuantLinear (int8, int4) and the production CPU kernels
    (torchao int8 weight-only, int8 dynamic, int4 weight-only; torch.ao's deprecated quantize_dynamic).

    Returns {name: {"module", "dtype" (of its input), "kind" ("teaching" | "production" | "reference"),
    "reference" (the fp32 weight its codes stand for, for the tolerance check)}}."""
    Q.quiet_torchao()
    out = {"fp32": dict(module=nn.Sequential(copy.deepcopy(base)), dtype=torch.float32, kind="reference"),
           "bf16": dict(module=nn.Sequential(copy.deepcopy(base)).to(torch.bfloat16), dtype=torch.bfloat16,
                        kind="reference")}
    for name, cfg in (("labkit int8 (teaching)", Q.QuantConfig(8)),
                      ("labkit int4-g64 (teaching)", Q.QuantConfig(4, group_size=group_size))):
        m = Q.quantize_(nn.Sequential(copy.deepcopy(base)), cfg, lambda m, f: isinstance(m, nn.Linear))
        out[name] = dict(module=m, dtype=torch.float32, kind="teaching")
    for kind in Q.TORCHAO_CPU:
        m = Q.torchao_quantize_(nn.Sequential(copy.deepcopy(base)), kind, group_size, lambda m, f: f == "0")
        dt = torch.bfloat16 if kind.startswith("int4") else torch.float32
        out[f"torchao {kind}"] = dict(module=m, dtype=dt, kind="production")
        if compile:
            out[f"torchao {kind} + compile"] = dict(module=torch.compile(m), dtype=dt, kind="production")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated (kept: its fbgemm kernel is fast)
        m = torch.ao.quantization.quantize_dynamic(nn.Sequential(copy.deepcopy(base)), {nn.Linear}, dtype=torch.qint8)
    out["torch.ao int8 dynamic (deprecated)"] = dict(module=m, dtype=torch.float32, kind="production")
    return out


def _weight_bytes(m: nn.Module) -> int:
    packed = getattr(m[0] if isinstance(m, nn.Sequential) else m, "_packed_params", None)
    if packed is not None:   # torch.ao's packed fbgemm weight: int8 codes + fp32 scale/zero per row
        w = packed._weight_bias()[0]
        return w.numel() + 8 * w.shape[0]
    return tensor_bytes(m)


@torch.no_grad()
def kernel_table(in_features: int = 2048, out_features: int = 2048, batches=(1, 8), compile: bool = False,
                 min_run_time: float = 0.2, seed: int = 0) -> dict:
    """One Linear of this shape through every path, ONE run, ONE thread: weight bytes in RAM, ms per call at each
    batch, speed ratio to fp32, and the output's relative error against fp32 (tolerances in TOLERANCE)."""
    base = _linear(in_features, out_features, seed)
    g = torch.Generator().manual_seed(seed + 1)
    xs = {b: torch.randn(b, in_features, generator=g) for b in batches}
    rows = {}
    with threads(1):
        variants = kernel_variants(base, compile)
        ref = {b: base(x) for b, x in xs.items()}
        for name, v in variants.items():
            m, dt = v["module"], v["dtype"]
            row = dict(kind=v["kind"], weight_bytes=_weight_bytes(m), ms={}, rel_error={})
            for b, x in xs.items():
                xb = x.to(dt)
                y = m(xb).float()
                row["rel_error"][b] = float((y - ref[b]).norm() / ref[b].norm())
                row["ms"][b] = 1e3 * time_call(m, xb, min_run_time=min_run_time)
            rows[name] = row
    for row in rows.values():
        row["speedup"] = {b: rows["fp32"]["ms"][b] / row["ms"][b] for b in batches}
    return dict(shape=[in_features, out_features], batches=list(batches), threads=1, compile=compile, rows=rows)


# relative output error vs fp32 each kind of path must stay under (int8 0.8–2%: dynamic also rounds the
# activations; int4 g64 6–11%: 16 levels per group)
TOLERANCE = {"bf16": 0.01, "int8": 0.03, "int4": 0.12}


def tolerance(name: str) -> float:
    return next(t for k, t in TOLERANCE.items() if k in name) if name != "fp32" else 0.0


@torch.no_grad()
def bandwidth(weight_mb: float = 256, min_run_time: float = 0.3, seed: int = 0) -> dict:
    """The physical limit, measured with the SAME modules as kernel_table (batch 1, one thread, one run): a
    read-only pass over the fp32 weight (w.sum(): every byte read once, nothing written) gives the read bandwidth;
    each path's bound is its weight bytes ÷ that bandwidth, and its achieved GB/s is weight bytes ÷ its time."""
    n = int(math.sqrt(weight_mb * 1e6 / 4))
    n -= n % 64
    table = kernel_table(n, n, batches=(1,), min_run_time=min_run_time, seed=seed)
    with threads(1):
        w = _linear(n, n, seed).weight.detach()
        read_s = time_call(torch.sum, w, min_run_time=min_run_time)
    read_gbs = w.nbytes / read_s / 1e9
    paths = {}
    for name, r in table["rows"].items():
        ms = r["ms"][1]
        paths[name] = dict(bytes=r["weight_bytes"], ms=ms, gb_per_s=r["weight_bytes"] / ms / 1e6,
                           bound_ms=r["weight_bytes"] / read_gbs / 1e6, kind=r["kind"],
                           achieved_speedup=table["rows"]["fp32"]["ms"][1] / ms,
                           bound_speedup=table["rows"]["fp32"]["weight_bytes"] / r["weight_bytes"])
        paths[name]["fraction_of_bound"] = paths[name]["bound_ms"] / ms
    return dict(n=n, weight_mb_fp32=round(4 * n * n / 1e6, 1), threads=1, read_gb_per_s=read_gbs, paths=paths)


# ----------------------------------------------------------------------------------------- sweeps on real models
def embedding_cosine(model, tokenizer, sentences: list[str], config: Q.QuantConfig | None,
                     reference: torch.Tensor | None = None) -> dict:
    """Mean/min cosine between MiniLM sentence embeddings under `config` and fp32 (config=None: fp32)."""
    from ..models import sentence_embeddings
    ref = sentence_embeddings(model, tokenizer, sentences) if reference is None else reference
    if config is None:
        return dict(mean=1.0, min=1.0)
    with Q.temporarily_quantized(model, config) as m:
        emb = sentence_embeddings(m, tokenizer, sentences)
        nbytes = Q.quantized_linear_bytes(m)
    cos = (emb * ref).sum(-1)
    return dict(mean=float(cos.mean()), min=float(cos.min()), linear_bytes=nbytes["total_bytes"],
                bits_per_weight=nbytes["bits_per_weight"])


def perplexity_point(model, tokens, config: Q.QuantConfig | None | str, max_tokens: int) -> dict:
    """Perplexity and bytes of `model` under one config (None → fp32, "bf16" → a bf16 copy)."""
    from ..evaluate import perplexity
    from ..memory import model_bytes
    if config is None:
        return dict(name="fp32", ppl=perplexity(model, tokens, max_tokens=max_tokens),
                    model_bytes=model_bytes(model), bits_per_weight=32.0)
    if config == "bf16":
        m = copy.deepcopy(model).to(torch.bfloat16)
        out = dict(name="bf16", ppl=perplexity(m, tokens, max_tokens=max_tokens), model_bytes=model_bytes(m),
                   bits_per_weight=16.0)
        del m
        return out
    with Q.temporarily_quantized(model, config) as m:
        b = Q.quantized_linear_bytes(m)
        return dict(name=config.name, ppl=perplexity(m, tokens, max_tokens=max_tokens), model_bytes=model_bytes(m),
                    linear_bytes=b["total_bytes"], bits_per_weight=b["bits_per_weight"], bits=config.bits,
                    granularity=config.granularity, group_size=config.group_size, symmetric=config.symmetric)


SMOL_GROUPS = (None, 192, 64, 32)   # 576 and 1536 are multiples of 192, 64, 32 — but not of 128
MINILM_GROUPS = (None, 128, 64, 32)  # 384 and 1536 are multiples of 128
LIVE_CHECK = dict(config=dict(bits=4, group_size=64), max_tokens=256)


def _configs(groups, bits_list=(8, 4, 3, 2)):
    return [Q.QuantConfig(bits) if g is None else Q.QuantConfig(bits, group_size=g) for bits in bits_list
            for g in groups]


def q41_origin(model) -> dict:
    """SmolLM2's GGUF Q4_1 origin: distinct values per block of 32, and how exactly 4-bit g32 asymmetric
    re-quantization reproduces each decoder Linear weight (relative error)."""
    filt = Q.skip_tied(model)
    lin = [(fqn, m) for fqn, m in model.named_modules() if filt(m, fqn)]
    distinct = torch.cat([Q.distinct_per_block(m.weight, 32) for _, m in lin])
    rel = {}
    for fqn, m in lin:
        w = m.weight.detach()
        rel[fqn] = float((Q.dequantize(Q.quantize(w, 4, group_size=32, symmetric=False)) - w).norm() / w.norm())
    emb = Q.distinct_per_block(model.get_input_embeddings().weight, 32)
    hist = torch.bincount(distinct, minlength=33)[:33]
    return dict(blocks=int(distinct.numel()), max_distinct=int(distinct.max()),
                mean_distinct=float(distinct.float().mean()), distinct_hist=hist.tolist(),
                embedding_mean_distinct=float(emb.float().mean()), embedding_max_distinct=int(emb.max()),
                requant_rel_error_max=max(rel.values()), requant_rel_error_mean=sum(rel.values()) / len(rel))


def make_results() -> dict:
    """The cached sweeps of notebook 02 (→ data/results/quantize.json via `python -m labkit results quantize`).

    SmolLM2-135M perplexity at fp32/bf16 and bits × granularity (1,024 validation tokens, or 8,192 with
    LABKIT_FULL=1); MiniLM cosine vs fp32 for the same grid; the live-check point the notebook recomputes;
    the kernel table with torch.compile; the bandwidth limit.
    """
    from ..evaluate import eval_tokens
    from ..models import load_model, sentence_embeddings
    from ..repro import full_mode, seed_everything
    seed_everything(0)
    t0 = time.time()
    budget = 8192 if full_mode() else 1024
    model, tok = load_model("smollm2-135m")
    tokens = eval_tokens(tok)
    smol = [perplexity_point(model, tokens, None, budget), perplexity_point(model, tokens, "bf16", budget)]
    configs = _configs(SMOL_GROUPS) + [Q.QuantConfig(4, group_size=32, symmetric=False),
                                       Q.QuantConfig(3, group_size=32, symmetric=False)]
    for cfg in configs:
        smol.append(perplexity_point(model, tokens, cfg, budget))
        print(f"  {smol[-1]['name']:<16} ppl {smol[-1]['ppl']:.3f}  ({time.time() - t0:.0f} s)", flush=True)
    live_cfg = Q.QuantConfig(**LIVE_CHECK["config"])
    live = dict(LIVE_CHECK, ppl=perplexity_point(model, tokens, live_cfg, LIVE_CHECK["max_tokens"])["ppl"],
                fp32_ppl=perplexity_point(model, tokens, None, LIVE_CHECK["max_tokens"])["ppl"])
    origin = q41_origin(model)
    del model
    enc, etok = load_model("minilm")
    sents = kjv_sentences(16)
    ref = sentence_embeddings(enc, etok, sents)
    mini = []
    for cfg in _configs(MINILM_GROUPS) + [Q.QuantConfig(4, group_size=32, symmetric=False)]:
        mini.append(dict(name=cfg.name, bits=cfg.bits, granularity=cfg.granularity, group_size=cfg.group_size,
                         symmetric=cfg.symmetric, **embedding_cosine(enc, etok, sents, cfg, ref)))
    mini_origin = Q.distinct_per_block(enc.encoder.layer[0].attention.self.query.weight, 32)
    return dict(tokens=budget, smollm2=smol, live_check=live, q41=origin, minilm=mini,
                minilm_mean_distinct_per_32=float(mini_origin.float().mean()), sentences=len(sents),
                kernels_compiled=kernel_table(2048, 2048, compile=True), bandwidth=bandwidth(256),
                seconds=round(time.time() - t0, 1))


def bench() -> dict:
    """Headline figures of notebook 02: perplexity and bytes per format (1,024 tokens), MiniLM cosine, the kernel
    table (2048², batch 1 and 8, one thread: speed ratios vs fp32), the bandwidth limit (256 MB, same kernels) and
    `methods`: fp32/RTN/GPTQ/AWQ perplexity, bits per weight and gap closed per setting (data/results/methods.json)."""
    from ..evaluate import LIVE_TOKENS, eval_tokens
    from ..models import load_model, sentence_embeddings
    model, tok = load_model("smollm2-135m")
    tokens = eval_tokens(tok)
    out = {"tokens": LIVE_TOKENS, "note": "SmolLM2 dims (576) are not multiples of 128: g64 stands in for g128"}
    points = [(None, "fp32"), ("bf16", "bf16"), (Q.QuantConfig(8), "int8"),
              (Q.QuantConfig(4, group_size=64), "int4_g64"), (Q.QuantConfig(4), "int4_per_channel"),
              (Q.QuantConfig(3, group_size=64), "int3_g64")]
    for cfg, key in points:
        p = perplexity_point(model, tokens, cfg, LIVE_TOKENS)
        out[f"ppl_{key}"] = round(p["ppl"], 2)
        out[f"mb_{key}"] = round(p["model_bytes"] / 1e6, 1)
    del model
    enc, etok = load_model("minilm")
    sents = kjv_sentences(16)
    ref = sentence_embeddings(enc, etok, sents)
    for cfg, key in ((Q.QuantConfig(8), "int8"), (Q.QuantConfig(4, group_size=128), "int4_g128"),
                     (Q.QuantConfig(4), "int4_per_channel")):
        out[f"minilm_cosine_{key}"] = round(embedding_cosine(enc, etok, sents, cfg, ref)["mean"], 4)
    kt = kernel_table(2048, 2048)
    out["kernels_2048"] = {k: {"speedup_b1": round(r["speedup"][1], 2), "speedup_b8": round(r["speedup"][8], 2),
                               "rel_error": round(r["rel_error"][1], 4)} for k, r in kt["rows"].items()}
    bw = bandwidth(256)
    out["read_gb_per_s"] = round(bw["read_gb_per_s"], 2)
    out["matvec_256MB"] = {k: {"gb_per_s": round(p["gb_per_s"], 2), "speedup": round(p["achieved_speedup"], 2),
                               "bound_speedup": round(p["bound_speedup"], 2)} for k, p in bw["paths"].items()}
    from ..repro import load_results
    from .methods import table
    out["methods"] = table(load_results("methods"))   # RTN/GPTQ/AWQ per setting (the cached whole-model run)
    return out


# ----------------------------------------------------------------------------------------- "Try it" (notebook 02)
def explore(model, tokens, bits: int = 4, group_size: int = 64, symmetric: bool = True,
            layer: str = "model.layers.0.self_attn.q_proj", max_tokens: int = 256, fp32_ppl: float | None = None,
            ) -> dict:
    """Quantize every decoder Linear with (bits, group_size [0 = per channel], symmetric): the error histogram
    of one layer's weights, perplexity on `max_tokens` tokens, bytes of the Linear weights, and the bytes the whole
    model holds in RAM (packed Linears + everything left in fp32), beside the fp32 model's."""
    from ..evaluate import perplexity
    from ..memory import model_bytes
    cfg = Q.QuantConfig(int(bits), group_size=int(group_size) if group_size else None, symmetric=bool(symmetric))
    w = model.get_submodule(layer).weight.detach()
    q = Q.quantize(w, cfg.bits, cfg.granularity, cfg.group_size, cfg.symmetric)
    err = (Q.dequantize(q) - w).flatten()
    if fp32_ppl is None:
        fp32_ppl = perplexity(model, tokens, max_tokens=max_tokens)
    fp32_model = model_bytes(model)
    with Q.temporarily_quantized(model, cfg) as m:
        ppl = perplexity(m, tokens, max_tokens=max_tokens)
        b = Q.quantized_linear_bytes(m)
        ram = model_bytes(m)
    return dict(name=cfg.name, layer=layer, errors=err, scale_max=float(q.scales.float().max()),
                rel_error=float(err.norm() / w.norm()), ppl=ppl, fp32_ppl=fp32_ppl, tokens=max_tokens,
                linear_bytes=b["total_bytes"], fp32_bytes=b["fp32_bytes"], bits_per_weight=b["bits_per_weight"],
                model_bytes=ram, fp32_model_bytes=fp32_model)


def layer_error_table(w: torch.Tensor, bits_list=(8, 4, 3, 2), groups=(None, 192, 64, 32)) -> list[dict]:
    """Relative error and bytes of one weight matrix for each (bits, granularity), symmetric."""
    rows = []
    for bits in bits_list:
        for g in groups:
            q = Q.quantize(w, bits) if g is None else Q.quantize(w, bits, group_size=g)
            rows.append(dict(bits=bits, granularity="per-channel" if g is None else f"g{g}",
                             bits_per_weight=q.bits_per_value(), bytes=q.nbytes, **Q.quant_error(w, q)))
    return rows
