"""Tests for labkit.kvcache: the paged KV cache, attention read in place over the blocks, int8 / int4 KV."""
import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import labkit as lk
from labkit.experiments import kvcache as E
from labkit.kvcache import (PAGED_ATTENTION, BlockView, PagedKVCache, dequantize_kv, generate_shared_prefix,
                            kv_cache_table, kv_token_bytes, paged_attention_decode, quantize_kv,
                            register_paged_attention, sample_parallel, shared_prefix_blocks)
from labkit.pool import PoolExhausted


# ---------------------------------------------------------------- paged KV cache on a tiny Llama
@pytest.fixture(scope="module")
def tiny():
    return lk.models.tiny_llama()


def _gen(model, ids, mask=None, cache=None, n=12):
    return model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=n, do_sample=False,
                          pad_token_id=2)


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_paged_cache_matches_dynamic_cache_batch1_and_batch2_left_padded(tiny, block_size):
    torch.manual_seed(0)
    ids = torch.randint(3, 256, (2, 9))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 2, 0  # left padding in row 1
    c1 = PagedKVCache(tiny.config, num_blocks=64, block_size=block_size)
    assert torch.equal(_gen(tiny, ids[:1]), _gen(tiny, ids[:1], cache=c1))
    c2 = PagedKVCache(tiny.config, num_blocks=64, block_size=block_size)
    assert torch.equal(_gen(tiny, ids, mask), _gen(tiny, ids, mask, cache=c2))
    assert c2.length == 9 + 12 - 1
    per_seq = -(-c2.length // block_size)
    assert c2.pool.num_used == 2 * per_seq
    assert c2.nbytes == 2 * per_seq * block_size * lk.memory.kv_bytes_per_token(tiny.config)
    c2.release()
    assert c2.pool.num_free == 64


def test_fork_shares_prefix_blocks_and_copies_on_write(tiny):
    torch.manual_seed(1)
    prompt, nxt = torch.randint(3, 256, (1, 10)), torch.tensor([[5], [7]])
    c = PagedKVCache(tiny.config, num_blocks=16, block_size=4)
    with torch.no_grad():
        tiny(prompt, past_key_values=c)
        c.fork(0, 1)
        assert c.tables[0] == c.tables[1] and c.pool.num_used == 3  # 10 tokens → 3 shared blocks
        out = tiny(nxt, past_key_values=c).logits
        ref_cache = DynamicCache(config=tiny.config)
        tiny(prompt.repeat(2, 1), past_key_values=ref_cache)
        ref = tiny(nxt, past_key_values=ref_cache).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert c.n_cow == 1 and c.tables[0][:2] == c.tables[1][:2] and c.tables[0][2] != c.tables[1][2]
    assert c.pool.num_used == 4  # 2 shared + 1 private each, not 6
    c.free_sequence(1)
    assert c.pool.num_used == 3
    c.release()
    c.pool.check_invariants()
    assert c.pool.num_free == 16


@pytest.mark.parametrize("prompt_len", [8, 10])
def test_sample_parallel_shares_the_prompt_and_matches_dynamic_cache(tiny, prompt_len):
    ids = torch.randint(3, 256, (1, prompt_len))
    p = sample_parallel(tiny, ids, n=3, max_new_tokens=9, block_size=4, seed=1)
    d = sample_parallel(tiny, ids, n=3, max_new_tokens=9, block_size=4, seed=1, cache=DynamicCache(config=tiny.config))
    assert torch.equal(p["tokens"], d["tokens"]) and p["tokens"].shape == (3, prompt_len + 9)
    assert len({tuple(t) for t in p["tokens"][:, prompt_len:].tolist()}) == 3  # three different samples
    full = prompt_len // 4                         # full prompt blocks stay shared
    per_seq = -(-(prompt_len + 8) // 4)            # the last sampled token is not cached
    assert p["cached_tokens"] == prompt_len + 8 and p["blocks_unshared"] == 3 * per_seq
    assert p["blocks_used"] == full + 3 * (per_seq - full) and p["shared_blocks"] == full
    assert p["copies_on_write"] == (2 if prompt_len % 4 else 0)  # a partial last block is copied by all but one
    assert all(t[:full] == p["tables"][0][:full] for t in p["tables"])
    with pytest.raises(ValueError, match="one prompt"):
        sample_parallel(tiny, ids.repeat(2, 1))


def test_paged_cache_exhaustion_raises_and_keeps_data(tiny):
    c = PagedKVCache(tiny.config, num_blocks=2, block_size=4)
    with torch.no_grad():
        tiny(torch.randint(3, 256, (1, 8)), past_key_values=c)
        before = c.pool.storage.clone()
        with pytest.raises(PoolExhausted, match="more blocks"):
            tiny(torch.tensor([[5]]), past_key_values=c)
    assert torch.equal(before, c.pool.storage) and c.length == 8


def test_paged_cache_rejects_beam_search_and_shape_mismatch(tiny):
    c = PagedKVCache(tiny.config, num_blocks=8, block_size=4)
    with pytest.raises(NotImplementedError):
        c.reorder_cache(torch.tensor([0]))
    with pytest.raises(ValueError, match="KV heads"):
        c.update(torch.zeros(1, 3, 1, 16), torch.zeros(1, 3, 1, 16), 0)


def test_kv_formula_layouts_and_quantized_bytes():
    cfg = lk.models.tiny_llama().config  # 2 layers, 4 query heads, 2 kv heads of 16
    assert lk.memory.kv_bytes_per_token(cfg) == kv_token_bytes(cfg) == 2 * 2 * 2 * 16 * 4
    rows = {(r["attention"], r["dtype"]): r["bytes_per_token"] for r in kv_cache_table(cfg)}
    assert rows[("MHA", "fp32")] == 2 * rows[("GQA", "fp32")] == 4 * rows[("MQA", "fp32")]
    assert rows[("GQA", "int8")] == 2 * 2 * 2 * (16 + 2)       # one fp16 scale per token and head (group = 16)
    assert rows[("GQA", "int4")] == 2 * 2 * 2 * (8 + 2) and rows[("GQA", "bf16")] == 2 * 2 * 2 * 16 * 2
    for dt in ("fp32", "bf16", "int8", "int4"):
        for g in (4, 16):
            c = PagedKVCache(cfg, 2, 4, kv_dtype=dt, group_size=g)
            assert c.bytes_per_token == kv_token_bytes(cfg, dt, g)   # measured on the tensors = formula
    with pytest.raises(ValueError, match="kv_dtype"):
        PagedKVCache(cfg, 2, 4, kv_dtype="int3")
    with pytest.raises(ValueError, match="group_size"):
        PagedKVCache(cfg, 2, 4, kv_dtype="int8", group_size=3)
    with pytest.raises(ValueError, match="attention"):
        PagedKVCache(cfg, 2, 4, attention="fast")


@pytest.mark.parametrize("bits,group", [(8, 64), (8, 16), (4, 32), (4, 8)])
def test_quantize_kv_round_trip_error_is_half_a_step(bits, group):
    x = torch.randn(2, 3, 5, 64) * torch.linspace(0.1, 4, 64)   # channels of different scales
    q, s = quantize_kv(x, bits, group)
    assert q.dtype == (torch.int8 if bits == 8 else torch.uint8) and q.shape[-1] == 64 * bits // 8
    assert s.shape == (2, 3, 5, 64 // group) and s.dtype == torch.float16
    step = s.float().repeat_interleave(group, -1)
    err = (dequantize_kv(q, s, bits) - x).abs()
    assert (err <= step / 2 + 1e-3 * step + 1e-6).all()           # round to nearest (fp16 scale rounding aside)
    if bits == 4:   # packing: with scale 1 (each row's max |y| = 7) every value on the grid survives exactly
        y = torch.randint(-7, 8, (4, 8)).float()
        y[:, 0] = 7
        assert torch.equal(dequantize_kv(*quantize_kv(y, 4, 8), 4), y)


def test_paged_attention_equals_sdpa_gqa_fp32():
    assert E.attention_error() <= 1e-5     # 9 query heads over 3 KV heads, block boundaries, batch 2


def test_paged_attention_with_mask_and_several_queries():
    from types import SimpleNamespace
    cfg = SimpleNamespace(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_size=32)
    K, V, q = torch.randn(2, 2, 21, 8), torch.randn(2, 2, 21, 8), torch.randn(2, 4, 3, 8)
    c = PagedKVCache(cfg, 16, 4, attention="paged")
    c.update(K, V, 0)
    mask = torch.ones(2, 1, 3, 21, dtype=torch.bool)
    mask[1, :, :, :9] = False                            # row 1: 9 padded positions, two whole blocks masked
    mask[:, :, 0, -2:] = mask[:, :, 1, -1:] = False      # causal among the 3 queries
    out = paged_attention_decode(q, BlockView(c, 0, 21), mask)
    ref = F.scaled_dot_product_attention(q, K, V, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    causal = paged_attention_decode(q, BlockView(c, 0, 21), None)   # None with 3 queries = causal
    torch.testing.assert_close(causal[0], ref[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_paged_attention_generates_like_dynamic_cache_without_copies(block_size):
    model = lk.models.tiny_llama()
    torch.manual_seed(0)
    ids = torch.randint(3, 256, (2, 9))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 2, 0
    ref1, ref2 = _gen(model, ids[:1]), _gen(model, ids, mask)
    model.set_attn_implementation(register_paged_attention())
    assert model.config._attn_implementation == PAGED_ATTENTION
    for rows, m, ref in ((slice(0, 1), None, ref1), (slice(0, 2), mask, ref2)):
        c = PagedKVCache(model.config, 64, block_size)
        assert c.attention == "paged"
        assert torch.equal(ref, _gen(model, ids[rows], m, cache=c))
        B = ref.shape[0]
        assert c.copied["gather"] == 0 and c.copied["write"] == B * c.length * c.bytes_per_token


def test_copied_bytes_per_step_constant_in_place_growing_when_gathering():
    cfg = lk.models.tiny_llama().config
    r = E.copies_per_step(cfg, contexts=(8, 16, 32), block_size=4)
    per_tok = kv_token_bytes(cfg)
    assert r["paged"] == {8: per_tok, 16: per_tok, 32: per_tok}           # the new token only
    assert r["gather"] == {T: per_tok + per_tok * 4 * -(-(T + 1) // 4) for T in (8, 16, 32)}


@pytest.mark.parametrize("kv_dtype", ["bf16", "int8", "int4"])
def test_quantized_cache_decode_reads_what_prefill_would(kv_dtype):
    """Decoding token by token through the blocks (dequantized in the attention) gives the logits of one
    forward whose attention reads the same quantized K/V."""
    model = lk.models.tiny_llama()
    model.set_attn_implementation(register_paged_attention())
    ids = torch.randint(3, 256, (1, 14))
    with torch.no_grad():
        full = E.KVQuantizedLM(model, kv_dtype, group_size=8, block_size=4)(ids).logits
        c = PagedKVCache(model.config, 8, 4, kv_dtype, group_size=8)
        model(ids[:, :10], past_key_values=c)
        steps = [model(ids[:, t: t + 1], past_key_values=c).logits for t in range(10, 14)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 10:], atol=1e-4, rtol=1e-4)
    plain = model(ids).logits
    assert (full - plain).abs().max() > 0     # quantization does change something


def test_shared_prefix_generation_holds_the_prefix_once():
    model = lk.models.tiny_llama()
    torch.manual_seed(2)
    prefix, suffix = torch.randint(3, 256, (1, 10)), torch.randint(3, 256, (3, 3))
    for impl in ("sdpa", register_paged_attention()):
        model.set_attn_implementation(impl)
        r = generate_shared_prefix(model, prefix, suffix, max_new_tokens=5, block_size=4)
        full = torch.cat([prefix.expand(3, -1), suffix], 1)
        ref = _gen(model, full, torch.ones_like(full), n=5)
        assert torch.equal(r["tokens"], ref)
        assert r["cached_tokens"] == 10 + 3 + 4 and r["blocks_used"] == r["blocks_formula"] == 2 + 3 * (5 - 2)
        assert r["blocks_unshared"] == 15 and r["bytes_saved_vs_copies"] == 4 * r["block_bytes"]
        assert r["copies_on_write"] == 2 and shared_prefix_blocks(3, 10, 17, 4) == 11
    with pytest.raises(ValueError, match="one row"):
        generate_shared_prefix(model, full, suffix)


@pytest.mark.slow
def test_paged_cache_drives_smollm2_like_the_default_cache():
    model, tok = lk.load_model("smollm2-135m")
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(["In the beginning God created", "And the LORD said unto Moses, Speak"], return_tensors="pt",
                padding=True)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=pad)
    ref = model.generate(**batch, **kw)
    cache = PagedKVCache(model.config, num_blocks=16, block_size=16)
    assert torch.equal(ref, model.generate(**batch, past_key_values=cache, **kw))
    assert lk.memory.kv_bytes_per_token(model.config) == 46_080
    model.set_attn_implementation(register_paged_attention())
    cache = PagedKVCache(model.config, num_blocks=16, block_size=16)
    assert torch.equal(ref, model.generate(**batch, past_key_values=cache, **kw)) and cache.copied["gather"] == 0
    model.set_attn_implementation("sdpa")
