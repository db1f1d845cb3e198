"""Experiments of notebook 07 (capstone): the grid of recipes behind data/results/capstone.json (`python -m labkit
results capstone`), the RAM measurements behind data/results/capstone_ram.json (`python -m labkit results
capstone_ram`), bench figures, and the `python -m labkit compress` command (compress_for_budget).

The ideas (recipes, stored formats, export/load, frontier, budget search) live in labkit/capstone.py.
"""
from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..capstone import (EVAL_TOKENS, KMEANS_SAMPLE, ZSTD_LEVEL, BudgetError, Compressed, Recipe, beyond_single,
                        best_recipe, check_export_folder, compress_, decode_matrix, export, load_compressed,
                        pareto_front, parse_budget, ram_formula_bytes, recode, search_points, unique_state)
from ..checks import whole_number

class _Restorer:
    """Keep a copy of the weights to put them back after each recipe (cheaper than reloading the model)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.saved = {n: t.detach().clone() for n, t in unique_state(model)[0].items()}

    @torch.no_grad()
    def restore(self):
        state = self.model.state_dict()
        for n, t in self.saved.items():
            state[n].copy_(t)


def _point(packed: "Compressed", ppl: float) -> dict:
    r = packed.recipe
    return {"name": r.name, "recipe": r.to_dict(), "techniques": r.techniques, "bytes": packed.nbytes,
            "ram_bytes": ram_formula_bytes(packed), "stage_bytes": packed.stage_bytes, "ppl": ppl}


DC_RECIPE = dict(sparsity=0.5, quant="kmeans", bits=4)     # the Deep Compression pipeline, as in notebook 04
DC_ROW_RECIPE = dict(DC_RECIPE, codebook="row")            # the same with one codebook per row
GRID = [dict(sparsity=0.3), dict(sparsity=0.5),
        dict(quant="int", bits=8), dict(quant="int", bits=4), dict(quant="int", bits=4, group_size=64),
        dict(quant="int", bits=4, group_size=32, symmetric=False),
        dict(quant="int", bits=3, group_size=64), dict(quant="kmeans", bits=4), dict(quant="kmeans", bits=3),
        dict(quant="kmeans", bits=4, codebook="row"),
        dict(sparsity=0.5, quant="int", bits=4, group_size=64), dict(sparsity=0.3, quant="kmeans", bits=4),
        DC_RECIPE, DC_ROW_RECIPE, dict(sparsity=0.5, quant="kmeans", bits=3)]


def grid_recipes() -> list[Recipe]:
    """The recipes of make_results' grid: pruning levels, bit widths and group sizes, k-means sharing, and
    combinations (each quantized one is also stored with zstd: same weights, fewer bytes)."""
    return [Recipe(**g) for g in GRID]


def deep_compression_stages(grid: list[dict], huffman: "Compressed", folder) -> list[dict]:
    """Han et al.'s stages from grid points: fp32 → pruned (bitmap) → k-means shared (packed codes) → Huffman
    (and zstd in its place), then the shared stage again with one codebook per row. The Huffman stage is written
    to `folder` and its weights file measured on disk."""
    r = Recipe(**DC_RECIPE)
    by_name = {p["name"]: p for p in grid}
    rows = [dict(stage=s, **{k: by_name[n][k] for k in ("name", "bytes", "ppl")}) for s, n in
            (("fp32", "fp32"), ("pruned", Recipe(r.sparsity).name), ("shared", r.name))]
    rep = export(huffman, folder)
    rows.append(dict(stage="huffman", name=huffman.recipe.name, bytes=rep["bytes"]["weights_file"],
                     ppl=rows[-1]["ppl"], bits_per_code=sum(e.get("n_bits", 0) for e in huffman.entries.values())
                     / sum(math.prod(e["shape"]) for e in huffman.entries.values() if "n_bits" in e)))
    z = replace(r, entropy="zstd").name
    rows.append(dict(stage="zstd (instead of Huffman)", name=z, bytes=by_name[z]["bytes"], ppl=by_name[z]["ppl"]))
    row = Recipe(**DC_ROW_RECIPE).name
    if row in by_name:
        rows.append(dict(stage="shared, a codebook per row", name=row, bytes=by_name[row]["bytes"],
                         ppl=by_name[row]["ppl"]))
    return rows


def distilled_point(results: dict | None = None, eval_tokens: int = EVAL_TOKENS) -> dict:
    """Notebook 03's teacher-initialised depth student after KD (data/results/distill.json, `python -m labkit
    results distill`) as a point: fp32 bytes of its weights and its mean validation perplexity over the seeds.
    That perplexity is on distill.json's budget (4,096 tokens), not this grid's `eval_tokens`: when they differ
    the name says so, and "eval_tokens" / "teacher_ppl" (the teacher on the same tokens) travel with the point.
    A missing or outdated distill.json raises (FileNotFoundError / ValueError) instead of dropping the point."""
    from ..evaluate import ppl_label
    from ..repro import load_results
    d = load_results("distill") if results is None else results
    try:
        depth, tokens = d["depth"], int(d["eval"]["val_tokens"])
        n, teacher = len(d["config"]["keep_layers"]), float(d["teacher"]["val_ppl"])
        point = {"bytes": int(depth["bytes"]), "ppl": float(depth["kd_ppl_mean"]), "seeds": int(depth["seeds"])}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"data/results/distill.json lacks the depth student's KD result ({e!r}); regenerate it "
                         "with `python -m labkit results distill`") from None
    budget = f" ({ppl_label(tokens)}, not {ppl_label(eval_tokens)})" if tokens != eval_tokens else ""
    return {"name": f"distilled: {n} layers + KD{budget}", "techniques": ["distill"], **point,
            "eval_tokens": tokens, "teacher_ppl": teacher, "source": "data/results/distill.json"}


def make_results() -> dict:
    """The cached sweep of notebook 07 (→ data/results/capstone.json via `python -m labkit results capstone`).

    SmolLM2-135M, 1,024 validation tokens per perplexity (as notebook 02's sweep; lk's default 4,096 would take
    ~1 minute per point on a busy 2-core CPU, and every point uses the same windows, so they compare): the grid of
    recipes with the exact bytes of their safetensors file and perplexity; the Deep Compression stages, the
    Huffman one written to disk and one layer decoded back to check it is lossless."""
    import tempfile

    from .. import prune as P
    from ..evaluate import eval_tokens, perplexity
    from ..memory import model_bytes
    from ..models import load_model
    from ..repro import seed_everything
    seed_everything(0)
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    tokens = eval_tokens(tok)
    grid = [_point(compress_(model, Recipe()), perplexity(model, tokens, max_tokens=EVAL_TOKENS))]
    masks = {s: P.compute_masks(model, P.PruneConfig("magnitude", s)) for s in sorted({g.get("sparsity", 0)
                                                                                     for g in GRID} - {0})}
    log = [f"fp32 ppl {grid[0]['ppl']:.2f}, masks ready ({time.perf_counter() - t0:.0f} s)"]
    print(log[-1], flush=True)
    restorer = _Restorer(model)
    for recipe in grid_recipes():
        packed = compress_(model, recipe, masks.get(recipe.sparsity))
        pts = [_point(packed, perplexity(model, tokens, max_tokens=EVAL_TOKENS))]
        if recipe.quant != "none":                      # the same weights, codes entropy coded
            pts.append(_point(recode(packed, "zstd"), pts[0]["ppl"]))
        grid.extend(pts)
        if recipe == Recipe(**DC_RECIPE):
            huff = recode(packed, "huffman")
            names = [n for n in huff.entries if n.endswith("mlp.gate_proj.weight")]
            name = names[len(names) // 2]
            lossless = name if torch.equal(decode_matrix(huff.entries[name]), model.state_dict()[name]) else None
        restorer.restore()
        log.append(" · ".join(f"{p['name']} {p['bytes'] / 1e6:.1f} MB" for p in pts)
                   + f" · ppl {pts[0]['ppl']:.2f} ({time.perf_counter() - t0:.0f} s)")
        print(log[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:          # after the grid: the per-row stage is a later recipe
        stages = deep_compression_stages(grid, huff, tmp)
    next(r for r in stages if r["stage"] == "huffman")["lossless_checked_on"] = lossless
    del huff
    return {"model": "smollm2-135m", "eval": {"split": "validation", "max_tokens": EVAL_TOKENS, "seq_len": 256},
            "fp32_bytes": grid[0]["bytes"], "fp32_model_bytes": model_bytes(model), "stages": stages, "grid": grid,
            "kmeans_sample": KMEANS_SAMPLE, "zstd_level": ZSTD_LEVEL,
            "log": log, "seconds": round(time.perf_counter() - t0, 1)}


def summary(results: dict) -> dict:
    """The headline figures of a results dict: stage bytes and perplexity, the frontier, best perplexity at
    25% and 12.5% of the fp32 bytes."""
    pts = search_points(results)
    fp32 = results["fp32_bytes"]
    out = {"stages": {r["stage"]: {"bytes": r["bytes"], "ppl": round(r["ppl"], 2),
                                   "x_smaller": round(results["stages"][0]["bytes"] / r["bytes"], 2)}
                      for r in results["stages"]},
           "frontier": [{"name": p["name"], "bytes": p["bytes"], "fraction_of_fp32": round(p["bytes"] / fp32, 4),
                         "ppl": round(p["ppl"], 2)} for p in pareto_front(pts)],
           "beyond_single": [p["name"] for p in beyond_single(pts)]}
    for frac in (0.25, 0.125):
        try:
            b = best_recipe(pts, int(frac * fp32))
            out[f"best_at_{frac:g}"] = {"name": b["name"], "bytes": b["bytes"], "ppl": round(b["ppl"], 2)}
        except BudgetError as e:
            out[f"best_at_{frac:g}"] = {"error": str(e)}
    return out


def bench() -> dict:
    """Notebook 07's figures from data/results/capstone.json and capstone_ram.json (regenerate with `python -m
    labkit results capstone` / `capstone_ram`, ~10 minutes each): Deep Compression stage bytes and perplexity,
    the disk frontier, best perplexity at 25% and 12.5%, and the `ram` section (every recipe measured in a fresh
    process) with int4_weights_rss_over_fp32 and int4_load_peak_over_steady."""
    from ..repro import load_results
    res = load_results("capstone")
    out = {"eval_tokens": res["eval"]["max_tokens"], "fp32_bytes": res["fp32_bytes"], **summary(res)}
    try:
        ram = load_results("capstone_ram")
    except FileNotFoundError:
        return out
    keys = ("file_bytes", "load_peak_rss_bytes", "steady_rss_bytes", "baseline_rss_bytes", "weights_rss_bytes",
            "formula_bytes", "tokens_per_s_ratio_vs_fp32", "ppl")
    out["ram"] = {r["name"]: {k: r[k] for k in keys} for r in ram["rows"]}
    out.update({k: ram["headline"][k] for k in ("int4_weights_rss_over_fp32", "int4_load_peak_over_steady",
                                                 "torchao_int4_tokens_per_s_over_fp32")})
    return out


# ----------------------------------------------------------------------------------------------- RAM, measured
# name → (the export it loads, how it loads it); every row runs in its own fresh process (ram_worker)
RAM_RECIPES = {
    "fp32": (dict(), "fp32"),
    "bf16": (dict(), "bf16"),
    "int8-pc": (dict(quant="int", bits=8), "packed"),
    "int4-g32-asym": (dict(quant="int", bits=4, group_size=32, symmetric=False), "packed"),
    "int4-g64 + zstd": (dict(quant="int", bits=4, group_size=64, entropy="zstd"), "packed"),
    "int8-pc + zstd": (dict(quant="int", bits=8, entropy="zstd"), "packed"),
    "torchao int4-g64": (dict(), "torchao-int4"),
    "torchao int4-g64, heap not trimmed": (dict(), "torchao-int4-untrimmed"),
    "int4-g32-asym, naive fp32 load": (dict(quant="int", bits=4, group_size=32, symmetric=False), "naive"),
}
INT4_ROW = "int4-g32-asym"
TORCHAO_GROUP = 64
RAM_PROMPT = "In the beginning God created"
RAM_NEW_TOKENS = 32


def _torchao_int4(fqn: str, lin: nn.Linear, trim: bool = True) -> nn.Module:
    """convert= hook of load_compressed: one decoder Linear (bf16) → torchao int4 (Int4OpaqueTensor), right after
    it is filled; the lm_head tied to the embedding stays bf16. trim=True hands the heap memory that torchao's
    freed temporaries leave behind back to the OS after each layer (glibc keeps it; measured: the load peak then
    grows by 100–250 MB of freed memory — the "heap not trimmed" row)."""
    from .. import quantize as Q
    if fqn == "lm_head":
        return lin
    out = Q.torchao_quantize_(nn.Sequential(lin), "int4 weight-only", TORCHAO_GROUP, lambda m, f: f == "0")[0]
    if trim:
        _malloc_trim(collect=False)
    return out


def _formula(model: nn.Module, loader: str, report: dict) -> int:
    """Bytes the weights should take in RAM for this loader: the export's formula (fp32 / packed), half of
    fp32 for bf16, and for torchao int4 two codes per byte + a bf16 scale and zero per group of 64 (+ the rest bf16)."""
    if loader in ("fp32", "packed"):
        return report["bytes"]["ram_formula"]
    loader = "torchao-int4" if loader.startswith("torchao") else loader
    n = report["bytes"]["fp32"] // 4
    if loader == "naive":
        return 4 * n
    if loader == "bf16":
        return 2 * n
    q = sum(m.in_features * m.out_features for f, m in model.named_modules()
            if isinstance(m, nn.Linear) and f != "lm_head")
    return 2 * (n - q) + q // 2 + 4 * q // TORCHAO_GROUP


def _malloc_trim(collect: bool = True) -> None:
    """gc, then hand freed heap memory back to the OS (glibc keeps it otherwise) before reading RSS."""
    if collect:
        gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_kinds() -> dict[str, int]:
    """RSS split by kind (Linux /proc/self/status): "anon" (heap and anonymous maps: tensors live here) and
    "file" (pages of mapped files: the code of torch's shared libraries, paged in the first time it runs)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem"):
                out[{"RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}[key]] = int(val.split()[0]) * 1024
    except OSError:
        pass
    return out


def _rss_by_mapping() -> dict[str, int]:
    """Resident bytes per mapping (/proc/self/smaps), keyed by file name ('libtorch_cpu.so') or '[heap]'/'[anon]'."""
    out: dict[str, int] = {}
    name = None
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 5)
                if "-" in head[0] and len(head) >= 5 and ":" in head[3]:       # a mapping's header line
                    name = head[5].strip().rpartition("/")[2] if len(head) > 5 else "[anon]"
                elif head[0] == "Rss:":
                    out[name] = out.get(name, 0) + int(head[1]) * 1024
    except OSError:
        pass
    return out


def _grown(before: dict[str, int], after: dict[str, int], min_bytes: int = 256 << 10) -> dict[str, int]:
    """Mappings whose resident bytes grew by at least min_bytes, largest first."""
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return dict(sorted(((k, v) for k, v in d.items() if v >= min_bytes), key=lambda kv: -kv[1]))


def ram_worker(folder: str, loader: str, ppl_tokens: int) -> dict:
    """Run in a FRESH process (lk.memory.run_in_subprocess): baseline RSS with labkit, torch and transformers
    imported and the tokenizer loaded; peak RSS while loading (VmHWM reset first); steady RSS after generating
    32 greedy tokens on one thread (freed heap handed back first); tokens/s; perplexity on `ppl_tokens` (0: none)."""
    import labkit as lk
    from transformers import AutoTokenizer

    from ..memory import current_rss, measure_memory
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(folder)
    tokens = lk.evaluate.eval_tokens(tok)
    ids = tok(RAM_PROMPT, return_tensors="pt")
    report = json.loads((Path(folder) / "report.json").read_text())
    import torchao  # noqa: F401  (every row imports the same libraries before its baseline)
    from ..capstone import empty_model
    empty_model(report["config"], report.get("attn_implementation"))   # imports the model's code: not weights
    _malloc_trim()
    kinds0, maps0 = _rss_kinds(), _rss_by_mapping()
    with measure_memory() as m:            # kernel high-water mark, reset at entry: the exact loading peak
        if loader.startswith("torchao-int4"):
            trim = loader == "torchao-int4"
            model = load_compressed(folder, dtype=torch.bfloat16, convert=lambda f, lin: _torchao_int4(f, lin, trim))
        else:
            model = load_compressed(folder, packed=loader == "packed",
                                    dtype=torch.bfloat16 if loader == "bf16" else torch.float32)
    baseline, load_peak, load_s = m.baseline_bytes, m.baseline_bytes + m.peak_bytes, m.seconds
    gen = dict(max_new_tokens=RAM_NEW_TOKENS, min_new_tokens=RAM_NEW_TOKENS, do_sample=False,
               pad_token_id=tok.eos_token_id)
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.eos_token_id)   # warm-up
        t0 = time.perf_counter()
        out = model.generate(**ids, **gen)
        gen_s = time.perf_counter() - t0
    _malloc_trim()
    steady = current_rss()
    kinds1, maps1 = _rss_kinds(), _rss_by_mapping()
    anon = kinds1.get("anon", steady) - kinds0.get("anon", baseline)
    from ..memory import tensor_bytes
    row = dict(loader=loader, recipe=report["recipe_name"], file_bytes=report["bytes"]["weights_file"],
               baseline_rss_bytes=baseline, load_peak_rss_bytes=load_peak, steady_rss_bytes=steady,
               weights_rss_bytes=anon, code_pages_bytes=kinds1.get("file", 0) - kinds0.get("file", 0),
               rss_growth_by_mapping=_grown(maps0, maps1), tensor_bytes=tensor_bytes(model),
               formula_bytes=_formula(model, loader, report), load_seconds=round(load_s, 2),
               tokens_per_s=RAM_NEW_TOKENS / gen_s, greedy_tokens=out[0].tolist(),
               fp32_copies=[n for n, p in model.named_parameters() if p.dim() == 2 and p.dtype == torch.float32])
    if ppl_tokens:
        with lk.repro.threads(2):
            row["ppl"] = float(lk.perplexity(model, tokens, max_tokens=ppl_tokens))
    return row


def measure_ram(names=None, ppl_tokens: int = EVAL_TOKENS, log=print, grid: dict | None = None) -> dict:
    """Export each recipe of RAM_RECIPES once (into a temporary folder), then load and run each in a fresh process
    (ram_worker): the rows of notebook 07's RAM frontier and bench()'s `ram` section. A row that loads exactly
    the weights of a grid recipe takes that recipe's perplexity from capstone.json (the same weights, the same
    tokens); bf16 and torchao int4 change the weights, so their perplexity is measured in the worker."""
    import tempfile

    from ..memory import run_in_subprocess
    from ..models import load_model
    from ..repro import load_results
    grid_ppl = {p["name"]: p["ppl"] for p in (grid or load_results("capstone"))["grid"]}
    names = list(RAM_RECIPES) if names is None else list(names)
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = load_model("smollm2-135m")
        restorer = _Restorer(model)
        folders = {}
        for name in names:
            recipe = Recipe(**RAM_RECIPES[name][0])
            if recipe.name not in folders:
                folders[recipe.name] = str(Path(tmp) / f"export-{len(folders)}")
                export(compress_(model, recipe), folders[recipe.name], tok)
                restorer.restore()
        del model, restorer
        gc.collect()
        for name in names:
            recipe, loader = Recipe(**RAM_RECIPES[name][0]), RAM_RECIPES[name][1]
            twin = next((r for r in rows if loader.startswith("torchao") and r["loader"].startswith("torchao")), None)
            own = twin is None and (loader in ("bf16", "torchao-int4", "torchao-int4-untrimmed")
                                    or recipe.name not in grid_ppl)
            row, _ = run_in_subprocess(ram_worker, folders[recipe.name], loader, ppl_tokens if own else 0)
            if not own:
                row["ppl"] = twin["ppl"] if twin else grid_ppl[recipe.name]
            row["ppl_source"] = ("measured in the worker" if own else f"row '{twin['name']}' (same weights)" if twin
                                 else "capstone.json (same weights)")
            rows.append(dict(name=name, **row))
            log(f"{name:32s} weights {row['weights_rss_bytes'] / 1e6:7.1f} MB (formula {row['formula_bytes'] / 1e6:6.1f})"
                f" load peak {(row['load_peak_rss_bytes'] - row['baseline_rss_bytes']) / 1e6:7.1f} MB "
                f"{row['tokens_per_s']:.1f} tok/s ppl {row['ppl']:.2f} ({time.perf_counter() - t0:.0f} s)")
    by = {r["name"]: r for r in rows}
    fp32 = by.get("fp32")
    for r in rows:
        r["tokens_per_s_ratio_vs_fp32"] = r["tokens_per_s"] / fp32["tokens_per_s"] if fp32 else None
        r["load_peak_over_steady"] = ((r["load_peak_rss_bytes"] - r["baseline_rss_bytes"])
                                      / max(1, r["steady_rss_bytes"] - r["baseline_rss_bytes"]))
        r["load_peak_over_weights"] = (r["load_peak_rss_bytes"] - r["baseline_rss_bytes"]) / max(1, r["weights_rss_bytes"])
        r["weights_rss_over_formula"] = r["weights_rss_bytes"] / r["formula_bytes"]
    head = {}
    if fp32 and INT4_ROW in by:
        head["int4_weights_rss_over_fp32"] = by[INT4_ROW]["weights_rss_bytes"] / fp32["weights_rss_bytes"]
        head["int4_load_peak_over_steady"] = by[INT4_ROW]["load_peak_over_steady"]
    if fp32 and "torchao int4-g64" in by:
        head["torchao_int4_tokens_per_s_over_fp32"] = by["torchao int4-g64"]["tokens_per_s_ratio_vs_fp32"]
    return {"model": "smollm2-135m", "threads": 1, "new_tokens": RAM_NEW_TOKENS, "prompt": RAM_PROMPT,
            "eval": {"split": "validation", "max_tokens": ppl_tokens}, "rows": rows, "headline": head,
            "note": "weights = growth of the process's ANONYMOUS resident memory (RssAnon: heap and anonymous maps, "
                    "where tensors live) from the baseline to the steady state after generating, freed heap handed "
                    "back with malloc_trim before each reading. The rest of the RSS growth is code_pages_bytes: "
                    "pages of torch's shared libraries (libtorch_cpu.so above all, see rss_growth_by_mapping) read "
                    "in from disk the first time generate runs their kernels — shared, evictable, the same few MB "
                    "for any model, not weights. load_peak_rss_bytes is the kernel's high-water mark (VmHWM, all "
                    "kinds) while loading; load_peak_over_steady = (peak − baseline) / (steady − baseline), "
                    "load_peak_over_weights = (peak − baseline) / weights. The torchao row trims the heap after "
                    "each converted layer; its 'heap not trimmed' twin shows the peak without that",
            "seconds": round(time.perf_counter() - t0, 1)}


def ram_points(ram: dict) -> list[dict]:
    """The measured RAM rows as memory_quality points (RAM = weights in RSS, quality = perplexity)."""
    tech = {"fp32": "fp32", "bf16": "bf16", "int8-pc": "int8", "int8-pc + zstd": "zstd", "int4-g64 + zstd": "zstd",
            "int4-g32-asym": "int4", "torchao int4-g64": "torchao"}
    return [{"bytes": r["weights_rss_bytes"], "quality": r["ppl"], "technique": tech.get(r["name"], "int4"),
             "label": r["name"], "reference": r["name"] == "fp32", "annotate": True}
            for r in ram["rows"] if "naive" not in r["name"] and "not trimmed" not in r["name"]]


# ----------------------------------------------------------------------------------------------- command line
def _check_tokens(max_tokens):
    from ..evaluate import SEQ_LEN
    if max_tokens is None:
        return None
    return whole_number("max_tokens", max_tokens, SEQ_LEN, f"tokens: at least one full window of {SEQ_LEN}")


def compress_for_budget(budget, out, results: dict | str | None = None, max_tokens: int | None = None,
                        log=print, kind: str = "disk", force: bool = False, model_name: str = "smollm2-135m",
                        prompt: str = "In the beginning God created", new_tokens: int = 16) -> dict:
    """`python -m labkit compress --budget B --out DIR [--ram] [--force]`: the best cached recipe whose bytes on
    `kind` ("disk": the weights file; "ram": the weights once loaded by load_compressed) fit B, applied to the
    model, exported with its report (recipe, bytes per stage, perplexity before/after, sha256 of every file),
    then loaded back and checked to generate the same greedy tokens. Every argument is checked — budget, kind,
    max_tokens, the output folder (not a file, not in data/, not a non-empty folder labkit did not write) —
    before the model is loaded."""
    from ..evaluate import default_budget, eval_tokens, perplexity
    from ..models import load_model
    from ..repro import load_results
    if kind not in ("disk", "ram"):
        raise ValueError(f"kind={kind!r}; use 'disk' (bytes of the file) or 'ram' (bytes once loaded)")
    max_tokens = _check_tokens(max_tokens)
    folder = check_export_folder(out, force)
    if results is None or isinstance(results, (str, Path)):
        results = load_results("capstone") if results is None else json.loads(Path(results).read_text())
    key = "bytes" if kind == "disk" else "ram_bytes"
    points = [p for p in search_points(results) if key in p]
    if not points:
        raise ValueError(f"the cached results have no {kind} bytes; regenerate them: python -m labkit results capstone")
    budget_bytes = parse_budget(budget, results["fp32_bytes"])
    point = best_recipe(points, budget_bytes, key=key)
    recipe = Recipe.from_dict(point["recipe"])
    log(f"{kind} budget {budget_bytes:,} bytes → {recipe.name} (cached: {point[key]:,} bytes, ppl {point['ppl']:.2f})")
    model, tok = load_model(model_name)
    tokens = eval_tokens(tok)
    ppl_fp32 = perplexity(model, tokens, max_tokens=max_tokens)
    packed = compress_(model, recipe)
    ppl = perplexity(model, tokens, max_tokens=max_tokens)
    ids = tok(prompt, return_tensors="pt")
    gen = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    with torch.inference_mode():
        before = model.generate(**ids, **gen)
    extra = {"budget": {"requested": str(budget), "bytes": budget_bytes, "kind": kind},
             "perplexity": {"fp32": ppl_fp32, "compressed": ppl, "split": "validation",
                            "max_tokens": max_tokens or default_budget()},
             "cached_point": {"bytes": point["bytes"], "ram_bytes": point.get("ram_bytes"), "ppl": point["ppl"],
                              "eval_tokens": results["eval"]["max_tokens"]},
             "generation": {"prompt": prompt, "greedy_tokens": before[0].tolist()}}
    report = export(packed, folder, tok, extra, force=force)
    log(f"wrote {folder}: weights file {report['bytes']['weights_file']:,} bytes, in RAM "
        f"{report['bytes']['ram_formula']:,} bytes ({report['bytes']['weights_file'] / report['bytes']['fp32']:.1%} / "
        f"{report['bytes']['ram_formula'] / report['bytes']['fp32']:.1%} of fp32), ppl {ppl_fp32:.2f} → {ppl:.2f}")
    with torch.inference_mode():
        after = load_compressed(folder).generate(**ids, **gen)
    if not torch.equal(before, after):
        raise RuntimeError(f"the model loaded from {folder} generates different tokens than before export")
    log(f"load_compressed({folder}) generates the same {new_tokens} tokens")
    return report




# ----------------------------------------------------------------------------------------------- charts, widget
def _tech(p: dict) -> str:
    r = p.get("recipe", {})
    if r.get("quant") == "int":
        return f"int{r['bits']}"
    if r.get("quant") == "kmeans":
        return "kmeans"
    return "magnitude" if r.get("sparsity") else "fp32"


def chart_points(results: dict, kind: str = "disk", max_ppl: float = 3000.0, distilled: bool = True) -> list[dict]:
    """The grid as lk.plots.memory_quality points on `kind` bytes ("disk": the file; "ram": once loaded by
    load_compressed); entropy-coded recipes are triangles. Points above max_ppl are left off the chart. With
    `distilled`, notebook 03's distilled student joins as a square (fp32: the same bytes on disk and in RAM; its
    name says when its perplexity is on another token budget, see distilled_point)."""
    key = {"disk": "bytes", "ram": "ram_bytes"}[kind]
    pts = []
    for p in search_points(results):
        if p["ppl"] > max_ppl:
            continue
        pts.append({"bytes": p[key], "quality": p["ppl"], "technique": _tech(p), "label": p["name"],
                    "reference": p["name"] == "fp32", "marker": "^" if "entropy" in p["techniques"] else "o",
                    "name": p["name"], "ppl": p["ppl"], key: p[key]})
    d = distilled_point(eval_tokens=results["eval"]["max_tokens"]) if distilled else None
    if d and d["ppl"] <= max_ppl:
        pts.append({"bytes": d["bytes"], "quality": d["ppl"], "technique": "distillation", "label": d["name"],
                    "marker": "s", "annotate": True, "name": d["name"], "ppl": d["ppl"], key: d["bytes"]})
    return pts
