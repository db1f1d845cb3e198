"""Tests for labkit.pool (block pool, variable allocator, compaction, serving simulation); the KV cache is in
test_kvcache.py."""
import platform
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import labkit as lk
from labkit.experiments import pool as X
from labkit.experiments.pool import heap_pinning, time_alloc, time_alloc_fresh, time_append
from labkit.pool import (BlockPool, PoolError, PoolExhausted, VariableAllocator, churn, cuda_caching_allocator_size,
                         make_requests, paged_waste_bound, sequences_that_fit, serving_comparison, simulate)


# ---------------------------------------------------------------- BlockPool
def test_block_pool_allocate_free_reuse_and_stats():
    p = BlockPool(4, (8,))
    a, b = p.allocate("s0"), p.allocate("s0")
    assert (a, b) == (0, 1) and p.num_used == 2
    p.block(a).fill_(3.0)
    assert p.storage[a].sum().item() == 24.0  # a view into the one preallocated tensor
    p.set_fill(a, 8)
    p.set_fill(b, 2)
    s = p.stats()
    assert s.utilisation == 0.5 and s.slots_filled == 10
    assert s.internal_fragmentation == pytest.approx(1 - 10 / 16) and s.external_fragmentation == 0.0
    p.free(b, owner="s0")
    assert p.allocate() == b  # LIFO: the block just freed is reused first
    p.check_invariants()


def test_block_pool_exhaustion_is_an_error_not_an_overwrite():
    p = BlockPool(2, (4,))
    x, y = p.allocate(), p.allocate()
    p.block(x).fill_(1.0)
    with pytest.raises(PoolExhausted, match="exhausted"):
        p.allocate()
    with pytest.raises(PoolExhausted, match="need 3 blocks"):
        p.allocate_many(3)
    assert p.storage[x].eq(1.0).all() and p.num_used == 2
    p.free(y)
    with pytest.raises(PoolExhausted):
        p.allocate_many(2)  # all-or-nothing
    assert p.num_free == 1


def test_block_pool_double_free_foreign_block_and_wrong_owner():
    p = BlockPool(3, (2,))
    b = p.allocate(owner="a")
    p.free(b, owner="a")
    with pytest.raises(PoolError, match="double free"):
        p.free(b)
    for bad in (-1, 3, 99, 1.5, True, "0"):
        with pytest.raises(PoolError, match="does not belong"):
            p.free(bad)
    with pytest.raises(PoolError, match="not allocated"):
        p.free(2)  # in range, but never handed out
    c = p.allocate(owner="a")
    with pytest.raises(PoolError, match="owned by"):
        p.free(c, owner="b")
    with pytest.raises(ValueError):
        BlockPool(0, (2,))
    with pytest.raises(ValueError):
        p.set_fill(c, 3)


def test_block_pool_refcounts_share_blocks():
    p = BlockPool(2, (2,))
    b = p.allocate(owner=0)
    p.share(b, owner=1)
    p.free(b, owner=0)
    assert p.num_used == 1 and p.refcount[b] == 1  # still held by owner 1
    p.free(b, owner=1)
    assert p.num_free == 2
    p.check_invariants()


def test_ten_thousand_random_operations_keep_the_pool_consistent():
    """Seeded random allocate / append / fork / free: no block owned twice, nothing leaks, stats agree."""
    rng = random.Random(0)
    bs, p = 4, BlockPool(64, (4,), torch.uint8)
    seqs: dict[int, list] = {}  # seq id → [blocks, length]
    nxt = 0
    for _ in range(10_000):
        op = rng.random()
        try:
            if op < 0.15 or not seqs:
                seqs[nxt] = [[p.allocate(owner=nxt)], 1]
                nxt += 1
            elif op < 0.75:  # append a token
                sid = rng.choice(list(seqs))
                blocks, n = seqs[sid]
                if n % bs == 0:
                    blocks.append(p.allocate(owner=sid))
                seqs[sid][1] = n + 1
            elif op < 0.85:  # fork: share every block of an existing sequence
                src = rng.choice(list(seqs))
                seqs[nxt] = [[p.share(b, owner=nxt) for b in seqs[src][0]], seqs[src][1]]
                nxt += 1
            else:
                sid = rng.choice(list(seqs))
                for b in seqs.pop(sid)[0]:
                    p.free(b, owner=sid)
        except PoolExhausted:
            sid = rng.choice(list(seqs))
            for b in seqs.pop(sid)[0]:
                p.free(b, owner=sid)
        held = [b for blocks, _ in seqs.values() for b in blocks]
        assert sorted(set(held)) == sorted(b for b in range(64) if p.refcount[b] > 0)
        assert sum(p.refcount) == len(held)
    p.check_invariants()
    for sid in list(seqs):
        for b in seqs.pop(sid)[0]:
            p.free(b, owner=sid)
    assert p.num_free == 64 and sum(p.refcount) == 0  # nothing leaked


