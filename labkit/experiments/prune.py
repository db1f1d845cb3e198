"""Notebook 01's experiments: the pruning sweep on SmolLM2-135M (cached in data/results/prune.json by
`python -m labkit results prune`), the per-layer sensitivity scan and a non-uniform allocation, the bytes of
each pruned model in its best storage format, bench figures and the widget's function."""
from __future__ import annotations

import math
import time

import torch

from ..evaluate import HEADLINE_TOKENS, perplexity
from ..prune import (
    PruneConfig, calibration_batches, collect_input_norms, compute_masks, apply_masks_, prune_mlp_neurons_,
    prune_with_masks_, pruned, recovery_finetune_, select_linears, sparsity_of,
)

EVAL_TOKENS = HEADLINE_TOKENS                   # validation tokens per cached perplexity
SWEEP_SPARSITIES = (0.1, 0.3, 0.5, 0.7)
# the four unstructured variants: score (magnitude | Wanda) × comparison group (per layer | per output row);
# the two papers' own pairings over the whole sweep, the swapped groupings at 50% (the fair control)
SWEEP_METHODS = {"magnitude": SWEEP_SPARSITIES, "wanda": SWEEP_SPARSITIES, "magnitude_row": (0.5,),
                 "wanda_layer": (0.5,)}
CALIB = {"n_samples": 8, "seq_len": 128}        # 1,024 train tokens, the same for Wanda and SparseGPT
RECOVERY = {"steps": 10, "lr": 1e-4, "seq_len": 128, "batch_size": 4}
STRUCTURED_SPARSITIES = (0.25, 0.5)
SCAN = {"method": "wanda", "sparsity": 0.7, "max_tokens": 512}   # one decoder layer at a time, cheap budget
ALLOCATION_SPREAD = 0.1                         # non-uniform: 50% ± 10 points by sensitivity rank


def sweep_config(method: str, sparsity: float = 0.5) -> PruneConfig:
    """The config a method name means in notebook 01: 'magnitude' (per layer, SparseGPT's baseline),
    'magnitude_row' (per output row), 'wanda' (|W|·‖X‖ per output row, the Wanda paper's), 'wanda_layer',
    'sparsegpt' (OBS updates, mask per block of 128 columns), '2:4' / '2:4 magnitude', '2:4 wanda', '2:4 sparsegpt'."""
    configs = {"magnitude": ("magnitude", "layer"), "magnitude_row": ("magnitude", "row"),
               "wanda": ("wanda", "row"), "wanda_layer": ("wanda", "layer"), "sparsegpt": ("sparsegpt", "layer")}
    if method in configs:
        m, scope = configs[method]
        return PruneConfig(m, sparsity, scope=scope)
    nm = {"2:4": "magnitude", "2:4 magnitude": "magnitude", "2:4 wanda": "wanda", "2:4 sparsegpt": "sparsegpt"}
    if method in nm:
        return PruneConfig("nm", n=2, m=4, score=nm[method])
    raise ValueError(f"unknown method {method!r}; use one of {sorted(configs) + sorted(nm)}")


def best_storage(shape, nnz: int, two_four: bool) -> tuple[str, int]:
    """(format, bytes) of the smallest exact storage of one fp32 matrix with `nnz` nonzeros: dense, CSR with
    int32 indices, bitmap, or 2:4 (values + 2-bit positions) when every group of 4 keeps at most 2."""
    from ..sparse import formula_bytes
    options = {"2:4": formula_bytes("2:4", shape, nnz)} if two_four else {}   # first: wins a tie
    options.update({f: formula_bytes(f, shape, nnz) for f in ("dense", "csr32", "bitmap")})
    fmt = min(options, key=options.get)
    return fmt, options[fmt]


