"""Experiments for notebook 04 §4 (entropy coding): Deep-Compression symbols of a SmolLM2 layer, bits per
weight of Huffman against general-purpose compressors, and the bench figures. The ideas live in lk.compress."""
from __future__ import annotations

import lzma
import zlib

import numpy as np
import torch

from .. import compress as C


def compressed_sizes(data: bytes) -> dict[str, int]:
    """Bytes after zlib (level 9), lzma (preset 9) and zstandard (level 19) on the same input."""
    import zstandard
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"compressed_sizes needs bytes, got {type(data).__name__}")
    return {"zlib": len(zlib.compress(data, 9)),
            "lzma": len(lzma.compress(data, preset=9)),
            "zstd": len(zstandard.ZstdCompressor(level=19).compress(data))}


def compare(symbols, bits: int = 4) -> dict[str, float]:
    """Bits per symbol: fixed-length (`bits` per symbol, packed with lk.compress.pack_bits), entropy H, Huffman
    (payload, and with its table), and zlib/lzma/zstd on the same packed bytes."""
    a = C.check_symbols(symbols).ravel()
    if a.size == 0:
        raise ValueError("compare needs at least one symbol")
    raw = C.pack_bits(a.astype(np.int64), bits).numpy().tobytes()
    n = a.size
    enc = C.huffman_encode(a)
    out = {"fixed": len(raw) * 8 / n, "entropy": C.entropy(a), "huffman": enc.bits_per_symbol,
           "huffman+table": enc.nbytes * 8 / n}
    out.update({k: v * 8 / n for k, v in compressed_sizes(raw).items()})
    return out


def layer_symbols(model, layer: int = 15, sparsity: float = 0.5, bits: int = 4) -> tuple[np.ndarray, torch.Tensor]:
    """Deep-Compression symbols of one Llama layer's MLP input matrices (gate_proj, up_proj): magnitude-pruned
    with lk.prune, then weight-shared (notebook 04 §4). Returns (symbols, codebook)."""
    from ..prune import magnitude_mask
    mlp = model.model.layers[layer].mlp
    ws = [m.weight.detach() for m in (mlp.gate_proj, mlp.up_proj)]
    pruned = torch.cat([(w * magnitude_mask(w, sparsity)).reshape(-1) for w in ws])
    return C.share_weights(pruned, bits=bits)


def bench() -> dict:
    """Bits per weight on SmolLM2 layer 15's MLP inputs (1.77M weights), 50% magnitude-pruned, 4-bit shared:
    entropy, Huffman (checked lossless), zlib/lzma/zstd on the packed 4-bit bytes."""
    from ..models import load_model
    model, _ = load_model("smollm2-135m")
    sym, _ = layer_symbols(model)
    enc = C.huffman_encode(sym)
    if not np.array_equal(C.huffman_decode(enc), sym):
        raise AssertionError("Huffman round trip failed")
    c = compare(sym, bits=4)
    return {"weights": "SmolLM2-135M layer 15 gate+up, 50% magnitude-pruned, 4-bit shared",
            **{k: round(v, 3) for k, v in c.items()}}
