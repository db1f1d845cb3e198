"""How one weight matrix is stored in a compressed model, and read back.

Defined in notebook 07 (07_capstone.ipynb, §1 "A recipe, and what it stores"). Stored formats of one weight:
"raw" (fp32), "bitmap" (pruned fp32: 1 bit per position + the nonzeros), "int" (integer codes + fp16 scales per
row or group) and "kmeans" (codes into a codebook, 0 = pruned: one fp32 codebook per matrix as in Deep
Compression, or one fp16 codebook per row). Codes are stored bit-packed ("none"), or entropy coded with zstd or
lk.compress's canonical Huffman; zstd codes stream from the file into the packed codes at load time, a chunk at a
time. `encode_matrix` / `decode_matrix` are the whole round trip; the model-level container, export and
`load_compressed` are in labkit/compressed_format.py, which re-exports everything here (as does lk.capstone).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import compress as C
from . import quantize as Q
from . import sparse as S
from .checks import torch_tensor, whole_number
from .repro import ChecksumError

ZSTD_LEVEL = 3
SIDE_PARTS = ("values", "mask", "codebook", "scales", "zeros")   # stored beside the codes
KMEANS_SAMPLE = 1 << 15     # k-means centroids are fitted on an evenly strided sample of this many weights


def _check_w(w) -> torch.Tensor:
    return torch_tensor("w", w, "a weight matrix, e.g. model.model.layers[0].mlp.up_proj.weight", kind="float",
                        finite=True, empty=True)


def _check_bits(bits) -> int:
    return whole_number("bits", bits, 1, "bits per code, 1–8", high=8)


def _check_meta(parts, meta) -> None:
    """parts and meta of a stored matrix as encode_codes / encode_matrix wrote them, or a ValueError saying so."""
    if not isinstance(parts, dict) or not all(isinstance(v, torch.Tensor) for v in parts.values()):
        raise TypeError(f"parts must be the dict of tensors encode_codes/encode_matrix returned, got {parts!r:.80}")
    if not isinstance(meta, dict) or not isinstance(meta.get("bits"), int) or not (
            {"packed", "zstd"} & set(parts) or {"huffman", "huffman_symbols", "huffman_lengths"} <= set(parts)):
        raise ValueError("parts/meta are not a stored matrix's codes (they need 'bits' and packed, zstd or Huffman "
                         "parts); pass what encode_codes or encode_matrix returned")


def share(w: torch.Tensor, bits: int, sample: int = KMEANS_SAMPLE) -> tuple[np.ndarray, torch.Tensor]:
    """Weight sharing as lk.compress.share_weights (symbol 0 = zero, 2^bits − 1 k-means centroids for the
    nonzeros), with the centroids fitted on an evenly strided sample plus the matrix's smallest and largest
    weight (so the linear initialisation spans the whole range, as Han et al.'s, and a lone outlier keeps a
    centroid): fast enough for 134M weights. Returns (uint8 symbols, flat; codebook [2^bits])."""
    _check_w(w)
    bits = _check_bits(bits)
    sample = whole_number("sample", sample, 1, "weights the centroids are fitted on, e.g. 32768")
    w = w.detach().float().reshape(-1)
    nz = w != 0
    vals = w[nz]
    k = 2 ** bits - 1
    if vals.numel() == 0:
        return np.zeros(w.numel(), np.uint8), torch.zeros(k + 1)
    sub = torch.cat([vals[:: max(1, vals.numel() // sample)], vals.min()[None], vals.max()[None]])
    cent = C.kmeans_1d(sub, k)
    sym = torch.zeros(w.numel(), dtype=torch.uint8)
    sym[nz] = (torch.bucketize(vals, (cent[1:] + cent[:-1]) / 2) + 1).to(torch.uint8)
    return sym.numpy(), torch.cat([torch.zeros(1), cent])


def share_rows(w: torch.Tensor, bits: int) -> tuple[np.ndarray, torch.Tensor]:
    """Weight sharing with one codebook per output row (lk.compress.kmeans_rows on all of the row's nonzeros):
    symbol 0 = zero, 1..2^bits − 1 the row's centroids, stored in fp16 (codes are chosen against the fp16
    centroids, so the stored codebook is exactly what is decoded). Returns (uint8 symbols, flat, row-major;
    codebook [rows, 2^bits] fp16)."""
    if _check_w(w).dim() != 2:
        raise ValueError(f"per-row codebooks need a 2-D weight, got shape {tuple(w.shape)}")
    bits = _check_bits(bits)
    w = w.detach().float().contiguous()
    cent = C.kmeans_rows(w, 2 ** bits - 1).half().float()
    sym = torch.searchsorted(((cent[:, 1:] + cent[:, :-1]) / 2).contiguous(), w) + 1
    sym = torch.where(w != 0, sym, 0).to(torch.uint8)
    return sym.reshape(-1).numpy(), torch.cat([torch.zeros(len(w), 1), cent], 1).half()


def encode_codes(codes: np.ndarray, bits: int, entropy: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Codes (uint8, flat) → stored tensors: bit-packed, zstd of one code per byte, or canonical Huffman."""
    if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8:
        raise TypeError(f"codes must be a uint8 numpy array (from share or unpack_bits(...).numpy()), got "
                        f"{getattr(codes, 'dtype', type(codes).__name__)}")
    _check_bits(bits)
    if entropy not in ("none", "zstd", "huffman"):
        raise ValueError(f"entropy={entropy!r}; use 'none' (bit-packed), 'zstd' or 'huffman'")
    if entropy == "none":
        return {"packed": Q.pack_bits(torch.from_numpy(codes), bits)}, {}
    if entropy == "zstd":
        import zstandard
        z = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(codes.tobytes())
        return {"zstd": torch.frombuffer(bytearray(z), dtype=torch.uint8)}, {}
    enc = C.huffman_encode(codes)
    return ({"huffman": torch.frombuffer(bytearray(enc.payload), dtype=torch.uint8) if enc.payload
             else torch.zeros(0, dtype=torch.uint8),
             "huffman_symbols": torch.from_numpy(enc.symbols.astype(np.uint8)),
             "huffman_lengths": torch.from_numpy(enc.lengths.copy())}, {"n_bits": enc.n_bits})


