"""Tests for labkit.quantize (notebook 02): packing, quantizers, quantize_, outliers, torchao agreement."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from labkit import quantize as Q


# ---------------------------------------------------------------- packing
@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip_exact(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = Q.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(Q.unpack_bits(packed, bits, n), codes)


def test_pack_layout_hand_computed():
    # 4 bits: two per byte, first code in the low nibble
    assert Q.pack_bits(torch.tensor([1, 2, 3, 4]), 4).tolist() == [0x21, 0x43]
    # 2 bits: four per byte
    assert Q.pack_bits(torch.tensor([3, 0, 1, 2]), 2).tolist() == [0b10_01_00_11]
    # 3 bits: eight codes in three bytes; codes 0..7 → bit stream 000 100 010 110 001 101 011 111 (LSB first)
    packed = Q.pack_bits(torch.arange(8), 3)
    assert packed.numel() == 3
    stream = sum(int(b) << (8 * i) for i, b in enumerate(packed.tolist()))
    assert [(stream >> (3 * j)) & 7 for j in range(8)] == list(range(8))


def test_pack_bad_input():
    with pytest.raises(ValueError, match="codes must lie"):
        Q.pack_bits(torch.tensor([16]), 4)
    with pytest.raises(TypeError):
        Q.pack_bits(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError):
        Q.pack_bits(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="fewer than"):
        Q.unpack_bits(torch.zeros(1, dtype=torch.uint8), 4, 3)


# ---------------------------------------------------------------- quantizers
def _bound(q, x):
    """Per-element scale/2 bound broadcast back to x's shape."""
    s = q.scales.float().unsqueeze(-1) / 2
    rows, groups = q.scales.shape
    return s.expand(rows, groups, q.numel // (rows * groups)).reshape(x.shape)


floats = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=24),
                    elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False))


