"""A paged KV cache on a `labkit.pool.BlockPool`, usable as `past_key_values` in `model.generate`.

Defined in notebook 05 (memory pools, §4). The protocol (transformers 5.23) is in shared/FINDINGS.md:
Llama attention calls `update(key, value, layer_idx)` with [B, Hkv, T, D] (RoPE applied); the mask needs
`get_seq_length`, `get_mask_sizes` and `get_query_offset` to report the true cached length — the inherited
ones return 0 and silently change tokens at batch 2 with left padding.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .memory import kv_bytes_per_token  # noqa: F401  (2 · layers · kv_heads · head_dim · bytes)
from .pool import BlockPool, PoolExhausted


class PagedKVCache(Cache):
    """Keys and values in fixed-size blocks of one pool tensor [blocks, layers, 2, block_size, Hkv, D].

    Each sequence (batch row) owns a block table; blocks are allocated as tokens arrive, shared between
    forked sequences (refcounts) and copied on write, and freed by `free_sequence` / `release`.
    """

    is_compileable = False

    def __init__(self, config, num_blocks: int = 256, block_size: int = 16, dtype=torch.float32):
        super().__init__(layers=[])
        heads = config.num_attention_heads
        self.num_layers = config.num_hidden_layers
        self.kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.block_size = int(block_size)
        self.pool = BlockPool(num_blocks, (self.num_layers, 2, self.block_size, self.kv_heads, self.head_dim),
                              dtype=dtype, block_size=self.block_size)
        self.tables: list[list[int]] = []   # block ids per sequence
        self.length = 0                     # tokens cached per sequence (all rows move together)
        self.n_cow = 0                      # copy-on-write block copies made

    # ---- the protocol transformers calls
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_length(self, layer_idx=None) -> int:
        return -1

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        B, H, q, D = key_states.shape
        if (H, D) != (self.kv_heads, self.head_dim):
            raise ValueError(f"cache built for {self.kv_heads} KV heads × {self.head_dim}, got {H} × {D}")
        if not self.tables:
            self.tables = [[] for _ in range(B)]
        if len(self.tables) != B:
            raise ValueError(f"cache holds {len(self.tables)} sequences but the batch has {B}")
        start, end = self.length, self.length + q
        if layer_idx == 0:
            self._reserve(end)
        pos = torch.arange(start, end)
        blk = torch.tensor([[t[p // self.block_size] for p in range(start, end)] for t in self.tables])  # [B, q]
        slot = (pos % self.block_size).expand(B, q)
        store = self.pool.storage
        store[blk, layer_idx, 0, slot] = key_states.transpose(1, 2).to(store.dtype)
        store[blk, layer_idx, 1, slot] = value_states.transpose(1, 2).to(store.dtype)
        if layer_idx == self.num_layers - 1:  # commit after the last layer has written
            self.length = end
            for t in self.tables:
                for k, b in enumerate(t):
                    self.pool.set_fill(b, min(self.block_size, max(0, end - k * self.block_size)))
        nb = -(-end // self.block_size)
        table = torch.tensor([t[:nb] for t in self.tables])                    # [B, nb]
        kv = store[table, layer_idx]                                           # [B, nb, 2, bs, H, D]
        kv = kv.permute(2, 0, 4, 1, 3, 5).reshape(2, B, H, nb * self.block_size, D)[:, :, :, :end]
        return kv[0].to(key_states.dtype), kv[1].to(value_states.dtype)

    # ---- block management
    def _reserve(self, end: int) -> None:
        """Make sure every sequence has blocks for positions < end and that the block it writes is its own."""
        first = self.length // self.block_size
        need = sum(max(0, -(-end // self.block_size) - len(t)) for t in self.tables)
        cow = sum(1 for t in self.tables for b in t[first:] if self.pool.refcount[b] > 1)
        if need + cow > self.pool.num_free:
            raise PoolExhausted(f"paged KV cache: need {need + cow} more blocks, {self.pool.num_free} free of "
                                f"{self.pool.num_blocks} — build it with more num_blocks or free finished sequences")
        for i, t in enumerate(self.tables):
            for k in range(first, len(t)):
                if self.pool.refcount[t[k]] > 1:     # copy-on-write: a shared block is about to be written
                    new = self.pool.allocate(owner=i)
                    self.pool.storage[new].copy_(self.pool.storage[t[k]])
                    self.pool.fill[new] = self.pool.fill[t[k]]
                    self.pool.free(t[k], owner=i)
                    t[k] = new
                    self.n_cow += 1
            while len(t) * self.block_size < end:
                t.append(self.pool.allocate(owner=i))

    def fork(self, src: int = 0, n: int = 1) -> None:
        """Add n sequences that share sequence src's blocks (a common prompt) instead of copying them."""
        for _ in range(n):
            i = len(self.tables)
            self.tables.append([self.pool.share(b, owner=i) for b in self.tables[src]])

    def free_sequence(self, i: int) -> None:
        """A finished sequence gives its blocks back (shared ones only lose one reference)."""
        for b in self.tables[i]:
            self.pool.free(b, owner=i)
        self.tables[i] = []

    def release(self) -> None:
        for i, t in enumerate(self.tables):
            if t:
                self.free_sequence(i)
        self.tables, self.length = [], 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("PagedKVCache supports greedy/sampling generation only (no beam search)")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PagedKVCache does not support crop (assisted generation)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("use fork() to share a prompt between sequences")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("PagedKVCache cannot drop batch rows; use free_sequence()")

    def nbytes(self) -> int:
        """Bytes in the blocks this cache holds (each shared block counted once)."""
        live = {b for t in self.tables for b in t}
        return len(live) * self.pool.storage[0].numel() * self.pool.storage.element_size()


