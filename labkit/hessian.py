"""The Hessian of a Linear layer's loss: H = 2/n · XᵀX over its calibration inputs, ready for the OBS solver.

Defined in notebook 01 ("SparseGPT") and notebook 02 ("After round-to-nearest"): GPTQ, SparseGPT (both in
labkit/second_order.py, which re-exports every name here) and AWQ (labkit/awq.py) all start from this one matrix.
A Linear with weight W [out, in] sees inputs X [n, in]; its layer-wise loss ‖WXᵀ − ŴXᵀ‖² has the Hessian
H = 2XᵀX, shared by every output row. `inverse_cholesky` gives the factor whose rows hold the OBS updates.
"""
from __future__ import annotations

import torch

from .checks import real_number, torch_tensor, whole_number
from .memory import check_fits


class HessianAccumulator:
    """Running H = 2/n · Σ xxᵀ over every input row x of a Linear (float64, [in, in]), and the mean |x| per
    input feature (the activation statistic AWQ scales by; labkit.awq)."""

    def __init__(self, in_features: int):
        in_features = whole_number("in_features", in_features, 1, "the Linear's in_features, e.g. 576")
        check_fits(f"a Hessian of {in_features} × {in_features} float64 values", 8 * in_features ** 2)
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs [..., in]. XᵀX is computed in the inputs' precision (float32 for a float32 model,
        as GPTQ's reference code does; float64 inputs stay float64) and accumulated in float64."""
        check_inputs("x", x)
        x = x.detach().reshape(-1, x.shape[-1])
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        if x.shape[1] != self.H.shape[0]:
            raise ValueError(f"inputs have {x.shape[1]} features, the Hessian {self.H.shape[0]}")
        if not torch.isfinite(x).all():
            raise ValueError("calibration inputs contain NaN or inf; check the model and the tokens")
        t = x.shape[0]
        self.H *= self.n / (self.n + t)
        self.n += t
        self.H += (2.0 / self.n) * (x.T @ x).double()
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)

    @property
    def hessian(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("no calibration inputs were seen; run the calibration tokens through the model")
        return self.H

    @property
    def abs_mean(self) -> torch.Tensor:
        """Mean |x| of each input feature over the calibration rows (float64, [in])."""
        self.hessian  # noqa: B018 (raises when nothing was seen)
        return self.abs_sum / self.n


def check_inputs(name: str, x) -> torch.Tensor:
    """A Linear's inputs [..., in]: a float tensor with a last dimension (TypeError / ValueError naming `name`)."""
    torch_tensor(name, x, "a Linear's inputs [..., in_features], e.g. torch.randn(128, 64)", kind="float")
    if x.dim() == 0:
        raise ValueError(f"{name} must have a last dimension of input features, got a 0-d tensor")
    return x


def check_weight(name: str, w) -> torch.Tensor:
    """A Linear's weight [out, in]: floating point, no NaN/inf (TypeError / ValueError naming `name`)."""
    return torch_tensor(name, w, "a Linear's weight [out, in]", dims=2, kind="float", finite=True)


def check_hessian(H, cols: int | None = None) -> torch.Tensor:
    """H: a finite float [cols, cols] matrix (square when cols is None), or a TypeError / ValueError naming it."""
    torch_tensor("H", H, "the Hessian [in, in], e.g. lk.second_order.hessian(x)", dims=2, kind="float", finite=True)
    if H.shape[0] != H.shape[1] or (cols is not None and H.shape[0] != cols):
        want = f"[{cols}, {cols}]" if cols is not None else "square"
        raise ValueError(f"H {tuple(H.shape)} does not match the weight's input features: it must be {want} "
                         "(H = lk.second_order.hessian(x) of the layer's inputs)")
    return H


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2/n · XᵀX for inputs x [..., in] (float64)."""
    check_inputs("x", x)
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.hessian


def prepare_hessian(H: torch.Tensor, weight: torch.Tensor, damp: float = 0.01):
    """Dead inputs (H_jj = 0) get H_jj = 1 and their weights 0; then H += λI with λ = damp · mean(diag H).
    Returns (H', W') as float64 copies."""
    check_hessian(H, check_weight("weight", weight).shape[1])
    if not (0.0 <= real_number("damp", damp, "a fraction of the mean diagonal, e.g. 0.01") < 1.0):
        raise ValueError(f"damp={damp!r}: use a small fraction of the mean diagonal, e.g. 0.01")
    H = H.detach().double().clone()
    W = weight.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += float(damp) * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    return H, W


def inverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU); row j holds the OBS update for column j."""
    check_hessian(H)
    L, info = torch.linalg.cholesky_ex(H if H.dtype in (torch.float32, torch.float64) else H.float())
    if int(info):
        raise ValueError("H is not positive definite (its Cholesky failed); add damping first, e.g. "
                         "H, W = lk.second_order.prepare_hessian(H, weight, damp=0.01)")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
