"""Experiments for notebook 04 (sparse storage): bytes tables, the matmul speed sweep (dense vs CSR vs BSR,
timed with lk.repro.time_call on one thread), storage curves from the exact formulas, the density widget's
report, and the bench figures. The formats and formulas themselves live in lk.sparse."""
from __future__ import annotations

import math

import torch

from .. import sparse as S
from ..repro import time_call


def bytes_table(dense: torch.Tensor, formats=("dense", "coo", "csr", "csr32", "bsr", "bitmap"),
                blocksize=(4, 4)) -> dict[str, dict]:
    """For each format: measured nbytes and the formula's value for this matrix (they must be equal)."""
    out = {}
    nnz = int(torch.count_nonzero(dense))
    vd = dense.dtype
    for fmt in formats:
        s = S.to_format(dense, fmt, blocksize=blocksize)
        idt = getattr(getattr(s, "col_indices", getattr(s, "indices", None)), "dtype", torch.int64)
        f = S.formula_bytes(fmt, dense.shape, nnz, vd, idt, blocksize,
                          n_blocks=s.n_blocks if fmt == "bsr" else None)
        out[fmt] = {"measured": s.nbytes, "formula": f, "ratio_to_dense": s.nbytes / S.Dense.formula_bytes(dense.shape, value_dtype=vd)}
    return out



# ----------------------------------------------------------------------------------------------- timing
def matmul_times(density: float, n: int = 4096, k: int = 64, blocksize=(16, 16), min_run_time: float = 0.1,
                 seed: int = 0) -> dict[str, float]:
    """Median seconds (lk.repro.time_call, one thread) of W @ X with W n×n at `density`, X n×k: dense, torch CSR
    (random sparsity) and torch BSR (block sparsity with the same density)."""
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1))
    w = S.random_sparse((n, n), density, seed)
    csr = S.CSR.from_dense(w, index_dtype=torch.int32).to_torch()
    t = {"dense": time_call(torch.matmul, w, x, min_run_time=min_run_time),
         "csr": time_call(torch.matmul, csr, x, min_run_time=min_run_time)}
    del csr
    wb = S.random_sparse((n, n), density, seed, blocksize=blocksize)
    bsr = S.BSR.from_dense(wb, blocksize=blocksize, index_dtype=torch.int32).to_torch()
    t["bsr"] = time_call(torch.matmul, bsr, x, min_run_time=min_run_time)
    return t


def crossover(densities, ratios) -> float:
    """Density where a ratio (sparse / dense) crosses 1, interpolated linearly; nan if it never does."""
    if len(densities) != len(ratios):
        raise ValueError(f"crossover needs one ratio per density, got {len(densities)} densities and {len(ratios)} ratios")
    pts = sorted(zip(densities, ratios))
    for (d0, r0), (d1, r1) in zip(pts, pts[1:]):
        if r0 <= 1.0 < r1 or r0 >= 1.0 > r1:
            return d0 + (1.0 - r0) * (d1 - d0) / (r1 - r0)
    return math.nan


def speed_sweep(densities=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5), n: int = 4096, k: int = 64,
                blocksize=(16, 16), min_run_time: float = 0.1, seed: int = 0) -> dict:
    """Time dense vs CSR vs BSR matmul at each density in one run (one thread); ratios and crossovers."""
    for d in densities:
        S.random_sparse((1, 1), d)                                    # checks each density before any timing
    rows = [dict(density=d, **matmul_times(d, n, k, blocksize, min_run_time, seed)) for d in densities]
    for r in rows:
        r["csr_ratio"], r["bsr_ratio"] = r["csr"] / r["dense"], r["bsr"] / r["dense"]
    ds = [r["density"] for r in rows]
    return {"n": n, "k": k, "blocksize": list(blocksize), "rows": rows,
            "csr_crossover": crossover(ds, [r["csr_ratio"] for r in rows]),
            "bsr_crossover": crossover(ds, [r["bsr_ratio"] for r in rows])}


def storage_curves(densities, shape=(4096, 4096), formats=("coo", "csr", "csr32", "bitmap", "bsr", "2:4"),
                   blocksize=(16, 16)) -> dict[str, list[float]]:
    """Bytes relative to dense at each density from the exact formulas (BSR assumes block sparsity: n_blocks =
    density · all blocks; 2:4 only exists at density ≤ 0.5)."""
    rows, cols = S.check_shape(shape)
    for d in densities:
        S.random_sparse((1, 1), d)                                    # a density in [0, 1], or a clear error
    dense = S.Dense.formula_bytes(shape)
    out = {}
    for fmt in formats:
        vals = []
        for d in densities:
            nnz = round(d * rows * cols)
            if fmt == "bsr":
                br, bc = S.check_block(shape, blocksize)
                nb = round(d * rows * cols / (br * bc))
                vals.append(S.BSR.formula_bytes(shape, nb, blocksize) / dense)
            elif fmt == "2:4":
                vals.append(S.TwoFour.formula_bytes(shape) / dense if d <= 0.5 else math.nan)
            else:
                vals.append(S.formula_bytes(fmt, shape, nnz) / dense)
        bs = S.check_block(shape, blocksize) if fmt == "bsr" else None
        out[f"bsr {bs[0]}×{bs[1]} (block-sparse)" if bs else fmt] = vals
    return out