def quantize_kv_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per token and head over head_dim: x ≈ q · scale, scale fp32 [..., 1]."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale.float()


def kv_cache_table(config, seq_len: int = 2048, batch: int = 1) -> list[dict]:
    """Bytes of a KV cache: full multi-head vs the model's GQA, fp32 / bf16 / int8 (+ one fp32 scale per head)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rows = []
    for name, h in (("MHA", heads), ("GQA", kv_heads)):
        for dt, b in (("fp32", 4), ("bf16", 2), ("int8", 1)):
            per_tok = 2 * config.num_hidden_layers * h * (head_dim * b + (4 if dt == "int8" else 0))
            rows.append({"attention": name, "kv_heads": h, "dtype": dt, "bytes_per_token": per_tok,
                         "total_bytes": per_tok * seq_len * batch})
    return rows


@torch.inference_mode()
def generation_speed(model, input_ids, max_new_tokens: int = 20, block_size: int = 16, repeats: int = 2,
                     attention_mask=None) -> dict:
    """Greedy tokens/s with transformers' default DynamicCache vs PagedKVCache, interleaved in one run (best of
    `repeats`); also checks that both produce the same tokens."""
    import time
    B, T = input_ids.shape
    blocks = B * (-(-(T + max_new_tokens) // block_size)) + 1
    kw = dict(attention_mask=attention_mask, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
              do_sample=False, pad_token_id=model.generation_config.pad_token_id or 0)
    best, outs = {"default": float("inf"), "paged": float("inf")}, {}
    for _ in range(repeats):
        for name in ("default", "paged"):
            cache = PagedKVCache(model.config, blocks, block_size) if name == "paged" else None
            t0 = time.perf_counter()
            outs[name] = model.generate(input_ids, past_key_values=cache, **kw)
            best[name] = min(best[name], time.perf_counter() - t0)
    new = B * max_new_tokens
    return {"default_tok_s": new / best["default"], "paged_tok_s": new / best["paged"],
            "ratio": best["default"] / best["paged"], "same_tokens": bool(torch.equal(outs["default"], outs["paged"]))}


@torch.inference_mode()
def sample_parallel(model, input_ids, n: int = 4, max_new_tokens: int = 16, block_size: int = 16,
                    temperature: float = 1.0, seed: int = 0, cache=None) -> dict:
    """Parallel sampling from one prompt (notebook 05, §5): prefill once, `fork` n − 1 sequences that share
    the prompt's blocks, then decode all n together; a shared block is copied only when a sequence writes into
    it. Sampling is Gumbel-max with noise drawn up front from `seed`, so any cache gives the same tokens.

    cache=None builds a PagedKVCache; pass a transformers DynamicCache to get the reference (the prompt is then
    prefilled n times). Returns the tokens [n, prompt + new], and for the paged cache the blocks used with
    sharing, the blocks n private copies would need, and the copy-on-write count.
    """
    from transformers import DynamicCache
    if input_ids.shape[0] != 1:
        raise ValueError("sample_parallel takes one prompt (batch 1); it forks the n sequences itself")
    if n < 1 or max_new_tokens < 1 or temperature <= 0:
        raise ValueError("n and max_new_tokens must be ≥ 1 and temperature > 0")
    T = input_ids.shape[1]
    paged = cache is None
    if paged:
        per_seq = -(-(T + max_new_tokens) // block_size)
        cache = PagedKVCache(model.config, num_blocks=n * per_seq + 1, block_size=block_size)
    elif not isinstance(cache, DynamicCache):
        raise TypeError("cache must be None (paged) or a transformers DynamicCache")
    g = torch.Generator().manual_seed(seed)
    noise = -torch.log(-torch.log(torch.rand(max_new_tokens, n, model.config.vocab_size, generator=g)))
    if paged:
        logits = model(input_ids, past_key_values=cache).logits[:, -1].expand(n, -1)
        cache.fork(0, n - 1)
    else:
        logits = model(input_ids.expand(n, -1), past_key_values=cache).logits[:, -1]
    out = [input_ids.expand(n, -1)]
    for step in range(max_new_tokens):
        nxt = (logits.float() / temperature + noise[step]).argmax(-1, keepdim=True)   # [n, 1]
        out.append(nxt)
        if step + 1 < max_new_tokens:
            logits = model(nxt, past_key_values=cache).logits[:, -1]
    res = {"tokens": torch.cat(out, dim=1)}
    if paged:
        L = cache.length   # the last sampled token is never fed back, so it has no KV entry
        res.update(blocks_used=cache.pool.num_used, blocks_unshared=n * -(-L // block_size),
                   copies_on_write=cache.n_cow, shared_blocks=sum(1 for c in cache.pool.refcount if c > 1),
                   block_bytes=cache.pool.storage[0].numel() * cache.pool.storage.element_size(),
                   tables=[list(t) for t in cache.tables], cached_tokens=L)
        cache.release()
    return res