@settings(max_examples=120, deadline=None)
@given(x=floats, bits=st.sampled_from(Q.SUPPORTED_BITS), symmetric=st.booleans(),
       granularity=st.sampled_from(["tensor", "channel", "group"]),
       scale_dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
def test_dequantize_error_within_half_scale(x, bits, symmetric, granularity, scale_dtype):
    x = torch.from_numpy(x)
    gs = None
    if granularity == "group":
        gs = next(d for d in (4, 3, 2, 1) if x.shape[1] % d == 0)
    q = Q.quantize(x, bits, granularity, gs, symmetric, scale_dtype)
    d = Q.dequantize(q)
    assert d.shape == x.shape and d.dtype == x.dtype
    err = (d - x).abs()
    tol = _bound(q, x) * (1 + 1e-5) + 1e-6 * x.abs().max() + 1e-30
    assert (err <= tol).all(), float((err - tol).max())
    assert q.nbytes == q.expected_nbytes()
    codes = q.codes()
    assert int(codes.max()) < 2**bits


def test_symmetric_per_channel_matches_naive_loop():
    torch.manual_seed(0)
    w = torch.randn(5, 12)
    q = Q.quantize(w, 8, "channel", scale_dtype=torch.float32)
    for r in range(5):
        s = w[r].abs().max().item() / 127
        for c in range(12):
            code = max(-127, min(127, round(w[r, c].item() / s)))
            assert abs(Q.dequantize(q)[r, c].item() - code * s) < 1e-6


def test_asymmetric_uses_min_and_all_levels():
    x = torch.tensor([[0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.25, 4.25]])
    q = Q.quantize(x, 4, "channel", symmetric=False, scale_dtype=torch.float32)
    assert q.zeros.item() == 0.5 and q.scales.item() == pytest.approx(0.25)
    assert torch.allclose(Q.dequantize(q), x)  # all on the grid 0.5 + 0.25·k → exact


def test_bytes_in_memory_and_on_disk(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    for bits in Q.SUPPORTED_BITS:
        for kw in (dict(granularity="channel"), dict(group_size=32)):
            q = Q.quantize(w, bits, **kw)
            n_groups = 64 if "granularity" in kw else 64 * 256 // 32
            assert q.nbytes == w.numel() * bits // 8 + 2 * n_groups  # codes + fp16 scales
            size = Q.save_qtensor(q, tmp_path / "q.safetensors")
            assert q.nbytes < size < q.nbytes + 1024  # only the safetensors header on top
    assert Q.quantize(w, 4, group_size=32).bits_per_value() == pytest.approx(4.5)
    assert Q.quantize(w, 4, group_size=32, symmetric=False).bits_per_value() == pytest.approx(5.0)


def test_quantize_bad_input():
    w = torch.randn(4, 10)
    with pytest.raises(ValueError, match="not supported"):
        Q.quantize(w, bits=5)
    with pytest.raises(ValueError, match="does not divide"):
        Q.quantize(w, bits=4, group_size=3)
    with pytest.raises(TypeError, match="floating-point"):
        Q.quantize(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(TypeError):
        Q.quantize([1.0, 2.0])
    with pytest.raises(ValueError, match="inf or NaN"):
        Q.quantize(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="granularity"):
        Q.quantize(w, granularity="row")
    with pytest.raises(ValueError, match="overflow"):
        Q.quantize(torch.tensor([[1e7, 1.0]]), bits=2)
    with pytest.raises(ValueError):
        Q.QuantConfig(bits=6)
    with pytest.raises(ValueError, match="group_size"):
        Q.QuantConfig(bits=4, granularity="group")


# ---------------------------------------------------------------- quantize_ on a model
class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.fc = nn.Linear(32, 64)
        self.norm = nn.LayerNorm(64)
        self.out = nn.Linear(64, 32)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.out(self.norm(self.fc(self.emb(ids)))))


def test_quantize_swaps_linears_skips_tied_head():
    torch.manual_seed(0)
    m = Tied()
    ids = torch.randint(0, 50, (2, 7))
    ref = m(ids).detach()
    Q.quantize_(m, Q.QuantConfig(bits=8))
    assert isinstance(m.fc, Q.QuantLinear) and isinstance(m.out, Q.QuantLinear)
    assert isinstance(m.head, nn.Linear) and m.head.weight is m.emb.weight
    y = m(ids).detach()
    assert (y - ref).norm() / ref.norm() < 0.02
    b = Q.quantized_linear_bytes(m)
    assert b["layers"] == 2 and b["codes_bytes"] == 32 * 64 + 64 * 32
    assert b["scale_bytes"] == 2 * (64 + 32)
    state = m.state_dict()
    assert state["fc.packed"].dtype == torch.uint8 and "fc.scales" in state


def test_quantize_bad_layers():
    m = Tied()
    with pytest.raises(TypeError, match="only swap nn.Linear"):
        Q.quantize_(m, Q.QuantConfig(bits=8), lambda mod, fqn: fqn in ("fc", "norm"))
    assert isinstance(m.fc, nn.Linear)  # nothing changed on error
    with pytest.raises(ValueError, match="does not divide in_features"):
        Q.quantize_(m, Q.QuantConfig(bits=4, group_size=24), lambda mod, fqn: fqn == "fc")
    with pytest.raises(TypeError, match="QuantConfig"):
        Q.quantize_(m, {"bits": 8})
    Q.quantize_(m, Q.QuantConfig(bits=4, group_size=16))
    with pytest.raises(ValueError, match="already quantized"):
        Q.quantize_(m, Q.QuantConfig(bits=8), lambda mod, fqn: fqn == "fc")


def test_quantize_tiny_llama_ordering():
    import labkit as lk
    model = lk.models.tiny_llama(seed=0)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    errs = {}
    for cfg in (Q.QuantConfig(8), Q.QuantConfig(4, group_size=16), Q.QuantConfig(4), Q.QuantConfig(2)):
        import copy
        m = Q.quantize_(copy.deepcopy(model), cfg)
        with torch.no_grad():
            errs[cfg.name] = float((m(ids).logits - ref).norm() / ref.norm())
    assert errs["int8-pc"] < errs["int4-g16"] < errs["int4-pc"] < errs["int2-pc"]
    assert errs["int8-pc"] < 0.01


# ---------------------------------------------------------------- Q4_1 origin, formats
def test_distinct_per_block():
    w = torch.tensor([[1.0, 1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 5.0]])
    assert Q.distinct_per_block(w, 4).tolist() == [3, 1]
    # a Q4_1-style block: min + scale·code, 16 codes at most
    codes = torch.randint(0, 16, (10, 32)).float()
    assert (Q.distinct_per_block(0.1 + 0.03 * codes, 32) <= 16).all()


def test_float_formats_and_cast_error():
    rows = {r["name"]: r for r in Q.float_formats()}
    assert rows["bf16"]["eps"] == 2**-7 and rows["fp16"]["eps"] == 2**-10 and rows["fp16"]["max"] == 65504
    e = Q.cast_error(torch.tensor([1e5, 1e-9, 1.0]), torch.float16)
    assert e["overflow"] == 1 and e["flushed_to_zero"] == 1
    e = Q.cast_error(torch.tensor([1e5, 1e-9, 1.0]), torch.bfloat16)
    assert e["overflow"] == 0 and e["flushed_to_zero"] == 0 and e["max_rel_error"] <= 2**-8


# ---------------------------------------------------------------- outliers
def test_mixed_int8_keeps_outlier_columns_exact():
    torch.manual_seed(0)
    x = torch.randn(16, 64)
    x[:, 5] *= 40  # an outlier feature
    w = torch.randn(32, 64) * 0.05
    e = Q.int8_matmul_errors(x, w, threshold=6.0)
    assert e["outlier_columns"] >= 1
    assert e["mixed"] < e["per_tensor"]
    assert e["normal_error_scale_without_outliers"] < e["normal_error_scale_with_outliers"]
    assert 0 < e["normal_zeroed_with_outliers"] <= 1
    # no outliers above the threshold → identical to per-token int8
    y, n = Q.mixed_int8_matmul(x, w, threshold=1e9)
    assert n == 0
    assert torch.allclose(y, Q.fake_quant_per_token(x) @ Q.fake_quant_per_token(w).T)


def test_linear_input_stats_hooks():
    m = Tied()
    ids = torch.randint(0, 50, (1, 9))
    st_ = Q.linear_input_stats(m, ids, keep=["out"])
    assert set(st_) == {"fc", "out", "head"}
    assert st_["out"]["inputs"].shape == (9, 64)
    assert torch.allclose(st_["out"]["feature_absmax"], st_["out"]["inputs"].abs().amax(0))


# ---------------------------------------------------------------- real libraries
def test_labkit_int8_matches_torchao():
    torch.manual_seed(0)
    lin = nn.Linear(128, 48)
    ao = Q.torchao_int8_weight(lin)
    q = Q.quantize(lin.weight, 8, "channel", scale_dtype=torch.float32)
    ours = Q.dequantize(q)
    # torchao: scale = absmax/127.5 over [-128, 127]; labkit: absmax/127 over [-127, 127] → within one step
    assert torch.allclose(ao["scale"], lin.weight.abs().amax(1) / 127.5, rtol=1e-5)
    step = q.scales.float()
    assert ((ours - ao["dequantized"]).abs() <= step * 1.01).all()
    x = torch.randn(4, 128)
    ref = lin(x)
    y_ao, y_lk = ao["module"](x), nn.functional.linear(x, ours, lin.bias)
    rel = lambda y: float((y - ref).norm() / ref.norm())  # noqa: E731
    assert rel(y_ao) < 0.01 and rel(y_lk) < 0.01  # int8 error ≈ step/√12 per weight ≈ 0.4% here
    assert float((y_ao - y_lk).norm() / ref.norm()) < 0.01


def test_torchao_int4_runs_on_cpu_and_matches_fp32():
    lin = nn.Linear(256, 64, bias=False)
    x = torch.randn(3, 256)
    ref = lin(x).detach()
    m = Q.torchao_quantize_(nn.Sequential(lin), "int4 weight-only", 64, lambda mod, fqn: fqn == "0")
    assert type(m[0].weight).__name__ == "Int4OpaqueTensor"
    y = m(x.to(torch.bfloat16)).float()
    assert float((y - ref).norm() / ref.norm()) < 0.12
    from labkit.memory import tensor_bytes
    assert tensor_bytes(m) == 256 * 64 // 2 + (256 // 64) * 64 * 2 * 2      # codes + bf16 scale & zero per group


def test_kernel_table_small():
    from labkit.experiments import quantize as X
    r = X.kernel_table(256, 128, batches=(1, 8), min_run_time=0.01)
    rows = r["rows"]
    for name, row in rows.items():  # every ratio is fp32's time over this path's, measured in the same run
        for b in (1, 8):
            assert row["speedup"][b] == pytest.approx(rows["fp32"]["ms"][b] / row["ms"][b], rel=1e-6), (name, b)
            assert row["ms"][b] > 0
    assert {"labkit int8 (teaching)", "labkit int4-g64 (teaching)", "torchao int8 weight-only",
            "torchao int8 dynamic", "torchao int4 weight-only", "torch.ao int8 dynamic (deprecated)"} <= set(rows)
    for name, row in rows.items():
        for b in (1, 8):
            assert row["rel_error"][b] <= X.tolerance(name), (name, b, row["rel_error"][b])
    assert rows["labkit int8 (teaching)"]["weight_bytes"] == 256 * 128 + 2 * 128
    assert rows["labkit int4-g64 (teaching)"]["weight_bytes"] == 256 * 128 // 2 + 2 * 128 * 4


def test_bandwidth_small():
    from labkit.experiments import quantize as X
    r = X.bandwidth(weight_mb=1, min_run_time=0.01)
    assert 0.1 < r["read_gb_per_s"] < 1000, r["read_gb_per_s"]  # GB/s of one core reading RAM: a sane range
    for name, v in r["paths"].items():  # each path's rate and bound come from its own bytes and time
        assert v["gb_per_s"] == pytest.approx(v["bytes"] / v["ms"] / 1e6)
        assert v["fraction_of_bound"] == pytest.approx(v["bound_ms"] / v["ms"])
    p = r["paths"]
    assert p["fp32"]["bytes"] == 4 * r["n"] ** 2 and p["bf16"]["bound_speedup"] == 2
    assert all(v["bound_ms"] == pytest.approx(v["bytes"] / r["read_gb_per_s"] / 1e6) for v in p.values())


# ---------------------------------------------------------------- packed in RAM, all-or-nothing, configs
@pytest.mark.parametrize("bits,gs,sym", [(8, None, True), (4, 32, False), (4, 16, True), (3, 32, True),
                                          (2, None, False)])
def test_quant_linear_tiles_match_the_dequantized_reference(bits, gs, sym, monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    ql = Q.QuantLinear.from_linear(lin, Q.QuantConfig(bits, group_size=gs, symmetric=sym))
    x = torch.randn(5, 96)
    ref = nn.functional.linear(x, Q.dequantize(ql.qtensor()), lin.bias)
    assert ql.tile_rows >= 40
    assert torch.allclose(ql(x), ref, atol=1e-5)
    ql.tile_rows = 7                                        # many tiles, the last one short
    assert torch.allclose(ql(x), ref, atol=1e-5)
    assert torch.equal(torch.cat([ql.rows(r, min(r + 7, 40)) for r in range(0, 40, 7)]), Q.dequantize(ql.qtensor()))
    from labkit.memory import tensor_bytes
    groups = 40 * (96 // gs if gs else 1)
    formula = 96 * 40 * bits // 8 + groups * 2 * (1 if sym else 2)
    assert ql.nbytes == formula
    assert tensor_bytes([ql.packed, ql.scales, ql.zeros] if ql.zeros is not None else [ql.packed, ql.scales]) == formula
    assert not any(t.dtype == torch.float32 and t.dim() == 2 for t in ql.buffers())


def test_quant_embedding_and_tied_head_share_the_packed_table():
    torch.manual_seed(0)
    w = torch.randn(50, 32)
    q = Q.quantize(w, 4, group_size=16, symmetric=False)
    emb = Q.QuantEmbedding(q)
    ids = torch.tensor([[3, 7, 3, 49]])
    assert torch.equal(emb(ids), Q.dequantize(q)[ids])
    head = emb.tied_head()
    assert head.packed is emb.table.packed and head.scales is emb.table.scales
    x = torch.randn(2, 32)
    assert torch.allclose(head(x), x @ Q.dequantize(q).T, atol=1e-5)
    from labkit.memory import tensor_bytes
    assert tensor_bytes(nn.ModuleList([emb, head])) == q.nbytes


def test_quant_config_is_frozen_and_type_checked():
    c = Q.QuantConfig(4, group_size=32)
    assert c.granularity == "group" and Q.QuantConfig(8).granularity == "channel"
    with pytest.raises(Exception):
        c.bits = 8
    for bad in (dict(group_size=32.5), dict(bits=4.0), dict(bits=True), dict(symmetric="no"),
                dict(scale_dtype="fp16")):
        with pytest.raises(TypeError):
            Q.QuantConfig(**{"bits": 4, **bad})
    with pytest.raises(ValueError, match="conflicts"):
        Q.QuantConfig(4, granularity="channel", group_size=32)
    with pytest.raises(ValueError):
        Q.QuantConfig(4, group_size=0)


def test_quantize_is_all_or_nothing_and_refuses_a_second_pass():
    m = Tied()
    with torch.no_grad():
        m.out.weight[0, 0] = float("nan")                  # the second layer cannot be quantized
    with pytest.raises(ValueError, match="out.*nothing was changed"):
        Q.quantize_(m, Q.QuantConfig(bits=8))
    assert isinstance(m.fc, nn.Linear) and isinstance(m.out, nn.Linear)
    with torch.no_grad():
        m.out.weight[0, 0] = 0.0
    Q.quantize_(m, Q.QuantConfig(bits=8))
    with pytest.raises(ValueError, match="already quantized"):
        Q.quantize_(m, Q.QuantConfig(bits=4))
