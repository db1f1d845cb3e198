"""Sparse storage formats for weight matrices: dense, COO, CSR, BSR, bitmap and 2:4, with exact byte formulas.

Defined in notebook 04 (Sparse storage). Each format is a small dataclass that holds real tensors, can go back
with `to_dense()`, reports `nbytes` measured from those tensors, and has a `formula_bytes(...)` that predicts
`nbytes` exactly. COO/CSR/BSR are checked against torch's own `to_sparse_coo/csr/bsr` in tests/test_sparse.py.

    >>> import labkit as lk
    >>> s = lk.sparse.to_format(w, "csr", index_dtype=torch.int32)
    >>> s.nbytes == lk.sparse.CSR.formula_bytes(w.shape, s.nnz, index_dtype=torch.int32)
    True
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .checks import torch_tensor, whole_number
from .compress import pack_bits, unpack_bits
# The checks on a matrix, shape and block size, and the random test matrices, live in labkit/sparse_matrices.py;
# random_sparse and nm_sparse are re-exported (notebook 04 uses lk.sparse.random_sparse).
from .sparse_matrices import (  # noqa: F401
    check_block, check_matrix, check_shape, nm_sparse, random_sparse,
)

INDEX_DTYPES = (torch.int32, torch.int64)
FORMATS = ("dense", "coo", "csr", "csr32", "bsr", "bitmap", "2:4")


# ----------------------------------------------------------------------------------------------- helpers
def parts_bytes(*tensors: torch.Tensor) -> int:
    """Bytes held by the tensors' elements (numel · element_size), summed."""
    for t in tensors:
        torch_tensor("tensors", t, "the parts of a stored matrix", empty=True)
    return sum(t.numel() * t.element_size() for t in tensors)


def _elsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_index_dtype(index_dtype) -> torch.dtype:
    if index_dtype not in INDEX_DTYPES:
        raise TypeError(f"index_dtype must be torch.int32 or torch.int64, got {index_dtype}")
    return index_dtype


def _check_value_dtype(value_dtype) -> None:
    if value_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"value_dtype must be a floating-point torch dtype, got {value_dtype}")


def _check_fits(n: int, index_dtype: torch.dtype, what: str) -> None:
    if index_dtype == torch.int32 and n > torch.iinfo(torch.int32).max:
        raise ValueError(f"{what} = {n} does not fit in int32 indices; use index_dtype=torch.int64")


# The index work below runs in NumPy (single-threaded, fast on a busy 2-core machine). Values are moved as
# raw bits (float32 viewed as int32, bf16 as int16...), so every dtype round-trips exactly.
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _raw(t: torch.Tensor) -> np.ndarray:
    """The tensor's bits as a NumPy integer array (no copy)."""
    return t.contiguous().view(_INT_OF_SIZE[t.element_size()]).numpy()


def _flat_nonzero(dense: torch.Tensor) -> np.ndarray:
    """Row-major flat positions of the nonzeros."""
    return np.flatnonzero((dense != 0).numpy())


def _gather(dense: torch.Tensor, flat: np.ndarray) -> torch.Tensor:
    """dense.flatten()[flat] as a new tensor of dense's dtype."""
    return dense.reshape(-1).index_select(0, torch.from_numpy(flat))


def _scatter(shape, flat: np.ndarray, values: torch.Tensor) -> torch.Tensor:
    """A zero matrix of `shape` with values written at the flat positions."""
    out = np.zeros(shape[0] * shape[1], dtype=_raw(values).dtype)
    out[flat] = _raw(values)
    return torch.from_numpy(out).view(values.dtype).reshape(shape)


# ----------------------------------------------------------------------------------------------- formats
@dataclass
class Dense:
    """Plain row-major storage: rows·cols values."""
    values: torch.Tensor

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> "Dense":
        return cls(check_matrix(dense).contiguous().clone())

    def to_dense(self) -> torch.Tensor:
        return self.values.clone()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    @property
    def nnz(self) -> int:
        return int(torch.count_nonzero(self.values))

    @property
    def nbytes(self) -> int:
        return parts_bytes(self.values)

    @staticmethod
    def formula_bytes(shape, nnz=None, value_dtype=torch.float32) -> int:
        """rows · cols · value_bytes (independent of nnz)."""
        return shape[0] * shape[1] * _elsize(value_dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values}


