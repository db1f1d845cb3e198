"""Memory pools: a fixed-size block pool, a first-fit/best-fit allocator with compaction, and a serving
simulation of contiguous max-length reservation vs paging (vLLM's PagedAttention idea).

Defined in notebook 05 (memory pools); the paged KV cache that runs on `BlockPool` is in `labkit.kvcache`, the
timings (allocation cost, appends, heap pinning), sweeps and bench figures in `labkit.experiments.pool`. This
module imports neither the KV cache nor the models.
"""
from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .checks import MAX_STEPS, check, real_number, whole_number
from .memory import check_fits


class PoolExhausted(MemoryError):
    """No room left: raised instead of ever overwriting a live block."""


class PoolError(ValueError):
    """Misuse of a pool: double free, a block or handle this pool never gave out, a wrong owner."""


# ---------------------------------------------------------------- fixed-size blocks (notebook 05, §2)
@dataclass
class PoolStats:
    num_blocks: int
    used_blocks: int
    free_blocks: int
    utilisation: float             # used blocks / all blocks
    slots_filled: int              # slots (e.g. tokens) written into the used blocks
    internal_fragmentation: float  # 1 − filled slots / slots of the used blocks (slack in partly filled blocks)
    external_fragmentation: float  # always 0 for equal blocks: any free block serves any request
    bytes_total: int