def density_report(density: float, n: int = 1024, k: int = 64, min_run_time: float = 0.05) -> dict:
    """Bytes of each format for an n×n matrix at `density` (exact formulas) and the matmul times (the widget)."""
    nnz = round(density * n * n)
    out = {fmt: S.formula_bytes(fmt, (n, n), nnz) for fmt in ("dense", "coo", "csr", "csr32", "bitmap")}
    out["2:4"] = S.TwoFour.formula_bytes((n, n)) if density <= 0.5 else None
    return {"density": density, "n": n, "bytes": out, "seconds": matmul_times(density, n, k, (16, 16), min_run_time)}


# ----------------------------------------------------------------------------------------------- signature chart
def relative_error(w: torch.Tensor, approx: torch.Tensor) -> float:
    """‖w − approx‖ / ‖w‖ (Frobenius): 0 for a lossless format."""
    return float((w - approx).norm() / w.norm().clamp(min=1e-30))


def storage_points(w: torch.Tensor, sparsities=(0.5, 0.7, 0.9), formats=("csr32", "bitmap"), bits: int = 4) -> list[dict]:
    """Points for lk.plots.memory_quality(memory="storage", quality="relative error"): one weight matrix stored
    every way — lossless (dense fp32, zstd on its bytes) on the error-0 line; magnitude-pruned at each sparsity in
    each sparse format (bytes measured from the tensors, error = what pruning removed); 2:4; and pruned 50% +
    `bits`-bit shared values (fixed-length indices packed with lk.compress.pack_bits, then Huffman-coded)."""
    import zstandard

    from .. import compress as C
    from ..prune import magnitude_mask, nm_mask
    w = S.check_matrix(w, "w").float()
    pts = [{"bytes": S.Dense.from_dense(w).nbytes, "quality": 0.0, "technique": "dense", "label": "dense fp32",
            "reference": True},
           {"bytes": len(zstandard.ZstdCompressor(level=19).compress(w.numpy().tobytes())), "quality": 0.0,
            "technique": "zstd", "label": "zstd (lossless)", "annotate": True}]
    for sp in sparsities:
        pts += pruned_points(w, sp, formats)
    if w.shape[1] % 4 == 0:
        w24 = w * nm_mask(w, 2, 4)
        pts.append({"bytes": S.TwoFour.from_dense(w24).nbytes, "quality": relative_error(w, w24), "technique": "2:4",
                    "label": "2:4", "sparsity": 0.5, "format": "2:4", "annotate": True})
    wp = w * magnitude_mask(w, 0.5)
    sym, book = C.share_weights(wp, bits=bits)
    err = relative_error(w, book[torch.from_numpy(sym).long()])
    fixed = C.pack_bits(sym, bits).numel() + book.numel() * 4
    enc = C.huffman_encode(sym)
    pts += [{"bytes": fixed, "quality": err, "technique": "kmeans", "label": f"50% + {bits}-bit shared",
             "sparsity": 0.5, "format": f"{bits}-bit indices"},
            {"bytes": enc.nbytes + book.numel() * 4, "quality": err, "technique": "huffman",
             "label": f"50% + {bits}-bit + Huffman", "sparsity": 0.5, "format": "huffman"}]
    return pts


def pruned_points(w: torch.Tensor, sparsity: float, formats=("csr32", "bitmap"), annotate: str = "bitmap") -> list[dict]:
    """`w` magnitude-pruned to `sparsity`, stored in each format: one point per format at its measured bytes (equal
    to lk.sparse.formula_bytes), all at the same relative error (the formats are lossless; pruning is not)."""
    from ..prune import magnitude_mask
    w = S.check_matrix(w, "w").float()
    wp = w * magnitude_mask(w, sparsity)
    err = relative_error(w, wp)
    pts = []
    for fmt in formats:
        s = S.to_format(wp, fmt)
        pts.append({"bytes": s.nbytes, "quality": err, "technique": "csr" if fmt.startswith("csr") else fmt,
                    "label": f"{fmt} {sparsity:.0%} pruned", "sparsity": sparsity, "format": fmt,
                    "formula": S.formula_bytes(fmt, wp.shape, s.nnz), "annotate": fmt == annotate})
    return pts


# ----------------------------------------------------------------------------------------------- bench
def bench() -> dict:
    """Bytes of each format at 1/10/50% density (measured and formula) and the CSR-vs-dense speed crossover."""
    shape = (1024, 1024)
    table = {}
    for d in (0.01, 0.1, 0.5):
        w = S.random_sparse(shape, d, seed=0)
        t = bytes_table(w, formats=("dense", "coo", "csr", "csr32", "bitmap"))
        t["bsr4x4"] = bytes_table(w, formats=("bsr",), blocksize=(4, 4))["bsr"]
        table[f"{int(d * 100)}%"] = {k: {"measured": v["measured"], "formula": v["formula"]} for k, v in t.items()}
    w24 = S.nm_sparse(shape)
    table["2:4"] = {"measured": S.TwoFour.from_dense(w24).nbytes, "formula": S.TwoFour.formula_bytes(shape)}
    sweep = speed_sweep(densities=(0.05, 0.1, 0.2, 0.3, 0.5), n=4096, k=64)  # the anchor's size
    return {"shape": list(shape), "bytes": table,
            "matmul": "4096² fp32 @ 4096×64, one thread",
            "csr_speed_crossover_density": round(sweep["csr_crossover"], 3),
            "bsr16_speed_crossover_density": round(sweep["bsr_crossover"], 3),
            "csr32_storage_break_even_density": round(S.storage_break_even("csr32", shape), 3)}
