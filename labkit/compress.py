"""Entropy coding of weights: entropy, canonical Huffman codes (encode/decode with numpy), weight sharing, and
the lab's one bit packer (`pack_bits` / `unpack_bits`: bitmap masks, 2:4 positions, 4-bit indices, quantized codes).
The comparison with zlib / lzma / zstandard lives in labkit.experiments.compress.

Defined in notebook 04 (Sparse storage, "Compressing what is left"), after Deep Compression (Han et al. 2016):
prune → share values (a small codebook, 4-bit indices) → Huffman-code the indices.

    >>> enc = lk.compress.huffman_encode(symbols)          # symbols: integer numpy array
    >>> (lk.compress.huffman_decode(enc) == symbols).all()
    True
"""
from __future__ import annotations

import heapq
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .checks import MAX_STEPS, whole_number
from .repro import ChecksumError

MAX_CODE_LENGTH = 57  # decoding reads a window of this many bits into one uint64


# ----------------------------------------------------------------------------------------------- entropy
def check_symbols(symbols) -> np.ndarray:
    if isinstance(symbols, torch.Tensor):
        symbols = symbols.detach().cpu().numpy()
    if isinstance(symbols, (bytes, bytearray)):
        symbols = np.frombuffer(symbols, dtype=np.uint8)
    a = np.asarray(symbols)
    if a.dtype.kind not in "iub":
        raise TypeError(f"symbols must be integers (e.g. quantization indices), got dtype {a.dtype}; "
                        f"quantize first (lk.compress.share_weights) or view the bytes with np.frombuffer")
    if a.size and a.min() < 0:
        raise ValueError("symbols must be non-negative; shift them (x - x.min()) before coding")
    return a


def frequencies(symbols) -> dict[int, int]:
    """Count of each symbol value."""
    a = check_symbols(symbols).ravel()
    vals, counts = np.unique(a, return_counts=True)
    return {int(v): int(c) for v, c in zip(vals, counts)}


def entropy(symbols=None, freqs: dict | None = None) -> float:
    """Shannon entropy H = −Σ p·log2 p in bits per symbol: the lower bound on any symbol-by-symbol code."""
    freqs = frequencies(symbols) if freqs is None else _check_freqs(freqs)
    c = np.array(list(freqs.values()), dtype=np.float64)
    if c.size == 0 or c.sum() == 0:
        return 0.0
    p = c[c > 0] / c.sum()
    return max(0.0, float(-(p * np.log2(p)).sum()))


# ----------------------------------------------------------------------------------------------- Huffman
def _check_freqs(freqs) -> dict:
    if not isinstance(freqs, dict):
        raise TypeError(f"freqs must be a dict {{symbol: count}} (e.g. lk.compress.frequencies(x)), got "
                        f"{type(freqs).__name__}")
    for s, c in freqs.items():
        whole_number(f"freqs[{s!r}]", c, 0, "a count")
    return freqs


def huffman_lengths(freqs: dict[int, int]) -> dict[int, int]:
    """Code length per symbol from a Huffman tree built with heapq (merge the two rarest, repeat).

    A single symbol gets length 1 (a code needs at least one bit)."""
    items = [(int(c), s) for s, c in _check_freqs(freqs).items() if c > 0]
    if not items:
        raise ValueError("cannot build a Huffman code from no symbols")
    if len(items) == 1:
        return {items[0][1]: 1}
    # heap entries: (count, tie-breaker, node id); parent[node] gives the tree, leaves are 0..n-1
    heap = [(c, i, i) for i, (c, _) in enumerate(items)]
    heapq.heapify(heap)
    parent: list[int] = [-1] * len(items)
    while len(heap) > 1:
        c1, _, a = heapq.heappop(heap)
        c2, _, b = heapq.heappop(heap)
        node = len(parent)
        parent.append(-1)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (c1 + c2, node, node))
    depth = [0] * len(parent)
    for node in range(len(parent) - 2, -1, -1):   # parents have larger ids: walk from the root down
        depth[node] = depth[parent[node]] + 1
    return {s: depth[i] for i, (_, s) in enumerate(items)}


