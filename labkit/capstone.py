"""Capstone: combine pruning, quantization / weight sharing and entropy coding into recipes; find the Pareto
frontier of bytes against perplexity; pick the best recipe for a memory budget; export a compressed model
(safetensors + a JSON report with sha256 of every file) and load it back.

Defined in notebook 07 (07_capstone.ipynb). Everything here reuses the lab's modules: masks from `lk.prune`,
round-to-nearest integers and bit packing from `lk.quantize`, k-means and Huffman from `lk.compress`, the bitmap
format from `lk.sparse`, the empty-model loader and ChecksumError from `lk.storage`.

    >>> recipe = lk.capstone.Recipe(sparsity=0.5, quant="kmeans", bits=4, entropy="zstd")
    >>> packed = lk.capstone.compress_(model, recipe)        # weights replaced by what the file will hold
    >>> report = lk.capstone.export(packed, folder, tokenizer)
    >>> model2 = lk.capstone.load_compressed(folder)        # same weights, same generated tokens

Stored formats of one weight: "raw" (fp32), "bitmap" (pruned fp32: 1 bit per position + the nonzeros),
"int" (integer codes + fp16 scales per row or group) and "kmeans" (codes into a codebook, 0 = pruned: one fp32
codebook per matrix as in Deep Compression, or one fp16 codebook per row).
Codes are stored bit-packed ("none"), or entropy coded with zstd or lk.compress's canonical Huffman.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import compress as C
from . import quantize as Q
from . import sparse as S
from .storage import ChecksumError, default_sparse_names

QUANTS = ("none", "int", "kmeans")
CODEBOOKS = ("matrix", "row")
ENTROPY = ("none", "zstd", "huffman")
KIND = "labkit-compressed-model"
REPORT = "report.json"
WEIGHTS = "model.safetensors"
ZSTD_LEVEL = 3
KMEANS_SAMPLE = 1 << 15     # k-means centroids are fitted on an evenly strided sample of this many weights
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
    Quantization applies to every weight matrix, the tied embedding / lm_head included.
    """
    sparsity: float = 0.0
    quant: str = "none"
    bits: int = 8
    group_size: int | None = None
    entropy: str = "none"
    codebook: str = "matrix"

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
            Q._check_bits(self.bits)
        if self.quant == "kmeans" and not (isinstance(self.bits, int) and 1 <= self.bits <= 8):
            raise ValueError(f"k-means sharing needs bits in 1..8, got {self.bits!r}")
        if self.group_size is not None and (self.quant != "int" or int(self.group_size) < 1):
            raise ValueError("group_size applies to quant='int' only, and must be positive")
        if self.codebook not in CODEBOOKS:
            raise ValueError(f"Recipe.codebook={self.codebook!r}; use one of {CODEBOOKS}")
        if self.codebook != "matrix" and self.quant != "kmeans":
            raise ValueError("codebook='row' applies to quant='kmeans' only (integer codes already have a scale "
                             "per row or group)")

    @property
    def name(self) -> str:
        """E.g. 'fp32', 'prune 50%', 'int4-g64', 'prune 50% + kmeans4 + zstd'."""
        parts = [f"prune {self.sparsity:.0%}"] if self.sparsity else []
        if self.quant == "int":
            parts.append(f"int{self.bits}-" + (f"g{self.group_size}" if self.group_size else "pc"))
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
        return cls(**{k: d[k] for k in ("sparsity", "quant", "bits", "group_size", "entropy", "codebook")
                      if k in d})