class PagedPoolMachine(RuleBasedStateMachine):
    """Hypothesis stateful test: sequences own blocks; forks share them; frees return them."""

    @initialize(nblocks=st.integers(1, 12), bs=st.integers(1, 5))
    def setup(self, nblocks, bs):
        self.p, self.bs, self.seqs, self.nxt = BlockPool(nblocks, (bs,), torch.uint8), bs, {}, 0

    @rule()
    def new_sequence(self):
        if self.p.num_free == 0:
            with pytest.raises(PoolExhausted):
                self.p.allocate()
            return
        self.seqs[self.nxt] = [[self.p.allocate(owner=self.nxt)], 1]
        self.nxt += 1

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def append(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        blocks, n = self.seqs[sid]
        if n % self.bs == 0:
            if self.p.num_free == 0:
                with pytest.raises(PoolExhausted):
                    self.p.allocate(owner=sid)
                return
            blocks.append(self.p.allocate(owner=sid))
        self.seqs[sid][1] = n + 1
        self.p.set_fill(blocks[-1], (n % self.bs) + 1)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data):
        src = data.draw(st.sampled_from(sorted(self.seqs)))
        self.seqs[self.nxt] = [[self.p.share(b, owner=self.nxt) for b in self.seqs[src][0]], self.seqs[src][1]]
        self.nxt += 1

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free_sequence(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        blocks = self.seqs.pop(sid)[0]
        for b in blocks:
            self.p.free(b, owner=sid)
        with pytest.raises(PoolError):  # freeing the same sequence again is a double free
            for b in blocks:
                self.p.free(b, owner=sid)

    @invariant()
    def consistent(self):
        if not hasattr(self, "p"):
            return
        self.p.check_invariants()
        held = [b for blocks, _ in self.seqs.values() for b in blocks]
        assert sum(self.p.refcount) == len(held)
        assert {b for b in range(self.p.num_blocks) if self.p.refcount[b]} == set(held)
        s = self.p.stats()
        assert s.used_blocks + s.free_blocks == s.num_blocks and 0 <= s.internal_fragmentation <= 1


TestPagedPoolMachine = PagedPoolMachine.TestCase
TestPagedPoolMachine.settings = settings(max_examples=50, stateful_step_count=200, deadline=None)  # 10,000 steps


# ---------------------------------------------------------------- VariableAllocator and compaction
def test_first_fit_vs_best_fit_on_a_hand_fixture():
    # holes after frees: [0,30) size 30 and [40,50) size 10 (live: 30..40, 50..100)
    for policy, expect in (("first", 0), ("best", 40)):
        a = VariableAllocator(100, policy=policy)
        h = [a.allocate(n) for n in (30, 10, 10, 50)]
        a.free(h[0])
        a.free(h[2])
        new = a.allocate(8)
        assert a.live[new][0] == expect
        a.check_invariants()


def test_fragmented_allocator_needs_compaction_then_fits_and_keeps_data():
    a = VariableAllocator(100)
    hs = [a.allocate(10) for _ in range(10)]
    for i, h in enumerate(hs):
        a.view(h).fill_(i)
    for h in hs[::2]:
        a.free(h)
    st_ = a.stats()
    assert st_.free == 50 and st_.largest_free == 10 and st_.external_fragmentation == pytest.approx(0.8)
    with pytest.raises(PoolExhausted, match="compact"):
        a.allocate(20)
    info = a.compact()
    assert info["bytes_moved"] == 50 and info["buffers_moved"] == 5  # every live buffer slides down
    assert a.stats().largest_free == 50 and a.stats().external_fragmentation == 0.0
    for i, h in enumerate(hs):
        if i % 2:
            assert a.view(h).eq(i).all()  # handles still valid, data intact
    a.allocate(20)
    a.check_invariants()


def test_allocator_errors_and_alignment():
    a = VariableAllocator(64, align=16)
    h = a.allocate(1)
    assert a.live[h][1] == 16 and a.stats().internal_fragmentation == pytest.approx(15 / 16)
    a.free(h)
    with pytest.raises(PoolError, match="double free"):
        a.free(h)
    with pytest.raises(PoolExhausted, match="free something"):
        a.allocate(65)
    with pytest.raises(ValueError):
        VariableAllocator(10, policy="worst")
    with pytest.raises(ValueError):
        a.allocate(0)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(1, 40)), min_size=1, max_size=120),
       policy=st.sampled_from(["first", "best"]))