def canonical_codes(lengths: dict[int, int]) -> dict[int, tuple[int, int]]:
    """Canonical Huffman: sort by (length, symbol) and count upwards; {symbol: (code, length)}.

    Only the lengths need to be stored to rebuild the code."""
    if not isinstance(lengths, dict):
        raise TypeError(f"lengths must be a dict {{symbol: code length ≥ 1}} (from huffman_lengths), got "
                        f"{type(lengths).__name__}")
    for s, L in lengths.items():
        whole_number(f"lengths[{s!r}]", L, 1, "a code length from huffman_lengths")
    if sum(2.0 ** -L for L in lengths.values()) > 1 + 1e-12:
        raise ValueError("these code lengths break Kraft's inequality (Σ 2^-L > 1): no prefix code has them")
    code, prev = 0, 0
    out = {}
    for s, L in sorted(lengths.items(), key=lambda kv: (kv[1], kv[0])):
        code <<= L - prev
        out[s] = (code, L)
        code += 1
        prev = L
    return out


@dataclass
class HuffmanEncoded:
    """A Huffman-coded array: the bit-packed payload plus what decoding needs (symbols and their lengths)."""
    payload: bytes
    n_bits: int
    shape: tuple
    dtype: str
    symbols: np.ndarray   # alphabet, sorted by (length, symbol)
    lengths: np.ndarray   # uint8 code lengths, same order
    crc32: int | None = None   # of the payload: decode refuses a corrupted payload (a flipped bit decodes silently)

    @property
    def n_symbols(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        """Payload + code table (symbol values and one length byte each)."""
        return len(self.payload) + self.symbols.nbytes + self.lengths.nbytes

    @property
    def bits_per_symbol(self) -> float:
        """Mean code length (payload bits / symbols), without the table."""
        return self.n_bits / max(1, self.n_symbols)


def mean_code_length(freqs: dict[int, int], lengths: dict[int, int]) -> float:
    """Σ p(s)·len(s): expected bits per symbol of the code."""
    freqs = _check_freqs(freqs)
    missing = [s for s, c in freqs.items() if c > 0 and s not in lengths]
    if missing:
        raise ValueError(f"lengths has no code for symbols {missing[:5]}; build them with huffman_lengths(freqs)")
    total = sum(freqs.values())
    if total == 0:
        raise ValueError("freqs has no symbols (all counts are 0)")
    return sum(c * lengths[s] for s, c in freqs.items() if c > 0) / total


def huffman_encode(symbols, chunk: int = 1 << 18) -> HuffmanEncoded:
    """Encode an integer array with a canonical Huffman code built from its own frequencies."""
    a = check_symbols(symbols)
    chunk = whole_number("chunk", chunk, 1, "symbols encoded at a time, e.g. 1 << 18")
    flat = a.ravel()
    if flat.size == 0:
        return HuffmanEncoded(b"", 0, a.shape, a.dtype.str, np.zeros(0, np.int64), np.zeros(0, np.uint8))
    freqs = frequencies(flat)
    codes = canonical_codes(huffman_lengths(freqs))
    order = sorted(codes, key=lambda s: (codes[s][1], s))
    lmax = max(L for _, L in codes.values())
    if lmax > MAX_CODE_LENGTH:
        raise ValueError(f"a code length of {lmax} bits exceeds {MAX_CODE_LENGTH}; the distribution is too skewed "
                         f"for this decoder — code fewer distinct symbols")
    # lookup tables indexed by the symbol's rank in the alphabet (symbol values can be huge)
    alphabet, flat = np.unique(flat, return_inverse=True)
    code_of = np.zeros(alphabet.size, dtype=np.uint64)
    len_of = np.zeros(alphabet.size, dtype=np.int64)
    for i, s in enumerate(alphabet.tolist()):
        code_of[i], len_of[i] = codes[s]
    out, carry, n_bits = [], np.zeros(0, np.uint8), 0
    shifts = np.arange(lmax - 1, -1, -1, dtype=np.int64)          # MSB first
    for i in range(0, flat.size, chunk):
        part = flat[i:i + chunk].astype(np.int64)
        L, C = len_of[part], code_of[part]
        # bit j of a code of length L, left-aligned in lmax columns
        rel = shifts[None, :] - (lmax - L)[:, None]               # which bit of the code sits in each column
        bits = ((C[:, None] >> np.maximum(rel, 0).astype(np.uint64)) & np.uint64(1)).astype(np.uint8)
        bits = bits[rel >= 0]                                      # row-major: codes in order, MSB first
        n_bits += bits.size
        bits = np.concatenate([carry, bits])
        full = bits.size // 8 * 8
        out.append(np.packbits(bits[:full]).tobytes())
        carry = bits[full:]
    if carry.size:
        out.append(np.packbits(carry).tobytes())                   # zero-padded last byte
    payload = b"".join(out)
    return HuffmanEncoded(payload, n_bits, a.shape, a.dtype.str, np.array(order, dtype=np.int64),
                          np.array([codes[s][1] for s in order], dtype=np.uint8), zlib.crc32(payload))


def huffman_decode(enc: HuffmanEncoded) -> np.ndarray:
    """Decode without a Python loop over symbols.

    1. For every bit position p, read the lmax-bit window starting at p and find which codeword it starts with
       (canonical codes: the code length is found by comparing the window with per-length limits).
    2. The real codeword starts are 0, next(0), next(next(0)), ... with next(p) = p + len(p); compute that chain
       for all n symbols at once by pointer doubling (log2 n vectorized steps)."""
    if not isinstance(enc, HuffmanEncoded):
        raise TypeError(f"huffman_decode needs the HuffmanEncoded that huffman_encode returned, got {type(enc).__name__}")
    if enc.crc32 is not None and zlib.crc32(enc.payload) != enc.crc32:
        raise ChecksumError(f"the Huffman payload ({len(enc.payload):,} bytes) does not match its crc32: it was "
                            "corrupted or truncated after encoding; encode the symbols again")
    n = enc.n_symbols
    dtype = np.dtype(enc.dtype)
    if n == 0 or enc.n_bits == 0:
        return np.zeros(enc.shape, dtype=dtype)
    lengths = enc.lengths.astype(np.int64)
    lmax = int(lengths.max())
    bits = np.unpackbits(np.frombuffer(enc.payload, dtype=np.uint8))[: enc.n_bits]
    if bits.size < enc.n_bits:
        raise ValueError(f"Huffman payload is truncated: {bits.size} bits, expected {enc.n_bits}")
    B = enc.n_bits
    padded = np.concatenate([bits, np.zeros(lmax, np.uint8)]).astype(np.uint64)
    window = np.zeros(B, dtype=np.uint64)
    for j in range(lmax):
        window = (window << np.uint64(1)) | padded[j:j + B]
    # canonical tables per length: first code, count, index of first symbol of that length
    counts = np.bincount(lengths, minlength=lmax + 1)
    first = np.zeros(lmax + 2, dtype=np.int64)
    offset = np.zeros(lmax + 2, dtype=np.int64)
    code = 0
    for L in range(1, lmax + 1):
        first[L] = code
        offset[L] = offset[L - 1] + (counts[L - 1] if L > 1 else 0)
        code = (code + counts[L]) << 1
    # limit[L] = exclusive upper bound of lmax-bit windows that start with a code of length ≤ L
    limit = np.array([(int(first[L]) + int(counts[L])) << (lmax - L) for L in range(1, lmax + 1)], dtype=np.uint64)
    L_at = np.searchsorted(limit, window, side="right") + 1        # code length starting at each bit position
    L_at = np.minimum(L_at, lmax)
    idx = (window >> (np.uint64(lmax) - L_at.astype(np.uint64))).astype(np.int64) - first[L_at] + offset[L_at]
    # chain of codeword starts by pointer doubling; positions ≥ B go to a sentinel
    nxt = np.minimum(np.arange(B, dtype=np.int64) + L_at, B)
    nxt = np.append(nxt, B)
    starts = np.zeros(1, dtype=np.int64)
    while starts.size < n:
        starts = np.concatenate([starts, nxt[starts]])
        nxt = nxt[nxt]
    starts = starts[:n]
    if starts[-1] >= B:
        raise ValueError("Huffman payload is corrupt: ran out of bits before decoding every symbol")
    sym_idx = idx[starts]
    if sym_idx.min() < 0 or sym_idx.max() >= enc.symbols.size:
        raise ValueError("Huffman payload is corrupt: a bit pattern is not a codeword")
    return enc.symbols[sym_idx].astype(dtype).reshape(enc.shape)


# ----------------------------------------------------------------------------------------------- weights → symbols
def _check_weights(w, who: str) -> torch.Tensor:
    """A finite real tensor as fp32, or a clear TypeError/ValueError."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{who} needs a torch.Tensor of weights, got {type(w).__name__}; use torch.as_tensor(x)")
    if w.is_complex() or w.dtype == torch.bool:
        raise TypeError(f"{who} needs real weights, got {w.dtype}")
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError(f"{who}: the weights hold {int((~torch.isfinite(w)).sum())} NaN/inf values; "
                         "clustering them gives NaN centroids — fix or mask them first")
    return w


def _check_k(k, rows: int = 1) -> int:
    from .memory import check_fits
    k = whole_number("k", k, 1, "a number of centroids, e.g. 16")
    check_fits(f"k-means with k={k} centroids", 16 * k * rows, "pick k below the number of values")
    return k


def _check_iters(iters) -> int:
    return whole_number("iters", iters, 0, "k-means iterations, e.g. 15", high=MAX_STEPS)


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 15) -> torch.Tensor:
    """Sorted centroids of a 1-D k-means with linear initialisation (min..max), as in Deep Compression."""
    v = _check_weights(values, "kmeans_1d").reshape(-1)
    _check_k(k)
    iters = _check_iters(iters)
    if v.numel() == 0:
        raise ValueError("no values to cluster")
    c = torch.linspace(float(v.min()), float(v.max()), k)
    for _ in range(iters):
        assign = torch.bucketize(v, (c[1:] + c[:-1]) / 2)
        sums = torch.zeros(k).index_add_(0, assign, v)
        cnt = torch.bincount(assign, minlength=k).float()
        c = torch.where(cnt > 0, sums / cnt.clamp(min=1), c).sort().values
    return c


def kmeans_rows(w: torch.Tensor, k: int, iters: int = 15) -> torch.Tensor:
    """k-means of every row of a 2-D tensor at once, over its nonzeros (zeros are pruned weights and take no
    part): the same algorithm as kmeans_1d (linear initialisation from the row's min to its max, so the row's
    largest weights keep a centroid), vectorised over rows. Returns sorted centroids [rows, k]; a row with no
    nonzeros gets k zeros."""
    w = _check_weights(w, "kmeans_rows")
    if w.dim() != 2:
        raise ValueError(f"kmeans_rows needs a 2-D weight, got shape {tuple(w.shape)}")
    _check_k(k, w.shape[0])
    iters = _check_iters(iters)
    w = w.contiguous()
    nz = w != 0
    lo = torch.where(nz, w, torch.inf).amin(1)
    hi = torch.where(nz, w, -torch.inf).amax(1)
    empty = ~nz.any(1)
    lo[empty], hi[empty] = 0.0, 0.0
    c = lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, k)[None]
    nzf = nz.float()
    for _ in range(iters):
        assign = torch.searchsorted(((c[:, 1:] + c[:, :-1]) / 2).contiguous(), w)
        sums = torch.zeros_like(c).scatter_add_(1, assign, w)            # zeros add nothing to a sum …
        cnt = torch.zeros_like(c).scatter_add_(1, assign, nzf)           # … and are not counted
        c = torch.where(cnt > 0, sums / cnt.clamp(min=1), c).sort(1).values
    return c


def share_weights(w: torch.Tensor, bits: int = 4, iters: int = 15) -> tuple[np.ndarray, torch.Tensor]:
    """Weight sharing: zeros (pruned) get symbol 0; nonzeros get 1..2^bits−1 from a k-means codebook.

    Returns (symbols as uint8 numpy array, codebook with codebook[0] = 0)."""
    _check_bits(bits)
    _check_iters(iters)
    w = _check_weights(w, "share_weights")
    nz = w != 0
    k = 2 ** bits - 1
    cent = kmeans_1d(w[nz], k, iters) if nz.any() else torch.zeros(k)
    sym = torch.zeros(w.shape, dtype=torch.uint8)
    sym[nz] = (torch.bucketize(w[nz], (cent[1:] + cent[:-1]) / 2) + 1).to(torch.uint8)
    return sym.numpy(), torch.cat([torch.zeros(1), cent])


def _check_bits(bits) -> int:
    return whole_number("bits", bits, 1, "1–8", high=8)


def pack_bits(codes, bits: int) -> torch.Tensor:
    """Pack unsigned integer codes (each < 2**bits; bools for bits=1) into uint8 bytes, least significant first.

    The lab's one bit packer (bitmap masks, 2:4 positions, 4-bit indices, quantized codes): n codes take exactly
    ceil(n·bits/8) bytes — eight 1-bit codes, four 2-bit codes, two 4-bit codes per byte, eight 3-bit codes in
    three bytes. Code j's bit k sits at bit position j·bits + k of the stream."""
    bits = _check_bits(bits)
    if isinstance(codes, np.ndarray):
        codes = torch.from_numpy(np.ascontiguousarray(codes))
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"pack_bits needs a tensor or numpy array of integer codes, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.is_complex():
        raise TypeError(f"pack_bits needs integer codes, got {codes.dtype}; round and convert them first "
                        f"(e.g. q.to(torch.uint8))")
    flat = codes.detach().cpu().reshape(-1)
    if codes.dtype != torch.bool and flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= (1 << bits)):
        raise ValueError(f"pack_bits: codes must lie in [0, {(1 << bits) - 1}] for {bits} bits, got "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    flat = flat.to(torch.uint8)
    n = flat.numel()
    if bits == 8:
        return flat.clone()
    nbytes = (n * bits + 7) // 8
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte
        per = 8 // bits
        g = torch.nn.functional.pad(flat, (0, (-n) % per)).view(-1, per)
        out = torch.zeros(g.shape[0], dtype=torch.uint8)
        for j in range(per):
            out |= g[:, j] << (j * bits)
        return out[:nbytes].contiguous()
    # 3, 5, 6, 7 bits: 8 codes fill exactly `bits` bytes
    g = torch.nn.functional.pad(flat, (0, (-n) % 8)).view(-1, 8)
    stream = torch.stack([(g >> b) & 1 for b in range(bits)], dim=-1).reshape(-1, 8)
    out = torch.zeros(stream.shape[0], dtype=torch.uint8)
    for b in range(8):
        out |= stream[:, b] << b
    return out[:nbytes].contiguous()


def unpack_bits(packed, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: the first n codes as uint8 (use .bool() for a 1-bit mask)."""
    bits = _check_bits(bits)
    if isinstance(packed, (bytes, bytearray)):
        packed = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
    if isinstance(packed, np.ndarray):
        packed = torch.from_numpy(np.ascontiguousarray(packed))
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits needs uint8 bytes (a tensor, array or bytes), got "
                        f"{getattr(packed, 'dtype', type(packed).__name__)}")
    n = whole_number("n", n, 0, "unpack_bits: how many codes to unpack")
    if packed.numel() * 8 < n * bits:
        raise ValueError(f"unpack_bits: {packed.numel()} bytes hold fewer than {n} codes of {bits} bits "
                         f"(truncated data?)")
    p = packed.detach().cpu().reshape(-1)
    if bits == 8:
        return p[:n].clone()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        return torch.stack([(p >> (j * bits)) & mask for j in range(per)], dim=-1).reshape(-1)[:n].contiguous()
    p = torch.nn.functional.pad(p, (0, (-p.numel()) % bits))
    stream = torch.stack([(p >> b) & 1 for b in range(8)], dim=-1).reshape(-1, 8, bits)
    out = torch.zeros(stream.shape[0], 8, dtype=torch.uint8)
    for b in range(bits):
        out |= stream[:, :, b] << b
    return out.reshape(-1)[:n].contiguous()
