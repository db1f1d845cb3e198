"""The matrices notebook 04 stores: what a weight matrix, a shape and a block size must be, and random sparse
matrices to try the formats on — unstructured (`random_sparse`), whole blocks kept (`random_sparse(...,
blocksize=)`) and N:M (`nm_sparse`).

Defined in notebook 04 (Sparse storage, §1 "Six formats on one small matrix", §3 "Smaller is not faster" and §6
"One chart"); the formats themselves are in labkit/sparse.py, which re-exports `random_sparse` and `nm_sparse`.

    >>> w = lk.sparse.random_sparse((64, 64), density=0.1, seed=0)   # 10% nonzeros, the rest exact zeros
"""
from __future__ import annotations

import math

import torch

from .checks import real_number, whole_number


def check_matrix(dense, what: str = "dense") -> torch.Tensor:
    """A 2-D floating-point tensor, or a clear TypeError/ValueError."""
    if not isinstance(dense, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(dense).__name__}; "
                        f"convert with torch.as_tensor(x, dtype=torch.float32)")
    if dense.layout != torch.strided:
        raise TypeError(f"{what} must be a dense (strided) tensor, got layout {dense.layout}; call .to_dense() first")
    if not isinstance(what, str):
        raise TypeError(f"what must name the matrix in messages (a str), got {what!r}")
    if not dense.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor (weights), got {dense.dtype}; "
                        f"convert with .float()")
    if dense.dim() != 2:
        raise ValueError(f"{what} must be a 2-D matrix, got shape {tuple(dense.shape)}; "
                         f"reshape it (e.g. w.reshape(w.shape[0], -1)) or store each matrix separately")
    return dense.detach().cpu()


def check_block(shape, blocksize) -> tuple[int, int]:
    """(br, bc) from an int or a pair of positive ints that divide the matrix shape."""
    pair = blocksize if isinstance(blocksize, (tuple, list)) else (blocksize, blocksize)
    if len(pair) != 2:
        raise TypeError(f"blocksize must be an int or a pair of ints (rows, cols), e.g. (4, 4); got {blocksize!r}")
    br, bc = (whole_number("blocksize", b, 1, "an int or a pair (rows, cols), e.g. (4, 4)") for b in pair)
    rows, cols = check_shape(shape)
    if rows % br or cols % bc:
        raise ValueError(f"shape {tuple(shape)} is not divisible by blocksize {(br, bc)}; pick a block size that "
                         f"divides both dimensions (e.g. {math.gcd(rows, 16)}×{math.gcd(cols, 16)}) or pad the matrix")
    return br, bc


def check_shape(shape) -> tuple[int, int]:
    """(rows, cols) as two whole numbers ≥ 0, or a clear error."""
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or len(shape) != 2:
        raise ValueError(f"shape must be (rows, cols), got {shape!r}")
    return tuple(whole_number("shape", d, 0, "two whole numbers (rows, cols)") for d in shape)


def _check_density(density) -> float:
    if not 0.0 <= real_number("density", density, "a fraction in [0, 1], e.g. 0.1") <= 1.0:
        raise ValueError(f"density must be in [0, 1] (e.g. 0.1 for 10% nonzeros), got {density}")
    return float(density)


def random_sparse(shape, density: float, seed: int = 0, blocksize=None, dtype=torch.float32) -> torch.Tensor:
    """A random dense matrix with a fraction `density` of nonzeros (whole blocks kept if blocksize is given)."""
    _check_density(density)
    check_shape(shape)
    whole_number("seed", seed)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch dtype (e.g. torch.float32), got {dtype!r}")
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=dtype)
    if blocksize is None:
        keep = torch.rand(shape, generator=g) < density
    else:
        br, bc = check_block(shape, blocksize)
        kb = torch.rand(shape[0] // br, shape[1] // bc, generator=g) < density
        keep = kb.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return w * keep


def nm_sparse(shape, n: int = 2, m: int = 4, seed: int = 0) -> torch.Tensor:
    """A random matrix with exactly n nonzeros in every group of m along each row (magnitude top-n)."""
    whole_number("n", n), whole_number("m", m), whole_number("seed", seed)
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    rows, cols = check_shape(shape)
    if cols % m:
        raise ValueError(f"columns ({cols}) must be a multiple of M={m}")
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    g = w.reshape(rows, cols // m, m)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(n, dim=-1).indices, True)
    return (g * keep).reshape(rows, cols)