def test_allocator_random_ops_never_overlap_and_compaction_preserves_data(ops, policy):
    a, live = VariableAllocator(256, policy=policy), {}
    for is_alloc, n in ops:
        if is_alloc or not live:
            try:
                h = a.allocate(n)
            except PoolExhausted:
                if a.stats().free >= n:
                    a.compact()
                    h = a.allocate(n)  # after compaction the free space is one hole
                else:
                    continue
            a.view(h).fill_(h % 251)
            live[h] = n
        else:
            h = sorted(live)[n % len(live)]
            a.free(h)
            del live[h]
        a.check_invariants()
        assert (a.address_map() >= 0).sum() == sum(live.values())
    a.compact()
    for h in live:
        assert a.view(h).eq(h % 251).all()


@pytest.mark.parametrize("policy", ["first", "best"])
def test_churn_is_seeded_fragments_and_scales_with_unit(policy):
    a, c = churn(policy, seed=3)
    b, c2 = churn(policy, seed=3)
    assert c == c2 and a.live == b.live and a.holes == b.holes
    a.check_invariants()
    st = a.stats()
    assert c["failed"] > 0 and c["failed_but_enough_free"] <= c["failed"] and st.holes > 1
    big, c3 = churn(policy, seed=3, unit=8)
    assert c3 == c and big.stats().used == 8 * st.used  # the same stream, every size × 8
    m1, m8 = a.address_map(), big.address_map(stride=8)
    assert m8.shape == m1.shape and np.array_equal(m8 >= 0, m1 >= 0)


def test_cuda_caching_allocator_rounding_rules():
    assert cuda_caching_allocator_size(1)["block"] == 512
    assert cuda_caching_allocator_size(513)["block"] == 1024
    assert cuda_caching_allocator_size(1 << 20)["segment"] == 2 << 20
    assert cuda_caching_allocator_size(5 << 20)["segment"] == 20 << 20
    assert cuda_caching_allocator_size((11 << 20) + 1)["segment"] == 12 << 20


def _scripted_timer(monkeypatch, seconds):
    """lk.repro.time_call, as the module under test sees it, runs each timed function once (the work is really
    done) and returns the next of `seconds`: a scripted clock. Returns the min_run_time of each call."""
    it, asked = iter(seconds), []

    def fake_time_call(fn, *args, min_run_time=0.2, n_threads=1, **kwargs):
        fn(*args, **kwargs)
        asked.append(min_run_time)
        return next(it)
    monkeypatch.setattr(X.repro, "time_call", fake_time_call)
    return asked


def test_time_alloc_times_each_variant_per_call_with_time_call(monkeypatch):
    asked = _scripted_timer(monkeypatch, [3e-3, 1e-3])                   # plain, then pool (20 calls each)
    r = time_alloc(4096, n=20, min_run_time=0.05)
    assert r["plain_us"] == pytest.approx(3e-3 / 20 * 1e6) and r["pool_us"] == pytest.approx(1e-3 / 20 * 1e6)
    assert r["ratio"] == pytest.approx(3.0) and r["block_bytes"] == 4096 and asked == [0.05, 0.05]