# ----------------------------------------------------------------------------------------------- one matrix
def share(w: torch.Tensor, bits: int, sample: int = KMEANS_SAMPLE) -> tuple[np.ndarray, torch.Tensor]:
    """Weight sharing as lk.compress.share_weights (symbol 0 = zero, 2^bits − 1 k-means centroids for the
    nonzeros), with the centroids fitted on an evenly strided sample plus the matrix's smallest and largest
    weight (so the linear initialisation spans the whole range, as Han et al.'s, and a lone outlier keeps a
    centroid): fast enough for 134M weights. Returns (uint8 symbols, flat; codebook [2^bits])."""
    w = w.detach().float().reshape(-1)
    nz = w != 0
    vals = w[nz]
    k = 2 ** bits - 1
    if vals.numel() == 0:
        return np.zeros(w.numel(), np.uint8), torch.zeros(k + 1)
    sub = torch.cat([vals[:: max(1, vals.numel() // sample)], vals.min()[None], vals.max()[None]])
    cent = C.kmeans_1d(sub, k)
    sym = torch.zeros(w.numel(), dtype=torch.uint8)
    sym[nz] = (torch.bucketize(vals, (cent[1:] + cent[:-1]) / 2) + 1).to(torch.uint8)
    return sym.numpy(), torch.cat([torch.zeros(1), cent])


def share_rows(w: torch.Tensor, bits: int) -> tuple[np.ndarray, torch.Tensor]:
    """Weight sharing with one codebook per output row (lk.compress.kmeans_rows on all of the row's nonzeros):
    symbol 0 = zero, 1..2^bits − 1 the row's centroids, stored in fp16 (codes are chosen against the fp16
    centroids, so the stored codebook is exactly what is decoded). Returns (uint8 symbols, flat, row-major;
    codebook [rows, 2^bits] fp16)."""
    if w.dim() != 2:
        raise ValueError(f"per-row codebooks need a 2-D weight, got shape {tuple(w.shape)}")
    w = w.detach().float().contiguous()
    cent = C.kmeans_rows(w, 2 ** bits - 1).half().float()
    sym = torch.searchsorted(((cent[:, 1:] + cent[:, :-1]) / 2).contiguous(), w) + 1
    sym = torch.where(w != 0, sym, 0).to(torch.uint8)
    return sym.reshape(-1).numpy(), torch.cat([torch.zeros(len(w), 1), cent], 1).half()


def _encode_codes(codes: np.ndarray, bits: int, entropy: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Codes (uint8, flat) → stored tensors: bit-packed, zstd of one code per byte, or canonical Huffman."""
    if entropy == "none":
        return {"packed": Q.pack_bits(torch.from_numpy(codes), bits)}, {}
    if entropy == "zstd":
        import zstandard
        z = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(codes.tobytes())
        return {"zstd": torch.frombuffer(bytearray(z), dtype=torch.uint8)}, {}
    enc = C.huffman_encode(codes)
    return ({"huffman": torch.frombuffer(bytearray(enc.payload), dtype=torch.uint8) if enc.payload
             else torch.zeros(0, dtype=torch.uint8),
             "huffman_symbols": torch.from_numpy(enc.symbols.astype(np.uint8)),
             "huffman_lengths": torch.from_numpy(enc.lengths.copy())}, {"n_bits": enc.n_bits})


def _decode_codes(parts: dict[str, torch.Tensor], meta: dict, n: int) -> np.ndarray:
    """Inverse of _encode_codes: n uint8 codes."""
    bits = meta["bits"]
    if "packed" in parts:
        return Q.unpack_bits(parts["packed"], bits, n).numpy()
    if "zstd" in parts:
        import zstandard
        raw = zstandard.ZstdDecompressor().decompress(parts["zstd"].numpy().tobytes(), max_output_size=n)
        return np.frombuffer(raw, dtype=np.uint8).copy()
    enc = C.HuffmanEncoded(parts["huffman"].numpy().tobytes(), int(meta["n_bits"]), (n,), "|u1",
                           parts["huffman_symbols"].numpy().astype(np.int64), parts["huffman_lengths"].numpy())
    return C.huffman_decode(enc)


def _reconstruct(fmt: str, codes: np.ndarray | None, side: dict[str, torch.Tensor], meta: dict,
                 packed: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 weight a stored matrix stands for (the same function at compression and at load time)."""
    shape = tuple(meta["shape"])
    if fmt == "raw":
        return side["values"].reshape(shape)
    if fmt == "bitmap":
        return S.Bitmap(side["mask"], side["values"], shape).to_dense()
    if fmt == "kmeans":
        if codes is None:
            codes = Q.unpack_bits(packed, meta["bits"], math.prod(shape)).numpy()
        book, idx = side["codebook"].float(), torch.from_numpy(codes).long()
        if book.dim() == 2:                                   # one codebook per row
            return book.gather(1, idx.reshape(book.shape[0], -1)).reshape(shape)
        return book[idx].reshape(shape)
    if packed is None:
        packed = Q.pack_bits(torch.from_numpy(codes), meta["bits"])
    return Q.dequantize(Q.QTensor(packed, side["scales"], None, meta["bits"], meta["group_size"], shape, True,
                                  meta["granularity"], torch.float32))


def encode_matrix(w: torch.Tensor, recipe: Recipe) -> tuple[dict, torch.Tensor]:
    """One weight (already pruned when recipe.sparsity > 0) → ({"format", "shape", ..., "parts": {name: tensor}},
    its reconstruction). 1-D tensors (norms, biases) are always stored raw."""
    w = w.detach().float().contiguous()
    meta = {"shape": list(w.shape), "dtype": "float32"}
    codes = packed = None
    if w.dim() != 2 or recipe.quant == "none":
        fmt = "bitmap" if (w.dim() == 2 and recipe.sparsity) else "raw"
        side = S.Bitmap.from_dense(w).tensors() if fmt == "bitmap" else {"values": w.reshape(-1)}
    elif recipe.quant == "kmeans":
        fmt = "kmeans"
        codes, codebook = (share_rows if recipe.codebook == "row" else share)(w, recipe.bits)
        side = {"codebook": codebook}
        meta["bits"] = recipe.bits
    else:
        fmt = "int"
        q = Q.quantize(w, recipe.bits, "group" if recipe.group_size else "channel", recipe.group_size)
        packed, side = q.packed, {"scales": q.scales}
        meta.update(bits=recipe.bits, group_size=q.group_size, granularity=q.granularity)
    parts = dict(side)
    if fmt in ("int", "kmeans"):
        if recipe.entropy == "none" and packed is not None:
            parts["packed"] = packed
        else:
            if codes is None:
                codes = Q.unpack_bits(packed, meta["bits"], w.numel()).numpy()
            coded, extra = _encode_codes(codes, meta["bits"], recipe.entropy)
            parts.update(coded)
            meta.update(extra)
    return {"format": fmt, **meta, "parts": parts}, _reconstruct(fmt, codes, side, meta, packed)


def decode_matrix(entry: dict) -> torch.Tensor:
    """The fp32 weight of one stored entry (as written by encode_matrix)."""
    parts = entry["parts"]
    side = {k: v for k, v in parts.items() if k in ("values", "mask", "codebook", "scales")}
    if entry["format"] not in ("int", "kmeans") or "packed" in parts:
        return _reconstruct(entry["format"], None, side, entry, parts.get("packed"))
    return _reconstruct(entry["format"], _decode_codes(parts, entry, math.prod(entry["shape"])), side, entry)


# ----------------------------------------------------------------------------------------------- the model
@dataclass
class Compressed:
    """A model's weights in stored form: {name: entry} (see encode_matrix), tied aliases, config, recipe."""
    recipe: Recipe
    entries: dict[str, dict]
    aliases: dict[str, str]
    config: dict | None
    attn_implementation: str | None = None
    stage_bytes: dict[str, int] = field(default_factory=dict)

    def flat(self) -> dict[str, torch.Tensor]:
        """The tensors the safetensors file holds: '<weight name>/<part>'."""
        return {f"{n}/{p}": t.contiguous() for n, e in self.entries.items() for p, t in e["parts"].items()}

    def nbytes(self) -> int:
        """Exact size of the safetensors file (serialized in memory: header + tensors)."""
        from safetensors.torch import save
        return len(save(self.flat(), metadata={"kind": KIND}))


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """state_dict without tied duplicates: ({name: tensor}, {alias: target})."""
    seen, out, aliases = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            out[name] = t
    return out, aliases


def _stage_bytes(entries: dict[str, dict], recipe: Recipe) -> dict[str, int]:
    """Bytes of the stored tensors after each stage of the recipe (file header not included): fp32 → pruned
    (bitmap: 1 bit per position + fp32 nonzeros) → quantized/shared (bit-packed codes + scales/codebook) →
    entropy coded."""
    sizes = dict.fromkeys(("fp32", "pruned", "quantized", "entropy"), 0)
    for name, e in entries.items():
        n = math.prod(e["shape"])
        final = sum(t.numel() * t.element_size() for t in e["parts"].values())
        pruned = (S.Bitmap.formula_bytes(e["shape"], e["nnz"]) if recipe.sparsity and "nnz" in e else 4 * n)
        if e["format"] in ("int", "kmeans"):
            side = sum(t.numel() * t.element_size() for k, t in e["parts"].items() if k in ("codebook", "scales"))
            quantized = side + math.ceil(n * e["bits"] / 8)
        else:
            pruned = quantized = final
        sizes["fp32"] += 4 * n
        sizes["pruned"] += pruned
        sizes["quantized"] += quantized
        sizes["entropy"] += final
    keep = ["fp32"] + (["pruned"] if recipe.sparsity else []) + (["quantized"] if recipe.quant != "none" else []) \
        + (["entropy"] if recipe.entropy != "none" else [])
    return {k: sizes[k] for k in keep}


def recode(packed: "Compressed", entropy: str) -> "Compressed":
    """The same stored weights with the codes stored another way (bit-packed, zstd or Huffman): lossless."""
    recipe = replace(packed.recipe, entropy=entropy)
    entries = {}
    for name, e in packed.entries.items():
        if e["format"] not in ("int", "kmeans"):
            entries[name] = e
            continue
        codes = _decode_codes(e["parts"], e, math.prod(e["shape"]))
        side = {k: v for k, v in e["parts"].items() if k in ("codebook", "scales")}
        meta = {k: v for k, v in e.items() if k not in ("parts", "n_bits")}
        coded, extra = _encode_codes(codes, e["bits"], entropy)
        entries[name] = {**meta, **extra, "parts": {**side, **coded}}
    out = Compressed(recipe, entries, packed.aliases, packed.config, packed.attn_implementation)
    out.stage_bytes = _stage_bytes(entries, recipe)
    return out


@torch.no_grad()
def compress_(model: nn.Module, recipe: Recipe, masks: dict[str, torch.Tensor] | None = None) -> Compressed:
    """In place: prune (magnitude, or the given keep-masks) and replace every weight by exactly what the stored
    form decodes to; return the stored form. The live model then IS the compressed model (notebook 07 §4)."""
    from . import prune as P
    if not isinstance(recipe, Recipe):
        raise TypeError(f"compress_ needs a labkit Recipe, got {type(recipe).__name__}")
    if recipe.sparsity:
        if masks is None:
            masks = P.compute_masks(model, P.PruneConfig("magnitude", recipe.sparsity))
        P.apply_masks_(model, masks)
    prunable = default_sparse_names(model)
    state, aliases = _unique_state(model)
    entries = {}
    for name, t in state.items():
        if not t.is_floating_point():
            raise TypeError(f"{name} is {t.dtype}; compress_ expects a float model (load it in fp32)")
        w = t.detach()
        this = recipe if name in prunable else replace(recipe, sparsity=0.0)   # the embedding is never pruned
        entry, rec = encode_matrix(w, this if w.dim() == 2 else Recipe())
        if name in prunable and recipe.sparsity:
            entry["nnz"] = int((w != 0).sum())
        entries[name] = entry
        t.copy_(rec.to(t.dtype).reshape(t.shape))
    cfg = getattr(model, "config", None)
    config = json.loads(cfg.to_json_string()) if cfg is not None else None
    if config:
        config.pop("quantization_config", None)
    out = Compressed(recipe, entries, aliases, config, getattr(cfg, "_attn_implementation", None))
    out.stage_bytes = _stage_bytes(entries, recipe)
    return out


# ----------------------------------------------------------------------------------------------- export / load
def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _report_digest(report: dict) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in report.items() if k != "report_sha256"})).hexdigest()


def export(packed: Compressed, folder, tokenizer=None, extra: dict | None = None) -> dict:
    """Write folder/model.safetensors (+ the tokenizer's files) and folder/report.json: the recipe, the bytes
    after each stage, what `extra` adds (e.g. perplexity), every file's size and sha256, and a sha256 of the
    report itself. Returns the report."""
    import os

    from safetensors.torch import save_file

    from .repro import REPO_ROOT, atomic_write_json, sha256_file
    folder = Path(folder).resolve()
    if folder == REPO_ROOT / "data" or (REPO_ROOT / "data") in folder.parents:
        raise ValueError(f"{folder} is inside the repository's data/ folder; export under lk.cache_dir() or a tempdir")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT).unlink(missing_ok=True)           # a half-written export has no report and will not load
    tmp = folder / f".{WEIGHTS}.tmp"
    save_file(packed.flat(), str(tmp), metadata={"kind": KIND})
    os.replace(tmp, folder / WEIGHTS)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != REPORT and not p.name.startswith(".")}
    tensors = {n: {k: v for k, v in e.items() if k != "parts"} | {"parts": sorted(e["parts"])}
               for n, e in packed.entries.items()}
    report = {"kind": KIND, "version": 1, "recipe": packed.recipe.to_dict(), "recipe_name": packed.recipe.name,
              "bytes": {"stages": packed.stage_bytes, "weights_file": files[WEIGHTS]["bytes"],
                        "fp32": packed.stage_bytes["fp32"]},
              "files": files, "tensors": tensors, "aliases": packed.aliases, "config": packed.config,
              "attn_implementation": packed.attn_implementation, **(extra or {})}
    report["report_sha256"] = _report_digest(report)
    atomic_write_json(folder / REPORT, report)
    return report