def is_two_four(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive inputs of every row has at most 2 nonzeros."""
    rows, cols = weight.shape
    return cols % 4 == 0 and bool(((weight != 0).reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


def storage_bytes(model, names) -> dict:
    """Bytes of the whole model (lk.model_bytes) with each named Linear weight in its best storage format."""
    from ..memory import model_bytes
    total, formats = model_bytes(model), {}
    for n in names:
        w = model.get_submodule(n).weight.detach()
        fmt, b = best_storage(tuple(w.shape), int((w != 0).sum()), is_two_four(w))
        total += b - w.numel() * w.element_size()
        formats[fmt] = formats.get(fmt, 0) + 1
    return {"bytes": int(total), "formats": formats}


def measure(model, ev, config: PruneConfig, norms=None, calib=None, max_tokens: int = EVAL_TOKENS,
            filter_fn=None) -> dict:
    """Perplexity and best-storage bytes of `model` pruned by `config` (dense weights restored afterwards)."""
    with pruned(model, config, filter_fn, input_norms=norms, calib_tokens=calib) as masks:
        ppl = perplexity(model, ev, max_tokens=max_tokens)
        store = storage_bytes(model, masks)
        return {"perplexity": round(float(ppl), 4), "sparsity": round(sparsity_of(masks), 6), **store}


def layer_filter(i: int):
    """filter_fn: the Linear layers of decoder layer i only."""
    prefix = f"model.layers.{i}."
    return lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn.startswith(prefix)


def allocation(sensitivity: list[float], mean: float = 0.5, spread: float = ALLOCATION_SPREAD) -> list[float]:
    """Per-layer sparsity: the least sensitive layer gets mean + spread, the most sensitive mean − spread,
    linear in the rank between; with layers of equal size the total is exactly `mean`."""
    n = len(sensitivity)
    order = sorted(range(n), key=lambda i: sensitivity[i])      # least sensitive first
    out = [0.0] * n
    for rank, i in enumerate(order):
        out[i] = round(mean + spread * (1 - 2 * rank / max(1, n - 1)), 6)
    return out


def nonuniform_masks(model, sparsities: list[float], norms, method: str = "wanda") -> dict:
    """Keep-masks with decoder layer i pruned at sparsities[i] by `method` (a mask-based sweep_config name)."""
    masks = {}
    for i, s in enumerate(sparsities):
        masks.update(compute_masks(model, sweep_config(method, s), layer_filter(i), norms))
    return masks


def curves(res: dict) -> dict:
    """The cached points as lk.plots.prune_sweep draws them: {"dense", "sweep": {method: {"0.50": ppl}},
    "nm_2_4": {score: ppl}, "at_50": {label: ppl}} (lines for the full sweeps, markers for the rest)."""
    pts = res["points"]
    sweep = {m: {f"{s:.2f}": pts[f"{m}_{round(s * 100)}"]["perplexity"] for s in sp}
             for m, sp in SWEEP_METHODS.items() if len(sp) > 1}
    nm = {score: pts[k]["perplexity"] for score, k in (("magnitude", "magnitude_2:4"), ("wanda", "wanda_2:4"),
                                                       ("sparsegpt", "sparsegpt_2:4")) if k in pts}
    at_50 = {label: pts[k]["perplexity"] for label, k in (("magnitude per row", "magnitude_row_50"),
                                                          ("Wanda per layer", "wanda_layer_50"),
                                                          ("SparseGPT", "sparsegpt_50")) if k in pts}
    return {"dense": res["dense"], "sweep": sweep, "nm_2_4": nm, "at_50": at_50}


def _setup(model_name: str = "smollm2-135m"):
    from ..data import tokens
    from ..evaluate import eval_tokens
    from ..models import load_model
    model, tok = load_model(model_name)
    return model, tok, eval_tokens(tok), tokens("train", tok)


def _log(msg: str, t0: float) -> None:
    print(f"[prune {time.perf_counter() - t0:6.0f}s] {msg}", flush=True)


def make_results() -> dict:
    """The figures behind notebook 01 (data/results/prune.json): perplexity on the protocol's headline budget
    for magnitude and Wanda, each per layer and per row, at 10–70%; SparseGPT at 50% and 2:4 beside them; a
    per-layer sensitivity scan and a non-uniform allocation; bytes of each pruned model in its best storage;
    structured MLP pruning; a short recovery fine-tune."""
    from ..repro import threads
    with threads(1):   # on a shared 2-core machine one thread is faster (and the numbers do not depend on it)
        return _make_results()


def _make_results() -> dict:
    from ..memory import model_bytes
    from ..repro import seed_everything
    seed_everything(0)
    t0 = time.perf_counter()
    model, tok, ev, train = _setup()
    calib = calibration_batches(train, **CALIB)
    norms = collect_input_norms(model, calib)
    linears = list(select_linears(model))
    out = {"model": "smollm2-135m", "eval": {"split": "validation", "max_tokens": EVAL_TOKENS, "seq_len": 256},
           "calibration": {"split": "train", **CALIB}, "pruned_layers": "every Linear in the decoder blocks; "
           "embeddings and (tied) lm_head dense", "dense": round(float(perplexity(model, ev, max_tokens=EVAL_TOKENS)), 4),
           "dense_bytes": model_bytes(model), "points": {}}
    _log(f"dense {out['dense']}", t0)
    pts = out["points"]
    for key, method, s in [("sparsegpt_50", "sparsegpt", 0.5), ("sparsegpt_2:4", "2:4 sparsegpt", 0.5)]:
        pts[key] = measure(model, ev, sweep_config(method, s), calib=calib)
        _log(f"{key} {pts[key]}", t0)
    for method, sparsities in SWEEP_METHODS.items():
        for s in sparsities:
            key = f"{method}_{round(s * 100)}"
            pts[key] = measure(model, ev, sweep_config(method, s), norms)
            _log(f"{key} {pts[key]['perplexity']}", t0)
    for score in ("magnitude", "wanda"):
        pts[f"{score}_2:4"] = measure(model, ev, sweep_config(f"2:4 {score}"), norms)
        _log(f"{score}_2:4 {pts[f'{score}_2:4']['perplexity']}", t0)

    # sensitivity: one decoder layer at a time pruned hard (cheap budget), then a non-uniform allocation
    scan_cfg = sweep_config(SCAN["method"], SCAN["sparsity"])
    base = float(perplexity(model, ev, max_tokens=SCAN["max_tokens"]))
    scan = []
    for i in range(len(model.model.layers)):
        with pruned(model, scan_cfg, layer_filter(i), input_norms=norms):
            scan.append(round(float(perplexity(model, ev, max_tokens=SCAN["max_tokens"])), 4))
    alloc = allocation([math.log(p / base) for p in scan])
    saved = {n: model.get_submodule(n).weight.detach().clone() for n in linears}
    masks = nonuniform_masks(model, alloc, norms, SCAN["method"])
    apply_masks_(model, masks)
    nonuni = {"perplexity": round(float(perplexity(model, ev, max_tokens=EVAL_TOKENS)), 4),
              "sparsity": round(sparsity_of(masks), 6), **storage_bytes(model, masks)}
    with torch.no_grad():
        for n in linears:
            model.get_submodule(n).weight.copy_(saved[n])
    del saved
    out["sensitivity"] = {**SCAN, "dense": round(base, 4), "per_layer": scan, "allocation": alloc,
                          "spread": ALLOCATION_SPREAD, "nonuniform": nonuni,
                          "uniform_key": f"{SCAN['method']}_50"}
    _log(f"nonuniform {nonuni['perplexity']} vs uniform {pts[out['sensitivity']['uniform_key']]['perplexity']}", t0)

    # recovery: magnitude 50%, then a few masked AdamW steps; the dense model gets the same steps for reference
    rec = {**RECOVERY, "config": "magnitude 50%"}
    masks = prune_with_masks_(model, sweep_config("magnitude", 0.5))
    rec["before"] = pts["magnitude_50"]["perplexity"]
    rec["losses"] = [round(x, 4) for x in recovery_finetune_(model, train, masks, **RECOVERY)]
    rec["after"] = round(float(perplexity(model, ev, max_tokens=EVAL_TOKENS)), 4)
    rec["sparsity_after"] = round(sparsity_of([model.get_submodule(n) for n in masks]), 6)
    del model, masks
    model, *_ = _setup()
    recovery_finetune_(model, train, None, **RECOVERY)
    rec["dense_after_same_steps"] = round(float(perplexity(model, ev, max_tokens=EVAL_TOKENS)), 4)
    out["recovery"] = rec
    _log(f"recovery {rec['after']}", t0)

    # structured: whole MLP neurons removed (activation-aware score), the matrices really shrink
    out["structured"] = {}
    for s in STRUCTURED_SPARSITIES:
        model = None
        model, *_ = _setup()
        before = model_bytes(model)
        prune_mlp_neurons_(model, s, norms)
        out["structured"][f"{s:.2f}"] = {
            "perplexity": round(float(perplexity(model, ev, max_tokens=EVAL_TOKENS)), 4),
            "intermediate_size": model.config.intermediate_size, "bytes_before": before,
            "bytes_after": model_bytes(model)}
        _log(f"structured {s} {out['structured'][f'{s:.2f}']['perplexity']}", t0)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def bench() -> dict:
    """Perplexity at 30/50/70% (magnitude per layer and per row, Wanda per row), 2:4, and SparseGPT at 50% and
    2:4, MEASURED on a small budget of 512 validation tokens (the cached figures use 4,096)."""
    model, tok, ev, train = _setup()
    calib = calibration_batches(train, **CALIB)
    norms = collect_input_norms(model, calib)
    budget = 512
    res = {"dense": round(float(perplexity(model, ev, max_tokens=budget)), 2)}
    for method in ("magnitude", "magnitude_row", "wanda"):
        for s in (0.3, 0.5, 0.7):
            res[f"{method}_{int(s * 100)}"] = round(measure(model, ev, sweep_config(method, s), norms,
                                                            max_tokens=budget)["perplexity"], 2)
    for score in ("magnitude", "wanda"):
        res[f"2:4_{score}"] = round(measure(model, ev, sweep_config(f"2:4 {score}"), norms,
                                            max_tokens=budget)["perplexity"], 2)
    res["sparsegpt_50"] = round(measure(model, ev, sweep_config("sparsegpt"), calib=calib,
                                        max_tokens=budget)["perplexity"], 2)
    res["sparsegpt_2:4"] = round(measure(model, ev, sweep_config("2:4 sparsegpt"), calib=calib,
                                         max_tokens=budget)["perplexity"], 2)
    return {"ppl_512_val_tokens": res, "eval_tokens": budget}


def prune_and_measure(model, tokenizer, eval_tokens, method: str = "magnitude", sparsity: float = 0.5,
                      input_norms=None, max_tokens: int = 512, prompt: str = "In the beginning",
                      max_new_tokens: int = 12) -> dict:
    """What the widget shows: perplexity, bytes and a greedy sample of the pruned model (weights restored after).

    Bytes: the pruned Linear weights as they are (dense fp32 — zeros cost as much as any number) and in their
    best exact storage format (dense, CSR/int32, bitmap or 2:4; labkit.sparse's formulas)."""
    from ..models import generate
    config = sweep_config(method, sparsity)
    with pruned(model, config, input_norms=input_norms) as masks:
        mods = [model.get_submodule(n) for n in masks]
        best = [best_storage(tuple(m.weight.shape), int((m.weight != 0).sum()), is_two_four(m.weight)) for m in mods]
        return {"method": method, "sparsity": round(sparsity_of(masks), 4),
                "perplexity": perplexity(model, eval_tokens, max_tokens=max_tokens),
                "dense_bytes": sum(m.weight.numel() * m.weight.element_size() for m in mods),
                "best_bytes": sum(b for _, b in best),
                "sample": generate(model, tokenizer, prompt, max_new_tokens)}