def decode_codes(parts: dict[str, torch.Tensor], meta: dict, n: int) -> np.ndarray:
    """Inverse of encode_codes: n uint8 codes."""
    _check_meta(parts, meta)
    n = whole_number("n", n, 0, "how many codes the matrix holds (rows × cols)")
    bits = meta["bits"]
    if "packed" in parts:
        return Q.unpack_bits(parts["packed"], bits, n).numpy()
    if "zstd" in parts:
        import zstandard
        raw = zstandard.ZstdDecompressor().decompress(parts["zstd"].numpy().tobytes(), max_output_size=n)
        return np.frombuffer(raw, dtype=np.uint8).copy()
    enc = C.HuffmanEncoded(parts["huffman"].numpy().tobytes(), int(meta["n_bits"]), (n,), "|u1",
                           parts["huffman_symbols"].numpy().astype(np.int64), parts["huffman_lengths"].numpy())
    return C.huffman_decode(enc)


def packed_codes(parts: dict, meta: dict, n: int, chunk: int = 1 << 16) -> torch.Tensor:
    """Entropy-coded codes → bit-packed codes. zstd streams: `parts["zstd"]` is the compressed tensor or a file-like
    object (SafetensorsReader.stream: read straight from the file), decompressed `chunk` codes at a time into one
    reused buffer and packed into the preallocated result, so the extra memory is one chunk plus zstd's window —
    never one byte per code for a whole matrix. Huffman decodes whole, then packs."""
    bits = meta["bits"]
    if "zstd" not in parts:
        return Q.pack_bits(torch.from_numpy(decode_codes(parts, meta, n)), bits)
    import zstandard
    if chunk < 8 or chunk % 8:
        raise ValueError(f"chunk={chunk} must be a positive multiple of 8 codes (8 codes pack into whole bytes)")
    src = parts["zstd"]
    reader = zstandard.ZstdDecompressor().stream_reader(src.numpy() if isinstance(src, torch.Tensor) else src)
    out = torch.empty(math.ceil(n * bits / 8), dtype=torch.uint8)
    buf = bytearray(min(chunk, n))
    view, codes = memoryview(buf), torch.frombuffer(buf, dtype=torch.uint8) if buf else None
    done = 0
    while done < n:
        want, got = min(chunk, n - done), 0
        while got < want:
            k = reader.readinto(view[got:want])
            if not k:
                raise ChecksumError(f"the zstd stream ends after {done + got} of {n} codes; re-export the model")
            got += k
        packed = Q.pack_bits(codes[:want], bits)
        lo = done * bits // 8
        out[lo: lo + packed.numel()] = packed
        done += want
    return out


