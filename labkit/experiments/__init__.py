"""The experiments layer: sweeps, cached results, bench figures and widget helpers, above the lessons.

Lesson modules (labkit/prune.py, quantize.py, ...) hold the ideas; the modules here run them on SmolLM2 to
produce the figures the notebooks show. Each experiment module defines `bench() -> dict` (headline figures,
printed by `python -m labkit bench`) and, where a figure takes too long for a notebook, `make_results() -> dict`
(written to data/results/<name>.json by `python -m labkit results <name>`).

The registry below is explicit: a new experiment is listed here, never discovered by scanning source files.
"""
from __future__ import annotations

import importlib

# name -> module that defines bench() (and make_results() where it caches results in data/results/<name>.json)
EXPERIMENTS: dict[str, str] = {
    "footprint": "labkit.experiments.footprint",
    "prune": "labkit.experiments.prune",
    "quantize": "labkit.experiments.quantize",
    "library_methods": "labkit.experiments.library_methods",
    "methods": "labkit.experiments.methods",
    "distill": "labkit.experiments.distill",
    "sparse": "labkit.experiments.sparse",
    "compress": "labkit.experiments.compress",
    "pool": "labkit.experiments.pool",
    "kvcache": "labkit.experiments.kvcache",
    "training": "labkit.experiments.training",
    "capstone": "labkit.experiments.capstone",
    "capstone_ram": "labkit.experiments.capstone_ram",
    "runtimes": "labkit.experiments.runtimes",
}


def names(kind: str = "bench") -> list[str]:
    """Experiments that define bench() (kind="bench") or make_results() (kind="results")."""
    attr = {"bench": "bench", "results": "make_results"}[kind]
    return [n for n in EXPERIMENTS if hasattr(load(n), attr)]


def load(name: str):
    """The module of an experiment; ValueError naming the known ones for a wrong name."""
    if name not in EXPERIMENTS:
        raise ValueError(f"no experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])