class BlockPool:
    """`num_blocks` equal blocks carved out of ONE preallocated tensor [num_blocks, *block_shape].

    allocate() pops a free block id (LIFO, so a just-freed block is reused first); free() gives it back.
    Blocks are reference-counted so that sequences can share them (prefix sharing / copy-on-write).
    `block_size` is how many slots (tokens) a block holds; `set_fill` records how many are in use.
    """

    def __init__(self, num_blocks: int, block_shape=(16,), dtype=torch.float32, block_size: int | None = None):
        self.num_blocks = whole_number("num_blocks", num_blocks, 1)
        if isinstance(block_shape, (str, bytes)) or not isinstance(block_shape, (tuple, list, torch.Size)) \
                or not block_shape:
            raise ValueError(f"block_shape must be a non-empty tuple of positive ints, got {block_shape!r}")
        block_shape = tuple(whole_number("block_shape", s, 1, "a tuple of positive ints, e.g. (16,)")
                            for s in block_shape)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch dtype such as torch.float32, got {dtype!r}")
        self.block_size = whole_number("block_size", block_size or block_shape[0], 1)
        check_fits(f"a pool of {self.num_blocks} blocks of {block_shape}",
                   self.num_blocks * math.prod(block_shape) * dtype.itemsize, "use fewer or smaller blocks")
        self.storage = torch.zeros((self.num_blocks, *block_shape), dtype=dtype)
        self._free = list(range(self.num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ... first
        self.refcount = [0] * self.num_blocks
        self.fill = [0] * self.num_blocks
        self.owners: list[list] = [[] for _ in range(self.num_blocks)]
        self.n_allocs = self.n_frees = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, owner=None) -> int:
        """Return a free block id (refcount 1); PoolExhausted when none is left."""
        if not self._free:
            raise PoolExhausted(f"block pool exhausted: all {self.num_blocks} blocks are in use — free a sequence "
                                "(or preempt one), or build the pool with more blocks")
        b = self._free.pop()
        self.refcount[b], self.fill[b], self.owners[b] = 1, 0, [owner]
        self.n_allocs += 1
        return b

    def allocate_many(self, n: int, owner=None) -> list[int]:
        """All-or-nothing: n blocks, or PoolExhausted with nothing allocated."""
        n = whole_number("n", n, 0, f"blocks to allocate; this pool has {self.num_blocks}")
        if n > len(self._free):
            raise PoolExhausted(f"need {n} blocks but only {len(self._free)} of {self.num_blocks} are free — free "
                                "a sequence (or preempt one), or use a bigger pool")
        return [self.allocate(owner) for _ in range(n)]

    def _check_live(self, block) -> int:
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or not 0 <= block < self.num_blocks:
            raise PoolError(f"block {block!r} does not belong to this pool (ids are 0..{self.num_blocks - 1})")
        if self.refcount[block] == 0:
            raise PoolError(f"block {block} is not allocated (double free, or a block this pool never gave out)")
        return int(block)

    def share(self, block: int, owner=None) -> int:
        """One more reference to a live block (a second sequence reads the same prefix)."""
        b = self._check_live(block)
        self.refcount[b] += 1
        self.owners[b].append(owner)
        return b

    def free(self, block: int, owner=None) -> None:
        """Drop one reference; the block returns to the free list when none is left. Double free → PoolError."""
        b = self._check_live(block)
        if owner is not None:
            if owner not in self.owners[b]:
                raise PoolError(f"block {b} is owned by {self.owners[b]}, not by {owner!r} — free only your own blocks")
            self.owners[b].remove(owner)
        else:
            self.owners[b].pop()
        self.refcount[b] -= 1
        if self.refcount[b] == 0:
            self.fill[b] = 0
            self._free.append(b)
            self.n_frees += 1

    def block(self, block: int) -> torch.Tensor:
        """A view of a live block's memory (no copy)."""
        return self.storage[self._check_live(block)]

    def set_fill(self, block: int, n: int) -> None:
        b = self._check_live(block)
        n = whole_number("fill", n, 0, "slots in use", high=self.block_size)
        self.fill[b] = int(n)

    def stats(self) -> PoolStats:
        used = self.num_used
        filled = sum(self.fill[b] for b in range(self.num_blocks) if self.refcount[b] > 0)
        cap = used * self.block_size
        return PoolStats(self.num_blocks, used, self.num_free, used / self.num_blocks, filled,
                         (1 - filled / cap) if cap else 0.0, 0.0,
                         self.storage.numel() * self.storage.element_size())

    def check_invariants(self) -> None:
        """Every block is either free (refcount 0) or live (refcount ≥ 1), never both; none listed twice."""
        free = set(self._free)
        check(len(free) == len(self._free), "a block is on the free list twice")
        for b in range(self.num_blocks):
            check((b in free) == (self.refcount[b] == 0), f"block {b}: free-list and refcount disagree")
            check(len(self.owners[b]) == self.refcount[b], f"block {b}: owners and refcount disagree")
        check(self.n_allocs - self.n_frees == self.num_used, "allocations − frees ≠ blocks in use")


# ---------------------------------------------------------------- variable-size allocator (notebook 05, §3)
@dataclass
class AllocStats:
    capacity: int
    used: int                      # bytes handed out (after rounding to `align`)
    requested: int                 # bytes asked for
    free: int
    largest_free: int
    holes: int
    utilisation: float             # used / capacity
    internal_fragmentation: float  # (used − requested) / used: rounding slack inside allocations
    external_fragmentation: float  # 1 − largest_free / free: free memory too scattered to use


class VariableAllocator:
    """First-fit or best-fit allocation of variable sizes inside one preallocated byte tensor.

    Handles are indirect (handle → offset), so `compact()` can move live buffers and the caller's handles
    stay valid — the same trick a moving garbage collector uses.
    """

    def __init__(self, capacity: int, policy: str = "first", align: int = 1):
        self.capacity = whole_number("capacity", capacity, 1)
        check_fits(f"an arena of capacity={self.capacity} bytes", self.capacity, "pass a smaller capacity")
        if policy not in ("first", "best"):
            raise ValueError(f"policy must be 'first' or 'best', got {policy!r}")
        self.policy, self.align = policy, whole_number("align", align, 1)
        self.storage = torch.zeros(self.capacity, dtype=torch.uint8)
        self.holes: list[tuple[int, int]] = [(0, self.capacity)]  # (offset, size), sorted, coalesced
        self.live: dict[int, tuple[int, int, int]] = {}          # handle → (offset, size, requested)
        self._next = 0

    def allocate(self, nbytes: int) -> int:
        req = whole_number("nbytes", nbytes, 1, "bytes to place")
        size = -(-req // self.align) * self.align
        fits = [i for i, (_, s) in enumerate(self.holes) if s >= size]
        if not fits:
            st = self.stats()
            raise PoolExhausted(f"cannot place {size} B: {st.free} B free in {st.holes} holes, the largest "
                                f"{st.largest_free} B" + (" — external fragmentation: compact() would make room"
                                                         if st.free >= size else " — free something first"))
        i = fits[0] if self.policy == "first" else min(fits, key=lambda j: (self.holes[j][1], j))
        off, s = self.holes[i]
        if s == size:
            del self.holes[i]
        else:
            self.holes[i] = (off + size, s - size)
        h, self._next = self._next, self._next + 1
        self.live[h] = (off, size, req)
        return h

    def free(self, handle: int) -> None:
        if handle not in self.live:
            raise PoolError(f"handle {handle!r} is not live (double free, or never allocated here)")
        off, size, _ = self.live.pop(handle)
        i = bisect.bisect(self.holes, (off, size))
        self.holes.insert(i, (off, size))
        if i + 1 < len(self.holes) and off + size == self.holes[i + 1][0]:       # merge with the next hole
            self.holes[i] = (off, size + self.holes.pop(i + 1)[1])
        if i > 0 and self.holes[i - 1][0] + self.holes[i - 1][1] == off:        # merge with the previous hole
            self.holes[i - 1] = (self.holes[i - 1][0], self.holes[i - 1][1] + self.holes.pop(i)[1])

    def view(self, handle: int) -> torch.Tensor:
        if handle not in self.live:
            raise PoolError(f"handle {handle!r} is not live")
        off, _, req = self.live[handle]
        return self.storage[off:off + req]

    def compact(self) -> dict:
        """Slide every live buffer down to the lowest free address; one hole remains at the end."""
        t0, moved, n = time.perf_counter(), 0, 0
        cursor = 0
        for h, (off, size, req) in sorted(self.live.items(), key=lambda kv: kv[1][0]):
            if off != cursor:
                self.storage[cursor:cursor + size] = self.storage[off:off + size].clone()
                self.live[h] = (cursor, size, req)
                moved, n = moved + size, n + 1
            cursor += size
        self.holes = [(cursor, self.capacity - cursor)] if cursor < self.capacity else []
        return {"bytes_moved": moved, "buffers_moved": n, "seconds": time.perf_counter() - t0}

    def stats(self) -> AllocStats:
        used = sum(s for _, s, _ in self.live.values())
        req = sum(r for _, _, r in self.live.values())
        free = sum(s for _, s in self.holes)
        largest = max((s for _, s in self.holes), default=0)
        return AllocStats(self.capacity, used, req, free, largest, len(self.holes), used / self.capacity,
                          (used - req) / used if used else 0.0, (1 - largest / free) if free else 0.0)

    def address_map(self, stride: int = 1) -> np.ndarray:
        """Owner of every `stride` bytes: the handle, or −1 where free (for drawing the address space).
        With stride > 1 a cell shows a buffer if any of it lies there."""
        st = whole_number("stride", stride, 1)
        m = np.full(-(-self.capacity // st), -1, dtype=np.int64)
        for h, (off, size, _) in self.live.items():
            m[off // st:-(-(off + size) // st)] = h
        return m

    def check_invariants(self) -> None:
        spans = sorted([(o, s) for o, s, _ in self.live.values()] + self.holes)
        pos = 0
        for o, s in spans:
            check(o == pos and s > 0, f"overlap or gap at {pos}")
            pos += s
        check(pos == self.capacity, "live buffers and holes do not tile the capacity")
        for (o1, s1), (o2, _) in zip(self.holes, self.holes[1:]):
            check(o1 + s1 < o2, "adjacent holes were not merged")


def churn(policy: str = "first", capacity: int = 4096, n_ops: int = 400, seed: int = 0, min_size: int = 16,
          max_size: int = 128, unit: int = 1) -> tuple[VariableAllocator, dict]:
    """A seeded stream of allocations (sizes min_size..max_size−1, times `unit` bytes) and frees of random live
    buffers, the same stream for either policy; a request that finds no hole is counted as failed and dropped.
    Returns the allocator in its final (fragmented) state and counts of what happened (failed_but_enough_free:
    refused although the free bytes added up — external fragmentation)."""
    seed = whole_number("seed", seed, 0, "any whole number ≥ 0")
    min_size = whole_number("min_size", min_size, 1, "the smallest request, in units")
    max_size = whole_number("max_size", max_size, min_size + 1, "more than min_size (sizes are min_size..max_size−1)")
    unit = whole_number("unit", unit, 1, "bytes per size unit, e.g. 1")
    capacity = whole_number("capacity", capacity, 1, "the arena, in units")
    n_ops = whole_number("n_ops", n_ops, 1, "operations to simulate", high=MAX_STEPS)
    rng = np.random.default_rng(seed)
    a = VariableAllocator(capacity * unit, policy)
    live, failed, fragmented, done = [], 0, 0, 0
    for _ in range(n_ops):
        r, size = rng.random(), int(rng.integers(min_size, max_size)) * unit   # both drawn every step
        if live and r < 0.4:
            a.free(live.pop(int(r / 0.4 * len(live))))
        else:
            try:
                live.append(a.allocate(size))
                done += 1
            except PoolExhausted:
                failed += 1
                fragmented += a.stats().free >= size
    return a, {"allocations": done, "failed": failed, "failed_but_enough_free": fragmented, "live": len(live)}


# ---------------------------------------------------------------- the GPU's allocator (notebook 05, §1)
def cuda_caching_allocator_size(nbytes: int) -> dict:
    """How PyTorch's CUDA caching allocator rounds a request (c10/cuda/CUDACachingAllocator.cpp defaults).

    Blocks are multiples of 512 B; requests ≤ 1 MiB come from 2 MiB "small" segments, 1–10 MiB from 20 MiB
    segments, larger ones get their own segment rounded up to 2 MiB. Model of the rules — on a CPU there is
    no caching allocator to measure.
    """
    n = whole_number("nbytes", nbytes, 1)
    block = max(512, -(-n // 512) * 512)
    mib = 1 << 20
    if block <= mib:
        segment = 2 * mib
    elif block < 10 * mib:
        segment = 20 * mib
    else:
        segment = -(-block // (2 * mib)) * 2 * mib
    return {"requested": n, "block": block, "segment": segment, "rounding_waste": block - n}


# ---------------------------------------------------------------- serving simulation (notebook 05, §5)
@dataclass
class Request:
    rid: int
    arrival: int   # step at which it arrives
    prompt: int    # prompt tokens
    output: int    # tokens to generate (unknown to the server in advance)


DISTRIBUTIONS = ("uniform", "short", "longtail")


def make_requests(n: int = 200, seed: int = 0, dist: str = "uniform", max_len: int = 1024,
                  rate: float = 0.5) -> list[Request]:
    """n seeded requests arriving as a Poisson process (`rate` per step); prompt + output ≤ max_len."""
    n = whole_number("n", n, 1, "requests", high=MAX_STEPS)
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {DISTRIBUTIONS}, got {dist!r}")
    shortest = 64 if dist == "short" else 16   # room for prompts and outputs of at least 8 tokens each
    max_len = whole_number("max_len", max_len, shortest, f"tokens per request; at least {shortest} for {dist!r}")
    seed = whole_number("seed", seed, 0, "any whole number ≥ 0")
    if real_number("rate", rate, "requests arriving per step, e.g. 0.5", low=0) == 0:
        raise ValueError("rate must be > 0 requests per step (e.g. 0.5), got 0")
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {DISTRIBUTIONS}, got {dist!r}")
    rng = np.random.default_rng(seed)
    half = max_len // 2
    if dist == "uniform":
        p, o = rng.integers(8, half + 1, n), rng.integers(8, half + 1, n)
    elif dist == "short":
        p, o = rng.integers(8, half // 4 + 1, n), rng.integers(8, half // 4 + 1, n)
    else:  # most short, a few near the limit (lognormal, like real chat traffic)
        p = np.clip(rng.lognormal(math.log(half / 6), 0.9, n), 8, half).astype(int)
        o = np.clip(rng.lognormal(math.log(half / 6), 0.9, n), 8, half).astype(int)
    arrivals = np.floor(np.cumsum(rng.exponential(1 / rate, n))).astype(int)
    return [Request(i, int(a), int(pi), int(oi)) for i, (a, pi, oi) in enumerate(zip(arrivals, p, o))]


def simulate(requests: list[Request], budget_tokens: int, policy: str = "paged", block_size: int = 16,
             max_len: int = 1024, snapshot_step: int | None = None) -> dict:
    """Step a decoding server until every request is done; one new token per running sequence per step.

    contiguous: a request reserves max_len slots on admission (the server cannot know its output length).
    paged: blocks of `block_size` slots are taken as tokens arrive and freed when the request finishes; when
    a block is needed and none is free, the newest running request is preempted (its blocks freed, it
    restarts later — vLLM's recompute preemption). Nothing is ever overwritten.
    Returns utilisation (token slots holding real tokens / slots reserved), waste, occupancy (real tokens /
    budget), mean and peak sequences running, throughput (finished output tokens per step), and a slot map
    (0 free, 1 reserved but empty, 2 a real token) at `snapshot_step` (default: the busiest step).
    """
    if policy not in ("contiguous", "paged"):
        raise ValueError(f"policy must be 'contiguous' or 'paged', got {policy!r}")
    budget, bs = whole_number("budget_tokens", budget_tokens, 1), whole_number("block_size", block_size, 1)
    max_len = whole_number("max_len", max_len, 1, "the longest a request may grow, in tokens")
    if snapshot_step is not None:
        whole_number("snapshot_step", snapshot_step, 0, "a step, or None for the busiest one")
    if isinstance(requests, (str, bytes)) or not isinstance(requests, (list, tuple)) or not requests \
            or not all(isinstance(r, Request) for r in requests):
        raise TypeError("requests must be a non-empty list of pool.Request, e.g. make_requests(200)")
    check_fits(f"a token budget of {budget} slots", 2 * budget, "pass a smaller budget_tokens")
    for r in requests:
        if r.prompt + r.output > max_len:
            raise ValueError(f"request {r.rid} needs {r.prompt + r.output} tokens > max_len={max_len}")
    if policy == "contiguous":
        if budget < max_len:
            raise ValueError(f"budget_tokens={budget} cannot hold even one max_len={max_len} reservation")
        alloc = VariableAllocator(budget)
    else:
        pool = BlockPool(budget // bs, (1,), torch.uint8, block_size=bs)
    pending = sorted(requests, key=lambda r: (r.arrival, r.rid))
    waiting: list[Request] = []
    running: list[dict] = []  # in admission order
    step = done = useful = preemptions = 0
    sum_tokens = sum_reserved = sum_running = peak = 0
    snap, snap_best = None, -1
    max_steps = 10 * sum(r.prompt + r.output for r in requests) + 1000

    def release(s):
        if policy == "contiguous":
            alloc.free(s["h"])
        else:
            for b in s["blocks"]:
                pool.free(b, owner=s["r"].rid)

    def slot_map():
        m = np.zeros(budget, dtype=np.int8)
        for s in running:
            if policy == "contiguous":
                off = alloc.live[s["h"]][0]
                m[off:off + max_len], m[off:off + s["len"]] = 1, 2
            else:
                for k, b in enumerate(s["blocks"]):
                    filled = min(bs, s["len"] - k * bs)
                    m[b * bs:(b + 1) * bs], m[b * bs:b * bs + filled] = 1, 2
        return m

    while pending or waiting or running:
        if step > max_steps:
            raise RuntimeError("simulation made no progress (budget too small for the longest request?)")
        while pending and pending[0].arrival <= step:
            waiting.append(pending.pop(0))
        while waiting:  # FCFS admission: prefill the prompt and produce the first token
            r = waiting[0]
            if policy == "contiguous":
                try:
                    s = {"r": r, "h": alloc.allocate(max_len), "len": r.prompt + 1, "gen": 1}
                except PoolExhausted:
                    break
            else:
                need = -(-(r.prompt + 1) // bs)
                if need > pool.num_free:
                    break
                s = {"r": r, "blocks": pool.allocate_many(need, owner=r.rid), "len": r.prompt + 1, "gen": 1}
            running.append(waiting.pop(0))
            running[-1] = s
        for s in list(running):  # decode one token each
            if s not in running or s["gen"] >= s["r"].output:
                continue
            if policy == "paged" and s["len"] % bs == 0:
                while pool.num_free == 0:  # preempt the newest request (maybe s itself)
                    victim = running.pop()
                    release(victim)
                    waiting.insert(0, victim["r"])
                    preemptions += 1
                    if victim is s:
                        break
                if s not in running:
                    continue
                s["blocks"].append(pool.allocate(owner=s["r"].rid))
            s["len"] += 1
            s["gen"] += 1
        tokens = sum(s["len"] for s in running)
        reserved = len(running) * max_len if policy == "contiguous" else pool.num_used * bs
        if policy == "paged":  # waste lives only in each sequence's last block
            check(reserved - tokens <= len(running) * (bs - 1), "paged waste exceeded (block-1) per sequence")
        sum_tokens, sum_reserved, sum_running = sum_tokens + tokens, sum_reserved + reserved, sum_running + len(running)
        peak = max(peak, len(running))
        if (snapshot_step is None and tokens > snap_best) or step == snapshot_step:
            snap, snap_best = slot_map(), tokens
        for s in [s for s in running if s["gen"] >= s["r"].output]:
            running.remove(s)
            release(s)
            done, useful = done + 1, useful + s["r"].output
        step += 1
    util = sum_tokens / sum_reserved if sum_reserved else 0.0
    return {"policy": policy, "block_size": bs if policy == "paged" else None, "budget_tokens": budget,
            "steps": step, "finished": done, "utilisation": util, "waste": 1 - util,
            "occupancy": sum_tokens / (step * budget), "mean_running": sum_running / step, "peak_running": peak,
            "throughput": useful / step, "preemptions": preemptions, "slot_map": snap}


def sequences_that_fit(lengths, budget_tokens: int, policy: str = "paged", block_size: int = 16,
                       max_len: int = 1024) -> int:
    """How many of these sequences (in order) fit at once: max_len reservations, or blocks of block_size."""
    budget, bs = whole_number("budget_tokens", budget_tokens, 1), whole_number("block_size", block_size, 1)
    max_len = whole_number("max_len", max_len, 1, "the reservation per sequence, in tokens")
    if policy not in ("contiguous", "paged"):
        raise ValueError(f"policy must be 'contiguous' or 'paged', got {policy!r}")
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, (list, tuple, np.ndarray)):
        raise TypeError(f"lengths must be a list of sequence lengths in tokens, got {type(lengths).__name__}")
    lengths = [whole_number("lengths", L, 0, "tokens per sequence") for L in lengths]
    if policy == "contiguous":
        return min(len(lengths), budget // max_len)
    free, n = budget // bs, 0
    for L in lengths:
        need = -(-int(L) // bs)
        if need > free:
            break
        free, n = free - need, n + 1
    return n


def paged_waste_bound(length: int, block_size: int) -> float:
    """Largest fraction of a sequence's slots that paging can waste: (block − 1) / length."""
    length = whole_number("length", length, 1, "tokens in the sequence")
    block_size = whole_number("block_size", block_size, 1, "slots per block, e.g. 16")
    return (block_size - 1) / length


def serving_comparison(block_size: int = 16, dist: str = "uniform", n: int = 200, seed: int = 0,
                       budget_tokens: int = 8192, max_len: int = 1024) -> dict:
    """Contiguous vs paged on the same seeded requests and budget (the widget's pure function)."""
    reqs = make_requests(n, seed=seed, dist=dist, max_len=max_len)
    out = {"contiguous": simulate(reqs, budget_tokens, "contiguous", max_len=max_len),
           "paged": simulate(reqs, budget_tokens, "paged", block_size=block_size, max_len=max_len)}
    lengths = [r.prompt + r.output for r in reqs]
    out["fit"] = {p: sequences_that_fit(lengths, budget_tokens, p, block_size, max_len)
                  for p in ("contiguous", "paged")}
    out["mean_length"] = float(np.mean(lengths))
    return out