def _reconstruct(fmt: str, codes: np.ndarray | None, side: dict[str, torch.Tensor], meta: dict,
                 packed: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 weight a stored matrix stands for (the same function at compression and at load time)."""
    shape = tuple(meta["shape"])
    if fmt == "raw":
        return side["values"].reshape(shape)
    if fmt == "bitmap":
        return S.Bitmap(side["mask"], side["values"], shape).to_dense()
    if fmt == "kmeans":
        if codes is None:
            codes = Q.unpack_bits(packed, meta["bits"], math.prod(shape)).numpy()
        book, idx = side["codebook"].float(), torch.from_numpy(codes).long()
        if book.dim() == 2:                                   # one codebook per row
            return book.gather(1, idx.reshape(book.shape[0], -1)).reshape(shape)
        return book[idx].reshape(shape)
    if packed is None:
        packed = Q.pack_bits(torch.from_numpy(codes), meta["bits"])
    return Q.dequantize(int_qtensor(packed, side, meta))


def int_qtensor(packed: torch.Tensor, side: dict[str, torch.Tensor], meta: dict) -> "Q.QTensor":
    """The QTensor of a stored "int" matrix: packed codes + scales (+ zero points when asymmetric)."""
    return Q.QTensor(packed, side["scales"], side.get("zeros"), meta["bits"], meta["group_size"],
                     tuple(meta["shape"]), "zeros" not in side, meta["granularity"], torch.float32)


def encode_matrix(w: torch.Tensor, recipe) -> tuple[dict, torch.Tensor]:
    """One weight (already pruned when recipe.sparsity > 0) → ({"format", "shape", ..., "parts": {name: tensor}},
    its reconstruction); `recipe` is a lk.capstone.Recipe. 1-D tensors (norms, biases) are always stored raw."""
    _check_w(w)
    if not all(hasattr(recipe, a) for a in ("sparsity", "quant", "bits", "group_size", "entropy", "codebook")):
        raise TypeError(f"recipe must be a lk.capstone.Recipe, got {type(recipe).__name__}")
    w = w.detach().float().contiguous()
    meta = {"shape": list(w.shape), "dtype": "float32"}
    codes = packed = None
    if w.dim() != 2 or recipe.quant == "none":
        fmt = "bitmap" if (w.dim() == 2 and recipe.sparsity) else "raw"
        side = S.Bitmap.from_dense(w).tensors() if fmt == "bitmap" else {"values": w.reshape(-1)}
    elif recipe.quant == "kmeans":
        fmt = "kmeans"
        codes, codebook = (share_rows if recipe.codebook == "row" else share)(w, recipe.bits)
        side = {"codebook": codebook}
        meta["bits"] = recipe.bits
    else:
        fmt = "int"
        q = Q.quantize(w, recipe.bits, "group" if recipe.group_size else "channel", recipe.group_size,
                       recipe.symmetric)
        packed, side = q.packed, {"scales": q.scales} | ({} if q.zeros is None else {"zeros": q.zeros})
        meta.update(bits=recipe.bits, group_size=q.group_size, granularity=q.granularity)
    parts = dict(side)
    if fmt in ("int", "kmeans"):
        if recipe.entropy == "none" and packed is not None:
            parts["packed"] = packed
        else:
            if codes is None:
                codes = Q.unpack_bits(packed, meta["bits"], w.numel()).numpy()
            coded, extra = encode_codes(codes, meta["bits"], recipe.entropy)
            parts.update(coded)
            meta.update(extra)
    return {"format": fmt, **meta, "parts": parts}, _reconstruct(fmt, codes, side, meta, packed)


def decode_matrix(entry: dict) -> torch.Tensor:
    """The fp32 weight of one stored entry (as written by encode_matrix)."""
    if (not isinstance(entry, dict) or entry.get("format") not in ("raw", "bitmap", "int", "kmeans")
            or not isinstance(entry.get("shape"), (list, tuple)) or not isinstance(entry.get("parts"), dict)):
        raise ValueError("entry must be a stored matrix as encode_matrix returned it ({'format', 'shape', 'parts', "
                         f"...}}); got {entry!r:.80}")
    parts = entry["parts"]
    side = {k: v for k, v in parts.items() if k in SIDE_PARTS}
    if entry["format"] not in ("int", "kmeans") or "packed" in parts:
        return _reconstruct(entry["format"], None, side, entry, parts.get("packed"))
    return _reconstruct(entry["format"], decode_codes(parts, entry, math.prod(entry["shape"])), side, entry)