def read_report(folder) -> dict:
    """The export's report after checking it and every file it lists; raises FileNotFoundError, ValueError or
    lk.storage.ChecksumError with what is wrong and how to fix it."""
    from .repro import sha256_file
    folder = Path(folder)
    fix = (f"re-export it (`python -m labkit compress --budget … --out {folder}`); never edit an export by hand")
    path = folder / REPORT
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {folder} is not a complete labkit export; {fix}")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(report, dict) or report.get("kind") != KIND:
        raise ValueError(f"{path} is not a labkit compressed-model report (kind={report.get('kind')!r}); {fix}")
    if report.get("report_sha256") != _report_digest(report):
        raise ChecksumError(f"{path} was changed after export: its content no longer matches its report_sha256; "
                            + fix)
    for name, meta in report["files"].items():
        p = folder / name
        if not p.exists():
            raise FileNotFoundError(f"{p} listed in {path} is missing; {fix}")
        digest = sha256_file(p)
        if digest != meta["sha256"]:
            raise ChecksumError(f"checksum mismatch in {p}: sha256 {digest[:12]}… but the report expects "
                                f"{meta['sha256'][:12]}… ({p.stat().st_size} bytes on disk, {meta['bytes']} expected)"
                                f" — the file is corrupted or was changed; {fix}")
    return report


