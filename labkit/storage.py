"""Chunked sparse checkpoints: save a pruned model in a sparse format as safetensors chunks with a JSON index
(sha256 per chunk), then load it whole or lazily, one decoder layer at a time from memory-mapped files.

Defined in notebook 04 (Sparse storage, "Chunked storage and lazy loading").

    >>> index = lk.storage.save_sparse(model, folder, fmt="bitmap")        # chunk-00001.safetensors, …, index.json
    >>> model2 = lk.storage.load_full(folder)                              # everything in memory
    >>> model3 = lk.storage.load_lazy(folder)                              # layers materialised during forward
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import sparse as S
from .checks import torch_module, whole_number
from .models import empty_model
from .repro import REPO_ROOT, ChecksumError, check_file, read_manifest, replace_folder, write_manifest

INDEX = "index.json"
KIND = "labkit-sparse-checkpoint"
__all__ = ["ChecksumError", "save_sparse", "load_full", "load_lazy", "SparseCheckpoint", "checkpoint_bytes",
           "default_sparse_names", "compare_loads", "logits_after_load"]   # ChecksumError is lk.repro's


def _fix_hint(folder: Path) -> str:
    return (f"re-save the checkpoint with lk.storage.save_sparse(model, '{folder}') "
            f"(or restore the file from a good copy); do not use a partially written folder")


def _content_sha256(index: dict) -> str:
    """sha256 of what the index says about the tensors (so an edited index.json is detected like a chunk)."""
    body = {k: index.get(k) for k in ("format", "tensors", "aliases", "config", "attn_implementation")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- save
def default_sparse_names(model: nn.Module) -> set[str]:
    """The weights stored sparse by default: every Linear weight except lm_head (what lk.prune prunes)."""
    torch_module("model", model, "a model such as lk.load_model()[0]")
    return {f"{fqn}.weight" for fqn, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and not fqn.endswith("lm_head")}


def _encode(t: torch.Tensor, fmt: str) -> tuple[str, dict[str, torch.Tensor], dict]:
    """(format, {part: tensor}, extra index fields) for one tensor."""
    if fmt == "dense" or t.dim() != 2 or not t.is_floating_point():
        return "dense", {"values": t.contiguous()}, {}
    s = S.to_format(t, fmt, blocksize=(4, 4))
    extra = {"blocksize": list(s.blocksize)} if fmt == "bsr" else {}
    return fmt, s.tensors(), extra


def _check_target(folder) -> Path:
    """The resolved folder, if save_sparse may write it: new, empty, or a previous labkit sparse checkpoint
    holding nothing but its own index and chunks (so no file labkit did not write is ever replaced)."""
    if not isinstance(folder, (str, Path)) or (isinstance(folder, str) and not folder.strip()):
        raise TypeError(f"folder must be a path (str or pathlib.Path), got {folder!r}")
    folder = Path(folder).expanduser().resolve()
    data = REPO_ROOT / "data"
    if data in folder.parents or folder == data:
        raise ValueError(f"{folder} is inside the repository's data/ folder; save under lk.cache_dir() or a tempdir")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a folder; pass a folder for the checkpoint")
    if not folder.exists() or not any(folder.iterdir()):
        return folder
    try:
        old = json.loads((folder / INDEX).read_text())
        ours = set(old.get("files") or old.get("chunks") or {}) | {INDEX} if old.get("kind") == KIND else set()
    except (OSError, ValueError, AttributeError, TypeError):
        ours = set()
    if not ours:
        raise ValueError(f"{folder} is not empty and is not a labkit sparse checkpoint (no labkit {INDEX}); "
                         f"save into a new or empty folder — labkit never replaces files it did not write")
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in ours)
    if foreign:
        raise ValueError(f"{folder} holds files that are not part of its labkit checkpoint ({', '.join(foreign[:5])}"
                         f"{'…' if len(foreign) > 5 else ''}); move them away or save into another folder — "
                         f"saving replaces the whole folder")
    return folder


def save_sparse(model: nn.Module, folder, fmt: str = "bitmap", chunk_bytes: int = 32_000_000,
                sparse_names: set[str] | None = None) -> dict:
    """Save model's weights as safetensors chunks + index.json (a lk.repro manifest: sha256 of every chunk).

    Weights in `sparse_names` (default: every Linear but lm_head) are stored in `fmt` ("coo", "csr", "csr32",
    "bsr", "bitmap", "2:4"); the rest dense. Chunks hold ≤ chunk_bytes each, except that one tensor is never
    split: a tensor bigger than chunk_bytes (SmolLM2's 49,152 × 576 embedding, 113 MB) gets a chunk of its own.
    Tied weights (lm_head = embedding) are stored once, as aliases.

    The save is atomic at the folder level: everything is written into a temporary sibling folder, verified,
    then swapped in (lk.repro.replace_folder) — a failed or interrupted save leaves the old checkpoint intact.
    `folder` must be new, empty, or a previous labkit sparse checkpoint with nothing else in it.
    Returns the index (also folder/index.json)."""
    from safetensors.torch import save_file
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if not isinstance(fmt, str) or fmt not in S.FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {S.FORMATS}")
    whole_number("chunk_bytes", chunk_bytes, 1, "bytes, e.g. 32_000_000 for 32 MB chunks")
    state = model.state_dict()
    if not state:
        raise ValueError("the model has no parameters or buffers to save")
    meta_dev = [n for n, t in state.items() if t.device.type == "meta"]
    if meta_dev:
        raise ValueError(f"{len(meta_dev)} tensors are on the meta device (e.g. {meta_dev[0]}): a lazily loaded "
                         "model holds no weights; load it with lk.storage.load_full before saving")
    if sparse_names is None:
        sparse_names = default_sparse_names(model)
    elif isinstance(sparse_names, str) or not all(isinstance(n, str) for n in sparse_names):
        raise TypeError("sparse_names must be a set of state-dict names (str), e.g. {'model.layers.0.mlp.up_proj.weight'}")
    else:
        sparse_names = set(sparse_names)
        unknown = sorted(sparse_names - set(state))
        if unknown:
            raise ValueError(f"sparse_names has names that are not in the model's state dict: {unknown[:3]}")
    folder = _check_target(folder)
    # encode everything first (in memory): a tensor that cannot be stored in fmt stops the save before any write
    seen: dict[tuple, str] = {}
    aliases, tensors_meta = {}, {}
    entries: list[tuple[str, dict[str, torch.Tensor]]] = []
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        try:
            f, parts, extra = _encode(t.detach().cpu(), fmt if name in sparse_names else "dense")
        except (TypeError, ValueError) as e:
            raise type(e)(f"{name}: {e}") from None
        tensors_meta[name] = {"format": f, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                              "parts": sorted(parts), **extra}
        entries.append((name, parts))
    # greedy chunking in state-dict order, so one decoder layer lives in one or two neighbouring chunks
    chunks: list[list[tuple[str, dict]]] = [[]]
    size = 0
    for name, parts in entries:
        b = S.parts_bytes(*parts.values())
        if chunks[-1] and size + b > chunk_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append((name, parts))
        size += b
    cfg = getattr(model, "config", None)
    config = json.loads(cfg.to_json_string()) if cfg is not None and hasattr(cfg, "to_json_string") else None
    if config:
        config.pop("quantization_config", None)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.saving-"))
    try:
        names = []
        for i, chunk in enumerate(chunks, 1):
            fname = f"chunk-{i:05d}.safetensors"
            flat = {f"{name}/{p}": t.contiguous() for name, parts in chunk for p, t in parts.items()}
            save_file(flat, str(tmp / fname), metadata={"kind": KIND})
            names.append(fname)
            for name, _ in chunk:
                tensors_meta[name]["chunk"] = fname
        index = {"format": fmt, "tensors": tensors_meta, "aliases": aliases, "config": config,
                 "attn_implementation": getattr(cfg, "_attn_implementation", None) if cfg is not None else None}
        index["content_sha256"] = _content_sha256(index)
        write_manifest(tmp, KIND, files=names, name=INDEX, extra=index)
        index = read_manifest(tmp, KIND, "the save wrote a bad file; save again", name=INDEX)   # verify
        replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return index


def checkpoint_bytes(folder) -> int:
    """Bytes on disk of all chunks (the index is a few kB more)."""
    if not isinstance(folder, (str, Path)):
        raise TypeError(f"folder must be a path (str or pathlib.Path), got {type(folder).__name__}")
    if not (Path(folder) / INDEX).is_file():
        raise FileNotFoundError(f"{folder} is not a sparse checkpoint (no {INDEX}); pass the folder given to "
                                "lk.storage.save_sparse")
    return sum(p.stat().st_size for p in Path(folder).glob("chunk-*.safetensors"))


# ----------------------------------------------------------------------------------------------- load
@dataclass
class SparseCheckpoint:
    """Read side of a chunked sparse checkpoint. Chunks are checked against their sha256 on first use and
    opened memory-mapped with safetensors.safe_open only while tensors are read from them."""
    folder: Path
    index: dict

    @classmethod
    def open(cls, folder) -> "SparseCheckpoint":
        """Read and check index.json (kind, version, its own content sha256); chunks are checked on first use."""
        if not isinstance(folder, (str, Path)):
            raise TypeError(f"folder must be a path (str or pathlib.Path), got {type(folder).__name__}")
        folder = Path(folder)
        path = folder / INDEX
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: {folder} is not a complete sparse checkpoint; "
                                    + _fix_hint(folder))
        fix = _fix_hint(folder)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ChecksumError(f"{path} is unreadable ({e}); " + fix) from None
        if isinstance(raw, dict) and raw.get("kind") == KIND and "chunks" in raw and "files" not in raw:
            index = dict(raw, files=raw["chunks"])         # written by an older labkit: chunk sha256s, no own sha
        else:
            index = read_manifest(folder, KIND, fix, name=INDEX, verify=False)
            if index.get("content_sha256") != _content_sha256(index):
                raise ChecksumError(f"{path} was edited or is corrupted (its tensor table does not match the sha256 "
                                    f"recorded when it was saved); " + fix)
        if not isinstance(index.get("tensors"), dict) or not isinstance(index.get("aliases"), dict):
            raise ChecksumError(f"{path} has no tensor table; " + fix)
        for fname in index["files"]:
            if not isinstance(fname, str) or "/" in fname or fname.startswith(".."):
                raise ChecksumError(f"{path} names a file outside its folder ({fname!r}); " + fix)
        ck = cls(folder, index)
        ck._verified: set[str] = set()
        return ck

    def verify(self, chunk: str | None = None) -> None:
        """Check one chunk (or all) against the index's size and sha256; raise ChecksumError naming the file."""
        names = [chunk] if chunk else list(self.index["files"])
        for fname in names:
            if fname in self._verified:
                continue
            if fname not in self.index["files"]:
                raise ChecksumError(f"{self.folder / INDEX} lists a tensor in {fname!r}, which is not one of its "
                                    f"chunks; " + _fix_hint(self.folder))
            entry = self.index["files"][fname]
            try:
                check_file(self.folder / fname, entry, _fix_hint(self.folder))
            except ChecksumError as e:
                raise ChecksumError(f"checksum mismatch: {e}") from None
            self._verified.add(fname)

    def names(self) -> list[str]:
        return list(self.index["tensors"]) + list(self.index["aliases"])

    def _resolve(self, name: str) -> str:
        if not isinstance(name, str):
            raise TypeError(f"a tensor name is a str such as 'model.layers.0.mlp.up_proj.weight', got {name!r}")
        name = self.index["aliases"].get(name, name)
        if name not in self.index["tensors"]:
            raise ValueError(f"{name!r} is not in the checkpoint {self.folder}; see its .names()")
        return name

    def get_many(self, names) -> dict[str, torch.Tensor]:
        """Dense tensors for these names, reading each chunk once (opened, read, closed)."""
        from safetensors import safe_open
        if isinstance(names, (str, bytes)) or not isinstance(names, (list, tuple, set)):
            raise TypeError(f"names must be a list of tensor names (see .names()), got {names!r}")
        by_chunk: dict[str, list[str]] = {}
        for n in names:
            by_chunk.setdefault(self.index["tensors"][self._resolve(n)]["chunk"], []).append(n)
        out = {}
        for fname, group in by_chunk.items():
            self.verify(fname)
            with safe_open(str(self.folder / fname), framework="pt") as f:
                for n in group:
                    out[n] = self._decode(self._resolve(n), f)
        return out

    def get(self, name: str) -> torch.Tensor:
        return self.get_many([name])[name]

    def _decode(self, name: str, f) -> torch.Tensor:
        meta = self.index["tensors"][name]
        parts = {p: f.get_tensor(f"{name}/{p}") for p in meta["parts"]}
        fmt, shape = meta["format"], tuple(meta["shape"])
        if fmt == "dense":
            return parts["values"]
        if fmt in ("csr", "csr32"):
            return S.CSR(parts["crow_indices"], parts["col_indices"], parts["values"], shape).to_dense()
        if fmt == "coo":
            return S.COO(parts["indices"], parts["values"], shape).to_dense()
        if fmt == "bsr":
            return S.BSR(parts["crow_indices"], parts["col_indices"], parts["values"], shape).to_dense()
        if fmt == "bitmap":
            return S.Bitmap(parts["mask"], parts["values"], shape).to_dense()
        if fmt == "2:4":
            return S.TwoFour(parts["values"], parts["meta"], shape).to_dense()
        raise ChecksumError(f"unknown stored format {fmt!r} for {name} in {self.folder / INDEX}; "
                            + _fix_hint(self.folder))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, dense (aliases share storage with their target)."""
        self.verify()
        out = self.get_many(list(self.index["tensors"]))
        for a, target in self.index["aliases"].items():
            out[a] = out[target]
        return out


def _empty_model(index: dict) -> nn.Module:
    if not index.get("config"):
        raise ValueError("this checkpoint has no model config; load its state_dict() into your own model")
    return empty_model(index["config"], index.get("attn_implementation"))


def _set_param(root: nn.Module, name: str, t: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)


def load_full(folder) -> nn.Module:
    """Read every chunk into memory, densify every weight, and return the model (the simple way)."""
    from safetensors.torch import load_file
    ck = SparseCheckpoint.open(folder)
    ck.verify()
    raw = {}
    for fname in ck.index["files"]:
        raw.update(load_file(str(ck.folder / fname)))                 # all chunks in memory at once
    model = _empty_model(ck.index)
    dense = {}
    for name, meta in ck.index["tensors"].items():
        parts = {p: raw[f"{name}/{p}"] for p in meta["parts"]}
        dense[name] = ck._decode(name, _Dict(parts, name))
    for a, target in ck.index["aliases"].items():
        dense[a] = dense[target]
    model.load_state_dict(dense, assign=True, strict=True)
    _retie(model)
    return model


class _Dict:
    """Adapter so _decode can read parts from an in-memory dict like from a safe_open handle."""
    def __init__(self, parts, name):
        self.parts, self.name = parts, name

    def get_tensor(self, key):
        return self.parts[key.rsplit("/", 1)[1]]


def _retie(model: nn.Module) -> None:
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        model.lm_head.weight = model.get_input_embeddings().weight


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and RSS creeps up layer by layer)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _layer_list(model: nn.Module, layers_fqn: str) -> nn.ModuleList:
    try:
        layers = model.get_submodule(layers_fqn)
    except AttributeError:
        raise ValueError(f"model has no submodule {layers_fqn!r}; pass layers_fqn= the ModuleList of blocks") from None
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{layers_fqn!r} is a {type(layers).__name__}, not an nn.ModuleList of blocks")
    return layers


def load_lazy(folder, layers_fqn: str = "model.layers") -> nn.Module:
    """A model whose decoder layers stay on the meta device (no memory) until their forward: a pre-hook reads
    that layer's weights from its memory-mapped chunk and densifies them, a post-hook frees them again.
    Everything outside the layers (embedding, final norm) is loaded at once. Peak ≈ embedding + one layer."""
    if not isinstance(layers_fqn, str):
        raise TypeError(f"layers_fqn must be the name of the ModuleList of blocks (str), e.g. 'model.layers'; "
                        f"got {layers_fqn!r}")
    ck = SparseCheckpoint.open(folder)
    model = _empty_model(ck.index)
    layers = _layer_list(model, layers_fqn)
    layer_params = {n for n, _ in model.named_parameters() if n.startswith(layers_fqn + ".")}
    rest = [n for n in ck.index["tensors"] if n not in layer_params]
    for n, t in ck.get_many(rest).items():
        _set_param(model, n, t)
    _retie(model)
    for i, layer in enumerate(layers):
        prefix = f"{layers_fqn}.{i}."
        names = [n for n, _ in layer.named_parameters()]

        def load(mod, args, prefix=prefix, names=names):
            for n, t in ck.get_many([prefix + n for n in names]).items():
                _set_param(mod, n[len(prefix):], t)

        def release(mod, args, output, names=names):
            for n in names:
                p = mod.get_parameter(n)
                _set_param(mod, n, torch.empty(p.shape, dtype=p.dtype, device="meta"))
            _malloc_trim()

        layer.register_forward_pre_hook(load)
        layer.register_forward_hook(release)
    return model


# ----------------------------------------------------------------------------------------------- measured in a fresh process
def _check_input_ids(input_ids, index: dict) -> None:
    """[batch, seq] token ids in the saved model's vocabulary (read from the checkpoint's config)."""
    from .checks import torch_tensor
    torch_tensor("input_ids", input_ids, "token ids [batch, seq], e.g. tok('text', return_tensors='pt').input_ids",
                 dims=2, kind="int")
    vocab = (index.get("config") or {}).get("vocab_size")
    if isinstance(vocab, int) and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise ValueError(f"input_ids run from {int(input_ids.min())} to {int(input_ids.max())} but the saved model's "
                         f"vocabulary has {vocab} ids; tokenize with its own tokenizer")


def logits_after_load(folder, input_ids: torch.Tensor, lazy: bool, threads: int = 1) -> dict:
    """Load (full or lazy) and run one forward in this process; the memory above the entry baseline is
    measured here, after torch/transformers are imported. Use with lk.memory.run_in_subprocess.
    One thread by default: two of these may run beside a notebook kernel on a 2-core machine."""
    from .memory import measure_memory
    threads = whole_number("threads", threads, 1, "torch threads for the load and forward, e.g. 1")
    _check_input_ids(input_ids, SparseCheckpoint.open(folder).index)
    if not isinstance(lazy, bool):
        raise TypeError(f"lazy must be True or False, got {lazy!r}")
    torch.set_num_threads(threads)
    _empty_model(SparseCheckpoint.open(folder).index)   # imports the model's code first: not part of the peak
    with measure_memory() as m:
        model = load_lazy(folder) if lazy else load_full(folder)
        with torch.no_grad():
            logits = model(input_ids).logits
    return {"logits": logits, "peak_bytes": m.peak_bytes, "seconds": m.seconds}


def compare_loads(folder, input_ids: torch.Tensor) -> dict:
    """Full and lazy load + one forward, each in its own fresh process, the two running side by side:
    {"full": {...}, "lazy": {...}} with logits, peak_bytes (above the post-import baseline) and seconds."""
    from concurrent.futures import ThreadPoolExecutor

    from .memory import run_in_subprocess
    _check_input_ids(input_ids, SparseCheckpoint.open(folder).index)   # before two processes start
    with ThreadPoolExecutor(max_workers=2) as ex:
        jobs = {k: ex.submit(run_in_subprocess, logits_after_load, str(folder), input_ids, lazy=(k == "lazy"))
                for k in ("full", "lazy")}
        return {k: j.result()[0] for k, j in jobs.items()}
