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
from .repro import ChecksumError
from .storage import default_sparse_names

QUANTS = ("none", "int", "kmeans")
CODEBOOKS = ("matrix", "row")
ENTROPY = ("none", "zstd", "huffman")
KIND = "labkit-compressed-model"
REPORT = "report.json"
MANIFEST = "labkit-manifest.json"
WEIGHTS = "model.safetensors"
ZSTD_LEVEL = 3
SIDE_PARTS = ("values", "mask", "codebook", "scales", "zeros")   # stored beside the codes
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
            Q._check_bits(self.bits)
        if self.quant == "kmeans" and not (isinstance(self.bits, int) and 1 <= self.bits <= 8):
            raise ValueError(f"k-means sharing needs bits in 1..8, got {self.bits!r}")
        if self.group_size is not None and (self.quant != "int" or int(self.group_size) < 1):
            raise ValueError("group_size applies to quant='int' only, and must be positive")
        if self.codebook not in CODEBOOKS:
            raise ValueError(f"Recipe.codebook={self.codebook!r}; use one of {CODEBOOKS}")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"Recipe.symmetric must be True or False, got {self.symmetric!r}")
        if not self.symmetric and self.quant != "int":
            raise ValueError("symmetric=False applies to quant='int' only")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)):
            raise TypeError(f"Recipe.group_size must be a whole number or None, got {self.group_size!r}")
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
        return cls(**{k: d[k] for k in ("sparsity", "quant", "bits", "group_size", "entropy", "codebook",
                                               "symmetric")
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


def _packed_codes(parts: dict[str, torch.Tensor], meta: dict, n: int, chunk: int = 1 << 20) -> torch.Tensor:
    """Entropy-coded codes → bit-packed codes, a chunk at a time for zstd (never all n codes at one byte each:
    the loading peak stays near the packed size); Huffman decodes whole, then packs."""
    bits = meta["bits"]
    if "zstd" not in parts:
        return Q.pack_bits(torch.from_numpy(_decode_codes(parts, meta, n)), bits)
    import zstandard
    out = torch.empty(math.ceil(n * bits / 8), dtype=torch.uint8)
    reader = zstandard.ZstdDecompressor().stream_reader(parts["zstd"].numpy().tobytes())
    done = 0
    while done < n:                      # chunk is a multiple of 8 codes: each packs into whole bytes
        want, buf = min(chunk, n - done), bytearray()
        while len(buf) < want:
            raw = reader.read(want - len(buf))
            if not raw:
                raise ChecksumError(f"the zstd stream ends after {done + len(buf)} of {n} codes; re-export the model")
            buf += raw
        codes = torch.frombuffer(buf, dtype=torch.uint8)
        lo = done * bits // 8
        packed = Q.pack_bits(codes, bits)
        out[lo: lo + packed.numel()] = packed
        done += codes.numel()
    return out


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
    return Q.dequantize(int_qtensor(packed, side, meta))


def int_qtensor(packed: torch.Tensor, side: dict[str, torch.Tensor], meta: dict) -> "Q.QTensor":
    """The QTensor of a stored "int" matrix: packed codes + scales (+ zero points when asymmetric)."""
    return Q.QTensor(packed, side["scales"], side.get("zeros"), meta["bits"], meta["group_size"],
                     tuple(meta["shape"]), "zeros" not in side, meta["granularity"], torch.float32)


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
        q = Q.quantize(w, recipe.bits, "group" if recipe.group_size else "channel", recipe.group_size,
                       recipe.symmetric)
        packed, side = q.packed, {"scales": q.scales} | ({} if q.zeros is None else {"zeros": q.zeros})
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
    side = {k: v for k, v in parts.items() if k in SIDE_PARTS}
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


def unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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
            side = sum(t.numel() * t.element_size() for k, t in e["parts"].items() if k in SIDE_PARTS)
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
        side = {k: v for k, v in e["parts"].items() if k in SIDE_PARTS}
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
    state, aliases = unique_state(model)
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


def _fix(folder) -> str:
    return f"re-export it (`python -m labkit compress --budget … --out {folder} --force`); never edit an export by hand"


def check_export_folder(folder, force: bool = False) -> Path:
    """The resolved export folder after checking it BEFORE any work: not inside data/, not a file, and either
    missing, empty, or (with force=True) a previous labkit export, which the new one will replace. A folder
    holding anything else is refused: labkit never deletes files it did not write."""
    from .repro import REPO_ROOT
    if not isinstance(folder, (str, Path)) or not str(folder):
        raise TypeError(f"the export folder must be a path, got {folder!r}")
    if not isinstance(force, bool):
        raise TypeError(f"force must be True or False, got {force!r}")
    folder = Path(folder).expanduser().resolve()
    data = (REPO_ROOT / "data").resolve()
    if folder == data or data in folder.parents:
        raise ValueError(f"{folder} is inside the repository's data/ folder; export under lk.cache_dir() or a tempdir")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is an existing file, not a folder; pass a new or empty folder for the export")
    if folder.is_dir() and any(folder.iterdir()):
        try:
            previous = json.loads((folder / REPORT).read_text()).get("kind") == KIND
        except (OSError, ValueError, AttributeError):
            previous = False
        if not previous:
            raise ValueError(f"{folder} is not empty and is not a labkit export; pass a new or empty folder "
                             f"(labkit never deletes files it did not write)")
        if not force:
            raise ValueError(f"{folder} holds a previous labkit export; pass force=True (--force) to replace it")
    if not folder.parent.is_dir():
        raise ValueError(f"the parent folder {folder.parent} does not exist; create it first")
    return folder


def export(packed: Compressed, folder, tokenizer=None, extra: dict | None = None, force: bool = False) -> dict:
    """Write folder/model.safetensors (+ the tokenizer's files), folder/report.json (the recipe, the bytes after
    each stage, what `extra` adds, e.g. perplexity) and a manifest with every file's size and sha256 — first
    into a temporary sibling folder, checked, then swapped in (lk.repro.replace_folder): an interruption leaves
    the old export or the new one, never half of one. Returns the report."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from .repro import atomic_write_json, file_entry, replace_folder, write_manifest
    if not isinstance(packed, Compressed):
        raise TypeError(f"export needs the Compressed returned by compress_, got {type(packed).__name__}")
    folder = check_export_folder(folder, force)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        save_file(packed.flat(), str(tmp / WEIGHTS), metadata={"kind": KIND})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        files = {p.name: file_entry(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        tensors = {n: {k: v for k, v in e.items() if k != "parts"} | {"parts": sorted(e["parts"])}
                   for n, e in packed.entries.items()}
        report = {"kind": KIND, "version": 2, "recipe": packed.recipe.to_dict(), "recipe_name": packed.recipe.name,
                  "bytes": {"stages": packed.stage_bytes, "weights_file": files[WEIGHTS]["bytes"],
                            "fp32": packed.stage_bytes["fp32"], "ram_formula": ram_formula_bytes(packed)},
                  "files": files, "tensors": tensors, "aliases": packed.aliases, "config": packed.config,
                  "attn_implementation": packed.attn_implementation, **(extra or {})}
        atomic_write_json(tmp / REPORT, report)
        write_manifest(tmp, KIND, name=MANIFEST)
        read_report(tmp)                                   # verify before the swap
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def read_report(folder) -> dict:
    """The export's report after checking the manifest and every file it lists (lk.repro.read_manifest);
    raises lk.repro.ChecksumError naming the file and the fix, or FileNotFoundError / ValueError."""
    from .repro import read_manifest
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass the folder written by lk.capstone.export")
    read_manifest(folder, KIND, _fix(folder), name=MANIFEST)
    try:
        report = json.loads((folder / REPORT).read_text())
    except ValueError as e:
        raise ValueError(f"{folder / REPORT} is not valid JSON ({e}); {_fix(folder)}") from None
    if not isinstance(report, dict) or report.get("kind") != KIND:
        raise ValueError(f"{folder / REPORT} is not a labkit compressed-model report; {_fix(folder)}")
    return report


def ram_formula_bytes(packed: Compressed) -> int:
    """Bytes the weights take in RAM after load_compressed: "int" matrices stay bit-packed (codes + scales
    [+ zeros], whatever the file's entropy coding), everything else is decoded to fp32."""
    total = 0
    for e in packed.entries.values():
        n = math.prod(e["shape"])
        if e["format"] == "int":
            side = sum(t.numel() * t.element_size() for k, t in e["parts"].items() if k in ("scales", "zeros"))
            total += math.ceil(n * e["bits"] / 8) + side
        else:
            total += 4 * n
    return total


def _set_module(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _set_tensor(model: nn.Module, name: str, t: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if leaf in mod._parameters:
        mod._parameters[leaf] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[leaf] = t


ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8,
             "I8": torch.int8, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


def empty_model(config: dict, attn_implementation: str | None = None) -> nn.Module:
    """The transformers model of a config dict with every parameter on the `meta` device (no memory yet)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg),
                                                 attn_implementation=attn_implementation)
    return model.eval()


class SafetensorsReader:
    """Read one tensor of a safetensors file at a time into memory of its own (readinto a fresh tensor).

    safetensors' safe_open maps the file: its tensors occupy RAM only once their pages are touched, so a
    loading peak measured right after loading would be too low. Reading into owned memory makes RSS honest."""

    def __init__(self, path):
        import struct
        self.f = open(path, "rb")
        (n,) = struct.unpack("<Q", self.f.read(8))
        self.header = json.loads(self.f.read(n))
        self.header.pop("__metadata__", None)
        self.start = 8 + n

    def get_tensor(self, name: str) -> torch.Tensor:
        h = self.header[name]
        lo, hi = h["data_offsets"]
        out = torch.empty(hi - lo, dtype=torch.uint8)
        self.f.seek(self.start + lo)
        if hi > lo and self.f.readinto(out.numpy()) != hi - lo:
            raise ChecksumError(f"{self.f.name} ends before tensor {name}; re-export it")
        return out.view(ST_DTYPES[h["dtype"]]).reshape(h["shape"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def load_compressed(folder, packed: bool = True, dtype: torch.dtype = torch.float32, convert=None) -> nn.Module:
    """Check the export (manifest, report, sha256 of every file) and rebuild the transformers model (eval mode).

    The model is built on the `meta` device (no memory) and filled one stored tensor at a time. With
    packed=True an "int" matrix never passes through fp32: its codes (entropy-decoded to bit-packed codes first
    when the file holds zstd/Huffman) go straight into a QuantLinear — or a QuantEmbedding whose tied lm_head
    shares the same buffers — so RAM holds the packing formula (`report["bytes"]["ram_formula"]`). Other formats
    (raw, bitmap, k-means) are decoded to `dtype`. packed=False decodes everything to `dtype` (the naive load).
    convert(fqn, module) -> module, if given, is called on every float nn.Linear as soon as it is filled (e.g. to
    hand it to torchao one layer at a time)."""
    report = read_report(folder)
    if not report.get("config"):
        raise ValueError(f"{folder} has no model config in its report; it cannot be rebuilt as a model")
    model = empty_model(report["config"], report.get("attn_implementation"))
    modules = dict(model.named_modules())
    done: dict[str, nn.Module] = {}
    with SafetensorsReader(Path(folder) / WEIGHTS) as f:
        for name, meta in report["tensors"].items():
            parts = {p: f.get_tensor(f"{name}/{p}") for p in meta["parts"]}
            fqn = name.rpartition(".")[0]
            mod = modules.get(fqn)
            if packed and meta["format"] == "int" and isinstance(mod, (nn.Linear, nn.Embedding)):
                if "packed" not in parts:
                    parts = {**parts, "packed": _packed_codes(parts, meta, math.prod(meta["shape"]))}
                q = int_qtensor(parts["packed"], parts, meta)
                new = Q.QuantEmbedding(q) if isinstance(mod, nn.Embedding) else Q.QuantLinear(q, mod.bias)
                _set_module(model, fqn, new)
                done[fqn] = new
                continue
            t = decode_matrix(dict(meta, parts=parts)).reshape(meta["shape"]).to(dtype)
            _set_tensor(model, name, t)
            if convert is not None and isinstance(mod, nn.Linear) and mod.weight.device.type != "meta":
                _set_module(model, fqn, convert(fqn, mod))
    for alias, target in report["aliases"].items():
        a_fqn, t_fqn = alias.rpartition(".")[0], target.rpartition(".")[0]
        if t_fqn in done:
            _set_module(model, a_fqn, done[t_fqn].tied_head() if isinstance(done[t_fqn], Q.QuantEmbedding)
                        else done[t_fqn])
        else:
            _set_tensor(model, alias, model.get_parameter(target))
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise ValueError(f"{folder}: {len(left)} weights were not in the export (e.g. {left[0]}); {_fix(folder)}")
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


def best_recipe(points: list[dict], budget_bytes: int, key: str = "bytes") -> dict:
    """The lowest-perplexity point whose bytes (`key`: "bytes" on disk, "ram_bytes" once loaded) fit the budget
    (ties: fewer bytes). A budget below every point raises BudgetError naming the smallest reachable point."""
    fits = [p for p in points if p[key] <= budget_bytes]
    if not fits:
        small = min(points, key=lambda p: p[key])
        raise BudgetError(f"a budget of {budget_bytes:,} bytes is below anything reachable: the smallest point "
                          f"found is '{small['name']}' at {small[key]:,} bytes (perplexity {small['ppl']:.1f}); "
                          f"raise the budget to at least that")
    return min(fits, key=lambda p: (p["ppl"], p[key]))


def search_points(results: dict) -> list[dict]:
    """The grid points of a results dict (make_results) that a recipe search can choose from (exportable ones)."""
    return [p for p in results["grid"] if "recipe" in p]


# ----------------------------------------------------------------------------------------------- command line