def load_compressed(folder) -> nn.Module:
    """Check the export (report and file checksums), decode every weight and return the transformers model
    (fp32, eval mode): the same weights as the compressed model that was exported."""
    from safetensors import safe_open

    from .storage import _empty_model, _retie
    report = read_report(folder)
    if not report.get("config"):
        raise ValueError(f"{folder} has no model config in its report; it cannot be rebuilt as a model")
    model = _empty_model(report)
    state = {}
    with safe_open(str(Path(folder) / WEIGHTS), framework="pt") as f:
        for name, meta in report["tensors"].items():
            entry = dict(meta, parts={p: f.get_tensor(f"{name}/{p}") for p in meta["parts"]})
            state[name] = decode_matrix(entry)
    for a, target in report["aliases"].items():
        state[a] = state[target]
    model.load_state_dict(state, assign=True, strict=True)
    _retie(model)
    return model.eval()


# ----------------------------------------------------------------------------------------------- frontier, budget
def pareto_front(points: list[dict], x: str = "bytes", y: str = "ppl") -> list[dict]:
    """Points not dominated by another (no other point is at most as large AND at most as bad, one strictly),
    sorted by x: the best perplexity reachable at each size."""
    best, out = math.inf, []
    for p in sorted(points, key=lambda p: (p[x], p[y])):
        if p[y] < best:
            out.append(p)
            best = p[y]
    return out


