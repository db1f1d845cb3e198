"""Tests for labkit.compress: entropy, canonical Huffman (heapq), bit-packed encode/decode, weight sharing."""
import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from labkit import compress as C
from labkit.experiments import compress as XC


def test_entropy_hand_computed():
    assert C.entropy(np.array([0, 0, 1, 1])) == pytest.approx(1.0)
    assert C.entropy(np.array([0, 0, 0, 0, 1, 1, 2, 3])) == pytest.approx(1.75)
    assert C.entropy(np.array([7, 7, 7])) == 0.0


def test_huffman_lengths_hand_computed():
    # dyadic probabilities: lengths = −log2 p and the mean equals the entropy
    freqs = {0: 4, 1: 2, 2: 1, 3: 1}
    L = C.huffman_lengths(freqs)
    assert L == {0: 1, 1: 2, 2: 3, 3: 3}
    assert C.mean_code_length(freqs, L) == pytest.approx(C.entropy(freqs=freqs))
    codes = C.canonical_codes(L)
    assert codes == {0: (0b0, 1), 1: (0b10, 2), 2: (0b110, 3), 3: (0b111, 3)}
    assert C.huffman_lengths({9: 5}) == {9: 1}


def _optimal_prefix_cost(counts: list[int]) -> int:
    """min Σ count·length over every prefix code, by brute force: any lengths with Σ 2^-length ≤ 1 (Kraft) have a
    prefix code, so the optimum is the cheapest Kraft-feasible length vector (lengths 1 … n − 1 suffice)."""
    import itertools
    n = len(counts)
    if n == 1:
        return counts[0]
    return min(sum(c * L for c, L in zip(counts, lengths))
               for lengths in itertools.product(range(1, n), repeat=n)
               if sum(2.0 ** -L for L in lengths) <= 1.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=6))
def test_huffman_is_an_optimal_prefix_code(counts):
    freqs = dict(enumerate(counts))
    lengths = C.huffman_lengths(freqs)
    assert sum(2.0 ** -L for L in lengths.values()) <= 1.0                  # a prefix code exists for them
    assert sum(c * lengths[s] for s, c in freqs.items()) == _optimal_prefix_cost(counts)


def test_canonical_code_is_prefix_free():
    rng = np.random.default_rng(0)
    freqs = {i: int(c) for i, c in enumerate(rng.integers(1, 1000, size=40))}
    codes = C.canonical_codes(C.huffman_lengths(freqs))
    words = [format(c, f"0{L}b") for c, L in codes.values()]
    for a in words:
        for b in words:
            assert a == b or not b.startswith(a)
    assert sum(2.0 ** -len(w) for w in words) == pytest.approx(1.0)  # Kraft equality: a complete code


def test_encode_bits_hand_computed():
    enc = C.huffman_encode(np.array([0, 1, 2, 3, 0], dtype=np.uint8), )
    # 0→0, 1→10, 2→110, 3→111 would need frequencies 4,2,1,1; here: 0 twice, others once
    L = C.huffman_lengths(C.frequencies(np.array([0, 1, 2, 3, 0])))
    assert enc.n_bits == sum(L[s] for s in [0, 1, 2, 3, 0])
    assert len(enc.payload) == math.ceil(enc.n_bits / 8)
    np.testing.assert_array_equal(C.huffman_decode(enc), [0, 1, 2, 3, 0])


@pytest.mark.parametrize("dist", ["uniform16", "geometric", "single", "two"])
def test_round_trip_and_within_one_bit_of_entropy(dist):
    rng = np.random.default_rng(1)
    x = {"uniform16": rng.integers(0, 16, 50_000), "geometric": rng.geometric(0.2, 50_000),
         "single": np.full(100, 3), "two": rng.integers(0, 2, 1000)}[dist]
    enc = C.huffman_encode(x)
    np.testing.assert_array_equal(C.huffman_decode(enc), x)
    H = C.entropy(x)
    assert H <= enc.bits_per_symbol < H + 1 or (dist == "single" and enc.bits_per_symbol == 1)


def test_chunk_boundaries_do_not_matter():
    x = np.random.default_rng(2).geometric(0.4, 10_001)
    a, b = C.huffman_encode(x), C.huffman_encode(x, chunk=333)
    assert a.payload == b.payload and a.n_bits == b.n_bits
    np.testing.assert_array_equal(C.huffman_decode(b), x)


def test_shapes_and_dtypes_preserved():
    x = np.random.default_rng(3).integers(0, 5, (7, 9)).astype(np.uint8)
    y = C.huffman_decode(C.huffman_encode(x))
    assert y.shape == x.shape and y.dtype == x.dtype and (y == x).all()
    t = torch.tensor([[1, 2], [2, 2]])
    assert (C.huffman_decode(C.huffman_encode(t)) == t.numpy()).all()
    empty = C.huffman_encode(np.zeros(0, np.int64))
    assert C.huffman_decode(empty).size == 0


