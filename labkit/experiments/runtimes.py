"""What each notebook costs: Run All minutes and the kernel's peak memory, measured; the learner's time, estimated.

`python -m labkit results runtimes` executes every notebook in place (a fresh kernel each, as "Run All" does) and
records the wall time and the kernel's peak resident memory (VmHWM). The README table and each notebook's header
quote these numbers; tests/test_docs.py fails when they disagree. Run it on an idle machine of the kind the lab
targets (2 cores): a busy machine measures the machine, not the notebook.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path

from ..repro import REPO_ROOT, atomic_write_bytes, load_results
from ..student import clean_notebook, notebook_text, read_notebook

NOTEBOOKS = REPO_ROOT / "notebooks"
READ_WORDS_PER_MIN = 150      # technical prose with code beside it
MIN_PER_CODE_CELL = 0.5       # to read a short cell and its output
MIN_PER_EXERCISE = 10         # to write and check a solution
CELL_TIMEOUT_S = 600          # `python -m labkit execute`: the longest a cell may run


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


def _kernel_manager():
    """A KernelManager for "python3" that runs THIS interpreter (the venv's), whatever the PATH says."""
    import ipykernel.kernelspec
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    class CurrentEnv(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return self.kernel_spec_class(resource_dir=ipykernel.kernelspec.RESOURCES,
                                          **ipykernel.kernelspec.get_kernel_dict())

    return KernelManager(kernel_name="python3", kernel_spec_manager=CurrentEnv())


def _kernel_peak_rss(km) -> int | None:
    """The kernel process's RSS high-water mark (VmHWM, bytes) on Linux; None elsewhere."""
    try:
        pid = km.provisioner.process.pid
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (AttributeError, OSError, ValueError):
        return None
    return None


def execute_notebook(path: Path, timeout: int = CELL_TIMEOUT_S, stats: dict | None = None) -> float:
    """Execute a notebook in place (cwd = its folder), clean it, return the wall seconds.

    `stats`, when given, receives "seconds" and "peak_rss_bytes" (the kernel's peak resident memory)."""
    from nbclient import NotebookClient

    nb = read_notebook(path)
    bin_dir = str(Path(sys.executable).parent)  # subprocesses started by the kernel find the venv too
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    km = _kernel_manager()
    client = NotebookClient(nb, km=km, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}, record_timing=False,
                            store_widget_state=True)  # widgets render from the saved state without a kernel
    t0 = time.perf_counter()
    try:
        client.execute()
        if stats is not None:
            stats["seconds"] = time.perf_counter() - t0
            stats["peak_rss_bytes"] = _kernel_peak_rss(km)
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    seconds = time.perf_counter() - t0
    atomic_write_bytes(path, notebook_text(clean_notebook(nb)).encode("utf-8"))
    return seconds


def make_results() -> dict:
    """Execute every notebook in place, one fresh kernel each; record seconds, peak RSS and the learner estimate."""
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