def test_time_append_counts_quadratic_vs_linear_copies(monkeypatch):
    with pytest.raises(ValueError, match="min_run_time"):               # the real time_call checks it
        time_append(min_run_time=0)
    _scripted_timer(monkeypatch, [0.6, 0.2])                             # cat, then pool
    r = time_append(tokens=40, token_bytes=64, block_size=8)
    assert r["cat_bytes_copied"] == 64 * 40 * 41 // 2 and r["pool_bytes_copied"] == 64 * 40
    assert (r["cat_s"], r["pool_s"]) == pytest.approx((0.6, 0.2)) and r["ratio"] == pytest.approx(3.0)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="heap trimming is glibc behaviour")
def test_heap_pinning_one_live_tensor_keeps_the_freed_heap_resident():
    r = heap_pinning(n=100, nbytes=100_000)  # 10 MB of 100 kB tensors, all from the heap
    assert r["allocated_all_live"] == 10_000_000 and r["allocated_one_live"] == 100_000
    assert r["rss_all_live"] >= 0.8 * r["allocated_all_live"]   # pages were touched (torch.ones writes them)
    assert r["rss_one_live"] >= 0.8 * r["allocated_all_live"]   # 99 % freed, yet still resident: pinned
    assert r["rss_none_live"] <= 0.5 * r["allocated_all_live"]  # the top freed too → glibc trims the heap
    with pytest.raises(ValueError, match="≥ 1"):
        heap_pinning(n=0)
    with pytest.raises(TypeError, match="whole number"):
        time_alloc_fresh(n=2.5)


# ---------------------------------------------------------------- serving simulation
def test_simulation_paged_beats_contiguous_and_waste_is_bounded():
    r = serving_comparison(block_size=16, n=60)
    c, p = r["contiguous"], r["paged"]
    assert c["finished"] == p["finished"] == 60
    assert p["utilisation"] > c["utilisation"] and p["mean_running"] > c["mean_running"]
    assert p["throughput"] > c["throughput"] and r["fit"]["paged"] > r["fit"]["contiguous"]
    # waste per sequence ≤ (block − 1) / length, so overall waste ≤ (block − 1) / shortest length
    shortest = min(q.prompt + 1 for q in make_requests(60))
    assert p["waste"] <= paged_waste_bound(shortest, 16)
    assert set(np.unique(p["slot_map"])) <= {0, 1, 2}
    again = serving_comparison(block_size=16, n=60)["paged"]
    assert again["steps"] == p["steps"] and again["utilisation"] == p["utilisation"]


def test_simulation_preempts_cleanly_when_blocks_run_out():
    reqs = make_requests(30, seed=1, max_len=256, rate=5.0)
    r = simulate(reqs, budget_tokens=512, policy="paged", block_size=8, max_len=256)
    assert r["finished"] == 30 and r["preemptions"] > 0  # every request still completes


def test_simulation_bad_input():
    with pytest.raises(ValueError, match="policy"):
        simulate(make_requests(3), 4096, policy="magic")
    with pytest.raises(ValueError, match="cannot hold"):
        simulate(make_requests(3), 100, policy="contiguous")
    with pytest.raises(ValueError, match="max_len"):
        simulate(make_requests(3, max_len=1024), 8192, max_len=64)
    with pytest.raises(ValueError, match="dist"):
        make_requests(3, dist="zipf")


def test_sequences_that_fit_hand_fixture():
    assert sequences_that_fit([10, 20, 30], 64, "paged", block_size=16) == 2  # 1 + 2 blocks of 4 fit, 2 more not
    assert sequences_that_fit([10, 20, 30], 64, "contiguous", max_len=32) == 2


def test_pool_imports_neither_the_kv_cache_nor_the_models():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(lk.pool))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in names if "kvcache" in m or "models" in m or "experiments" in m}
