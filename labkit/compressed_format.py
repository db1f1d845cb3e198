"""How a compressed model is stored and loaded: the `Compressed` container, the export folder (safetensors +
report + checksummed manifest) and `load_compressed`, which rebuilds the model on the `meta` device with integer
weights still packed in RAM.

Defined in notebook 07 (07_capstone.ipynb, sections 4 and 7); the recipes, `compress_` and the budget search that
produce a `Compressed` are in labkit/capstone.py, which re-exports everything here (`lk.capstone.export`,
`lk.capstone.load_compressed`, ...). The stored form of one weight (raw, bitmap, int, kmeans; codes bit-packed or
entropy coded) is in labkit/stored_matrix.py, re-exported here.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import quantize as Q
from . import sparse as S
from .models import empty_model  # noqa: F401  (lk.capstone re-exports it)
from .checks import torch_module, whole_number
from .repro import ChecksumError
# One weight matrix's stored form has its own module; re-exported (lk.capstone re-exports these names in turn).
from .stored_matrix import (  # noqa: F401
    KMEANS_SAMPLE, SIDE_PARTS, ZSTD_LEVEL, decode_codes, decode_matrix, encode_codes, encode_matrix, int_qtensor,
    packed_codes, share, share_rows,
)

if TYPE_CHECKING:
    from .capstone import Recipe

KIND = "labkit-compressed-model"
REPORT = "report.json"
MANIFEST = "labkit-manifest.json"
WEIGHTS = "model.safetensors"


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

    @property
    def nbytes(self) -> int:
        """Exact size of the safetensors file (serialized in memory: header + tensors)."""
        from safetensors.torch import save
        return len(save(self.flat(), metadata={"kind": KIND}))


def unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """state_dict without tied duplicates: ({name: tensor}, {alias: target})."""
    torch_module("model", model, "a model such as lk.load_model()[0]")
    seen, out, aliases = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            out[name] = t
    return out, aliases


def count_stage_bytes(entries: dict[str, dict], recipe: Recipe) -> dict[str, int]:
    """Bytes of the stored tensors after each stage of the recipe (file header not included): fp32 → pruned
    (bitmap: 1 bit per position + fp32 nonzeros) → quantized/shared (bit-packed codes + scales/codebook) →
    entropy coded."""
    if not isinstance(entries, dict) or not all(isinstance(e, dict) and "parts" in e for e in entries.values()):
        raise TypeError("entries must be the {name: entry} dict of a Compressed (compress_(...).entries)")
    if not all(hasattr(recipe, a) for a in ("sparsity", "quant", "entropy")):
        raise TypeError(f"recipe must be a lk.capstone.Recipe, got {type(recipe).__name__}")
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


# ----------------------------------------------------------------------------------------------- export / load
def check_compressed(packed) -> "Compressed":
    """TypeError unless packed is the Compressed returned by lk.capstone.compress_."""
    if not isinstance(packed, Compressed):
        raise TypeError(f"need the Compressed returned by lk.capstone.compress_(model, recipe), got "
                        f"{type(packed).__name__}")
    return packed


def _check_folder_arg(folder) -> Path:
    if not isinstance(folder, (str, Path)) or not str(folder):
        raise TypeError(f"folder must be a path (str or pathlib.Path) of an export, got {folder!r}")
    return Path(folder)


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
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer (lk.load_model()[1]) or None, got "
                        f"{type(tokenizer).__name__}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict of what the report adds (e.g. {{'ppl': 31.2}}) or None, got "
                        f"{type(extra).__name__}")
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
    folder = _check_folder_arg(folder)
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
    check_compressed(packed)
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


class SafetensorsReader:
    """Read one tensor of a safetensors file at a time into memory of its own (readinto a fresh tensor).

    safetensors' safe_open maps the file: its tensors occupy RAM only once their pages are touched, so a
    loading peak measured right after loading would be too low. Reading into owned memory makes RSS honest.
    `get_tensor(name, dtype)` converts chunk by chunk (an fp32 tensor loaded as bf16 never exists in fp32
    whole); `stream(name)` reads a tensor's bytes as a file (a zstd part decompressed as it is read)."""

    def __init__(self, path, chunk_bytes: int = 1 << 20):
        import struct
        self.chunk_bytes = whole_number("chunk_bytes", chunk_bytes, 1, "bytes read at a time, e.g. 1 << 20")
        self.scratch = None
        self.f = open(_check_folder_arg(path), "rb")
        (n,) = struct.unpack("<Q", self.f.read(8))
        self.header = json.loads(self.f.read(n))
        self.header.pop("__metadata__", None)
        self.start = 8 + n

    def _span(self, name: str) -> tuple[int, int]:
        lo, hi = self.header[name]["data_offsets"]
        return self.start + lo, hi - lo

    def _read_into(self, name: str, pos: int, out: torch.Tensor) -> None:
        self.f.seek(pos)
        if out.numel() and self.f.readinto(out.view(torch.uint8).reshape(-1).numpy()) != out.numel() * out.element_size():
            raise ChecksumError(f"{self.f.name} ends before tensor {name}; re-export it")

    def get_tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        h = self.header[name]
        stored, shape = ST_DTYPES[h["dtype"]], h["shape"]
        pos, size = self._span(name)
        if dtype is None or dtype == stored:
            out = torch.empty(size, dtype=torch.uint8)
            self._read_into(name, pos, out)
            return out.view(stored).reshape(shape)
        out = torch.empty(math.prod(shape), dtype=dtype)
        if self.scratch is None:                 # one staging buffer for the whole file, reused by every tensor
            self.scratch = torch.empty(self.chunk_bytes, dtype=torch.uint8)
        step = self.chunk_bytes // stored.itemsize
        buf = self.scratch.view(stored)
        for i in range(0, out.numel(), step):
            part = buf[: min(step, out.numel() - i)]
            self._read_into(name, pos + i * stored.itemsize, part)
            out[i: i + part.numel()] = part
        return out.reshape(shape)

    def stream(self, name: str) -> "_Span":
        """The bytes of tensor `name` as a read-only file object (read(n) → bytes), for a streaming decoder."""
        return _Span(self.f, *self._span(name))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


