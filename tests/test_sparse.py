"""Tests for labkit.sparse: round trips, exact byte formulas, agreement with torch's sparse layouts."""
import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from labkit import sparse as S
from labkit.experiments import sparse as XS

torch.manual_seed(0)


def _matrix(rows=32, cols=48, density=0.3, seed=0):
    return S.random_sparse((rows, cols), density, seed=seed)


@pytest.mark.parametrize("fmt", ["dense", "coo", "csr", "csr32", "bsr", "bitmap"])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 1.0])
def test_round_trip_and_formula(fmt, density):
    w = _matrix(density=density)
    s = S.to_format(w, fmt)
    assert torch.equal(s.to_dense(), w)
    nnz = int(torch.count_nonzero(w))
    idt = torch.int32 if fmt == "csr32" else torch.int64
    f = S.formula_bytes(fmt, w.shape, nnz, index_dtype=idt, n_blocks=getattr(s, "n_blocks", None))
    assert s.nbytes == f


def test_two_four_round_trip_and_formula():
    w = S.nm_sparse((16, 64))
    s = S.TwoFour.from_dense(w)
    assert torch.equal(s.to_dense(), w)
    assert s.nbytes == S.TwoFour.formula_bytes(w.shape) == 16 * 32 * 4 + 16 * 64 // 8
    # groups with fewer than 2 nonzeros are fine too (explicit zeros are stored)
    w[:, :8] = 0
    w[0, 9:12] = 0
    assert torch.equal(S.TwoFour.from_dense(w).to_dense(), w)


def test_two_four_metadata_is_two_bits_per_kept_value():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0]])
    s = S.TwoFour.from_dense(w)
    assert s.values.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert s.positions().reshape(-1).tolist() == [1, 3, 0, 3]
    assert s.meta.tolist() == [1 | (3 << 2) | (0 << 4) | (3 << 6)]


def test_against_torch_coo_csr_bsr():
    w = _matrix(32, 48, 0.2, seed=3)
    coo, tcoo = S.COO.from_dense(w), w.to_sparse_coo().coalesce()
    assert torch.equal(coo.indices, tcoo.indices()) and torch.equal(coo.values, tcoo.values())
    csr, tcsr = S.CSR.from_dense(w), w.to_sparse_csr()
    assert torch.equal(csr.crow_indices, tcsr.crow_indices())
    assert torch.equal(csr.col_indices, tcsr.col_indices())
    assert torch.equal(csr.values, tcsr.values())
    wb = S.random_sparse((32, 48), 0.3, seed=1, blocksize=(4, 8))
    bsr, tbsr = S.BSR.from_dense(wb, blocksize=(4, 8)), wb.to_sparse_bsr((4, 8))
    assert torch.equal(bsr.crow_indices, tbsr.crow_indices())
    assert torch.equal(bsr.col_indices, tbsr.col_indices())
    assert torch.equal(bsr.values, tbsr.values())
    assert torch.equal(bsr.to_torch().to_dense(), wb)


def test_torch_matmul_matches_dense():
    w, x = _matrix(64, 64, 0.2), torch.randn(64, 8)
    for s in (S.CSR.from_dense(w), S.CSR.from_dense(w, index_dtype=torch.int32), S.BSR.from_dense(w, (8, 8))):
        torch.testing.assert_close(s @ x, w @ x)


def test_headline_bytes_per_nonzero_and_break_even():
    assert S.bytes_per_nonzero("coo") == 20 and S.bytes_per_nonzero("csr") == 12 and S.bytes_per_nonzero("csr32") == 8
    assert S.storage_break_even("coo") == pytest.approx(0.2, abs=1e-3)
    assert S.storage_break_even("csr") == pytest.approx(1 / 3, abs=1e-3)
    assert S.storage_break_even("csr32") == pytest.approx(0.5, abs=1e-3)
    assert S.storage_break_even("2:4") == 0.5
    assert S.TwoFour.formula_bytes((4096, 4096)) / S.Dense.formula_bytes((4096, 4096)) == 2.125 / 4


def test_bad_input():
    with pytest.raises(ValueError, match="divisible by blocksize"):
        S.BSR.from_dense(torch.zeros(10, 12), blocksize=(4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        S.CSR.from_dense(torch.zeros(4, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        S.CSR.from_dense([[1.0, 0.0]])
    with pytest.raises(ValueError, match="2-D"):
        S.COO.from_dense(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="index_dtype"):
        S.CSR.from_dense(torch.zeros(4, 4), index_dtype=torch.int16)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        S.TwoFour.from_dense(torch.ones(4, 8))
    with pytest.raises(ValueError, match="multiple of 4"):
        S.TwoFour.from_dense(torch.zeros(4, 6))
    with pytest.raises(ValueError, match="unknown format"):
        S.to_format(torch.zeros(4, 4), "ell")
    with pytest.raises(ValueError, match="density"):
        S.random_sparse((4, 4), 1.5)


def test_crossover_interpolation():
    assert XS.crossover([0.1, 0.2, 0.3], [0.5, 0.8, 1.2]) == pytest.approx(0.25)
    assert math.isnan(XS.crossover([0.1, 0.2], [0.5, 0.8]))


def test_speed_crossover_is_loosely_where_expected():
    sw = XS.speed_sweep(densities=(0.01, 0.05, 0.2, 0.6), n=1024, k=64, min_run_time=0.05)
    assert sw["rows"][0]["csr_ratio"] < 1.0 < sw["rows"][-1]["csr_ratio"]
    assert 0.01 <= sw["csr_crossover"] <= 0.6


@st.composite
def sparse_matrices(draw):
    rows = draw(st.integers(1, 12))
    cols = draw(st.integers(1, 3)) * 4
    vals = draw(st.lists(st.one_of(st.just(0.0), st.floats(-1e6, 1e6, allow_nan=False, width=32)),
                         min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(vals, dtype=torch.float32).reshape(rows, cols)


@settings(max_examples=60, deadline=None)
@given(sparse_matrices(), st.sampled_from(["dense", "coo", "csr", "csr32", "bitmap", "bsr"]))
def test_every_format_round_trips_exactly(w, fmt):
    bs = (1, 4)
    s = S.to_format(w, fmt, blocksize=bs)
    assert torch.equal(s.to_dense(), w)
    idt = torch.int32 if fmt == "csr32" else torch.int64
    assert s.nbytes == S.formula_bytes(fmt, w.shape, int(torch.count_nonzero(w)), index_dtype=idt, blocksize=bs,
                                       n_blocks=getattr(s, "n_blocks", None))


@settings(max_examples=40, deadline=None)
@given(sparse_matrices())
def test_two_four_round_trips_exactly(w):
    g = w.reshape(w.shape[0], -1, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
    w24 = (g * keep).reshape(w.shape)
    s = S.TwoFour.from_dense(w24)
    assert torch.equal(s.to_dense(), w24) and s.nbytes == S.TwoFour.formula_bytes(w.shape)
