"""Tests for labkit.capstone and labkit.compressed_format: recipes, stored formats, export / load_compressed on a
tiny Llama, checksums, the Pareto frontier, budgets and the `compress` command."""
import json
import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from labkit import capstone as K
from labkit import compressed_format
from labkit import quantize as Q
from labkit.__main__ import main
from labkit.experiments.capstone import compress_for_budget
from labkit.models import tiny_llama
from labkit.storage import ChecksumError

IDS = torch.tensor([[5, 17, 42, 99, 3, 200, 7, 64]])
RECIPES = [K.Recipe(), K.Recipe(0.5), K.Recipe(quant="int", bits=8), K.Recipe(quant="int", bits=4, group_size=32),
           K.Recipe(0.5, "int", 3, entropy="zstd"), K.Recipe(0.5, "kmeans", 4, entropy="huffman"),
           K.Recipe(0.3, "kmeans", 2, entropy="zstd"), K.Recipe(quant="kmeans", bits=4),
           K.Recipe(0.5, "kmeans", 4, entropy="zstd", codebook="row"), K.Recipe(quant="kmeans", bits=3, codebook="row")]


def _generate(model):
    with torch.inference_mode():
        return model.generate(IDS, max_new_tokens=12, do_sample=False, pad_token_id=2)


# ----------------------------------------------------------------------------------------------- recipes
def test_recipe_validation():
    with pytest.raises(ValueError, match="quant"):
        K.Recipe(quant="int9")
    with pytest.raises(ValueError, match="entropy coding applies"):
        K.Recipe(entropy="zstd")
    with pytest.raises(ValueError, match="bits"):
        K.Recipe(quant="int", bits=5)
    with pytest.raises(ValueError, match="group_size"):
        K.Recipe(quant="kmeans", bits=4, group_size=64)
    with pytest.raises(ValueError, match="sparsity"):
        K.Recipe(sparsity=1.0)
    with pytest.raises(ValueError, match="codebook"):
        K.Recipe(quant="kmeans", bits=4, codebook="column")
    with pytest.raises(ValueError, match="kmeans' only"):
        K.Recipe(quant="int", bits=4, codebook="row")


def test_recipe_names_and_dict_round_trip():
    r = K.Recipe(0.5, "kmeans", 4, entropy="huffman")
    assert r.name == "prune 50% + kmeans4 + huffman"
    assert r.techniques == ["prune", "share", "entropy"]
    assert K.Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert K.Recipe().name == "fp32" and K.Recipe().techniques == []
    assert K.Recipe(quant="int", bits=4, group_size=64).name == "int4-g64"
    row = K.Recipe(0.5, "kmeans", 4, entropy="zstd", codebook="row")
    assert row.name == "prune 50% + kmeans4-row + zstd"
    assert K.Recipe.from_dict(json.loads(json.dumps(row.to_dict()))) == row
    old = {k: v for k, v in r.to_dict().items() if k != "codebook"}        # results written before codebooks
    assert K.Recipe.from_dict(old) == r


# ----------------------------------------------------------------------------------------------- one matrix
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 4), quant=st.sampled_from(["int", "kmeans", "kmeans-row"]),
       bits=st.sampled_from([2, 3, 4, 8]), entropy=st.sampled_from(K.ENTROPY), grouped=st.booleans(),
       zeros=st.floats(0.0, 0.9), seed=st.integers(0, 10_000))
def test_decode_equals_reconstruction(rows, groups, quant, bits, entropy, grouped, zeros, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 8 * groups, generator=g)
    w[torch.rand(w.shape, generator=g) < zeros] = 0.0
    per_row = quant == "kmeans-row"
    quant = "kmeans" if per_row else quant
    recipe = K.Recipe(0.5 if zeros else 0.0, quant, bits, 8 if (grouped and quant == "int") else None, entropy,
                      "row" if per_row else "matrix")
    entry, rec = K.encode_matrix(w, recipe)
    assert rec.shape == w.shape and rec.dtype == torch.float32
    assert torch.equal(K.decode_matrix(entry), rec)
    if per_row:                # every row: zeros stay zero, nonzeros go to their row's nearest stored centroid
        book = entry["parts"]["codebook"].float()
        assert book.shape == (rows, 2 ** bits) and bool((book[:, 0] == 0).all())
        for r in range(rows):
            nz = w[r] != 0
            assert bool((rec[r][~nz] == 0).all())
            if nz.any():
                dist = (w[r][nz, None] - book[r, 1:][None]).abs()
                assert torch.allclose((rec[r][nz] - w[r][nz]).abs(), dist.min(1).values, atol=1e-6)
    elif quant == "kmeans":    # zeros stay zeros (symbol 0), at most 2^bits distinct values
        assert bool((rec[w == 0] == 0).all())
        assert rec.unique().numel() <= 2 ** bits
    else:                      # round to nearest: |error| ≤ scale / 2 (scales are fp16)
        q = Q.quantize(w, bits, "group" if recipe.group_size else "channel", recipe.group_size)
        assert torch.allclose(rec, Q.dequantize(q))


