"""labkit.memory against references: naive byte counts, transformers' own KV cache, real peaks."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import labkit as lk
from labkit import memory as M


@given(st.lists(st.integers(1, 40), min_size=1, max_size=3),
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.float64]))
@settings(max_examples=40, deadline=None)
def test_tensor_bytes_is_numel_times_itemsize(shape, dtype):
    t = torch.zeros(shape, dtype=dtype)
    assert lk.tensor_bytes(t) == t.numel() * t.element_size()


def test_views_and_shared_storage_count_once():
    x = torch.zeros(100, 10)
    assert lk.tensor_bytes([x, x[:5], x.T, {"a": x}]) == 4000
    assert lk.tensor_bytes([x, torch.zeros(3)]) == 4012


def test_sparse_tensor_bytes_are_indices_plus_values():
    d = torch.zeros(10, 10)
    d[0, 1] = d[3, 4] = 1.0
    coo = d.to_sparse_coo()
    assert lk.tensor_bytes(coo) == 2 * 2 * 8 + 2 * 4
    csr = d.to_sparse_csr()
    compact = torch.sparse_csr_tensor(csr.crow_indices().clone(), csr.col_indices().clone(),
                                      csr.values().clone(), csr.shape)
    assert lk.tensor_bytes(compact) == 11 * 8 + 2 * 8 + 2 * 4
    # torch's conversion leaves col_indices as a view of a 2×nnz buffer: memory holds the whole buffer
    assert lk.tensor_bytes(csr) >= lk.tensor_bytes(compact)


def test_tensor_subclass_bytes_are_its_parts():
    """torchao's int8 weight is a tensor subclass: its bytes are its parts — int8 codes, an fp32 scale and an int8
    zero point per row — not numel × 4."""
    from labkit.quantize import torchao_int8_weight
    out = torchao_int8_weight(torch.nn.Linear(64, 32))
    w = out["module"].weight
    assert M.tensor_bytes(w) == 64 * 32 * 1 + 32 * 4 + 32 * 1
    assert M.tensor_bytes(out["module"]) == M.tensor_bytes(w) + 32 * 4       # + the fp32 bias


def test_model_bytes_dedupes_tied_embeddings(tiny):
    assert tiny.lm_head.weight.data_ptr() == tiny.model.embed_tokens.weight.data_ptr()
    naive = sum(p.numel() * p.element_size() for p in tiny.parameters())  # parameters() dedupes too
    buffers = sum(b.numel() * b.element_size() for b in tiny.buffers())
    assert lk.model_bytes(tiny) == naive + buffers
    assert lk.count_params(tiny) == sum(p.numel() for p in tiny.parameters())
    parts = M.bytes_by_module(tiny)
    assert parts["lm_head"] == 0 and sum(parts.values()) == lk.model_bytes(tiny)


def test_bytes_by_dtype_follows_conversion(tiny):
    half = tiny.to(torch.bfloat16)
    by = M.bytes_by_dtype(half)
    buffers = sum(b.numel() * b.element_size() for b in half.buffers() if b.dtype == torch.bfloat16)
    assert by["bfloat16"] == lk.count_params(half) * 2 + buffers
    assert sum(by.values()) == lk.model_bytes(half)


def test_training_estimate_is_16_bytes_per_param_for_adam():
    for precision in ("fp32", "mixed"):
        assert M.estimate_training_bytes(1000, precision)["total"] == 16000
    assert M.estimate_training_bytes(10, "fp32", "sgd")["total"] == 80
    with pytest.raises(ValueError, match="precision"):
        M.estimate_training_bytes(10, "fp8")


def test_kv_estimate_equals_dynamic_cache(tiny):
    from transformers import DynamicCache
    cache = DynamicCache(config=tiny.config)
    ids = torch.randint(0, 256, (3, 17))
    with torch.inference_mode():
        tiny(input_ids=ids, past_key_values=cache, use_cache=True)
    measured = sum(lk.tensor_bytes([layer.keys, layer.values]) for layer in cache.layers)
    assert measured == lk.estimate_kv_cache_bytes(tiny.config, batch=3, seq_len=17)
    assert M.kv_bytes_per_token(tiny.config, torch.bfloat16) * 2 == M.kv_bytes_per_token(tiny.config)


def test_param_estimate_matches_model(tiny):
    assert M.estimate_param_bytes(lk.count_params(tiny), torch.float32) == sum(
        p.numel() * 4 for p in tiny.parameters())
    assert M.estimate_param_bytes(10, "int4") == 5
    with pytest.raises(ValueError, match="unknown dtype"):
        M.dtype_bytes("int5")


def test_measure_memory_sees_a_short_lived_allocation():
    n = 60_000_000  # 240 MB, freed before the block ends
    with lk.measure_memory() as m:
        x = torch.ones(n)
        del x
    assert m.peak_bytes >= 0.9 * n * 4, m
    assert m.peak_bytes < 2.0 * n * 4, m


def test_measure_memory_sampling_fallback(monkeypatch):
    monkeypatch.setattr(M, "_reset_peak", lambda: False)
    with lk.measure_memory(sample_interval=0.0005) as m:
        x = torch.ones(50_000_000)
        import time
        time.sleep(0.05)
        del x
    assert m.method.startswith("RSS sampled") and m.peak_bytes > 150e6


def test_run_in_subprocess_measures_a_fresh_process():
    result, peak = M.run_in_subprocess(torch.ones, 25_000_000)
    assert result.shape == (25_000_000,) and peak >= 90e6
    with pytest.raises(ValueError, match="importable"):
        M.run_in_subprocess(lambda: 1)


def test_activation_estimate_scales_linearly(tiny):
    a = M.estimate_activation_bytes(tiny.config, 1, 64)["total"]
    b = M.estimate_activation_bytes(tiny.config, 2, 64)["total"]
    assert b == 2 * a


def test_fmt_bytes():
    assert lk.fmt_bytes(538_060_288) == "538.1 MB"
    assert lk.fmt_bytes(999) == "999 B"
    assert lk.fmt_bytes(2.5e9) == "2.5 GB"


def test_run_in_subprocess_env_reaches_the_child_only(monkeypatch):
    import os
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    value, _ = M.run_in_subprocess(os.getenv, "MALLOC_MMAP_THRESHOLD_", env=M.QUIET_MALLOC)
    assert value == "65536" and "MALLOC_MMAP_THRESHOLD_" not in os.environ


def test_generation_keeps_only_the_last_positions_logits():
    import types
    cfg = types.SimpleNamespace(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=16, num_hidden_layers=2, vocab_size=1000)
    score = M.estimate_activation_bytes(cfg, 2, 100, training=False)
    gen = M.estimate_activation_bytes(cfg, 2, 100, training=False, logits_to_keep=1)
    assert score["logits"] == 2 * 100 * 1000 * 4 and gen["logits"] == 2 * 1 * 1000 * 4
    assert score["layers"] == gen["layers"]
    with pytest.raises(ValueError, match="logits_to_keep"):
        M.estimate_activation_bytes(cfg, 2, 100, training=False, logits_to_keep=0)


def test_run_in_subprocess_sets_and_unsets_the_childs_environment_only(monkeypatch):
    import os
    monkeypatch.setenv("LABKIT_TEST_VAR", "parent")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    child, _ = M.run_in_subprocess(os.getenv, "MALLOC_MMAP_THRESHOLD_", env=M.QUIET_MALLOC)
    assert child == M.QUIET_MALLOC["MALLOC_MMAP_THRESHOLD_"]
    child, _ = M.run_in_subprocess(os.getenv, "LABKIT_TEST_VAR", env={"LABKIT_TEST_VAR": None})
    assert child is None
    assert os.environ["LABKIT_TEST_VAR"] == "parent" and "MALLOC_MMAP_THRESHOLD_" not in os.environ