class _Span:
    """A window [pos, pos + size) of an open file that reads like a file of its own."""

    def __init__(self, f, pos: int, size: int):
        self.f, self.pos, self.end = f, pos, pos + size

    def read(self, n: int = -1) -> bytes:
        n = self.end - self.pos if n is None or n < 0 else min(n, self.end - self.pos)
        self.f.seek(self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data


def load_compressed(folder, packed: bool = True, dtype: torch.dtype = torch.float32, convert=None) -> nn.Module:
    """Check the export (manifest, report, sha256 of every file) and rebuild the transformers model (eval mode).

    The model is built on the `meta` device (no memory) and filled one stored tensor at a time. With
    packed=True an "int" matrix never passes through fp32: its codes (entropy-decoded to bit-packed codes first
    when the file holds zstd/Huffman) go straight into a QuantLinear — or a QuantEmbedding whose tied lm_head
    shares the same buffers — so RAM holds the packing formula (`report["bytes"]["ram_formula"]`). Other formats
    (raw, bitmap, k-means) are decoded to `dtype`. packed=False decodes everything to `dtype` (the naive load).
    convert(fqn, module) -> module, if given, is called on every float nn.Linear as soon as it is filled (e.g. to
    hand it to torchao one layer at a time)."""
    if not isinstance(packed, bool):
        raise TypeError(f"packed must be True or False, got {packed!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch dtype (torch.float32, torch.bfloat16), got {dtype!r}")
    if convert is not None and not callable(convert):
        raise TypeError(f"convert must be a function (fqn, module) -> module, or None; got {convert!r}")
    report = read_report(folder)
    if not report.get("config"):
        raise ValueError(f"{folder} has no model config in its report; it cannot be rebuilt as a model")
    model = empty_model(report["config"], report.get("attn_implementation"))
    modules = dict(model.named_modules())
    done: dict[str, nn.Module] = {}
    with SafetensorsReader(Path(folder) / WEIGHTS) as f:
        for name, meta in report["tensors"].items():
            fqn = name.rpartition(".")[0]
            mod = modules.get(fqn)
            if packed and meta["format"] == "int" and isinstance(mod, (nn.Linear, nn.Embedding)):
                parts = {p: f.stream(f"{name}/{p}") if p == "zstd" else f.get_tensor(f"{name}/{p}")
                         for p in meta["parts"]}
                if "packed" not in parts:
                    parts = {**parts, "packed": packed_codes(parts, meta, math.prod(meta["shape"]))}
                q = int_qtensor(parts["packed"], parts, meta)
                new = Q.QuantEmbedding(q) if isinstance(mod, nn.Embedding) else Q.QuantLinear(q, mod.bias)
                _set_module(model, fqn, new)
                done[fqn] = new
                continue
            if meta["format"] == "raw":                       # read straight into `dtype`, chunk by chunk
                t = f.get_tensor(f"{name}/values", dtype).reshape(meta["shape"])
            else:
                parts = {p: f.get_tensor(f"{name}/{p}") for p in meta["parts"]}
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
