"""Capstone: combine pruning, quantization / weight sharing and entropy coding into recipes; find the Pareto
frontier of bytes against perplexity; pick the best recipe for a memory budget; export a compressed model
(safetensors + a JSON report with sha256 of every file) and load it back.

Defined in notebook 07 (07_capstone.ipynb). Everything here reuses the lab's modules: masks from `lk.prune`,
round-to-nearest integers and bit packing from `lk.quantize`, k-means and Huffman from `lk.compress`, the bitmap
format from `lk.sparse`. How a compressed model is stored, exported and loaded back packed lives in
labkit/compressed_format.py; its names are re-exported here (`lk.capstone.export`, `lk.capstone.load_compressed`).

    >>> recipe = lk.capstone.Recipe(sparsity=0.5, quant="kmeans", bits=4, entropy="zstd")
    >>> packed = lk.capstone.compress_(model, recipe)        # weights replaced by what the file will hold
    >>> report = lk.capstone.export(packed, folder, tokenizer)
    >>> model2 = lk.capstone.load_compressed(folder)        # same weights, same generated tokens
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from . import quantize as Q
from .checks import real_number, torch_module, whole_number
from .compressed_format import (KIND, KMEANS_SAMPLE, MANIFEST, REPORT, SIDE_PARTS, WEIGHTS,  # noqa: F401
                                ZSTD_LEVEL, Compressed, SafetensorsReader, decode_codes, encode_codes,
                                packed_codes, count_stage_bytes, check_compressed, check_export_folder,
                                decode_matrix, empty_model, encode_matrix, export, int_qtensor, load_compressed,
                                ram_formula_bytes, read_report, share, share_rows, unique_state)
from .storage import default_sparse_names

QUANTS = ("none", "int", "kmeans")
CODEBOOKS = ("matrix", "row")
ENTROPY = ("none", "zstd", "huffman")
EVAL_TOKENS = 1024          # validation tokens per perplexity in make_results (see make_results' docstring)

class BudgetError(ValueError):
    """No recipe fits the memory budget."""


# ----------------------------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    """One way to compress a model (notebook 07 §1).

    sparsity: fraction of each decoder Linear weight zeroed by magnitude (lk.prune; embedding never pruned).
    quant: "none" (fp32 values), "int" (round-to-nearest, lk.quantize) or "kmeans" (weight sharing, Han et al.).
    bits / group_size: bits per code; group_size for "int" only (None = one scale per output row).
    entropy: how the codes are stored: "none" (bit-packed), "zstd" or "huffman" (lk.compress).
    codebook: for "kmeans": "matrix" (one fp32 codebook per weight matrix, as Han et al.) or "row" (one fp16
    codebook per output row, fitted on that row: 2^bits · 16 bits more per row, and each row keeps its outliers).
    symmetric: for "int": False stores a scale and a zero point (the group's minimum) per group, as GGUF's Q4_1.
    Quantization applies to every weight matrix, the tied embedding / lm_head included.
    """
    sparsity: float = 0.0
    quant: str = "none"
    bits: int = 8
    group_size: int | None = None
    entropy: str = "none"
    codebook: str = "matrix"
    symmetric: bool = True

    def __post_init__(self):
        from .prune import check_sparsity
        check_sparsity(self.sparsity)
        if self.quant not in QUANTS:
            raise ValueError(f"Recipe.quant={self.quant!r}; use one of {QUANTS}")
        if self.entropy not in ENTROPY:
            raise ValueError(f"Recipe.entropy={self.entropy!r}; use one of {ENTROPY}")
        if self.quant == "none" and self.entropy != "none":
            raise ValueError("entropy coding applies to integer codes: pick quant='int' or 'kmeans' with it")
        if self.quant == "int":
            Q.check_bits(self.bits)
        if self.quant == "kmeans":
            whole_number("Recipe.bits", self.bits, 1, "k-means sharing: 1–8", high=8)
        if self.group_size is not None:
            whole_number("Recipe.group_size", self.group_size, 1, "or None: one scale per row")
            if self.quant != "int":
                raise ValueError("group_size applies to quant='int' only; leave it None for the others")
        if self.codebook not in CODEBOOKS:
            raise ValueError(f"Recipe.codebook={self.codebook!r}; use one of {CODEBOOKS}")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"Recipe.symmetric must be True or False, got {self.symmetric!r}")
        if not self.symmetric and self.quant != "int":
            raise ValueError("symmetric=False applies to quant='int' only")
        if self.codebook != "matrix" and self.quant != "kmeans":
            raise ValueError("codebook='row' applies to quant='kmeans' only (integer codes already have a scale "
                             "per row or group)")

    @property
    def name(self) -> str:
        """E.g. 'fp32', 'prune 50%', 'int4-g64', 'prune 50% + kmeans4 + zstd'."""
        parts = [f"prune {self.sparsity:.0%}"] if self.sparsity else []
        if self.quant == "int":
            parts.append(f"int{self.bits}-" + (f"g{self.group_size}" if self.group_size else "pc")
                         + ("" if self.symmetric else "-asym"))
        elif self.quant == "kmeans":
            parts.append(f"kmeans{self.bits}" + ("-row" if self.codebook == "row" else ""))
        if self.entropy != "none":
            parts.append(self.entropy)
        return " + ".join(parts) or "fp32"

    @property
    def techniques(self) -> list[str]:
        """Which of prune / quantize / share / entropy-code this recipe uses."""
        t = ["prune"] if self.sparsity else []
        t += {"int": ["quantize"], "kmeans": ["share"], "none": []}[self.quant]
        return t + (["entropy"] if self.entropy != "none" else [])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        if not isinstance(d, dict):
            raise TypeError(f"Recipe.from_dict needs a dict (Recipe.to_dict(), or a report's 'recipe'), got "
                            f"{type(d).__name__}")
        return cls(**{k: d[k] for k in ("sparsity", "quant", "bits", "group_size", "entropy", "codebook",
                                               "symmetric")
                      if k in d})


# ----------------------------------------------------------------------------------------------- compress a model
def recode(packed: "Compressed", entropy: str) -> "Compressed":
    """The same stored weights with the codes stored another way (bit-packed, zstd or Huffman): lossless."""
    recipe = replace(check_compressed(packed).recipe, entropy=entropy)
    entries = {}
    for name, e in packed.entries.items():
        if e["format"] not in ("int", "kmeans"):
            entries[name] = e
            continue
        codes = decode_codes(e["parts"], e, math.prod(e["shape"]))
        side = {k: v for k, v in e["parts"].items() if k in SIDE_PARTS}
        meta = {k: v for k, v in e.items() if k not in ("parts", "n_bits")}
        coded, extra = encode_codes(codes, e["bits"], entropy)
        entries[name] = {**meta, **extra, "parts": {**side, **coded}}
    out = Compressed(recipe, entries, packed.aliases, packed.config, packed.attn_implementation)
    out.stage_bytes = count_stage_bytes(entries, recipe)
    return out


def _masks_by_tensor(model: nn.Module, masks: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict:
    """{state name: keep-mask} for masks keyed by module fqn (as lk.prune returns them); checked, nothing changed."""
    if not isinstance(masks, dict):
        raise TypeError(f"masks must be a dict {{module fqn: bool keep-mask}} (lk.prune.compute_masks), got "
                        f"{type(masks).__name__}")
    modules = dict(model.named_modules())
    out = {}
    for fqn, mask in masks.items():
        weight = getattr(modules.get(fqn), "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"mask {fqn!r} names no module with a weight in this model; use the keys of "
                             "lk.prune.compute_masks(model, ...)")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != weight.shape:
            raise ValueError(f"mask {fqn!r} must be a bool tensor of shape {tuple(weight.shape)}")
        out[aliases.get(f"{fqn}.weight", f"{fqn}.weight")] = mask
    return out


def _check_tensor(name: str, t: torch.Tensor, recipe: Recipe) -> None:
    """Refuse, before any weight changes, a tensor compress_ could not encode (named, with the fix)."""
    if not t.is_floating_point():
        raise TypeError(f"{name} is {t.dtype}; compress_ expects a float model (load it in fp32)")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} (shape {tuple(t.shape)}) holds {int((~torch.isfinite(t)).sum())} NaN/inf "
                         "values; no scale or codebook can store them: reload or repair the model first")
    if recipe.quant == "int" and recipe.group_size and t.dim() == 2 and t.shape[1] % recipe.group_size:
        raise ValueError(f"group_size={recipe.group_size} does not divide the rows of {name} (shape "
                         f"{tuple(t.shape)}): pick a group size that divides every matrix's last dimension "
                         "(e.g. 32 or a common divisor), or group_size=None for one scale per row")


@torch.no_grad()
def compress_(model: nn.Module, recipe: Recipe, masks: dict[str, torch.Tensor] | None = None) -> Compressed:
    """In place: prune (magnitude, or the given keep-masks) and replace every weight by exactly what the stored
    form decodes to; return the stored form. The live model then IS the compressed model (notebook 07 §4).
    All-or-nothing: every tensor is checked and encoded before the first weight changes (peak RAM: one more
    fp32 copy of the weights), and the weights are put back if anything fails."""
    from . import prune as P
    if not isinstance(recipe, Recipe):
        raise TypeError(f"compress_ needs a labkit Recipe, got {type(recipe).__name__}")
    torch_module("model", model, "a float model such as lk.load_model()[0]")
    if masks is not None and not isinstance(masks, dict):
        raise TypeError(f"masks must be a dict {{module fqn: bool keep-mask}} (lk.prune.compute_masks) or None, got "
                        f"{type(masks).__name__}")
    prunable = default_sparse_names(model)
    state, aliases = unique_state(model)
    for name, t in state.items():
        _check_tensor(name, t, recipe)
    keep = {}
    if recipe.sparsity:
        if masks is None:
            masks = P.compute_masks(model, P.PruneConfig("magnitude", recipe.sparsity))
        keep = _masks_by_tensor(model, masks, aliases)
    entries, new = {}, {}
    for name, t in state.items():       # encode everything first: the model is untouched until all succeeded
        w = t.detach() * keep[name] if name in keep else t.detach()
        this = recipe if name in prunable else replace(recipe, sparsity=0.0)   # the embedding is never pruned
        entry, rec = encode_matrix(w, this if w.dim() == 2 else Recipe())
        if name in prunable and recipe.sparsity:
            entry["nnz"] = int((w != 0).sum())
        entries[name] = entry
        new[name] = rec.to(t.dtype).reshape(t.shape)
    swapped = []
    try:
        for name, t in state.items():   # swap: `new` ends up holding the originals, to put back on failure
            old = t.clone()
            t.copy_(new[name])
            new[name] = old
            swapped.append(name)
    except BaseException:
        for name in swapped:
            state[name].copy_(new[name])
        raise
    cfg = getattr(model, "config", None)
    config = json.loads(cfg.to_json_string()) if cfg is not None else None
    if config:
        config.pop("quantization_config", None)
    out = Compressed(recipe, entries, aliases, config, getattr(cfg, "_attn_implementation", None))
    out.stage_bytes = count_stage_bytes(entries, recipe)
    return out


# ----------------------------------------------------------------------------------------------- frontier, budget
def _check_points(points, *keys: str) -> None:
    """points: a list of dicts, each with a number under every key (e.g. 'bytes' and 'ppl')."""
    if isinstance(points, (str, bytes, dict)) or not isinstance(points, (list, tuple)):
        raise TypeError(f"points must be a list of dicts such as search_points(results), got {type(points).__name__}")
    for k in keys:
        if not isinstance(k, str):
            raise TypeError(f"the keys must name fields of the points (str, e.g. 'bytes', 'ppl'), got {k!r}")
    for p in points:
        if not isinstance(p, dict) or any(not isinstance(p.get(k), (int, float)) for k in keys):
            raise ValueError(f"every point must be a dict with numbers under {list(keys)}, got {p!r:.120}")


def pareto_front(points: list[dict], x: str = "bytes", y: str = "ppl") -> list[dict]:
    """Points not dominated by another (no other point is at most as large AND at most as bad, one strictly),
    sorted by x: the best perplexity reachable at each size."""
    _check_points(points, x, y)
    best, out = math.inf, []
    for p in sorted(points, key=lambda p: (p[x], p[y])):
        if p[y] < best:
            out.append(p)
            best = p[y]
    return out


def beyond_single(points: list[dict]) -> list[dict]:
    """Frontier points that combine techniques and that no single-technique point matches: nothing with one
    technique (or none) is at most as large and at most as bad."""
    _check_points(points, "bytes", "ppl")
    singles = [p for p in points if len(p.get("techniques", [])) <= 1]
    return [p for p in pareto_front(points) if len(p.get("techniques", [])) > 1
            and not any(s["bytes"] <= p["bytes"] and s["ppl"] <= p["ppl"] for s in singles)]


def parse_budget(budget, fp32_bytes: int) -> int:
    """A budget as bytes: a fraction of fp32 (0 < x ≤ 1, e.g. 0.25), a byte count (e.g. 67000000), or a
    size with a unit ('64MB', '1.5GB'; decimal units)."""
    fp32_bytes = whole_number("fp32_bytes", fp32_bytes, 1, "the model's fp32 size in bytes (lk.model_bytes)")
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
        raise TypeError(f"budget must be a number or a size such as '64MB', got {budget!r}")
    text = str(budget).strip().upper().replace(" ", "")
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "B": 1}
    scale = 1
    for u, s in units.items():
        if text.endswith(u):
            text, scale = text[: -len(u)], s
            break
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"budget {budget!r} is not a number: give a fraction of fp32 bytes (0.25), bytes "
                         "(67000000) or a size ('64MB')") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"budget must be positive, got {budget!r}")
    if scale == 1 and value <= 1:
        return int(value * fp32_bytes)
    if scale == 1 and not value.is_integer():
        raise ValueError(f"budget {budget!r} is more than 1 so it is a byte count, and bytes are whole: pass a "
                         "fraction ≤ 1 (0.25), whole bytes (67000000) or a size ('1.5MB')")
    return int(value * scale)


def best_recipe(points: list[dict], budget_bytes: int, key: str = "bytes") -> dict:
    """The lowest-perplexity point whose bytes (`key`: "bytes" on disk, "ram_bytes" once loaded) fit the budget
    (ties: fewer bytes). A budget below every point raises BudgetError naming the smallest reachable point."""
    _check_points(points, key, "ppl")
    if not points:
        raise ValueError("points is empty: nothing to choose from (search_points(results) of a finished search)")
    real_number("budget_bytes", budget_bytes, "bytes, e.g. parse_budget('64MB', fp32_bytes)", low=0)
    fits = [p for p in points if p[key] <= budget_bytes]
    if not fits:
        small = min(points, key=lambda p: p[key])
        raise BudgetError(f"a budget of {budget_bytes:,} bytes is below anything reachable: the smallest point "
                          f"found is '{small.get('name', small.get('recipe'))}' at {small[key]:,} bytes (perplexity {small['ppl']:.1f}); "
                          f"raise the budget to at least that")
    return min(fits, key=lambda p: (p["ppl"], p[key]))


def search_points(results: dict) -> list[dict]:
    """The grid points of a results dict (make_results) that a recipe search can choose from (exportable ones)."""
    if not isinstance(results, dict) or not isinstance(results.get("grid"), list):
        raise ValueError("results must be the dict make_results wrote, with a 'grid' list (lk.repro.load_results"
                         "('capstone'))")
    return [p for p in results["grid"] if "recipe" in p]
