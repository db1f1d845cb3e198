"""Pruning masks: pure functions on tensors — magnitude, Wanda's |W|·‖X‖₂, global and per-row ranking, N:M.

Defined in notebook 01 (01_pruning.ipynb, §1 "Magnitude pruning", §3 "Wanda", §4 "N:M"); lk.prune re-exports every
name here and applies the masks to a model (prune_, apply_masks_).

Conventions: a mask is a bool tensor shaped like the weight, True = KEEP, False = pruned (zero).
`sparsity` is the fraction of weights set to zero; the number pruned is round(sparsity * numel), the same
rule as `torch.nn.utils.prune` (so our masks equal torch's on the same weights).
"""
from __future__ import annotations

import numpy as np
import torch

from .checks import real_number, torch_tensor, whole_number


def check_sparsity(sparsity) -> float:
    """Return sparsity as a float; TypeError for a non-number (a string too), ValueError outside [0, 1)."""
    s = real_number("sparsity", sparsity, "a fraction in [0, 1) such as 0.5")
    if not (0.0 <= s < 1.0) or s != s:
        raise ValueError(
            f"sparsity must be in [0, 1) (the fraction of weights set to zero), got {sparsity!r}; "
            "use e.g. 0.5 for 50% — not 50 — and 1.0 would delete every weight")
    return s


def check_nm(n, m) -> None:
    """TypeError unless n and m are whole numbers, ValueError unless 0 < n < m."""
    n, m = whole_number("n", n, 0, "e.g. n=2, m=4 for 2:4"), whole_number("m", m, 0, "e.g. n=2, m=4 for 2:4")
    if not (0 < n < m):
        raise ValueError(
            f"N:M pattern needs 0 < N < M (keep N of every M weights), got N={n}, M={m}; "
            "e.g. n=2, m=4 for 2:4 sparsity (N ≥ M would prune nothing, N = 0 everything)")


def n_to_prune(numel: int, sparsity: float) -> int:
    # Same rule as torch.nn.utils.prune._compute_nparams_toprune: Python's round().
    return int(round(sparsity * numel))


def _check_scores(name: str, t) -> torch.Tensor:   # no NaN/inf: a NaN has no rank, the mask would be arbitrary
    return torch_tensor(name, t, "a weight or score tensor, e.g. linear.weight", kind="real", finite=True, empty=True)


def check_tensor_dict(name: str, d) -> dict:
    if not isinstance(d, dict) or not all(isinstance(t, torch.Tensor) for t in d.values()):
        raise TypeError(f"{name} must be a dict {{name: tensor}}, e.g. {{n: m.weight for n, m in "
                        f"select_linears(model).items()}}; got {type(d).__name__}"
                        + (" holding non-tensors" if isinstance(d, dict) else ""))
    return d


# ---------------------------------------------------------------------------------------------------------
# Masks (pure functions on tensors)
# ---------------------------------------------------------------------------------------------------------
def _kth_smallest(x: torch.Tensor, k: int, dim: int | None = None) -> torch.Tensor:
    """k-th smallest value (1-based) of x, or of each row along dim (keepdim); numpy's introselect is ~4×
    faster than torch.kthvalue on CPU."""
    a = x.detach().to("cpu", torch.float64 if x.dtype == torch.float64 else torch.float32).numpy()
    if dim is None:
        return torch.tensor(np.partition(a.reshape(-1), k - 1)[k - 1], dtype=x.dtype, device=x.device)
    part = np.take(np.partition(a, k - 1, axis=dim), [k - 1], axis=dim)
    return torch.from_numpy(part).to(x.device, x.dtype)