def beyond_single(points: list[dict]) -> list[dict]:
    """Frontier points that combine techniques and that no single-technique point matches: nothing with one
    technique (or none) is at most as large and at most as bad."""
    singles = [p for p in points if len(p.get("techniques", [])) <= 1]
    return [p for p in pareto_front(points) if len(p.get("techniques", [])) > 1
            and not any(s["bytes"] <= p["bytes"] and s["ppl"] <= p["ppl"] for s in singles)]


def parse_budget(budget, fp32_bytes: int) -> int:
    """A budget as bytes: a fraction of fp32 (0 < x ≤ 1, e.g. 0.25), a byte count (e.g. 67000000), or a
    size with a unit ('64MB', '1.5GB'; decimal units)."""
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
    return int(value * scale)


def best_recipe(points: list[dict], budget_bytes: int) -> dict:
    """The lowest-perplexity point whose bytes fit the budget (ties: fewer bytes). A budget below every point
    raises BudgetError naming the smallest reachable point."""
    fits = [p for p in points if p["bytes"] <= budget_bytes]
    if not fits:
        small = min(points, key=lambda p: p["bytes"])
        raise BudgetError(f"a budget of {budget_bytes:,} bytes is below anything reachable: the smallest point "
                          f"found is '{small['name']}' at {small['bytes']:,} bytes (perplexity {small['ppl']:.1f}); "
                          f"raise the budget to at least that")
    return min(fits, key=lambda p: (p["ppl"], p["bytes"]))


