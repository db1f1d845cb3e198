"""Experiments of notebook 05's serving sections: paged attention read in place vs the gathering cache, bytes
copied per decode step, decode speed, prefix sharing in real generation, and int8 / int4 KV caches.

`make_results()` writes data/results/kvcache.json (`python -m labkit results kvcache`, a few minutes on one
thread); `bench()` prints the headline figures (`python -m labkit bench kvcache`).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .. import repro
from ..evaluate import HEADLINE_TOKENS, eval_tokens, perplexity
from ..kvcache import (KV_DTYPES, BlockView, PagedKVCache, generate_shared_prefix, kv_cache_table, kv_token_bytes,
                       paged_attention_decode, register_paged_attention)

CONTEXTS = (256, 512, 1024, 2048)
SYSTEM_PROMPT = ("You are a careful reader of the King James Bible. Answer in one short sentence, quote the verse "
                 "when you can, and say plainly when the text does not tell. ") * 3


def attention_error(contexts=(1, 15, 16, 17, 300), block_size: int = 16, seed: int = 0) -> float:
    """Max |paged_attention_decode − scaled_dot_product_attention| on the same random K/V, fp32, GQA 9 / 3 heads
    of 64 (SmolLM2's layout), batch 2, over several context lengths (block boundaries included)."""
    cfg = SimpleNamespace(num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                          hidden_size=576)
    g, err = torch.Generator().manual_seed(seed), 0.0
    for T in contexts:
        K, V = (torch.randn(2, 3, T, 64, generator=g) for _ in range(2))
        q = torch.randn(2, 9, 1, 64, generator=g)
        cache = PagedKVCache(cfg, num_blocks=2 * -(-T // block_size), block_size=block_size, attention="paged")
        cache.update(K, V, 0)
        out = paged_attention_decode(q, BlockView(cache, 0, T))
        ref = F.scaled_dot_product_attention(q, K, V, enable_gqa=True)
        err = max(err, (out - ref).abs().max().item())
    return err


def copies_per_step(config, contexts=CONTEXTS, block_size: int = 16, kv_dtype: str = "fp32") -> dict:
    """Bytes the cache copies in ONE decode step after `context` cached tokens (all layers, batch 1), counted by
    the cache itself: 'gather' builds a contiguous K/V per layer; 'paged' writes the new token only.
    The cache is filled with random K/V of the model's shape (what it stores does not change what it copies)."""
    H = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    D = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    out = {}
    for mode in ("gather", "paged"):
        out[mode] = {}
        for T in contexts:
            c = PagedKVCache(config, num_blocks=-(-(T + 1) // block_size), block_size=block_size,
                             kv_dtype=kv_dtype, attention=mode)
            for step_len in (T, 1):   # prefill T tokens, then one decode step
                c.copied = dict.fromkeys(c.copied, 0)
                kv = torch.zeros(1, H, step_len, D)
                for layer in range(config.num_hidden_layers):
                    c.update(kv, kv, layer)
            out[mode][T] = sum(c.copied.values())
    return out


def flex_paged_attention(context: int = 1024, page_size: int = 16, seed: int = 0) -> dict:
    """torch's own paged attention (FlexAttention + torch.nn.attention.experimental PagedAttention, compiled with
    torch.compile) on one decode query with SmolLM2's GQA shape, beside the teaching loop: max error against
    sdpa, compile seconds, and seconds per call of both (one thread). Returns {"ok": False, "error": ...} where
    it does not run."""
    import time
    try:
        from torch.nn.attention.experimental._paged_attention import PagedAttention
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        g = torch.Generator().manual_seed(seed)
        K, V = (torch.randn(1, 3, context, 64, generator=g) for _ in range(2))
        q = torch.randn(1, 9, 1, 64, generator=g)
        n_pages = -(-context // page_size)
        pa = PagedAttention(n_pages, page_size, 1, device="cpu")
        k_cache, v_cache = torch.zeros(1, 3, n_pages * page_size, 64), torch.zeros(1, 3, n_pages * page_size, 64)
        pa.reserve(torch.tensor([0]), torch.tensor([context]))
        pa.assign(torch.tensor([0]), torch.arange(context)[None], K, V, k_cache, v_cache)
        mask = create_block_mask(lambda b, h, qi, kv: kv < context, 1, None, 1, context, device="cpu",
                                 BLOCK_SIZE=page_size)
        block_mask, score_mod = pa.convert_logical_block_mask(mask), pa.get_score_mod(None)
        fa = torch.compile(flex_attention)
        t0 = time.perf_counter()
        out = fa(q, k_cache, v_cache, block_mask=block_mask, score_mod=score_mod, enable_gqa=True)
        compile_s = time.perf_counter() - t0
        ref = F.scaled_dot_product_attention(q, K, V, enable_gqa=True)
        cfg = SimpleNamespace(num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                              hidden_size=576)
        cache = PagedKVCache(cfg, n_pages, page_size, attention="paged")
        cache.update(K, V, 0)
        view = BlockView(cache, 0, context)
        return {"ok": True, "max_abs_err": (out - ref).abs().max().item(), "compile_s": compile_s,
                "flex_s": repro.time_call(fa, q, k_cache, v_cache, block_mask=block_mask, score_mod=score_mod,
                                          enable_gqa=True),
                "teaching_loop_s": repro.time_call(paged_attention_decode, q, view),
                "sdpa_contiguous_s": repro.time_call(F.scaled_dot_product_attention, q, K, V, enable_gqa=True)}
    except Exception as e:  # noqa: BLE001 — report what failed instead of failing the results run
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}"}


def _prompt(tokenizer, length: int, offset: int = 0) -> torch.Tensor:
    toks = eval_tokens(tokenizer)
    return toks[offset: offset + length].reshape(1, -1)


@torch.inference_mode()
def decode_speed(model, tokenizer, context: int = 1024, block_size: int = 16, min_run_time: float = 0.5,
                 rounds: int = 2) -> dict:
    """Seconds per decode step after `context` tokens, one thread, in one run: transformers' DynamicCache
    (sdpa), the paged cache that gathers (sdpa on the copy), and the paged cache read in place
    (paged_attention). Each step is rolled back after timing, so every call sees the same context."""
    from transformers import DynamicCache
    ids = _prompt(tokenizer, context)
    nxt = ids[:, -1:]
    impl = model.config._attn_implementation
    paged = register_paged_attention()
    steps, res = {}, {}
    try:
        for name in ("default", "gather", "paged"):
            model.set_attn_implementation(paged if name == "paged" else "sdpa")
            if name == "default":
                cache = DynamicCache(config=model.config)
                rollback = lambda c=cache: c.crop(-1)  # noqa: E731  (drop the one new token)
            else:
                cache = PagedKVCache(model.config, -(-(context + 1) // block_size), block_size, attention=name)
                rollback = lambda c=cache: setattr(c, "length", context)  # noqa: E731
            model(ids, past_key_values=cache)

            def step(c=cache, rb=rollback):
                model(nxt, past_key_values=c)
                rb()
            steps[name] = step
        for _ in range(rounds):   # interleaved rounds, best of each: a busy machine slows all alike
            for name, step in steps.items():
                model.set_attn_implementation(paged if name == "paged" else "sdpa")
                t = repro.time_call(step, min_run_time=min_run_time)
                res[name] = min(res.get(name, t), t)
    finally:
        model.set_attn_implementation(impl)
    return {"context": context, "seconds_per_step": res,
            "tokens_per_s": {k: 1 / v for k, v in res.items()},
            "tokens_per_s_ratio_vs_default": {k: res["default"] / v for k, v in res.items()}}


@torch.inference_mode()
def same_tokens(model, tokenizer, max_new_tokens: int = 24, block_size: int = 16) -> dict:
    """Greedy tokens of the in-place paged attention vs the default cache: batch 1 and batch 2 left-padded."""
    impl, side = model.config._attn_implementation, tokenizer.padding_side
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    tokenizer.padding_side = "left"
    batch = tokenizer(["In the beginning God created",
                       "And the LORD spake unto Moses, saying, Speak unto the children"], return_tensors="pt",
                      padding=True)
    out = {}
    try:
        for name, rows in (("batch1", slice(0, 1)), ("batch2_left_padded", slice(0, 2))):
            args = {k: v[rows] for k, v in batch.items()}
            if name == "batch1":
                args = {k: v[:, -int(batch["attention_mask"][0].sum()):] for k, v in args.items()}
            model.set_attn_implementation("sdpa")
            ref = model.generate(**args, **kw)
            model.set_attn_implementation(register_paged_attention())
            cache = PagedKVCache(model.config, 64, block_size)
            out[name] = bool(torch.equal(ref, model.generate(**args, past_key_values=cache, **kw)))
            out[name + "_gathered_bytes"] = cache.copied["gather"]
    finally:
        model.set_attn_implementation(impl)
        tokenizer.padding_side = side
    return out


class KVQuantizedLM(torch.nn.Module):
    """`model` whose attention reads keys and values back from a PagedKVCache of `kv_dtype` (a fresh cache per
    forward), so lk.perplexity scores it on the lab's protocol unchanged."""

    def __init__(self, model, kv_dtype: str = "int8", group_size: int = 64, block_size: int = 16):
        super().__init__()
        self.model, self.kv_dtype, self.group_size, self.block_size = model, kv_dtype, group_size, block_size

    def forward(self, input_ids, **kwargs):
        B, T = input_ids.shape
        cache = PagedKVCache(self.model.config, B * -(-T // self.block_size), self.block_size, self.kv_dtype,
                             self.group_size, attention="paged")
        return self.model(input_ids, past_key_values=cache, use_cache=True, **kwargs)


_REFERENCES: dict = {}   # fp32 greedy continuations, per (model, prompts, lengths): generated once per session


@torch.inference_mode()
def greedy_agreement(model, tokenizer, kv_dtype: str, group_size: int = 64, n_prompts: int = 4,
                     prompt_len: int = 64, new_tokens: int = 64, reference=None) -> tuple[float, torch.Tensor]:
    """Share of `new_tokens` greedy steps where the model reading a `kv_dtype` cache picks the same next token as
    with fp32 K/V, given the same (fp32-greedy) prefix; prompts from the held-out tokens. Returns (agreement,
    the fp32 continuation — pass it back as `reference` to skip regenerating it)."""
    key = (id(model), n_prompts, prompt_len, new_tokens)
    if reference is None and key in _REFERENCES:
        reference = _REFERENCES[key]
    toks = eval_tokens(tokenizer)
    step = len(toks) // n_prompts
    prompts = torch.stack([toks[i * step: i * step + prompt_len] for i in range(n_prompts)])
    if reference is None:
        reference = _REFERENCES[key] = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=model.generation_config.pad_token_id or 0)
    logits = KVQuantizedLM(model, kv_dtype, group_size)(reference[:, :-1]).logits
    pred = logits[:, prompt_len - 1:].argmax(-1)
    return (pred == reference[:, prompt_len:]).float().mean().item(), reference


def kv_quant_point(model, tokenizer, bits: int = 8, group_size: int = 64) -> dict:
    """One point of the KV-quantization widget: bytes per token and greedy agreement with fp32 (bits 32 = fp32)."""
    if bits not in (32, 8, 4):
        raise ValueError(f"bits must be 32, 8 or 4, got {bits!r}")
    dt = {32: "fp32", 8: "int8", 4: "int4"}[bits]
    agree = 1.0 if bits == 32 else greedy_agreement(model, tokenizer, dt, group_size)[0]
    label = "fp32 KV" if bits == 32 else f"int{bits}, g{group_size}"
    return {"bytes": kv_token_bytes(model.config, dt, group_size), "quality": agree, "technique": f"kv {dt}",
            "label": label, "reference": bits == 32}


def kv_quality(model, tokenizer, kv_dtypes=tuple(KV_DTYPES), max_tokens: int = HEADLINE_TOKENS,
               group_size: int = 64) -> dict:
    """Per KV dtype: bytes per token measured on the cache's tensors and by the formula, perplexity on the
    protocol, greedy agreement with fp32 over 64 tokens."""
    toks, ref, out = eval_tokens(tokenizer), None, {}
    for dt in kv_dtypes:
        cache = PagedKVCache(model.config, 1, 16, dt, group_size)
        ppl = perplexity(KVQuantizedLM(model, dt, group_size), toks, max_tokens=max_tokens)
        agree, ref = greedy_agreement(model, tokenizer, dt, group_size, reference=ref)
        out[dt] = {"bytes_per_token": cache.bytes_per_token,
                   "bytes_per_token_formula": kv_token_bytes(model.config, dt, group_size),
                   "ppl": round(float(ppl), 4), "ppl_tokens": ppl.tokens, "greedy_agreement": agree}
    return out


def prefix_sharing(model, tokenizer, n: int = 4, suffix_len: int = 8, max_new_tokens: int = 16,
                   block_size: int = 16) -> dict:
    """N requests with one long system prompt and different questions (cut to the same token length), generated
    with the shared prefix and, as the reference, each with its own full DynamicCache."""
    questions = ["Who built the ark, and why?", "What did God create on the first day of the world?",
                 "Who was the first king of Israel in the book of Samuel?", "Where was Jesus born, and to whom?",
                 "What is written on the tablets of stone that Moses carried?", "Who wrote most of the Psalms?"]
    prefix = tokenizer(SYSTEM_PROMPT, return_tensors="pt").input_ids
    qs = [tokenizer(" Question: " + q, return_tensors="pt").input_ids[0] for q in questions[:n]]
    if len(qs) < n or min(len(q) for q in qs) < suffix_len:
        raise ValueError(f"n ≤ {len(questions)} and suffix_len ≤ {min(len(q) for q in qs)}")
    suffix = torch.stack([q[:suffix_len] for q in qs])
    shared = generate_shared_prefix(model, prefix, suffix, max_new_tokens, block_size)
    full = torch.cat([prefix.expand(n, -1), suffix], dim=1)
    with torch.inference_mode():
        ref = model.generate(full, attention_mask=torch.ones_like(full), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=model.generation_config.pad_token_id or 0)
    out = {k: v for k, v in shared.items() if k != "tokens"}
    out.update(n=n, prefix_tokens=prefix.shape[1], suffix_tokens=suffix_len, same_tokens=bool(torch.equal(ref, shared["tokens"])))
    return out


def layouts(config, seq_len: int = 1024) -> list[dict]:
    """MHA / GQA / MQA × KV dtypes (estimates, kv_cache_table) — the model's own layout is the GQA rows."""
    return kv_cache_table(config, seq_len=seq_len)


def sequences_that_fit(bytes_per_token: float, budget_bytes: float = 2 ** 30, seq_len: int = 1024) -> int:
    """Sequences of seq_len tokens whose KV cache fits in budget_bytes (the serving view)."""
    return int(budget_bytes // (bytes_per_token * seq_len))


def make_results() -> dict:
    """data/results/kvcache.json: every figure of notebook 05's serving sections (one thread, a few minutes)."""
    from ..models import load_model
    model, tok = load_model("smollm2-135m")
    with repro.threads(1):
        out = {"paged_attention": {"max_abs_err": attention_error(), **same_tokens(model, tok)},
               "copied_bytes_per_step": {m: {str(k): v for k, v in d.items()}
                                         for m, d in copies_per_step(model.config).items()},
               "decode_speed": decode_speed(model, tok, 1024),
               "decode_speed_block64": decode_speed(model, tok, 1024, block_size=64),
               "flex_attention": flex_paged_attention(),
               "prefix_sharing": prefix_sharing(model, tok),
               "kv_quality": kv_quality(model, tok)}
    out["paged_attention"]["same_tokens"] = out["paged_attention"]["batch1"] and \
        out["paged_attention"]["batch2_left_padded"]
    out["layouts"] = layouts(model.config)
    out["kv_fp32_bytes_per_token_formula"] = kv_token_bytes(model.config, "fp32")
    return json_ready(out)


def json_ready(x):
    if isinstance(x, dict):
        return {str(k): json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, float):
        return float(f"{x:.6g}") if math.isfinite(x) else x
    return x


def bench() -> dict:
    """Headline figures of notebook 05's serving sections (~2–3 min on one thread)."""
    from ..models import load_model
    model, tok = load_model("smollm2-135m")
    with repro.threads(1):
        st = same_tokens(model, tok)
        speed = decode_speed(model, tok, 1024)
        prefix = prefix_sharing(model, tok)
        q = kv_quality(model, tok, ("fp32", "int8", "int4"))
    copies = copies_per_step(model.config)
    out = {"paged_attention": {"max_abs_err": float(f"{attention_error():.3g}"),
                               "same_tokens": st["batch1"] and st["batch2_left_padded"]},
           "copied_bytes_per_step": copies,
           "tokens_per_s_ratio_vs_default": {k: round(v, 3)
                                             for k, v in speed["tokens_per_s_ratio_vs_default"].items()},
           "prefix_sharing": {k: prefix[k] for k in ("n", "prefix_tokens", "blocks_used", "blocks_formula",
                                                     "blocks_unshared", "bytes_saved_vs_copies", "same_tokens")}}
    for dt in ("int8", "int4"):
        out[f"kv_{dt}"] = {**{k: q[dt][k] for k in ("bytes_per_token", "bytes_per_token_formula", "ppl",
                                                     "greedy_agreement")},
                           "ppl_fp32": q["fp32"]["ppl"], "ppl_tokens": q[dt]["ppl_tokens"]}
    return out
