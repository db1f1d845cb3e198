"""data/results/capstone_ram.json (`python -m labkit results capstone_ram`, ~10 minutes): every RAM recipe of
notebook 07 loaded and run in a fresh process (labkit.experiments.capstone.measure_ram)."""
from __future__ import annotations


def make_results() -> dict:
    from .capstone import measure_ram
    return measure_ram()


def bench() -> dict:
    """The RAM headline from data/results/capstone_ram.json (the per-recipe rows are in capstone's `ram` section)."""
    from ..repro import load_results
    ram = load_results("capstone_ram")
    return {"threads": ram["threads"], "new_tokens": ram["new_tokens"], **ram["headline"]}
