"""AWQ (labkit.awq) against a naive float64 loop, its identities (scaling is exact before rounding; the folded
model computes what the unscaled one did), GPTQ on a whole tiny model, and the one-layer experiment."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import labkit as lk
from labkit import awq as A
from labkit import second_order as SO
from labkit.quantize import QuantConfig, QuantLinear, quantize_, quantized_linear_bytes

CFGS = [QuantConfig(3, group_size=8), QuantConfig(4), QuantConfig(3, group_size=16, symmetric=False)]


def problem(rows=24, cols=32, n=400, seed=0, correlated=False):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g, dtype=torch.float64)
    if correlated:     # real activations are correlated: what GPTQ's updates exploit (iid inputs leave it nothing)
        X = X @ (torch.eye(cols, dtype=torch.float64) + torch.randn(cols, cols, generator=g, dtype=torch.float64))
    X[:, :2] *= 20                                  # two salient input channels
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.1
    return W.float(), X


def naive_search(W, X, cfg, alphas):
    """The textbook loop, float64, straight from the outputs: for α, s = mean|x|^α / √(max·min);
    Ŵ = RTN(W·s)/s; error = ‖XWᵀ − XŴᵀ‖ / ‖XWᵀ‖."""
    ref = X @ W.double().T
    xm = X.abs().mean(0)
    out = {}
    for a in alphas:
        s = xm.clamp_min(1e-4) ** a
        s = s / torch.sqrt(s.max() * s.min())
        Wq = lk.quantize.dequantize(lk.quantize.quantize((W.double() * s).float(), cfg.bits, cfg.granularity,
                                                         cfg.group_size, cfg.symmetric)).double() / s
        out[a] = float((ref - X @ Wq.T).norm() / ref.norm())
    return out


@pytest.mark.parametrize("cfg", CFGS)
def test_search_matches_a_naive_float64_loop(cfg):
    W, X = problem()
    H = SO.hessian(X)
    r = A.search_scale([W], X.abs().mean(0), H, cfg)
    ref = naive_search(W, X, cfg, A.ALPHAS)
    for a in A.ALPHAS:
        assert r.errors[a] == pytest.approx(ref[a], rel=1e-4), a    # stated tolerance: 1e-4 relative (float32 grid)
    assert r.alpha == min(ref, key=ref.get) or ref[r.alpha] <= min(ref.values()) * (1 + 1e-4)
    assert r.errors[0.0] == pytest.approx(A.relative_error(W, A.fake_quantize(W, cfg), H), rel=1e-4)  # α=0 is RTN
    assert r.error <= r.rtn_error
    assert r.alpha > 0 and r.error < 0.9 * r.rtn_error     # salient channels: scaling helps here


def test_relative_error_equals_layer_error():
    W, X = problem()
    Wq = A.fake_quantize(W, QuantConfig(3, group_size=8))
    assert A.relative_error(W, Wq, SO.hessian(X)) == pytest.approx(SO.layer_error(W, Wq, X), rel=1e-5)


@settings(max_examples=25, deadline=None)
@given(alpha=st.floats(0, 1), seed=st.integers(0, 10_000))
def test_scaling_is_an_exact_identity_before_rounding(alpha, seed):
    W, X = problem(seed=seed)
    s = A.channel_scales(X.abs().mean(0), alpha)
    assert torch.allclose((X / s) @ (W.double() * s).T, X @ W.double().T, rtol=1e-10, atol=1e-10)
    assert float(s.max() * s.min()) == pytest.approx(1.0)


def test_clip_search_never_worse_than_no_clip_per_group():
    W, X = problem()
    H = SO.hessian(X)
    for cfg in CFGS:
        c = A.clip_search(W, H, cfg)
        assert A.relative_error(W, A.fake_quantize(c, cfg), H) <= A.relative_error(W, A.fake_quantize(W, cfg), H) + 1e-6
        assert (c.abs() <= W.abs() + 1e-7).all()          # clipping only shrinks


def _tiny(seed=0):
    m = lk.models.tiny_llama(seed=seed)      # hidden 64, 4 query heads over 2 K/V heads, MLP 128
    with torch.no_grad():   # non-trivial norms, like a trained model
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.5 * torch.rand_like(p))
    return m


def test_gqa_expand_follows_repeat_kv():
    m = _tiny()
    a = m.model.layers[0].self_attn
    e = A.gqa_expand(a)
    hd = a.head_dim
    assert e.shape == (a.o_proj.in_features,)
    assert e[:hd].tolist() == list(range(hd)) and e[hd:2 * hd].tolist() == list(range(hd))   # heads 0, 1 → kv 0
    assert e[2 * hd:3 * hd].tolist() == list(range(hd, 2 * hd))


def test_folded_model_computes_what_the_unscaled_one_did():
    m = _tiny()
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(ids).logits
    folded = copy.deepcopy(m)
    rep = A.awq_(folded, ids, QuantConfig(3, group_size=16), clip=False)
    assert set(rep) == {"model.layers.0", "model.layers.1"}
    assert set(rep["model.layers.0"]) == {"qkv", "o", "gate_up", "down"}
    changed = sum(not torch.equal(a, b) for a, b in zip(m.parameters(), folded.parameters()))
    assert changed > 0 and any(r["alpha"] > 0 for layer in rep.values() for r in layer.values())
    with torch.no_grad():
        out = folded(ids).logits
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), (out - ref).abs().max()   # fp32 tolerance


def test_awq_then_rtn_beats_rtn_on_layer_outputs_and_keeps_bytes():
    m = _tiny()
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    cfg = QuantConfig(3, group_size=16)
    stats = SO.collect_stats(m, ids)
    rtn = quantize_(copy.deepcopy(m), cfg)
    aw = copy.deepcopy(m)
    A.awq_(aw, stats, cfg)
    quantize_(aw, cfg)
    assert quantized_linear_bytes(aw) == quantized_linear_bytes(rtn)          # folding costs no byte
    with torch.no_grad():
        ref, o_rtn, o_awq = m(ids).logits, rtn(ids).logits, aw(ids).logits
    assert (o_awq - ref).norm() < (o_rtn - ref).norm()


def test_collect_stats_shares_one_accumulator_for_one_input():
    m = _tiny()
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    st_ = SO.collect_stats(m, ids)
    p = "model.layers.0."
    assert st_[p + "self_attn.q_proj"] is st_[p + "self_attn.k_proj"] is st_[p + "self_attn.v_proj"]
    assert st_[p + "mlp.gate_proj"] is st_[p + "mlp.up_proj"]
    assert st_[p + "mlp.down_proj"] is not st_[p + "mlp.up_proj"]
    assert st_[p + "self_attn.q_proj"].n == 4 * 16


def test_input_scaled_is_exact_and_quantizable():
    lin = torch.nn.Linear(32, 8)
    x = torch.randn(5, 32)
    s = torch.rand(32) + 0.5
    with torch.no_grad():
        ref = lin(x)
    model = torch.nn.Sequential(copy.deepcopy(lin))
    A.scale_input_(model, "0", s)
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-4)
    quantize_(model, QuantConfig(8), lambda mod, f: isinstance(mod, torch.nn.Linear))
    assert isinstance(model[0].linear, QuantLinear)
    with pytest.raises(ValueError, match="scales"):
        A.InputScaled(torch.nn.Linear(4, 2), torch.ones(3))


def test_gptq_whole_model_beats_rtn_and_holds_packed_codes():
    m = _tiny()
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    cfg = QuantConfig(3, group_size=16)
    g = SO.gptq_(copy.deepcopy(m), ids, cfg)                                 # sequential, layer by layer
    one_pass = SO.gptq_(copy.deepcopy(m), SO.collect_stats(m, ids), cfg)     # every Linear on fp32 inputs
    rtn = quantize_(copy.deepcopy(m), cfg)
    for model in (g, one_pass):
        assert sum(isinstance(x, QuantLinear) for x in model.modules()) == 14
        assert quantized_linear_bytes(model) == quantized_linear_bytes(rtn)
    with torch.no_grad():
        ref, o_rtn = m(ids).logits, rtn(ids).logits
        for model in (g, one_pass):
            assert (model(ids).logits - ref).norm() < (o_rtn - ref).norm()


def test_bad_inputs():
    W, X = problem()
    H = SO.hessian(X)
    with pytest.raises(TypeError, match="QuantConfig"):
        A.fake_quantize(W, SO.Grid(3, 8))
    with pytest.raises(ValueError, match="alpha"):
        A.channel_scales(X.abs().mean(0), 1.5)
    with pytest.raises(ValueError, match="input features"):
        A.search_scale([W], X.abs().mean(0), H[:4, :4], QuantConfig(3, group_size=8))
    with pytest.raises(TypeError, match="Llama"):
        A.awq_(torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.zeros(1, 4, dtype=torch.long), QuantConfig(4))
    with pytest.raises(TypeError, match="QuantConfig"):
        SO.gptq_(_tiny(), torch.zeros(1, 4, dtype=torch.long), SO.Grid(3, 8))


def test_one_layer_experiment_on_a_small_problem():
    from labkit.experiments import methods as M
    W, X = problem(cols=64, n=3000, correlated=True)   # GPTQ needs many more calibration rows than inputs
    r = M.one_layer(W, X[:2000].float(), X[2000:].float(), QuantConfig(3, group_size=16), frac=0.05)
    assert r["gptq"] < r["rtn"] and r["awq_scale"] <= r["rtn"] and r["awq"] <= r["awq_scale"] + 1e-6
    assert r["keep_salient"] < r["keep_random"]     # the salient channels are the ones with large activations
    assert r["channels_kept"] == 3


def test_methods_table_reads_the_results_shape():
    from labkit.experiments import EXPERIMENTS, methods as M
    assert EXPERIMENTS["methods"] == "labkit.experiments.methods"
    row = lambda ppl, gap=None: {"ppl": ppl, "bits_per_weight": 3.25, "gap_closed": gap}  # noqa: E731
    res = {"fp32": {"ppl": 30.0}, "settings": {"int3-g64": {"rtn": row(90.0), "gptq": row(40.0, 0.73),
                                                            "awq": row(60.0, 0.37)}}}
    t = M.table(res)["int3-g64"]
    assert t == {"fp32_ppl": 30.0, "rtn_ppl": 90.0, "bits_per_weight": 3.25, "gptq_ppl": 40.0,
                 "gptq_gap_closed": 0.73, "awq_ppl": 60.0, "awq_gap_closed": 0.37}
    assert M.config("int4-pc").granularity == "channel" and not M.config("int3-g64-asym").symmetric
    with pytest.raises(ValueError, match="unknown setting"):
        M.config("int5")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 32])
def test_fake_quantize_is_dequantize_of_quantize(bits, symmetric, group_size):
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(bits)) * 3
    q = lk.quantize.quantize(x, bits, group_size=group_size, symmetric=symmetric)
    assert torch.equal(lk.quantize.fake_quantize(x, bits, group_size=group_size, symmetric=symmetric),
                       lk.quantize.dequantize(q))
