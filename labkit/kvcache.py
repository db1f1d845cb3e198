"""A paged KV cache on a `labkit.pool.BlockPool`, and attention that reads its blocks in place.

Defined in notebook 05 (memory pools, §4–§6). transformers 5.23 calls `update(key, value, layer_idx)` in every
attention layer with [B, Hkv, T, D] (RoPE applied); the causal mask needs `get_seq_length`, `get_mask_sizes` and
`get_query_offset` to report the true cached length (the inherited ones report 0, which silently changes the
tokens of a left-padded batch of 2).

Two ways to attend over the blocks:
- "gather": `update` copies a sequence's blocks into one contiguous K/V per layer, every step (an O(T) copy
  per token) and any attention implementation reads it;
- "paged" (vLLM's PagedAttention idea, https://arxiv.org/abs/2309.06180): `update` writes only the new token
  and returns a `BlockView`; `paged_attention` (registered with transformers as PAGED_ATTENTION) walks the block
  table with an online softmax — a running max and sum merged block by block, as FlashAttention
  (https://arxiv.org/abs/2205.14135) and flash-decoding do — so no copy of the past is ever made.
The blocks can hold fp32, bf16, or int8 / int4 values with one fp16 scale per group of `group_size` channels of
each token and head (per-token grouping in the spirit of KIVI, https://arxiv.org/abs/2402.02750), dequantized
block by block inside the attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from .checks import real_number, torch_tensor, whole_number
from .memory import check_fits, kv_bytes_per_token, kv_layout
from .pool import BlockPool, PoolExhausted

PAGED_ATTENTION = "labkit_paged"       # the attn_implementation name of `paged_attention`
KV_DTYPES = {"fp32": (torch.float32, 32), "bf16": (torch.bfloat16, 16), "int8": (torch.int8, 8),
             "int4": (torch.uint8, 4)}  # name → (storage dtype, bits per value)
SCALE_BYTES = 2                         # one fp16 scale per group


def kv_token_bytes(config, kv_dtype: str = "fp32", group_size: int = 64, kv_heads: int | None = None) -> int:
    """Bytes one token takes in the cache: 2 · layers · kv_heads · (head_dim · bits / 8 + scales)."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {list(KV_DTYPES)}, got {kv_dtype!r}")
    whole_number("group_size", group_size, 1, "channels per fp16 scale, e.g. 64")
    values = kv_bytes_per_token(config, kv_dtype, kv_heads)        # the values: lk.memory's formula
    if KV_DTYPES[kv_dtype][1] > 8:
        return values
    layers, kv_heads, head_dim = kv_layout(config, kv_heads)
    return values + 2 * layers * kv_heads * (head_dim // min(group_size, head_dim)) * SCALE_BYTES


def quantize_kv(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest over groups of `group_size` channels of the last dim: x ≈ q · scale.
    Returns q (int8, or two int4 values packed per uint8) and fp16 scales [..., D // group_size]."""
    torch_tensor("x", x, "keys or values [..., head_dim]", kind="float", finite=True)
    bits = _check_kv_bits(bits)
    group_size = whole_number("group_size", group_size, 1, "channels per scale, e.g. 64")
    if x.dim() == 0 or x.shape[-1] % group_size or (bits == 4 and x.shape[-1] % 2):
        raise ValueError(f"group_size={group_size} must divide the last dimension of x (shape {tuple(x.shape)}), "
                         "which must be even for int4")
    return _quantize_kv(x, bits, group_size)


def _quantize_kv(x, bits, group_size):      # the cache's hot path: its arguments are checked when it is built
    *lead, D = x.shape
    g = x.float().reshape(*lead, D // group_size, group_size)
    qmax = 2 ** (bits - 1) - 1
    scale = (g.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-6).half()
    q = torch.round(g / scale.float()).clamp(-qmax, qmax).reshape(*lead, D)
    if bits == 8:
        return q.to(torch.int8), scale.squeeze(-1)
    u = (q + 8).to(torch.uint8)                       # 1..15 in a nibble
    return u[..., 0::2] | (u[..., 1::2] << 4), scale.squeeze(-1)


def _check_kv_bits(bits) -> int:
    if whole_number("bits", bits, 4, "4 or 8", high=8) not in (4, 8):
        raise ValueError(f"bits must be 4 or 8 (the cache's int4 and int8), got {bits}")
    return bits


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `quantize_kv`, in fp32."""
    bits = _check_kv_bits(bits)
    torch_tensor("q", q, "the codes quantize_kv returned", kind="int")
    torch_tensor("scale", scale, "the fp16 scales quantize_kv returned", kind="float", finite=True)
    D = q.shape[-1] * (2 if bits == 4 else 1) if q.dim() else 0
    if q.dim() == 0 or q.shape[:-1] != scale.shape[:-1] or scale.dim() == 0 or D % scale.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and scale {tuple(scale.shape)} do not belong together: pass the pair "
                         f"quantize_kv(x, {bits}, group_size) returned")
    return _dequantize_kv(q, scale, bits)


def _dequantize_kv(q, scale, bits):         # the hot path of paged attention (one call per block and layer)
    if bits == 4:
        q = torch.stack([(q & 15).to(torch.int8) - 8, (q >> 4).to(torch.int8) - 8], -1).flatten(-2)
    *lead, D = q.shape
    G = scale.shape[-1]
    return (q.float().reshape(*lead, G, D // G) * scale.float().unsqueeze(-1)).reshape(*lead, D)


@dataclass(frozen=True)
class BlockView:
    """What `update` returns in "paged" mode instead of a K/V tensor: which cache, layer and how many tokens."""
    cache: "PagedKVCache"
    layer_idx: int
    length: int


class PagedKVCache(Cache):
    """Keys and values in fixed-size blocks of one pool tensor [blocks, layers, 2, Hkv, block_size, D'].

    Each sequence (batch row) owns a block table; blocks are allocated as tokens arrive, shared between
    forked sequences (refcounts) and copied on write, and freed by `free_sequence` / `release`.
    attention: "paged" (read the blocks in place; needs the model's attn_implementation = PAGED_ATTENTION) or
    "gather" (copy them into a contiguous K/V per layer and step); default: "paged" when the model uses it.
    kv_dtype: "fp32", "bf16", "int8" or "int4" (group-wise scales in a second tensor `scales`).
    `copied` counts the bytes written into the cache ("write"), gathered into contiguous copies ("gather") and
    duplicated by copy-on-write ("cow").
    """

    is_compileable = False

    def __init__(self, config, num_blocks: int = 256, block_size: int = 16, kv_dtype: str = "fp32",
                 group_size: int = 64, attention: str | None = None):
        super().__init__(layers=[])
        self.num_layers, self.kv_heads, self.head_dim = kv_layout(config)    # a TypeError for a non-config
        num_blocks = whole_number("num_blocks", num_blocks, 1, "blocks in the pool, e.g. 256")
        self.block_size = whole_number("block_size", block_size, 1, "tokens per block, e.g. 16")
        group_size = whole_number("group_size", group_size, 1, "channels per fp16 scale, e.g. 64")
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {list(KV_DTYPES)}, got {kv_dtype!r}")
        if attention is None:
            attention = "paged" if getattr(config, "_attn_implementation", None) == PAGED_ATTENTION else "gather"
        if attention not in ("paged", "gather"):
            raise ValueError(f"attention must be 'paged' or 'gather', got {attention!r}")
        store_dtype, self.bits = KV_DTYPES[kv_dtype]
        check_fits(f"a KV cache of {num_blocks} blocks × {self.block_size} tokens",
                   num_blocks * self.block_size * kv_token_bytes(config, kv_dtype, group_size), "use fewer blocks")
        self.kv_dtype, self.attention = kv_dtype, attention
        self.group_size = min(int(group_size), self.head_dim) if self.bits <= 8 else self.head_dim
        if self.bits <= 8 and (self.group_size <= 0 or self.head_dim % self.group_size or self.group_size % 2):
            raise ValueError(f"group_size must be an even divisor of head_dim={self.head_dim}, got {group_size}")
        width = self.head_dim * self.bits // 8 if self.bits < 8 else self.head_dim
        shape = (self.num_layers, 2, self.kv_heads, self.block_size)
        self.pool = BlockPool(num_blocks, (*shape, width), dtype=store_dtype, block_size=self.block_size)
        self.scales = (torch.zeros(num_blocks, *shape, self.head_dim // self.group_size, dtype=torch.float16)
                       if self.bits <= 8 else None)
        self.tables: list[list[int]] = []   # block ids per sequence
        self.length = 0                     # tokens cached per sequence (all rows move together)
        self.n_cow = 0                      # copy-on-write block copies made
        self.copied = {"write": 0, "gather": 0, "cow": 0}

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
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            torch_tensor(name, t, "[batch, kv_heads, tokens, head_dim]", dims=4, kind="float")
        if value_states.shape != key_states.shape:
            raise ValueError(f"key_states {tuple(key_states.shape)} and value_states {tuple(value_states.shape)} "
                             "must have one shape")
        whole_number("layer_idx", layer_idx, 0, "the decoder layer", high=self.num_layers - 1)
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
        blk = torch.tensor([[t[p // self.block_size] for p in range(start, end)] for t in self.tables])  # [B, q]
        slot = (torch.arange(start, end) % self.block_size).expand(B, q)
        written = []
        for i, x in enumerate((key_states, value_states)):   # write only the new tokens (no copy of the past)
            stored, scale = self._encode(x)                   # [B, H, q, D'], [B, H, q, G] or None
            self.pool.storage[blk, layer_idx, i, :, slot] = stored.transpose(1, 2)
            if scale is not None:
                self.scales[blk, layer_idx, i, :, slot] = scale.transpose(1, 2)
            self.copied["write"] += stored.nbytes + (scale.nbytes if scale is not None else 0)
            written.append((stored, scale))
        if layer_idx == self.num_layers - 1:  # commit after the last layer has written
            self.length = end
            for t in self.tables:
                for k, b in enumerate(t):
                    self.pool.set_fill(b, min(self.block_size, max(0, end - k * self.block_size)))
        if self.attention == "gather":
            return self._gather(layer_idx, end, key_states.dtype)
        if start == 0:   # prefill: the prompt's K/V are all there is — attend to them as stored, no gather
            return tuple(self._decode(s, sc).to(key_states.dtype) for s, sc in written)
        view = BlockView(self, layer_idx, end)
        return view, view

    def _encode(self, x):
        if self.bits > 8:
            return x.to(self.pool.storage.dtype), None
        return _quantize_kv(x, self.bits, self.group_size)

    def _decode(self, stored, scale):
        return stored.float() if scale is None else _dequantize_kv(stored, scale, self.bits)

    def _gather(self, layer_idx: int, end: int, dtype):
        """The copying path: all of each sequence's blocks → one contiguous [B, H, end, D] per K and V."""
        nb = -(-end // self.block_size)
        table = torch.tensor([t[:nb] for t in self.tables])                    # [B, nb]
        kv = self.pool.storage[table, layer_idx]                               # [B, nb, 2, H, bs, D'] (a copy)
        sc = self.scales[table, layer_idx] if self.scales is not None else None
        self.copied["gather"] += kv.nbytes + (sc.nbytes if sc is not None else 0)

        def flat(x):
            B, _, _, H, bs, W = x.shape
            return x.permute(2, 0, 3, 1, 4, 5).reshape(2, B, H, nb * bs, W)[:, :, :, :end]
        kv, sc = flat(kv), (flat(sc) if sc is not None else None)
        k = self._decode(kv[0], sc[0] if sc is not None else None)
        v = self._decode(kv[1], sc[1] if sc is not None else None)
        return k.to(dtype), v.to(dtype)

    def block_kv(self, layer_idx: int, block: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the first n slots of one block, [Hkv, n, D] each: views for fp32, dequantized otherwise."""
        if not (type(layer_idx) is int and type(block) is int and type(n) is int and 0 <= layer_idx < self.num_layers
                and 0 <= block < self.pool.num_blocks and 0 <= n <= self.block_size):   # cheap: the decode hot path
            whole_number("layer_idx", layer_idx, 0, "the decoder layer", high=self.num_layers - 1)
            whole_number("block", block, 0, "a block id of this cache's pool", high=self.pool.num_blocks - 1)
            whole_number("n", n, 0, "slots to read", high=self.block_size)
        kv = self.pool.storage[block, layer_idx, :, :, :n]                     # a view: [2, H, n, D']
        if self.scales is None:
            return (kv[0], kv[1]) if self.bits == 32 else (kv[0].float(), kv[1].float())
        sc = self.scales[block, layer_idx, :, :, :n]
        return _dequantize_kv(kv[0], sc[0], self.bits), _dequantize_kv(kv[1], sc[1], self.bits)

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
                    if self.scales is not None:
                        self.scales[new].copy_(self.scales[t[k]])
                    self.pool.fill[new] = self.pool.fill[t[k]]
                    self.pool.free(t[k], owner=i)
                    t[k] = new
                    self.n_cow += 1
                    self.copied["cow"] += self.block_bytes
            while len(t) * self.block_size < end:
                t.append(self.pool.allocate(owner=i))

    def fork(self, src: int = 0, n: int = 1) -> None:
        """Add n sequences that share sequence src's blocks (a common prompt) instead of copying them."""
        whole_number("src", src, 0, "the sequence to share", high=len(self.tables) - 1)
        n = whole_number("n", n, 0, "sequences to add; each needs blocks of its own to decode into",
                         high=self.pool.num_blocks)
        for _ in range(n):
            i = len(self.tables)
            self.tables.append([self.pool.share(b, owner=i) for b in self.tables[src]])

    def free_sequence(self, i: int) -> None:
        """A finished sequence gives its blocks back (shared ones only lose one reference)."""
        whole_number("i", i, 0, "a sequence of this cache", high=len(self.tables) - 1)
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

    @property
    def block_bytes(self) -> int:
        """Bytes of one block: its K/V values plus, for int8/int4, its scales."""
        s = self.pool.storage[0].nbytes
        return s + (self.scales[0].nbytes if self.scales is not None else 0)

    @property
    def bytes_per_token(self) -> int:
        """Measured from the tensors: one block's bytes ÷ its slots."""
        return self.block_bytes // self.block_size

    @property
    def nbytes(self) -> int:
        """Bytes in the blocks this cache holds (each shared block counted once)."""
        return len({b for t in self.tables for b in t}) * self.block_bytes


# ---------------------------------------------------------------- attention over the blocks, in place
def paged_attention_decode(query: torch.Tensor, view: BlockView, attention_mask=None,
                           scaling: float | None = None) -> torch.Tensor:
    """softmax(q·Kᵀ·scaling + mask)·V over each sequence's blocks, one block at a time (online softmax).

    query [B, Hq, q, D] (Hq = g · Hkv: query heads h·g … h·g+g−1 share KV head h); attention_mask: None (causal)
    or bool [B, 1, q, kv] (True = attend). Per block: scores s, new running max m' = max(m, max s), then
    sum ← sum·e^(m−m') + Σe^(s−m') and acc ← acc·e^(m−m') + e^(s−m')·V. Returns [B, Hq, q, D] in fp32."""
    torch_tensor("query", query, "[batch, heads, tokens, head_dim]", dims=4, kind="float", finite=True)
    if not isinstance(view, BlockView):
        raise TypeError(f"view must be the BlockView a PagedKVCache's update returned, got {type(view).__name__}")
    if scaling is not None and not real_number("scaling", scaling, "e.g. head_dim ** -0.5, or None", low=0) > 0:
        raise ValueError(f"scaling must be > 0 (e.g. head_dim ** -0.5) or None, got {scaling!r}")
    B, Hq, q, D = query.shape
    cache, L = view.cache, view.length
    H, bs = cache.kv_heads, cache.block_size
    g = Hq // H
    scaling = D ** -0.5 if scaling is None else scaling
    if attention_mask is None and q > 1:   # causal: query i sits at position L − q + i
        attention_mask = (torch.arange(L)[None, :] <= torch.arange(L - q, L)[:, None])[None, None].expand(B, 1, q, L)
    out = []
    for b, table in enumerate(cache.tables):
        qb = query[b].float().reshape(H, g * q, D)                 # group the query heads by their KV head
        m = torch.full((H, g * q, 1), float("-inf"))
        s_sum, acc = torch.zeros(H, g * q, 1), torch.zeros(H, g * q, D)
        for j in range(-(-L // bs)):
            n = min(bs, L - j * bs)
            k, v = cache.block_kv(view.layer_idx, table[j], n)          # [H, n, D], read in place
            s = torch.matmul(qb, k.transpose(1, 2)) * scaling      # [H, g·q, n]
            if attention_mask is not None:
                keep = attention_mask[b, 0, :, j * bs: j * bs + n]  # [q, n]
                s = s.masked_fill(~keep.expand(g, q, n).reshape(1, g * q, n), float("-inf"))
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p, corr = torch.exp(s - m_safe), torch.exp(m - m_safe)
            s_sum = s_sum * corr + p.sum(-1, keepdim=True)
            acc = acc * corr + torch.matmul(p, v)
            m = m_new
        out.append((acc / s_sum).reshape(Hq, q, D))
    return torch.stack(out)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function (registered as PAGED_ATTENTION): block-table attention when the cache
    hands over a BlockView, plain scaled_dot_product_attention on the tensors it gets otherwise (the prefill)."""
    if isinstance(key, BlockView):
        out = paged_attention_decode(query, key, attention_mask, scaling).to(query.dtype)
    else:
        causal = attention_mask is None and query.shape[2] > 1
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, is_causal=causal,
                                             scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register_paged_attention() -> str:
    """Make PAGED_ATTENTION a valid `attn_implementation` (with sdpa's boolean mask); returns the name.
    Use: `model.set_attn_implementation(lk.kvcache.register_paged_attention())`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(PAGED_ATTENTION, paged_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PAGED_ATTENTION, sdpa_mask)
    return PAGED_ATTENTION


# ---------------------------------------------------------------- sizes and sharing
def kv_cache_table(config, seq_len: int = 2048, batch: int = 1, group_size: int = 64) -> list[dict]:
    """Bytes of a KV cache per token and for batch × seq_len tokens: every attention layout (MHA: one KV head per
    query head; the model's GQA; MQA: one KV head) × fp32 / bf16 / int8 / int4 (+ fp16 group scales)."""
    seq_len = whole_number("seq_len", seq_len, 0, "tokens per sequence, e.g. 2048")
    batch = whole_number("batch", batch, 0, "sequences, e.g. 1")
    kv_heads = kv_layout(config)[1]
    heads = config.num_attention_heads
    rows = []
    for name, h in (("MHA", heads), ("GQA", kv_heads), ("MQA", 1)):
        for dt in KV_DTYPES:
            per_tok = kv_token_bytes(config, dt, group_size, kv_heads=h)
            rows.append({"attention": name, "kv_heads": h, "dtype": dt, "bytes_per_token": per_tok,
                         "total_bytes": per_tok * seq_len * batch})
    return rows


def shared_prefix_blocks(n: int, prefix_len: int, total_len: int, block_size: int) -> int:
    """Blocks n sequences need when they share a prefix: its full blocks once + each sequence's own tail."""
    n = whole_number("n", n, 1, "sequences sharing the prefix")
    block_size = whole_number("block_size", block_size, 1, "tokens per block, e.g. 16")
    total_len = whole_number("total_len", total_len, 0, "tokens per sequence, prefix included")
    prefix_len = whole_number("prefix_len", prefix_len, 0, "tokens shared, at most total_len", high=total_len)
    full = prefix_len // block_size
    return full + n * (-(-total_len // block_size) - full)


def _check_generation(model, prompt_len: int, max_new_tokens, block_size) -> None:
    """max_new_tokens ≥ 1 within the model's context after the prompt, and a block size ≥ 1."""
    limit = getattr(model.config, "max_position_embeddings", None)
    room = limit - prompt_len if isinstance(limit, int) else None
    whole_number("max_new_tokens", max_new_tokens, 1, "tokens to generate, within the model's context", high=room)
    whole_number("block_size", block_size, 1, "tokens per block, e.g. 16")


@torch.inference_mode()
def generate_shared_prefix(model, prefix_ids, suffix_ids, max_new_tokens: int = 16, block_size: int = 16,
                           kv_dtype: str = "fp32") -> dict:
    """N requests that share one prefix (a system prompt) and differ in their suffix (equal lengths, so the rows
    move together): prefill the prefix once, `fork` it N − 1 times, then `model.generate` the N requests
    greedily. Returns the tokens [N, prefix + suffix + new], blocks used, the formula, and what N private
    copies would need."""
    from .evaluate import check_token_ids
    from .models import check_llama
    check_token_ids("prefix_ids", prefix_ids, check_llama(model), dims=2)
    check_token_ids("suffix_ids", suffix_ids, model, dims=2)
    _check_generation(model, prefix_ids.shape[1] + suffix_ids.shape[1], max_new_tokens, block_size)
    if prefix_ids.shape[0] != 1:
        raise ValueError("prefix_ids must be one row [1, P]; the N requests are the rows of suffix_ids")
    N, P, S = suffix_ids.shape[0], prefix_ids.shape[1], suffix_ids.shape[1]
    per_seq = -(-(P + S + max_new_tokens) // block_size)
    cache = PagedKVCache(model.config, num_blocks=N * per_seq + 1, block_size=block_size, kv_dtype=kv_dtype)
    model(prefix_ids, past_key_values=cache)
    cache.fork(0, N - 1)
    ids = torch.cat([prefix_ids.expand(N, -1), suffix_ids], dim=1)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, do_sample=False,
                         max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                         pad_token_id=model.generation_config.pad_token_id or 0)
    L = cache.length
    res = {"tokens": out, "cached_tokens": L, "blocks_used": cache.pool.num_used,
           "blocks_formula": shared_prefix_blocks(N, P, L, block_size), "blocks_unshared": N * -(-L // block_size),
           "shared_blocks": sum(1 for c in cache.pool.refcount if c > 1), "copies_on_write": cache.n_cow,
           "block_bytes": cache.block_bytes}
    res["bytes_saved_vs_copies"] = (res["blocks_unshared"] - res["blocks_used"]) * cache.block_bytes
    cache.release()
    return res


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

    from .evaluate import check_token_ids
    from .models import check_llama
    check_token_ids("input_ids", input_ids, check_llama(model), dims=2)
    if input_ids.shape[0] != 1:
        raise ValueError("sample_parallel takes one prompt (batch 1); it forks the n sequences itself")
    n = whole_number("n", n, 1, "sequences to sample, e.g. 4", high=1024)
    seed = whole_number("seed", seed, 0, "any whole number ≥ 0")
    if not real_number("temperature", temperature, "e.g. 1.0", low=0) > 0:
        raise ValueError(f"temperature must be > 0 (e.g. 1.0), got {temperature!r}")
    _check_generation(model, input_ids.shape[1], max_new_tokens, block_size)
    check_fits(f"sampling noise for {n} × {max_new_tokens} tokens", 4 * n * max_new_tokens * model.config.vocab_size,
               "sample fewer or shorter sequences")
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
                   block_bytes=cache.block_bytes, tables=[list(t) for t in cache.tables], cached_tokens=L)
        cache.release()
    return res
