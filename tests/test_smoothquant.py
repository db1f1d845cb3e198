"""Tests for labkit.smoothquant: smoothing is an exact identity before quantization, W8A8 against a naive float64
loop, SmoothQuant beats naive W8A8 on an outlier layer, the model transforms, and bad inputs."""
import copy

import pytest
import torch

from labkit import quantize as Q
from labkit import smoothquant as SQ
from labkit.models import tiny_llama


def _outlier_layer(seed=0, n=64, d_in=48, d_out=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    x[:, [3, 17]] *= 80.0                           # two outlier channels, as in a real LLM's activations
    w = torch.randn(d_out, d_in, generator=g) * 0.05
    return x, w


def _naive_w8a8(x, w, act, s=None):
    """float64 loops: smooth, then int8 per token (or per tensor) × int8 per output row, dequantized."""
    x, w = x.double(), w.double()
    if s is not None:
        x, w = x / s.double(), w * s.double()

    def fq_rows(m):
        out = torch.empty_like(m)
        for i in range(m.shape[0]):
            scale = m[i].abs().max() / 127
            out[i] = torch.clamp(torch.round(m[i] / scale), -127, 127) * scale
        return out

    if act == "tensor":
        scale = x.abs().max() / 127
        xq = torch.clamp(torch.round(x / scale), -127, 127) * scale
    else:
        xq = fq_rows(x)
    wq = fq_rows(w)
    y = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
    for t in range(x.shape[0]):
        for o in range(w.shape[0]):
            y[t, o] = (xq[t] * wq[o]).sum()
    return y


def test_smoothing_factors_match_a_loop():
    x, w = _outlier_layer()
    w2 = torch.randn(16, 48)
    xa = x.abs().amax(0)
    for alpha in (0.0, 0.5, 0.8, 1.0):
        s = SQ.smoothing_factors(xa, [w, w2], alpha)
        for j in range(48):
            wmax = max(w[:, j].abs().max(), w2[:, j].abs().max())
            want = max(xa[j].clamp_min(SQ.EPS) ** alpha / wmax.clamp_min(SQ.EPS) ** (1 - alpha), SQ.EPS)
            assert s[j].item() == pytest.approx(float(want), rel=1e-5)
    assert torch.equal(SQ.smoothing_factors(xa, w, 0.0), 1 / w.abs().amax(0))   # α = 0: only the weight's range


def test_smoothing_alone_is_an_exact_identity_on_one_layer():
    x, w = _outlier_layer()
    s = SQ.smoothing_factors(x.abs().amax(0), w, 0.8)
    ref = x @ w.T
    assert SQ.relative_error((x / s) @ (w * s).T, ref) < 1e-5


@pytest.mark.parametrize("act", SQ.ACTS)
@pytest.mark.parametrize("alpha", [None, 0.5])
def test_w8a8_matches_the_float64_loop(act, alpha):
    x, w = _outlier_layer(1, n=12, d_in=24, d_out=10)
    s = None if alpha is None else SQ.smoothing_factors(x.abs().amax(0), w, alpha)
    got = SQ.w8a8_matmul(x, w, act, s)
    want = _naive_w8a8(x, w, act, s)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max())


def test_smoothquant_beats_naive_w8a8_on_outlier_channels():
    x, w = _outlier_layer()
    ref = x @ w.T
    naive = SQ.relative_error(SQ.w8a8_matmul(x, w, "tensor"), ref)
    smooth = SQ.relative_error(SQ.w8a8_matmul(x, w, "tensor", SQ.smoothing_factors(x.abs().amax(0), w, 0.5)), ref)
    assert smooth < naive / 3
    best, errs = SQ.search_alpha(x, w, act="tensor")
    assert errs[best] == min(errs.values()) < naive / 3
    assert set(errs) == set(SQ.ALPHAS)


def test_smooth_model_is_an_identity_in_fp32_then_w8a8():
    model = tiny_llama(0).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, :3] *= 30     # give the down_proj input some outliers
        ref = model(ids).logits
    stats = Q.linear_input_stats(model, ids)
    smoothed = copy.deepcopy(model)
    s = SQ.smooth_(smoothed, stats, 0.8)
    assert len(s) == 3 * len(model.model.layers)
    with torch.no_grad():
        out = smoothed(ids).logits
    assert SQ.relative_error(out, ref) < 1e-5                      # exact identity before quantization
    assert not torch.equal(smoothed.model.layers[0].input_layernorm.weight, model.model.layers[0].input_layernorm.weight)
    SQ.w8a8_(smoothed, "token")
    n = sum(isinstance(m, SQ.W8A8Linear) for m in smoothed.modules())
    assert n == 7 * len(model.model.layers)
    assert SQ.w8a8_bytes(smoothed) == sum(m.in_features * m.out_features + 2 * m.out_features
                                          for m in smoothed.modules() if isinstance(m, SQ.W8A8Linear))
    with torch.no_grad():
        q = smoothed(ids).logits
    assert 0 < SQ.relative_error(q, ref) < 0.2
    with pytest.raises(ValueError, match="already"):
        SQ.w8a8_(smoothed)
    per_group = {g["linears"][0]: 0.5 for g in SQ.llama_groups(model)}
    SQ.smooth_(copy.deepcopy(model), stats, per_group)             # one α per group works too


@pytest.mark.parametrize("alpha, error", [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                          (True, TypeError), ("0.5", TypeError), (None, TypeError)])
def test_bad_alpha(alpha, error):
    x, w = _outlier_layer()
    with pytest.raises(error, match=r"alpha.*\[0, 1\].*0\.5"):
        SQ.smoothing_factors(x.abs().amax(0), w, alpha)


def test_bad_shapes_and_inputs():
    x, w = _outlier_layer()
    xa = x.abs().amax(0)
    with pytest.raises(ValueError, match="one value per input channel"):
        SQ.smoothing_factors(xa[:-1], w)
    with pytest.raises(ValueError, match="different widths"):
        SQ.smoothing_factors(xa, [w, torch.randn(4, 7)])
    with pytest.raises(ValueError, match="2-D"):
        SQ.smoothing_factors(xa, torch.randn(48))
    with pytest.raises(ValueError, match="finite"):
        SQ.smoothing_factors(torch.full_like(xa, float("nan")), w)
    with pytest.raises(ValueError, match="features"):
        SQ.w8a8_matmul(x[:, :-1], w)
    with pytest.raises(ValueError, match="one factor per input channel"):
        SQ.w8a8_matmul(x, w, s=torch.ones(5))
    with pytest.raises(ValueError, match="act"):
        SQ.w8a8_matmul(x, w, act="row")
    model = tiny_llama(0).eval()
    with pytest.raises(ValueError, match="linear_input_stats"):
        SQ.smooth_(model, {}, 0.5)
    stats = Q.linear_input_stats(model, torch.randint(0, 100, (1, 8)))
    with pytest.raises(ValueError, match="one per group"):
        SQ.smooth_(model, stats, {"model.layers.0.self_attn.q_proj": 0.5})
    with pytest.raises(ValueError, match="alpha"):
        SQ.smooth_(model, stats, 2.0)