def search_points(results: dict) -> list[dict]:
    """The grid points of a results dict (make_results) that a recipe search can choose from (exportable ones)."""
    return [p for p in results["grid"] if "recipe" in p]


# ----------------------------------------------------------------------------------------------- measuring
class _Restorer:
    """Keep a copy of the weights to put them back after each recipe (cheaper than reloading the model)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.saved = {n: t.detach().clone() for n, t in _unique_state(model)[0].items()}

    @torch.no_grad()
    def restore(self):
        state = self.model.state_dict()
        for n, t in self.saved.items():
            state[n].copy_(t)


def _point(packed: "Compressed", ppl: float) -> dict:
    r = packed.recipe
    return {"name": r.name, "recipe": r.to_dict(), "techniques": r.techniques, "bytes": packed.nbytes(),
            "stage_bytes": packed.stage_bytes, "ppl": ppl}


DC_RECIPE = dict(sparsity=0.5, quant="kmeans", bits=4)     # the Deep Compression pipeline, as in notebook 04
DC_ROW_RECIPE = dict(DC_RECIPE, codebook="row")            # the same with one codebook per row
GRID = [dict(sparsity=0.3), dict(sparsity=0.5),
        dict(quant="int", bits=8), dict(quant="int", bits=4), dict(quant="int", bits=4, group_size=64),
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


def distilled_point(teacher_config, results: dict | None = None) -> dict | None:
    """The distilled student of notebook 03 (data/results/distill.json), as a point: fp32 bytes of its
    parameters and its own validation perplexity (its eval, not this grid's); None if there are no results."""
    from .repro import load_results
    try:
        d = results or load_results("distill")
        cfg = d["config"]["student"]
        run = d["headline"]["kd_run"]
        from .distill import StudentConfig, make_student
        from .memory import model_bytes
        sc = StudentConfig(**{k: v for k, v in cfg.items() if k in StudentConfig.__dataclass_fields__})
        student = make_student(teacher_config, sc)
        return {"name": f"distilled student ({run})", "techniques": ["distill"], "bytes": model_bytes(student),
                "ppl": float(d["runs"][run]["val_ppl"]), "source": "data/results/distill.json",
                "eval_tokens": d["config"]["eval_tokens"]}
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return None


def make_results() -> dict:
    """The cached sweep of notebook 07 (→ data/results/capstone.json via `python -m labkit results capstone`).

    SmolLM2-135M, 1,024 validation tokens per perplexity (as notebook 02's sweep; lk's default 4,096 would take
    ~1 minute per point on a busy 2-core CPU, and every point uses the same windows, so they compare): the grid of
    recipes with the exact bytes of their safetensors file and perplexity; the Deep Compression stages, the
    Huffman one written to disk and one layer decoded back to check it is lossless."""
    import tempfile

    from . import prune as P
    from .evaluate import eval_tokens, perplexity
    from .memory import model_bytes
    from .models import load_model
    from .repro import seed_everything
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
    student = distilled_point(model.config)
    return {"model": "smollm2-135m", "eval": {"split": "validation", "max_tokens": EVAL_TOKENS, "seq_len": 256},
            "fp32_bytes": grid[0]["bytes"], "fp32_model_bytes": model_bytes(model), "stages": stages, "grid": grid,
            "others": [student] if student else [], "kmeans_sample": KMEANS_SAMPLE, "zstd_level": ZSTD_LEVEL,
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
    """Issue 7's figures from data/results/capstone.json (regenerate with `python -m labkit results capstone`,
    ~10 minutes): Deep Compression stage bytes and perplexity, the frontier, best perplexity at 25% and 12.5%."""
    from .repro import load_results
    res = load_results("capstone")
    return {"eval_tokens": res["eval"]["max_tokens"], "fp32_bytes": res["fp32_bytes"], **summary(res)}


# ----------------------------------------------------------------------------------------------- command line
def compress_for_budget(budget, out, results: dict | str | None = None, max_tokens: int | None = None,
                        model_name: str = "smollm2-135m", prompt: str = "In the beginning God created",
                        new_tokens: int = 16, log=print) -> dict:
    """`python -m labkit compress --budget B --out DIR`: the best cached recipe that fits B, applied to the model,
    exported with its report (recipe, bytes per stage, perplexity before/after, sha256 of every file), then
    loaded back and checked to generate the same greedy tokens. A budget below every point raises BudgetError
    before anything is loaded."""
    from .evaluate import default_budget, eval_tokens, perplexity
    from .models import load_model
    from .repro import load_results
    if results is None or isinstance(results, (str, Path)):
        results = load_results("capstone") if results is None else json.loads(Path(results).read_text())
    budget_bytes = parse_budget(budget, results["fp32_bytes"])
    point = best_recipe(search_points(results), budget_bytes)
    recipe = Recipe.from_dict(point["recipe"])
    log(f"budget {budget_bytes:,} bytes → {recipe.name} (cached: {point['bytes']:,} bytes, ppl {point['ppl']:.2f})")
    model, tok = load_model(model_name)
    tokens = eval_tokens(tok)
    ppl_fp32 = perplexity(model, tokens, max_tokens=max_tokens)
    packed = compress_(model, recipe)
    ppl = perplexity(model, tokens, max_tokens=max_tokens)
    ids = tok(prompt, return_tensors="pt")
    gen = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    with torch.inference_mode():
        before = model.generate(**ids, **gen)
    extra = {"budget": {"requested": str(budget), "bytes": budget_bytes},
             "perplexity": {"fp32": ppl_fp32, "compressed": ppl, "split": "validation",
                            "max_tokens": max_tokens or default_budget()},
             "cached_point": {"bytes": point["bytes"], "ppl": point["ppl"], "eval_tokens": results["eval"]["max_tokens"]},
             "generation": {"prompt": prompt, "greedy_tokens": before[0].tolist()}}
    report = export(packed, out, tok, extra)
    log(f"wrote {out}: weights {report['bytes']['weights_file']:,} bytes "
        f"({report['bytes']['weights_file'] / report['bytes']['fp32']:.1%} of fp32), ppl {ppl_fp32:.2f} → {ppl:.2f}")
    with torch.inference_mode():
        after = load_compressed(out).generate(**ids, **gen)
    if not torch.equal(before, after):
        raise AssertionError(f"the model loaded from {out} generates different tokens than before export")
    log(f"load_compressed({out}) generates the same {new_tokens} tokens")
    return report
