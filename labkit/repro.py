"""Reproducibility and files: seeds, threads, the cache folder, atomic writes, checksums, results files.

Defined in notebook 00 (Setup); every notebook uses it.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "data" / "results"


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch so that a notebook gives the same numbers on every run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def set_threads(n: int) -> int:
    """Set torch's intra-op threads; return the previous value (restore it after a timing)."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    return old


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


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes to a temp file in the same folder, fsync, then rename: never a half-written file."""
    path = Path(path)
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
    """Write a JSON file atomically (sorted keys, indent 1, trailing newline)."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def results_path(name: str) -> Path:
    """Path of a shipped results file, data/results/<name>.json (read-only for notebooks)."""
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