def mask_from_scores(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask that zeros the round(sparsity·numel) lowest scores of the whole tensor (notebook 01 §1)."""
    sparsity = check_sparsity(sparsity)
    _check_scores("scores", scores)
    k = n_to_prune(scores.numel(), sparsity)
    flat = scores.detach().reshape(-1)
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    # Fast path: the k-th smallest score is the threshold. With ties at the threshold, fall back to topk,
    # which picks among equal scores exactly as torch.nn.utils.prune does.
    mask = flat > _kth_smallest(flat, k)
    if int((~mask).sum()) != k:
        mask = torch.ones_like(flat, dtype=torch.bool)
        mask[torch.topk(flat, k, largest=False).indices] = False
    return mask.view_as(scores)


def row_mask_from_scores(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask that zeros the lowest round(sparsity·in) scores of every output row (Wanda's comparison group)."""
    sparsity = check_sparsity(sparsity)
    _check_scores("scores", scores)
    if scores.dim() != 2:
        raise ValueError(f"row scope needs a 2-D weight [out, in], got shape {tuple(scores.shape)}")
    k = n_to_prune(scores.shape[1], sparsity)
    scores = scores.detach()
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    mask = scores > _kth_smallest(scores, k, dim=1)
    if not bool(((~mask).sum(1) == k).all()):  # ties at a row's threshold: exact topk instead
        mask = torch.ones_like(scores, dtype=torch.bool)
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, False)
    return mask


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Layer-wise magnitude mask: zero the smallest |w| (= torch.nn.utils.prune.l1_unstructured)."""
    return mask_from_scores(_check_scores("weight", weight).detach().abs(), sparsity)


def global_masks_from_scores(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Masks for several tensors ranked together: the lowest round(sparsity·total) scores overall are zeroed."""
    sparsity = check_sparsity(sparsity)
    check_tensor_dict("scores", scores)
    if not scores:
        return {}
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names])
    keep = mask_from_scores(flat, sparsity)
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start:start + size].view_as(scores[n])
        start += size
    return out


def global_magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Global magnitude masks (= torch.nn.utils.prune.global_unstructured with L1Unstructured)."""
    check_tensor_dict("weights", weights)
    return global_masks_from_scores({k: w.detach().abs() for k, w in weights.items()}, sparsity)


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Wanda importance |W_ij| · ‖X_j‖₂ (Sun et al. 2024): weight [out, in] times per-input-feature norms [in]."""
    _check_scores("weight", weight)
    torch_tensor("input_norm", input_norm, "‖X_j‖₂ per input feature, from collect_input_norms", kind="real")
    if weight.dim() != 2 or input_norm.shape != (weight.shape[1],):
        raise ValueError(f"wanda_scores needs weight [out, in] and input_norm [in]; got {tuple(weight.shape)} "
                         f"and {tuple(input_norm.shape)} — collect the norms with collect_input_norms(model, tokens)")
    if not torch.isfinite(input_norm).all():
        raise ValueError(f"input norms contain {int((~torch.isfinite(input_norm)).sum())} NaN/inf values: the "
                         "calibration run overflowed or the model is broken; recollect them with collect_input_norms "
                         "on a healthy model (Wanda would otherwise prune by garbage scores)")
    return weight.detach().abs() * input_norm.to(weight.dtype).view(1, -1)


def nm_mask_from_scores(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M keep-mask: in every group of m consecutive inputs of a row, keep the n highest scores."""
    check_nm(n, m)
    _check_scores("scores", scores)
    if scores.dim() != 2:
        raise ValueError(f"N:M masks need a 2-D weight [out, in], got shape {tuple(scores.shape)}")
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M with M={m} needs in_features divisible by {m}, got {cols}; pick an M that divides "
                         f"{cols} or leave this layer out with filter_fn")
    groups = scores.detach().reshape(rows, cols // m, m)
    mask = torch.ones_like(groups, dtype=torch.bool)
    idx = torch.topk(groups, m - n, dim=-1, largest=False).indices
    mask.scatter_(-1, idx, False)
    return mask.reshape(rows, cols)


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M magnitude mask (2:4 = the pattern sparse tensor cores accelerate)."""
    return nm_mask_from_scores(_check_scores("weight", weight).detach().abs(), n, m)


def sparsity_of(x) -> float:
    """Fraction of exact zeros in a tensor, or over the given modules' weights / a dict of tensors."""
    if isinstance(x, torch.Tensor):
        return float((x == 0).sum()) / max(1, x.numel())
    items = list(x.values()) if isinstance(x, dict) else list(x) if isinstance(x, (list, tuple, set)) else None
    tensors = None if items is None else [getattr(mod, "weight", mod) for mod in items]
    if tensors is None or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError(f"sparsity_of needs a tensor, a dict of tensors (e.g. masks) or a list of modules with a "
                        f".weight, got {type(x).__name__}" + ("" if items is None else " holding other things"))
    zeros = sum(int((t == 0).sum()) for t in tensors)
    total = sum(t.numel() for t in tensors)
    return zeros / max(1, total)