def test_bad_input():
    with pytest.raises(TypeError, match="integers"):
        C.huffman_encode(np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="non-negative"):
        C.huffman_encode(np.array([-1, 2]))
    with pytest.raises(ValueError, match="no symbols"):
        C.huffman_lengths({})
    enc = C.huffman_encode(np.arange(100) % 7)
    enc.payload = enc.payload[: len(enc.payload) // 2]
    with pytest.raises(ValueError, match="truncated"):
        C.huffman_decode(enc)


def test_share_weights_and_compare():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=g)
    w = w * (w.abs() > w.abs().median())
    sym, book = C.share_weights(w, bits=4)
    assert sym.dtype == np.uint8 and sym.max() <= 15 and book[0] == 0
    assert ((sym == 0) == (w == 0).numpy()).all()                  # pruned zeros keep their own symbol
    err = (book[torch.from_numpy(sym).long()] - w).abs()
    assert err.mean() < 0.1 and err[w == 0].max() == 0               # 15 shared values for N(0,1) weights
    c = XC.compare(sym, bits=4)
    assert c["fixed"] == 4.0
    assert c["entropy"] <= c["huffman"] < c["entropy"] + 1
    assert set(c) >= {"zlib", "lzma", "zstd"}


def _naive_lloyd(values: list[float], k: int, iters: int = 15) -> list[float]:
    """Lloyd's algorithm written plainly: centroids from min to max, assign each value to its nearest centroid
    (the lower one on a tie), move each centroid to the mean of its values (an empty one stays), sort."""
    lo, hi = min(values), max(values)
    c = [lo + (hi - lo) * j / (k - 1) for j in range(k)] if k > 1 else [lo]
    for _ in range(iters):
        members = [[] for _ in range(k)]
        for v in values:
            members[min(range(k), key=lambda j: (abs(v - c[j]), j))].append(v)
        c = sorted(sum(m) / len(m) if m else c[j] for j, m in enumerate(members))
    return c


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_kmeans_1d_equals_a_naive_lloyd_loop(seed, k):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(300, generator=g, dtype=torch.float64) * (1 + seed)
    v[:3] = torch.tensor([8.0, -6.0, 7.5]) * (1 + seed)                      # outliers: far-away clusters
    got = C.kmeans_1d(v.float(), k)
    ref = torch.tensor(_naive_lloyd(v.float().double().tolist(), k), dtype=torch.float64)
    assert got.shape == (k,) and torch.allclose(got.double(), ref, atol=1e-4 * (1 + seed)), (got, ref)


def test_kmeans_rows_equals_kmeans_1d_row_by_row():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 200, generator=g) * torch.linspace(0.1, 3.0, 12)[:, None]   # rows of different scales
    w[w.abs() < 0.3] = 0.0                                                           # pruned positions
    w[5] = 0.0                                                                       # a fully pruned row
    w[7, 3] = 25.0                                                                   # an outlier
    got = C.kmeans_rows(w, 7)
    assert got.shape == (12, 7) and bool((got[:, 1:] >= got[:, :-1]).all())
    for r in range(12):
        vals = w[r][w[r] != 0]
        ref = C.kmeans_1d(vals, 7) if vals.numel() else torch.zeros(7)
        assert torch.allclose(got[r], ref, atol=1e-5), r
    assert got[7].max() == 25.0                       # linear initialisation: the outlier keeps its own centroid
    with pytest.raises(ValueError, match="2-D"):
        C.kmeans_rows(torch.randn(5), 3)


def test_pack_bits_hand_computed():
    assert C.pack_bits(np.array([1, 2, 15]), 4).tolist() == [0x21, 0x0F]          # two 4-bit codes per byte
    assert C.pack_bits(torch.tensor([3, 0, 1, 2]), 2).tolist() == [0b10_01_00_11]  # four 2-bit codes
    assert C.pack_bits(torch.tensor([True, False, True] + [False] * 5 + [True]), 1).tolist() == [0b101, 1]
    assert C.pack_bits(torch.arange(8), 3).numel() == 3                            # 8 codes × 3 bits = 3 bytes
    with pytest.raises(ValueError, match="codes must lie"):
        C.pack_bits(torch.tensor([16]), 4)
    with pytest.raises(TypeError, match="integer codes"):
        C.pack_bits(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="1..8"):
        C.pack_bits(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="fewer than"):
        C.unpack_bits(torch.zeros(1, dtype=torch.uint8), 4, 3)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.lists(st.integers(0, 255), max_size=70))
def test_pack_bits_round_trip(bits, xs):
    codes = torch.tensor([x % (1 << bits) for x in xs], dtype=torch.int64)
    packed = C.pack_bits(codes, bits)
    assert packed.numel() == (len(xs) * bits + 7) // 8
    assert torch.equal(C.unpack_bits(packed, bits, len(xs)).long(), codes)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=0, max_size=400))
def test_decode_encode_is_identity(xs):
    x = np.array(xs, dtype=np.int64)
    enc = C.huffman_encode(x)
    np.testing.assert_array_equal(C.huffman_decode(enc), x)
    if x.size:
        H = C.entropy(x)
        assert H - 1e-9 <= enc.bits_per_symbol <= H + 1             # = H + 1 only for a single symbol
        if len(set(xs)) > 1:
            assert enc.bits_per_symbol < H + 1


def test_layer_symbols_on_tiny_llama():
    import labkit as lk
    model = lk.models.tiny_llama(seed=0)
    sym, book = XC.layer_symbols(model, layer=1, sparsity=0.5, bits=4)
    assert sym.size == 2 * 128 * 64 and (sym == 0).mean() == 0.5
    enc = C.huffman_encode(sym)
    np.testing.assert_array_equal(C.huffman_decode(enc), sym)
    assert C.entropy(sym) <= enc.bits_per_symbol < C.entropy(sym) + 1