def test_matrix_codebook_keeps_the_outliers():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(512, 512, generator=g) * 0.02
    w[100, 7], w[300, 9] = 2.5, -1.75          # two outliers that an evenly strided sample would miss
    sym, book = K.share(w, 4)
    assert float(book.max()) == 2.5 and float(book.min()) == -1.75
    rec = book[torch.from_numpy(sym).long()].reshape(w.shape)
    assert rec[100, 7] == 2.5 and rec[300, 9] == -1.75


def test_bitmap_and_raw_are_exact():
    w = torch.randn(4, 16)
    w[:, ::2] = 0
    entry, rec = K.encode_matrix(w, K.Recipe(0.5))
    assert entry["format"] == "bitmap" and torch.equal(rec, w) and torch.equal(K.decode_matrix(entry), w)
    entry, rec = K.encode_matrix(torch.randn(7), K.Recipe(quant="int", bits=4))
    assert entry["format"] == "raw"                                 # 1-D tensors (norms) are never quantized


# ----------------------------------------------------------------------------------------------- model round trip
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_export_load_generates_the_same_tokens(tmp_path, recipe):
    model = tiny_llama()
    packed = K.compress_(model, recipe)
    before = _generate(model)
    report = K.export(packed, tmp_path)
    loaded = K.load_compressed(tmp_path)
    assert torch.equal(_generate(loaded), before)
    if recipe.quant == "int":          # packed in RAM: QuantLinear / QuantEmbedding, no fp32 copy of a weight matrix
        assert not [n for n, p in loaded.named_parameters() if p.dim() == 2]
        q = loaded.model.layers[0].mlp.up_proj
        assert isinstance(q, Q.QuantLinear)
        assert torch.equal(q.weight_dequantized(), model.model.layers[0].mlp.up_proj.weight)
        assert loaded.lm_head.packed is loaded.model.embed_tokens.table.packed     # still tied, one copy
        vectors = sum(p.numel() * 4 for p in loaded.parameters())
        from labkit.memory import tensor_bytes
        held = tensor_bytes([t for m in loaded.modules() if isinstance(m, Q.QuantLinear) for t in m.buffers()])
        assert held + vectors == report["bytes"]["ram_formula"] < report["bytes"]["fp32"] / 3
    else:
        for (n, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(loaded.state_dict().items())):
            assert torch.equal(a, b), n
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight      # still tied
        assert report["bytes"]["ram_formula"] == report["bytes"]["fp32"]
    naive = K.load_compressed(tmp_path, packed=False)                           # everything decoded to fp32
    assert torch.equal(_generate(naive), before)
    assert report["bytes"]["weights_file"] == (tmp_path / K.WEIGHTS).stat().st_size == packed.nbytes
    assert report["recipe"] == recipe.to_dict()


