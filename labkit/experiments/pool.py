"""Experiments of notebook 05's allocator and serving sections: the block-size sweep of the serving simulation
(data/results/pool.json, `python -m labkit results pool`) and the headline figures (`python -m labkit bench pool`).
Decoding speed and the KV cache's own figures are in `labkit.experiments.kvcache`."""
from __future__ import annotations

from .. import repro
from ..pool import DISTRIBUTIONS, make_requests, serving_comparison, simulate, time_alloc, time_alloc_fresh

BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def make_results() -> dict:
    """Sweep of the serving simulation: every distribution × block size, contiguous as the baseline."""
    out = {"budget_tokens": 8192, "max_len": 1024, "n_requests": 200, "seed": 0, "runs": []}
    for dist in DISTRIBUTIONS:
        reqs = make_requests(200, seed=0, dist=dist, max_len=1024)
        runs = [simulate(reqs, 8192, "contiguous", max_len=1024)]
        runs += [simulate(reqs, 8192, "paged", block_size=bs, max_len=1024) for bs in BLOCK_SIZES]
        for r in runs:
            r.pop("slot_map")
            out["runs"].append({"dist": dist, **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}})
    return out


def bench() -> dict:
    """Headline figures of notebook 05's first sections (≲ 30 s): serving waste, sequences that fit, allocation."""
    with repro.threads(1):
        out = {}
        for bs in (16, 64):
            r = serving_comparison(block_size=bs)
            out[f"block{bs}"] = {p: {k: round(r[p][k], 3) for k in ("utilisation", "waste", "mean_running", "throughput")}
                                 for p in ("contiguous", "paged")}
            out[f"block{bs}"]["fit"] = r["fit"]
        for size in (4096, 737_280):
            t = time_alloc(size, n=200)
            out[f"alloc_{size}B"] = {k: round(v, 2) for k, v in t.items()}
        out["alloc_737280B_fresh_pages"] = {k: round(v, 2) for k, v in time_alloc_fresh(737_280).items()}
        return out
