"""Tests for labkit.experiments.library_methods: torchao's prototypes run (or fail, recorded word for word) on the
CPU on small layers, labkit's SmoothQuant agrees with torchao's, and the cached results hold what notebook 02 shows."""
import pytest
import torch
from torch import nn

from labkit import quantize as Q
from labkit import smoothquant as SQ
from labkit.experiments import library_methods as L
from labkit.experiments import names
from labkit.models import tiny_llama


def _layer(seed=0, d_in=128, d_out=64, n=96):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g) * 0.05)
    x = torch.randn(2 * n, d_in, generator=g)
    x[:, [5, 40]] *= 60.0
    return lin, x[:n], x[n:]


def test_registered_as_a_results_command():
    assert "library_methods" in names("results") and "library_methods" in names("bench")


def test_torchao_smoothquant_runs_on_cpu_and_agrees_with_labkit():
    lin, xc, xv = _layer()
    ao = L.torchao_smoothquant(lin, xc, xv, 0.5)
    assert ao["runs_on_cpu"], ao
    assert ao["weight_type"] == "Int8Tensor"
    assert ao["bytes"] >= 128 * 64                                   # int8 codes at least
    s = SQ.smoothing_factors(xc.abs().amax(0), lin.weight, 0.5)
    ours = SQ.relative_error(SQ.w8a8_matmul(xv, lin.weight, "token", s), xv @ lin.weight.detach().T)
    assert ao["error"] < 0.05 and ours < 0.05
    xs, ws = xv / s, lin.weight.detach() * s                          # torchao's grid: max/127.5, codes −128…127
    on_its_grid = SQ.relative_error(L.fake_quant_torchao_grid(xs) @ L.fake_quant_torchao_grid(ws).T,
                                    xv @ lin.weight.detach().T)
    assert on_its_grid == pytest.approx(ao["error"], rel=0.02)         # the whole difference is the rounding grid


def test_torchao_gptq_failure_is_recorded_word_for_word():
    lin, xc, xv = _layer()
    r = L.torchao_gptq(lin, xc, xv, "int8")
    if r["runs_on_cpu"]:
        pytest.skip("this torchao runs GPTQ on the CPU; the cached results must then be regenerated")
    assert r["exception"] and r["message"] and r["step"] in ("observe", "convert", "forward", "config")
    assert r["raised_at"].startswith("torchao/") and ":" in r["raised_at"]


def test_torchao_awq_int4_cpu_runs_in_bf16():
    lin, xc, xv = _layer()
    awq = L.torchao_awq(lin, xc, xv, "int4-cpu")
    rtn = L.torchao_awq(lin, xc, xv, "int4-cpu", awq=False)
    assert awq["runs_on_cpu"] and rtn["runs_on_cpu"], (awq, rtn)
    assert awq["weight_type"] == "Int4OpaqueTensor" and awq["activation_dtype"] == "bfloat16"
    assert awq["error"] < 0.2 and rtn["error"] < 0.2


def test_failure_records_type_message_and_place():
    try:
        raise ValueError("boom")
    except ValueError as e:
        r = L._failure(e, "convert")
    assert r == {"runs_on_cpu": False, "step": "convert", "exception": "ValueError", "message": "boom",
                 "raised_at": r["raised_at"]} and r["raised_at"].endswith(".py:" + r["raised_at"].split(":")[-1])


def test_outlier_layers_and_layer_rows_on_a_tiny_llama():
    model = tiny_llama(0).eval()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[:, :2] *= 50
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    groups = SQ.llama_groups(model)
    firsts = [g["linears"][0] for g in groups]
    smoothable = {n for g in groups for n in g["linears"]}
    stats = Q.linear_input_stats(model, ids, keep=firsts)
    layers = L.outlier_layers(stats, 2, smoothable)
    assert len(layers) == 2 and layers[0]["max_over_median"] >= layers[1]["max_over_median"]
    assert all(r["layer"] in smoothable for r in layers)
    names_ = [r["layer"] for r in layers]
    val = Q.linear_input_stats(model, ids.flip(1), names=names_, keep=names_)
    rows = L.layer_rows(model, stats, {n: v["inputs"] for n, v in stats.items() if "inputs" in v},
                        {n: v["inputs"] for n, v in val.items()}, layers)
    for r in rows:
        for act in SQ.ACTS:
            e = r[f"act_per_{act}"]
            assert set(e) == {"naive", "alpha=0.5", "alpha=0.8", "searched", "searched_alpha"}
            assert all(0 <= v < 1 for k, v in e.items() if k != "searched_alpha")


def test_cached_results_hold_the_claims():
    from labkit.repro import load_results
    try:
        r = load_results("library_methods")
    except FileNotFoundError:
        pytest.skip("run `python -m labkit results library_methods` first")
    worst = r["layers"][0]
    assert worst["max_over_median"] > 100
    t = worst["act_per_tensor"]
    assert min(t["alpha=0.5"], t["alpha=0.8"], t["searched"]) < t["naive"]
    assert {"fp32", "w8a8 per-token, naive", "w8a8 per-tensor, naive"} <= set(r["ppl"])
    lib = r["library"]
    assert lib["smoothquant"]["alpha=0.5"]["torchao"]["runs_on_cpu"]
    for k in ("torchao_int8", "torchao_int4"):
        g = lib["gptq"][k]
        assert g["runs_on_cpu"] or (g["exception"] and g["message"])