def test_stage_bytes_follow_the_formulas():
    model = tiny_llama()
    n_params = sum(p.numel() for p in model.parameters())                   # tied weights counted once
    packed = K.compress_(model, K.Recipe(0.5, "int", 4, 32, "zstd"))
    st_ = packed.stage_bytes
    assert st_["fp32"] == 4 * n_params
    mats = {n: e for n, e in packed.entries.items() if e["format"] == "int"}
    vectors = sum(4 * math.prod(e["shape"]) for e in packed.entries.values() if e["format"] == "raw")
    codes = sum(math.ceil(math.prod(e["shape"]) * 4 / 8) + 2 * math.prod(e["shape"]) // 32 for e in mats.values())
    assert st_["quantized"] == codes + vectors                               # 4-bit codes + one fp16 scale per 32
    assert st_["fp32"] > st_["pruned"] > st_["quantized"] > st_["entropy"]   # zeros compress


def _state(model):
    return {n: t.clone() for n, t in model.state_dict().items()}


def test_compress_names_the_tensor_a_group_size_does_not_fit_and_changes_nothing():
    model = tiny_llama(intermediate_size=96)                  # down_proj rows have 96 columns: 64 does not divide
    before = _state(model)
    with pytest.raises(ValueError, match=r"down_proj\.weight \(shape \(\d+, 96\)\).*group size"):
        K.compress_(model, K.Recipe(0.5, "int", 4, 64))
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_compress_refuses_inf_by_name_and_bad_masks_before_changing_anything():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    before = _state(model)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj\.weight \(shape .*NaN/inf"):
        K.compress_(model, K.Recipe(quant="int", bits=4))
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        K.compress_(model, K.Recipe(0.5), masks={"model.layers.0.mlp.up_proj": torch.ones(3, 3, dtype=torch.bool)})
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_compress_puts_the_weights_back_when_a_later_tensor_fails(monkeypatch):
    """A failure nothing checks for up front (here: encoding the 5th tensor) still leaves the model as it was."""
    model, calls = tiny_llama(), []
    before = _state(model)
    real = compressed_format.encode_matrix

    def flaky(w, recipe):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("out of memory")
        return real(w, recipe)
    monkeypatch.setattr(K, "encode_matrix", flaky)
    with pytest.raises(RuntimeError):
        K.compress_(model, K.Recipe(0.5, "int", 4))
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    monkeypatch.setattr(K, "encode_matrix", real)
    K.compress_(model, K.Recipe(0.5, "int", 4))               # and the same call works afterwards
    assert not all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_corrupted_or_edited_export_is_detected(tmp_path):
    K.export(K.compress_(tiny_llama(), K.Recipe(quant="int", bits=8)), tmp_path)
    weights = tmp_path / K.WEIGHTS
    good = weights.read_bytes()
    weights.write_bytes(good[:-5] + bytes([good[-5] ^ 1]) + good[-4:])
    with pytest.raises(ChecksumError, match="model.safetensors does not match its sha256"):
        K.load_compressed(tmp_path)
    weights.write_bytes(good)
    report_path = tmp_path / K.REPORT
    report = json.loads(report_path.read_text())
    report["recipe"]["bits"] = 4                                              # a hand edit
    report_path.write_text(json.dumps(report))
    with pytest.raises(ChecksumError, match="report.json .*(sha256|bytes)"):
        K.load_compressed(tmp_path)
    report_path.write_text("{not json")
    with pytest.raises(ChecksumError):
        K.load_compressed(tmp_path)
    report_path.unlink()
    with pytest.raises(ChecksumError, match="missing"):
        K.load_compressed(tmp_path)
    (tmp_path / K.MANIFEST).unlink()
    with pytest.raises(ChecksumError, match="not a complete labkit"):
        K.load_compressed(tmp_path)


def test_export_is_atomic_and_never_touches_foreign_files(tmp_path, monkeypatch):
    packed = K.compress_(tiny_llama(), K.Recipe(quant="int", bits=8))
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("my notes")
    with pytest.raises(ValueError, match="not empty and is not a labkit export"):
        K.export(packed, user)
    assert [p.name for p in user.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="existing file"):
        K.export(packed, user / "notes.txt")
    out = tmp_path / "out"
    K.export(packed, out)
    good = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match="force=True"):
        K.export(packed, out)
    other = K.compress_(tiny_llama(), K.Recipe(quant="int", bits=4, group_size=32))

    def boom(*a, **k):
        raise KeyboardInterrupt                                             # interrupted after writing, before the swap
    monkeypatch.setattr(compressed_format, "read_report", boom)   # export verifies with it before the swap
    with pytest.raises(KeyboardInterrupt):
        K.export(other, out, force=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == good          # the old export, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]     # no temporary folder left behind
    K.export(other, out, force=True)
    assert K.read_report(out)["recipe_name"] == "int4-g32"


def test_export_refuses_the_data_folder():
    from labkit.repro import REPO_ROOT
    with pytest.raises(ValueError, match="data/"):
        K.export(K.compress_(tiny_llama(), K.Recipe()), REPO_ROOT / "data" / "x")


# ----------------------------------------------------------------------------------------------- frontier, budget
points = st.lists(st.tuples(st.integers(1, 100), st.floats(1, 100)), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(points)
def test_pareto_front(raw):
    pts = [{"name": str(i), "bytes": b, "ppl": p} for i, (b, p) in enumerate(raw)]
    front = K.pareto_front(pts)
    dominates = lambda a, b: a["bytes"] <= b["bytes"] and a["ppl"] <= b["ppl"] and (a["bytes"], a["ppl"]) != (b["bytes"], b["ppl"])  # noqa: E731
    for f in front:
        assert not any(dominates(p, f) for p in pts)
    for p in pts:
        assert p in front or any(f["bytes"] <= p["bytes"] and f["ppl"] <= p["ppl"] for f in front)
    assert [f["bytes"] for f in front] == sorted(f["bytes"] for f in front)
    assert all(a["ppl"] > b["ppl"] for a, b in zip(front, front[1:]))


def test_beyond_single():
    pts = [{"name": "a", "bytes": 10, "ppl": 5.0, "techniques": ["quantize"]},
           {"name": "b", "bytes": 5, "ppl": 9.0, "techniques": ["prune"]},
           {"name": "ab", "bytes": 4, "ppl": 6.0, "techniques": ["prune", "quantize"]},
           {"name": "ab2", "bytes": 20, "ppl": 7.0, "techniques": ["prune", "quantize"]}]
    assert [p["name"] for p in K.beyond_single(pts)] == ["ab"]


def test_parse_budget():
    assert K.parse_budget("0.25", 1000) == 250
    assert K.parse_budget(0.125, 800) == 100
    assert K.parse_budget("67000000", 1) == 67_000_000
    assert K.parse_budget("64MB", 1) == 64_000_000 and K.parse_budget("1.5 GB", 1) == 1_500_000_000
    for bad in ("abc", "-1", "0", "nan"):
        with pytest.raises(ValueError):
            K.parse_budget(bad, 1000)


def test_best_recipe_and_unreachable_budget():
    pts = [{"name": "big", "bytes": 100, "ppl": 10.0}, {"name": "mid", "bytes": 50, "ppl": 12.0},
           {"name": "small", "bytes": 20, "ppl": 30.0}]
    assert K.best_recipe(pts, 100)["name"] == "big"
    assert K.best_recipe(pts, 99)["name"] == "mid"
    with pytest.raises(K.BudgetError, match="below anything reachable.*'small' at 20 bytes"):
        K.best_recipe(pts, 19)


def test_cli_budget_below_reachable(tmp_path, capsys):
    res = {"fp32_bytes": 1000, "eval": {"max_tokens": 8},
           "grid": [{"name": "int4-g64", "bytes": 140, "ppl": 40.0, "recipe": K.Recipe(quant="int", bits=4,
                                                                                      group_size=64).to_dict()}]}
    path = tmp_path / "capstone.json"
    path.write_text(json.dumps(res))
    assert main(["compress", "--budget", "0.1", "--out", str(tmp_path / "out"), "--results", str(path)]) == 2
    err = capsys.readouterr().err
    assert "below anything reachable" in err and "'int4-g64' at 140 bytes" in err
    assert not (tmp_path / "out").exists()
    assert main(["compress", "--budget", "lots", "--out", str(tmp_path / "out"), "--results", str(path)]) == 2
    assert "not a number" in capsys.readouterr().err


@pytest.mark.slow
def test_compress_for_budget_exports_a_model_that_generates_the_same_tokens(tmp_path):
    """The success path of `python -m labkit compress`, on a tiny Llama saved with SmolLM2's tokenizer."""
    from labkit import models
    from labkit.memory import model_bytes
    tok_src = models.prepare("smollm2-135m")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tok_src))
    tiny = tiny_llama(vocab_size=len(tok))
    folder = tmp_path / "tiny"
    tiny.save_pretrained(folder)
    tok.save_pretrained(folder)
    recipe = K.Recipe(0.5, "int", 4, group_size=32, entropy="zstd")
    res = {"fp32_bytes": model_bytes(tiny), "eval": {"max_tokens": 64},
           "grid": [{"name": recipe.name, "bytes": model_bytes(tiny) // 5, "ppl": 1e3, "recipe": recipe.to_dict()},
                    {"name": "fp32", "bytes": model_bytes(tiny), "ppl": 9e2, "recipe": K.Recipe().to_dict()}]}
    logs = []
    for bad, err in ((dict(out=tmp_path / "tiny" / "config.json"), "existing file"),
                     (dict(out=folder), "not empty"), (dict(max_tokens=64), "at least one full window"),
                     (dict(max_tokens=256.0), "whole number"), (dict(kind="vram"), "kind")):
        kw = dict(budget=0.5, out=tmp_path / "out", results=res, max_tokens=256, model_name="no-such-model") | bad
        with pytest.raises((ValueError, TypeError), match=err):                 # refused before any model is loaded
            compress_for_budget(**kw)
    report = compress_for_budget(0.5, tmp_path / "out", results=res, max_tokens=256, model_name=str(folder),
                                   log=logs.append)
    assert report["recipe"] == recipe.to_dict() and report["recipe_name"] == recipe.name  # the best that fits 0.5
    assert any("generates the same" in line for line in logs)
    assert (tmp_path / "out" / "report.json").exists()
    assert report["perplexity"]["max_tokens"] == 256 and math.isfinite(report["perplexity"]["compressed"])
    assert K.load_compressed(tmp_path / "out").config.vocab_size == len(tok)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_zstd_codes_decode_chunk_by_chunk_to_the_packed_codes(bits):
    import numpy as np
    n = 100_003
    codes = np.random.default_rng(bits).integers(0, 2**bits, n).astype(np.uint8)
    parts, _ = K.encode_codes(codes, bits, "zstd")
    got = K.packed_codes(parts, {"bits": bits}, n, chunk=1 << 10)
    assert torch.equal(got, Q.pack_bits(torch.from_numpy(codes), bits))


def test_zstd_codes_stream_from_the_file_chunk_by_chunk(tmp_path):
    import numpy as np
    from safetensors.torch import save_file
    n, bits = 50_001, 4
    codes = np.random.default_rng(0).integers(0, 2**bits, n).astype(np.uint8)
    parts, _ = K.encode_codes(codes, bits, "zstd")
    save_file({"a": torch.arange(7.0), "w/zstd": parts["zstd"], "z": torch.ones(3)}, str(tmp_path / "f.safetensors"))
    with K.SafetensorsReader(tmp_path / "f.safetensors") as f:
        src = f.stream("w/zstd")
        got = K.packed_codes({"zstd": src}, {"bits": bits}, n, chunk=1 << 12)
        assert torch.equal(f.get_tensor("z"), torch.ones(3))          # the stream left the reader usable
    assert torch.equal(got, Q.pack_bits(torch.from_numpy(codes), bits))
    short, _ = K.encode_codes(codes[: n // 2], bits, "zstd")
    with pytest.raises(ChecksumError, match="ends after"):
        K.packed_codes(short, {"bits": bits}, n, chunk=1 << 12)
    with pytest.raises(ValueError, match="multiple of 8"):
        K.packed_codes(parts, {"bits": bits}, n, chunk=100)


def test_reader_converts_dtype_chunk_by_chunk(tmp_path):
    from safetensors.torch import save_file
    w = torch.randn(300, 77)
    save_file({"w": w}, str(tmp_path / "f.safetensors"))
    with K.SafetensorsReader(tmp_path / "f.safetensors", chunk_bytes=4 * 1000) as f:   # 23 chunks, a partial last
        assert torch.equal(f.get_tensor("w", torch.bfloat16), w.to(torch.bfloat16))
        assert torch.equal(f.get_tensor("w"), w) and f.scratch.numel() == 4000           # one staging buffer


# ----------------------------------------------------------------------------------------------- the distilled point
def test_distilled_point_comes_from_the_shipped_distill_results():
    """The capstone chart's distilled student: the KD depth student of data/results/distill.json, never dropped."""
    from labkit.experiments import capstone as X
    from labkit.repro import load_results
    d, res = load_results("distill"), load_results("capstone")
    p = X.distilled_point(eval_tokens=res["eval"]["max_tokens"])
    assert p is not None and p["bytes"] == d["depth"]["bytes"] and p["ppl"] == d["depth"]["kd_ppl_mean"]
    assert p["teacher_ppl"] == d["teacher"]["val_ppl"] and p["eval_tokens"] == d["eval"]["val_tokens"]
    if p["eval_tokens"] != res["eval"]["max_tokens"]:                      # another budget: the name says so
        assert "not ppl" in p["name"]
    assert any(q["label"] == p["name"] for q in X.chart_points(res, "disk"))
    assert any(q["label"] == p["name"] for q in X.chart_points(res, "ram"))
    with pytest.raises(ValueError, match="python -m labkit results distill"):
        X.distilled_point({"teacher": d["teacher"]})
