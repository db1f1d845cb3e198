"""Experiments of notebook 05's allocator and serving sections: what allocation costs (a fresh tensor vs a pool
block, growing a buffer by torch.cat vs blocks, a heap pinned by one live tensor — each measured, some in a fresh
process), the block-size sweep of the serving simulation (data/results/pool.json, `python -m labkit results
pool`) and the headline figures (`python -m labkit bench pool`). Decoding speed and the KV cache's own figures
are in `labkit.experiments.kvcache`."""
from __future__ import annotations

import gc
import os

import torch

from .. import repro
from ..checks import whole_number
from ..memory import QUIET_MALLOC, current_rss, run_in_subprocess
from ..pool import (DISTRIBUTIONS, BlockPool, make_requests, serving_comparison, simulate)

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


# ---------------------------------------------------------------- allocation cost (notebook 05, §1)
def time_alloc(block_bytes: int = 737_280, n: int = 200, min_run_time: float = 0.2) -> dict:
    """Seconds per allocate+write+free: a fresh torch.empty each time vs reusing one block of a BlockPool.

    Default size = one 16-token KV block of SmolLM2-135M in fp32 (16 · 46,080 B). Each variant is a loop of `n`
    of them, timed by lk.repro.time_call (warm-up, then the median over `min_run_time` seconds, one thread).
    """
    numel, n = whole_number("block_bytes", block_bytes, 1) // 4, whole_number("n", n, 1)
    pool = BlockPool(4, (numel,), torch.float32)

    def plain():
        for _ in range(n):
            t = torch.empty(numel)
            t.fill_(1.0)
            del t

    def pooled():
        for _ in range(n):
            b = pool.allocate()
            pool.storage[b].fill_(1.0)
            pool.free(b)

    plain_s = repro.time_call(plain, min_run_time=min_run_time) / n
    pool_s = repro.time_call(pooled, min_run_time=min_run_time) / n
    return {"block_bytes": numel * 4, "plain_us": plain_s * 1e6, "pool_us": pool_s * 1e6, "ratio": plain_s / pool_s}


def time_alloc_fresh(block_bytes: int = 737_280, n: int = 100) -> dict:
    """`time_alloc` in a fresh process where glibc must map fresh pages from the OS for every block
    (MALLOC_MMAP_THRESHOLD_=65536 turns off its reuse of freed memory) — the cost a pool avoids."""
    out, _ = run_in_subprocess(time_alloc, whole_number("block_bytes", block_bytes, 1), whole_number("n", n, 1),
                               env=QUIET_MALLOC)
    return out


def _heap_pinning_child(n: int, nbytes: int) -> dict:
    gc.collect()
    r0 = current_rss()
    ts = [torch.ones(nbytes // 4) for _ in range(n)]
    r1 = current_rss()
    last = ts[-1]
    del ts
    gc.collect()
    r2 = current_rss()
    del last
    gc.collect()
    return {"rss_all_live": r1 - r0, "rss_one_live": r2 - r0, "rss_none_live": current_rss() - r0}


def heap_pinning(n: int = 200, nbytes: int = 100_000) -> dict:
    """The CPU's version of "reserved vs allocated", in a fresh process: allocate n tensors of nbytes
    (below glibc's mmap threshold, so they come from the heap), free all but the LAST one, then that one too.
    RSS (resident bytes) stays high while one live tensor sits at the top of the heap: the freed space below
    it is kept by the allocator — free, but not returned to the OS. glibc behaviour (Linux), with its default
    settings (any MALLOC_* variable is unset for the child); other C libraries may return memory differently."""
    n, nbytes = whole_number("n", n, 1), whole_number("nbytes", nbytes, 1)
    glibc_defaults = {k: None for k in os.environ if k.startswith("MALLOC_")}
    out, _ = run_in_subprocess(_heap_pinning_child, n, nbytes, env=glibc_defaults)
    out.update(allocated_all_live=n * (nbytes // 4) * 4, allocated_one_live=(nbytes // 4) * 4)
    return out


def time_append(tokens: int = 256, token_bytes: int = 1_536, block_size: int = 16, min_run_time: float = 0.2) -> dict:
    """Grow a per-sequence buffer one token at a time: torch.cat (a new, bigger tensor each step, as
    transformers' DynamicCache does per layer) vs writing into blocks of a preallocated pool. Default: one
    layer of SmolLM2-135M in fp32 (2 · 3 · 64 · 4 = 1,536 B per token). Bytes copied, and seconds per growth to
    `tokens` (lk.repro.time_call: the median over `min_run_time` seconds, one thread)."""
    tokens, numel = whole_number("tokens", tokens, 1), whole_number("token_bytes", token_bytes, 1) // 4
    row = torch.ones(1, numel)

    def cat():
        buf = torch.empty(0, numel)
        for _ in range(tokens):
            buf = torch.cat([buf, row])

    def pooled():
        pool = BlockPool(-(-tokens // block_size), (block_size, numel))
        table = []
        for i in range(tokens):
            if i % block_size == 0:
                table.append(pool.allocate())
            pool.storage[table[-1], i % block_size] = row[0]

    cat_s, pool_s = repro.time_call(cat, min_run_time=min_run_time), repro.time_call(pooled, min_run_time=min_run_time)
    return {"tokens": tokens, "cat_bytes_copied": numel * 4 * tokens * (tokens + 1) // 2,
            "pool_bytes_copied": numel * 4 * tokens, "cat_s": cat_s, "pool_s": pool_s, "ratio": cat_s / pool_s}
