"""Reproducibility and files: seeds, threads, the cache folder, atomic writes, checksums, results files.

Defined in notebook 00 (Setup); every notebook uses it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from .checks import real_number, whole_number

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "data" / "results"


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch so that a notebook gives the same numbers on every run."""
    seed = whole_number("seed", seed, 0, "such as 0; NumPy's range", high=2**32 - 1)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def full_mode() -> bool:
    """True when LABKIT_FULL=1: heavier sweeps and bigger evaluation budgets."""
    return os.environ.get("LABKIT_FULL", "0").strip() not in ("", "0", "false", "False")


def cache_dir() -> Path:
    """Writable cache folder (LABKIT_CACHE, else ~/.cache/labkit); never inside data/."""
    root = os.environ.get("LABKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "labkit")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _as_path(what: str, path) -> Path:
    """path as a Path; TypeError unless it is a str or os.PathLike, ValueError for an empty one."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str or pathlib.Path), got {path!r}")
    if not str(path).strip():
        raise ValueError(f"{what} is an empty path; name a file or folder")
    return Path(path)


def _check_kind(kind) -> str:
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"kind names what the file is (a non-empty str such as 'labkit-token-cache'), got {kind!r}")
    return kind


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    chunk = whole_number("chunk", chunk, 1, "bytes read at a time, e.g. 1 << 20", high=1 << 30)
    h = hashlib.sha256()
    with open(_as_path("path", path), "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes to a temp file in the same folder, fsync, then rename: never a half-written file."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes writes bytes, got {type(data).__name__}; encode text with .encode() "
                        "or use atomic_write_json")
    path = _as_path("path", path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; name a file inside it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """Write a JSON file atomically (sorted keys, indent 1, trailing newline); nothing is written on an error."""
    _as_path("path", path)
    try:
        text = json.dumps(obj, indent=1, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"cannot write {path} as JSON: {e}; convert tensors and arrays with .tolist() or "
                        ".item() and other objects to dicts of numbers and strings first") from None
    return atomic_write_bytes(path, (text + "\n").encode())


def results_path(name: str) -> Path:
    """Path of a shipped results file, data/results/<name>.json (read-only for notebooks)."""
    if not isinstance(name, str):
        raise TypeError(f"a results name is a str such as 'prune', got {type(name).__name__}")
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"a results name is a plain name such as 'prune' (data/results/<name>.json), got {name!r}")
    return RESULTS_DIR / f"{name}.json"


def load_results(name: str) -> dict:
    """Load data/results/<name>.json with a clear error if it is missing or corrupt."""
    path = results_path(name)
    fix = f"regenerate it with `python -m labkit results {name}` from the repository root"
    if not path.exists():
        raise FileNotFoundError(f"results file {path} is missing; {fix}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"results file {path} is corrupt ({e}); {fix}") from None


# ---- threads and timing ------------------------------------------------------------------------------

def _check_threads(n) -> None:
    whole_number("the number of threads", n, 1, "such as 1", high=1024)


@contextlib.contextmanager
def threads(n: int):
    """Run the block with torch using n intra-op threads; the previous setting is restored on exit.

    Timings in the lab are ratios measured in one run with `with lk.repro.threads(1): ...`."""
    _check_threads(n)
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(old)


def time_call(fn, *args, min_run_time: float = 0.2, n_threads: int | None = 1, **kwargs) -> float:
    """Median seconds per call of fn(*args, **kwargs), measured by torch.utils.benchmark.Timer.

    One timer for the whole lab: warm-up, enough repeats to fill `min_run_time` seconds, the median of the
    blocks. n_threads=1 by default (compare variants as ratios within one run); None keeps torch's setting."""
    from torch.utils.benchmark import Timer
    if not callable(fn):
        raise TypeError(f"time_call needs a callable, got {type(fn).__name__}")
    if not 0 < real_number("min_run_time", min_run_time, "seconds > 0, e.g. 0.2", low=0) <= 3600:
        raise ValueError(f"min_run_time must be a finite number of seconds > 0 and at most an hour (e.g. 0.2), got "
                         f"{min_run_time!r}")
    if n_threads is not None:
        _check_threads(n_threads)
    threads_now = torch.get_num_threads() if n_threads is None else n_threads
    call = (lambda: fn(*args, **kwargs)) if (args or kwargs) else fn
    call()  # warm-up (first-call allocations, lazy initialisation)
    timer = Timer(stmt="call()", globals={"call": call}, num_threads=threads_now)
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


# ---- checksums: one manifest for every file labkit writes and later trusts -----------------------------

class ChecksumError(ValueError):
    """A file labkit wrote does not match its recorded sha256/size: corrupted, truncated or edited.

    The message names the file and how to rebuild it (caches) or why it is refused (a user's file)."""


MANIFEST_VERSION = 1


def file_entry(path: str | os.PathLike) -> dict:
    """{"bytes": size, "sha256": hex} of one file."""
    path = _as_path("path", path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def check_file(path: str | os.PathLike, entry: dict, fix: str) -> None:
    """Raise ChecksumError unless the file exists with the size and sha256 of `entry`; `fix` says what to do."""
    path = _as_path("path", path)
    if not isinstance(entry, dict):
        raise TypeError(f"entry must be the dict file_entry returned ({{'bytes': …, 'sha256': …}}), got {entry!r:.80}")
    if not path.is_file():
        raise ChecksumError(f"{path} is missing; {fix}")
    size = path.stat().st_size
    if size != entry.get("bytes"):
        raise ChecksumError(f"{path} has {size:,} bytes but {entry.get('bytes')!r} were written (truncated or "
                            f"changed); {fix}")
    digest = sha256_file(path)
    if digest != entry.get("sha256"):
        raise ChecksumError(f"{path} does not match its sha256 (recorded {str(entry.get('sha256'))[:12]}…, "
                            f"found {digest[:12]}…): the file is corrupted or was edited; {fix}")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def write_verified(path: str | os.PathLike, data: bytes, kind: str, meta: dict | None = None) -> Path:
    """Write bytes atomically plus a sidecar `<name>.sha256.json` (kind, format version, size, sha256, meta).

    For single-file caches and checkpoints; read them back with read_verified."""
    _check_kind(kind)
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict stored beside the checksum (or None), got {type(meta).__name__}")
    path = _as_path("path", path)
    atomic_write_bytes(path, data)
    side = {"kind": kind, "version": MANIFEST_VERSION, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "meta": meta or {}}
    atomic_write_json(_sidecar(path), side)
    return path


def read_verified(path: str | os.PathLike, kind: str, fix: str) -> tuple[bytes, dict]:
    """(bytes, meta) of a file written by write_verified; ChecksumError (with `fix`) when anything is off."""
    path = _as_path("path", path)
    _check_kind(kind)
    side_path = _sidecar(path)
    try:
        side = json.loads(side_path.read_text())
    except FileNotFoundError:
        raise ChecksumError(f"{path} has no checksum file {side_path.name} (an interrupted write, or not written "
                            f"by labkit); {fix}") from None
    except (OSError, ValueError) as e:
        raise ChecksumError(f"the checksum file {side_path} is unreadable ({e}); {fix}") from None
    if not isinstance(side, dict) or side.get("kind") != kind or side.get("version") != MANIFEST_VERSION:
        raise ChecksumError(f"{path} is not a {kind} file of format version {MANIFEST_VERSION} "
                            f"(its checksum file says {side.get('kind') if isinstance(side, dict) else side!r}); {fix}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ChecksumError(f"{path} is missing; {fix}") from None
    if len(data) != side.get("bytes") or hashlib.sha256(data).hexdigest() != side.get("sha256"):
        raise ChecksumError(f"{path} does not match its recorded size and sha256 (corrupted, truncated or "
                            f"edited); {fix}")
    return data, side.get("meta", {})


@contextlib.contextmanager
def hold_interrupts():
    """Hold Ctrl-C (SIGINT) until the block ends (main thread; elsewhere a no-op), then raise KeyboardInterrupt:
    files written as a pair (a file and its checksum) are both written or neither."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    old = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if caught:
            raise KeyboardInterrupt


def write_verified_torch(path: str | os.PathLike, obj, kind: str, meta: dict | None = None) -> Path:
    """torch.save(obj) through write_verified (atomic, sha256 sidecar), Ctrl-C held until both files are written.

    For caches and checkpoints of tensors, numbers, strings, lists and dicts; read back with read_verified_torch."""
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    with hold_interrupts():
        return write_verified(path, buf.getvalue(), kind, meta)


def read_verified_torch(path: str | os.PathLike, kind: str, fix: str) -> tuple[object, dict]:
    """(obj, meta) of a write_verified_torch file: checked first (ChecksumError with `fix`), then
    torch.load(weights_only=True) — tensors, numbers, strings, lists and dicts only, never code."""
    import io
    data, meta = read_verified(path, kind, fix)
    return torch.load(io.BytesIO(data), weights_only=True), meta


def write_manifest(folder: str | os.PathLike, kind: str, files: list[str] | None = None,
                   name: str = "labkit-manifest.json", extra: dict | None = None) -> dict:
    """Write `folder/name`: kind, format version and {file: {bytes, sha256}} of `files` (default: every file
    in the folder but the manifest). Written last and atomically: a folder without it is incomplete."""
    folder = _as_path("folder", folder)
    _check_kind(kind)
    if files is not None and (isinstance(files, (str, bytes)) or not isinstance(files, (list, tuple))
                              or not all(isinstance(f, str) for f in files)):
        raise TypeError(f"files must be a list of file names in the folder (or None for all), got {files!r}")
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be the manifest's file name, e.g. 'labkit-manifest.json', got {name!r}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict added to the manifest (or None), got {type(extra).__name__}")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write a manifest into {folder}: no such folder")
    if files is None:
        files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != name)
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot write the manifest of {folder}: {', '.join(missing)} missing")
    manifest = {"kind": kind, "version": MANIFEST_VERSION,
                "files": {f: file_entry(folder / f) for f in files}, **(extra or {})}
    atomic_write_json(folder / name, manifest)
    return manifest


def read_manifest(folder: str | os.PathLike, kind: str, fix: str, name: str = "labkit-manifest.json",
                  verify: bool = True) -> dict:
    """The manifest of a folder written by write_manifest, every file checked (verify=True); ChecksumError else."""
    folder = _as_path("folder", folder)
    _check_kind(kind)
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be the manifest's file name, e.g. 'labkit-manifest.json', got {name!r}")
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be True or False, got {verify!r}")
    path = folder / name
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ChecksumError(f"{folder} has no {name} (not a complete labkit {kind}); {fix}") from None
    except (OSError, ValueError) as e:
        raise ChecksumError(f"{path} is unreadable ({e}); {fix}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != kind or not isinstance(manifest.get("files"), dict):
        raise ChecksumError(f"{folder} is not a labkit {kind} (its {name} says "
                            f"{manifest.get('kind') if isinstance(manifest, dict) else '?'}); {fix}")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ChecksumError(f"{path} has format version {manifest.get('version')!r}, this labkit reads "
                            f"{MANIFEST_VERSION}; {fix}")
    if verify:
        for fname, entry in manifest["files"].items():
            if not isinstance(fname, str) or "/" in fname or fname.startswith(".."):
                raise ChecksumError(f"{path} names a file outside its folder ({fname!r}); {fix}")
            if not isinstance(entry, dict):
                raise ChecksumError(f"{path} lists {fname!r} without its size and sha256; {fix}")
            check_file(folder / fname, entry, fix)
    return manifest


def replace_folder(tmp: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Move a finished temporary folder onto dest: the old dest (if any) is kept until the new one is in place.

    Callers build `tmp` as a sibling of dest (tempfile.mkdtemp(dir=dest.parent)), verify it, then call this;
    an interruption leaves either the old complete folder or the new one."""
    tmp, dest = _as_path("tmp", tmp), _as_path("dest", dest)
    if not tmp.is_dir():
        raise FileNotFoundError(f"tmp {tmp} is not a folder; pass the finished temporary folder to move onto dest")
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old.exists() and not dest.exists():
            os.replace(old, dest)
        raise
    if old.exists():
        import shutil
        shutil.rmtree(old, ignore_errors=True)
    return dest


# ---- the machine, as the notebooks print it (never typed into text) --------------------------------------

def cpu_info() -> dict:
    """This CPU as read from the OS: model, logical cores, bf16/AMX instructions, cache sizes (Linux; else less).

    Notebooks print it beside a timing so that a claim like "bf16 is faster here" is read off the run."""
    import platform
    info = {"model": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "avx512_bf16": False, "amx_bf16": False, "l2_bytes": None, "l3_bytes": None}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["avx512_bf16"] = "avx512_bf16" in flags
                info["amx_bf16"] = "amx_bf16" in flags
                break
    except OSError:
        pass
    for level in (2, 3):
        try:
            sizes = {}
            for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
                if (idx / "level").read_text().strip() == str(level):
                    s = (idx / "size").read_text().strip()
                    sizes[idx.name] = int(s[:-1]) * {"K": 1024, "M": 1 << 20}[s[-1]] if s[-1] in "KM" else int(s)
            info[f"l{level}_bytes"] = max(sizes.values()) if sizes else None
        except (OSError, ValueError):
            pass
    info["bf16_matmul_in_hardware"] = info["avx512_bf16"] or info["amx_bf16"]
    return info