@dataclass
class COO:
    """Coordinate list: for each nonzero its (row, col) and value. Bytes = nnz · (2·index + value)."""
    indices: torch.Tensor   # [2, nnz]
    values: torch.Tensor    # [nnz]
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, dense: torch.Tensor, index_dtype=torch.int64) -> "COO":
        dense = check_matrix(dense)
        _check_fits(max(dense.shape), _check_index_dtype(index_dtype), "largest dimension")
        flat = _flat_nonzero(dense)                          # row-major order, like torch's coalesced COO
        idx = np.stack([flat // dense.shape[1], flat % dense.shape[1]])
        return cls(torch.from_numpy(idx).to(index_dtype), _gather(dense, flat), tuple(dense.shape))

    def to_dense(self) -> torch.Tensor:
        r, c = self.indices.numpy().astype(np.int64)
        return _scatter(self.shape, r * self.shape[1] + c, self.values)

    def to_torch(self) -> torch.Tensor:
        return torch.sparse_coo_tensor(self.indices.long(), self.values, self.shape).coalesce()

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def nbytes(self) -> int:
        return parts_bytes(self.indices, self.values)

    @staticmethod
    def formula_bytes(shape, nnz, value_dtype=torch.float32, index_dtype=torch.int64) -> int:
        """nnz · (2 · index_bytes + value_bytes): 20 bytes per nonzero for fp32 values, int64 indices."""
        return nnz * (2 * _elsize(index_dtype) + _elsize(value_dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"indices": self.indices, "values": self.values}


@dataclass
class CSR:
    """Compressed sparse rows: row pointers (rows+1), column index and value per nonzero."""
    crow_indices: torch.Tensor  # [rows + 1]
    col_indices: torch.Tensor   # [nnz]
    values: torch.Tensor        # [nnz]
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, dense: torch.Tensor, index_dtype=torch.int64) -> "CSR":
        dense = check_matrix(dense)
        rows, cols = dense.shape
        flat = _flat_nonzero(dense)
        _check_fits(flat.size, _check_index_dtype(index_dtype), "nnz")
        crow = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(flat // cols, minlength=rows), out=crow[1:])
        return cls(torch.from_numpy(crow).to(index_dtype), torch.from_numpy(flat % cols).to(index_dtype),
                   _gather(dense, flat), (rows, cols))

    def to_torch(self) -> torch.Tensor:
        """torch's own CSR tensor over the same index/value tensors (used for matmul)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values, self.shape)

    def to_dense(self) -> torch.Tensor:
        rows = np.repeat(np.arange(self.shape[0], dtype=np.int64), np.diff(self.crow_indices.numpy()))
        return _scatter(self.shape, rows * self.shape[1] + self.col_indices.numpy(), self.values)

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        torch_tensor("x", x, f"a dense matrix [{self.shape[1]}, k] of the values' dtype", dims=2)
        if x.shape[0] != self.shape[1] or x.dtype != self.values.dtype:
            raise ValueError(f"CSR {tuple(self.shape)} @ x needs x of shape [{self.shape[1]}, k] and dtype "
                             f"{self.values.dtype}, got {tuple(x.shape)} {x.dtype}")
        return self.to_torch() @ x

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def nbytes(self) -> int:
        return parts_bytes(self.crow_indices, self.col_indices, self.values)

    @staticmethod
    def formula_bytes(shape, nnz, value_dtype=torch.float32, index_dtype=torch.int64) -> int:
        """(rows + 1) · index_bytes + nnz · (index_bytes + value_bytes)."""
        ib = _elsize(index_dtype)
        return (shape[0] + 1) * ib + nnz * (ib + _elsize(value_dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"crow_indices": self.crow_indices, "col_indices": self.col_indices, "values": self.values}


@dataclass
class BSR:
    """Block CSR: CSR over (br × bc) blocks; every block with any nonzero is stored whole (zeros included)."""
    crow_indices: torch.Tensor  # [rows/br + 1]
    col_indices: torch.Tensor   # [n_blocks]
    values: torch.Tensor        # [n_blocks, br, bc]
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, dense: torch.Tensor, blocksize=(4, 4), index_dtype=torch.int64) -> "BSR":
        dense = check_matrix(dense)
        br, bc = check_block(dense.shape, blocksize)
        _check_index_dtype(index_dtype)
        R, C = dense.shape[0] // br, dense.shape[1] // bc
        blocks = dense.reshape(R, br, C, bc).transpose(1, 2)          # [R, C, br, bc]
        keep = (blocks != 0).any(dim=-1).any(dim=-1)                  # [R, C]
        crow = torch.zeros(R + 1, dtype=torch.int64)
        torch.cumsum(keep.sum(dim=1), 0, out=crow[1:])
        col = keep.nonzero()[:, 1]
        return cls(crow.to(index_dtype), col.to(index_dtype), blocks[keep].contiguous(), tuple(dense.shape))

    @property
    def blocksize(self) -> tuple[int, int]:
        return tuple(self.values.shape[1:])

    def to_torch(self) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_bsr_tensor(self.crow_indices, self.col_indices, self.values, self.shape)

    def to_dense(self) -> torch.Tensor:
        br, bc = self.blocksize
        R, C = self.shape[0] // br, self.shape[1] // bc
        rows = torch.repeat_interleave(torch.arange(R), self.crow_indices.long().diff())
        blocks = torch.zeros(R, C, br, bc, dtype=self.values.dtype)
        blocks[rows, self.col_indices.long()] = self.values
        return blocks.transpose(1, 2).reshape(self.shape)

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_torch() @ x

    @property
    def nnz(self) -> int:
        """Stored values (zeros inside kept blocks included)."""
        return self.values.numel()

    @property
    def n_blocks(self) -> int:
        return self.values.shape[0]

    @property
    def nbytes(self) -> int:
        return parts_bytes(self.crow_indices, self.col_indices, self.values)

    @staticmethod
    def formula_bytes(shape, n_blocks, blocksize=(4, 4), value_dtype=torch.float32, index_dtype=torch.int64) -> int:
        """(rows/br + 1) · index_bytes + n_blocks · (index_bytes + br·bc·value_bytes). Note: n_blocks, not nnz."""
        br, bc = check_block(shape, blocksize)
        ib = _elsize(index_dtype)
        return (shape[0] // br + 1) * ib + n_blocks * (ib + br * bc * _elsize(value_dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"crow_indices": self.crow_indices, "col_indices": self.col_indices, "values": self.values}


@dataclass
class Bitmap:
    """One bit per position (1 = nonzero, packed 8 per byte) + the nonzero values in row-major order."""
    mask: torch.Tensor     # uint8 [ceil(rows·cols / 8)]
    values: torch.Tensor   # [nnz]
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> "Bitmap":
        dense = check_matrix(dense)
        m = dense != 0
        return cls(pack_bits(m, 1), _gather(dense, np.flatnonzero(m.numpy())), tuple(dense.shape))

    def to_dense(self) -> torch.Tensor:
        m = unpack_bits(self.mask, 1, self.shape[0] * self.shape[1]).numpy()
        return _scatter(self.shape, np.flatnonzero(m), self.values)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def nbytes(self) -> int:
        return parts_bytes(self.mask, self.values)

    @staticmethod
    def formula_bytes(shape, nnz, value_dtype=torch.float32) -> int:
        """ceil(rows · cols / 8) + nnz · value_bytes."""
        return -(-shape[0] * shape[1] // 8) + nnz * _elsize(value_dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mask": self.mask, "values": self.values}


@dataclass
class TwoFour:
    """2:4 semi-structured: in every group of 4 along a row keep 2 values + a 2-bit position each (4 per byte).

    Groups with fewer than 2 nonzeros store explicit zeros, so the size does not depend on nnz:
    rows·cols/2 values + rows·cols/8 bytes of metadata (2.125 bytes per weight for fp32 instead of 4).
    """
    values: torch.Tensor   # [rows, cols/2]
    meta: torch.Tensor     # uint8 [ceil(rows·cols/2 / 4)], four 2-bit positions per byte
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> "TwoFour":
        dense = check_matrix(dense)
        rows, cols = dense.shape
        if cols % 4:
            raise ValueError(f"2:4 needs the number of columns to be a multiple of 4, got shape {(rows, cols)}; "
                             f"pad the matrix or use CSR/bitmap")
        g = _raw(dense).reshape(rows, cols // 4, 4)
        nz = (dense != 0).numpy().reshape(rows, cols // 4, 4)
        per_group = nz.sum(axis=-1)
        if per_group.size and per_group.max() > 2:
            bad = int((per_group > 2).sum())
            raise ValueError(f"matrix is not 2:4 sparse: {bad} groups of 4 have more than 2 nonzeros; prune it "
                             f"first with an N:M mask (lk.prune, n=2, m=4)")
        # 2 positions per group: the nonzeros, then the lowest free positions, in order — one lookup per group
        pattern = nz[..., 0] | (nz[..., 1] << 1) | (nz[..., 2] << 2) | (nz[..., 3] << 3)
        pos = _TWO_FOUR_LUT[pattern.astype(np.uint8)]                                 # [rows, cols/4, 2]
        vals = np.take_along_axis(g, pos, axis=-1).reshape(rows, cols // 2)
        meta = pack_bits(torch.from_numpy(pos.reshape(-1).astype(np.uint8)), 2)      # four 2-bit codes per byte
        return cls(torch.from_numpy(np.ascontiguousarray(vals)).view(dense.dtype), meta, (rows, cols))

    def positions(self) -> torch.Tensor:
        """The unpacked 2-bit positions, [rows, cols/4, 2]."""
        rows, cols = self.shape
        return unpack_bits(self.meta, 2, rows * cols // 2).long().reshape(rows, cols // 4, 2)

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.shape
        v = _raw(self.values).reshape(rows, cols // 4, 2)
        out = np.zeros((rows, cols // 4, 4), dtype=v.dtype)
        np.put_along_axis(out, self.positions().numpy(), v, axis=-1)
        return torch.from_numpy(out).view(self.values.dtype).reshape(rows, cols)

    @property
    def nnz(self) -> int:
        return int(torch.count_nonzero(self.values))

    @property
    def nbytes(self) -> int:
        return parts_bytes(self.values, self.meta)

    @staticmethod
    def formula_bytes(shape, nnz=None, value_dtype=torch.float32) -> int:
        """rows·cols/2 · value_bytes + ceil(rows·cols/2 · 2 bits / 8) (independent of nnz)."""
        kept = shape[0] * shape[1] // 2
        return kept * _elsize(value_dtype) + -(-kept // 4)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "meta": self.meta}


def _two_four_lut() -> np.ndarray:
    """For each 4-bit nonzero pattern with ≤ 2 bits set: the 2 kept positions (nonzeros first, then lowest)."""
    lut = np.zeros((16, 2), dtype=np.int64)
    for p in range(16):
        nzs = [i for i in range(4) if p >> i & 1]
        if len(nzs) <= 2:
            lut[p] = sorted((nzs + [i for i in range(4) if i not in nzs])[:2])
    return lut


_TWO_FOUR_LUT = _two_four_lut()

FORMAT_CLASSES = {"dense": Dense, "coo": COO, "csr": CSR, "bsr": BSR, "bitmap": Bitmap, "2:4": TwoFour}


def to_format(dense: torch.Tensor, fmt: str, index_dtype=torch.int64, blocksize=(4, 4)):
    """Convert a dense matrix to one of FORMATS ("csr32" = CSR with int32 indices)."""
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    if fmt == "csr32":
        fmt, index_dtype = "csr", torch.int32
    cls = FORMAT_CLASSES[fmt]
    if fmt in ("coo", "csr"):
        return cls.from_dense(dense, index_dtype=index_dtype)
    if fmt == "bsr":
        return cls.from_dense(dense, blocksize=blocksize, index_dtype=index_dtype)
    return cls.from_dense(dense)


def formula_bytes(fmt: str, shape, nnz: int, value_dtype=torch.float32, index_dtype=torch.int64,
                  blocksize=(4, 4), n_blocks: int | None = None) -> int:
    """Exact bytes of `fmt` for a matrix of `shape` with `nnz` nonzeros (BSR needs n_blocks)."""
    rows, cols = check_shape(shape)
    if nnz is not None:
        whole_number("nnz", nnz, 0, high=rows * cols)
    _check_value_dtype(value_dtype)
    _check_index_dtype(index_dtype)
    if fmt == "csr32":
        fmt, index_dtype = "csr", torch.int32
    if fmt in ("dense", "bitmap", "2:4"):
        return FORMAT_CLASSES[fmt].formula_bytes(shape, nnz, value_dtype=value_dtype)
    if fmt in ("coo", "csr"):
        return FORMAT_CLASSES[fmt].formula_bytes(shape, nnz, value_dtype=value_dtype, index_dtype=index_dtype)
    if fmt == "bsr":
        if n_blocks is None:
            raise ValueError("BSR's size depends on the number of stored blocks: pass n_blocks=")
        br, bc = check_block(shape, blocksize)
        whole_number("n_blocks", n_blocks, 0, "blocks stored", high=(rows // br) * (cols // bc))
        return BSR.formula_bytes(shape, n_blocks, blocksize, value_dtype=value_dtype, index_dtype=index_dtype)
    raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")


def bytes_per_nonzero(fmt: str, value_dtype=torch.float32, index_dtype=torch.int64) -> float:
    """Bytes each nonzero costs (ignoring the per-row pointers): COO 2·i+v, CSR i+v, bitmap v (+1/8 per slot)."""
    _check_value_dtype(value_dtype)
    _check_index_dtype(index_dtype)
    if fmt == "csr32":
        fmt, index_dtype = "csr", torch.int32
    v, i = _elsize(value_dtype), _elsize(index_dtype)
    per = {"coo": 2 * i + v, "csr": i + v, "bitmap": v}
    if fmt not in per:
        raise ValueError(f"bytes_per_nonzero is defined for 'coo', 'csr', 'csr32' and 'bitmap', got {fmt!r} (dense and "
                         f"2:4 cost the same whatever the nonzeros: use formula_bytes)")
    return per[fmt]


def storage_break_even(fmt: str, shape=(4096, 4096), value_dtype=torch.float32, index_dtype=torch.int64,
                       blocksize=(4, 4)) -> float:
    """Largest density at which `fmt` is no bigger than dense, from the exact formulas (BSR: random sparsity
    is assumed — a block is kept when any of its br·bc values is nonzero)."""
    rows, cols = check_shape(shape)
    _check_value_dtype(value_dtype)
    _check_index_dtype(index_dtype)
    if rows < 1 or cols < 1:
        raise ValueError(f"storage_break_even needs a non-empty shape, got {tuple(shape)}")
    if fmt not in FORMATS or fmt == "dense":
        raise ValueError(f"storage_break_even compares a sparse format with dense: choose one of {FORMATS[1:]}, got {fmt!r}")
    n = rows * cols
    dense = Dense.formula_bytes(shape, value_dtype=value_dtype)
    if fmt == "2:4":
        return 0.5 if TwoFour.formula_bytes(shape, value_dtype=value_dtype) <= dense else 0.0
    if fmt == "bsr":
        br, bc = check_block(shape, blocksize)
        nb_total = n // (br * bc)
        lo, hi = 0.0, 1.0   # bytes grow monotonically with density: bisect
        for _ in range(60):
            mid = (lo + hi) / 2
            nb = nb_total * (1 - (1 - mid) ** (br * bc))
            b = BSR.formula_bytes(shape, nb, blocksize, value_dtype, index_dtype)
            lo, hi = (mid, hi) if b <= dense else (lo, mid)
        return lo
    # linear in nnz: solve formula(nnz) = dense
    f0 = formula_bytes(fmt, shape, 0, value_dtype, index_dtype)
    f1 = formula_bytes(fmt, shape, 1, value_dtype, index_dtype) - f0
    return max(0.0, min(1.0, (dense - f0) / f1 / n))
