"""What each notebook costs: Run All minutes and the kernel's peak memory, measured; the learner's time, estimated.

`python -m labkit results runtimes` executes every notebook in place (a fresh kernel each, as "Run All" does) and
records the wall time and the kernel's peak resident memory (VmHWM). The README table and each notebook's header
quote these numbers; tests/test_docs.py fails when they disagree. Run it on an idle machine of the kind the lab
targets (2 cores): a busy machine measures the machine, not the notebook.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..repro import REPO_ROOT, load_results

NOTEBOOKS = REPO_ROOT / "notebooks"
READ_WORDS_PER_MIN = 150      # technical prose with code beside it
MIN_PER_CODE_CELL = 0.5       # to read a short cell and its output
MIN_PER_EXERCISE = 10         # to write and check a solution


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def learner_minutes(path: Path) -> int:
    """Estimate (not a measurement) of a learner's time: reading + code cells + exercises, to 5 minutes."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    words, code, exercises = 0, 0, 0
    for cell in nb["cells"]:
        src = "".join(cell.get("source", ""))
        if cell["cell_type"] == "markdown":
            words += len(re.findall(r"\w+", src))
        elif cell["cell_type"] == "code":
            code += 1
            exercises += src.count("# BEGIN SOLUTION")
    minutes = words / READ_WORDS_PER_MIN + code * MIN_PER_CODE_CELL + exercises * MIN_PER_EXERCISE
    return int(5 * math.ceil(minutes / 5))


def make_results() -> dict:
    """Execute every notebook in place, one fresh kernel each; record seconds, peak RSS and the learner estimate."""
    from ..__main__ import execute_notebook
    out = {}
    for path in notebook_paths():
        stats: dict = {}
        execute_notebook(path, stats=stats)
        out[path.stem] = {"run_all_seconds": round(stats["seconds"], 1),
                          "peak_rss_bytes": stats.get("peak_rss_bytes"),
                          "learner_minutes_estimate": learner_minutes(path)}
        print(f"runtimes: {path.name}: {stats['seconds']:.0f} s, peak "
              f"{(stats.get('peak_rss_bytes') or 0) / 1e9:.2f} GB", flush=True)
    return {"notebooks": out, "machine": _machine()}


def _machine() -> dict:
    import os
    import platform
    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}


def run_all_minutes(seconds: float) -> str:
    """How the README and headers print a Run All time: minutes to one decimal, at least 0.1."""
    return f"{max(0.1, round(seconds / 60, 1)):.1f}"


def peak_gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f}"


def bench() -> dict:
    """The cached table: per notebook, Run All minutes, peak GB, learner minutes (estimate)."""
    res = load_results("runtimes")
    return {name: {"run_all_min": float(run_all_minutes(r["run_all_seconds"])),
                   "peak_gb": float(peak_gb(r["peak_rss_bytes"])),
                   "learner_min_estimate": r["learner_minutes_estimate"]}
            for name, r in res["notebooks"].items()}
