"""One second-order solver for GPTQ and SparseGPT: the OBS update with the Cholesky of the inverse Hessian.

Defined in notebook 01 ("SparseGPT") and notebook 02 ("After round-to-nearest"). A Linear layer with weight W
[out, in] sees inputs X [n, in]; its layer-wise loss ‖WXᵀ − ŴXᵀ‖² has the Hessian H = 2XᵀX (shared by every
output row). Optimal Brain Surgeon: when column j is rounded (GPTQ) or zeroed (SparseGPT) with error δ, the
columns not yet processed absorb it: W[:, F] −= δ/[H_F⁻¹]_00 · [H_F⁻¹]_0,:, where F = {j, j+1, …}. Frantar et al.
noticed that row j of the upper Cholesky factor U of H⁻¹ is exactly [H_F⁻¹]_0,: / √[H_F⁻¹]_00, so one Cholesky
replaces a fresh inverse per column, and the updates can be applied lazily, one block of 128 columns at a time.

GPTQ: Frantar, Ashkboos, Hoefler, Alistarh 2022, https://arxiv.org/abs/2210.17323
SparseGPT: Frantar & Alistarh 2023, https://arxiv.org/abs/2301.00774
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .calibration import check_filter
from .checks import real_number, torch_module, torch_tensor, whole_number
from .evaluate import check_token_ids
# The Hessian has its own module; re-exported (notebook 01 uses so.hessian, awq uses HessianAccumulator).
from .hessian import (  # noqa: F401
    HessianAccumulator, check_hessian, check_inputs, check_weight, hessian, inverse_cholesky, prepare_hessian,
)
from .models import check_llama
from .quantize import QTensor, QuantConfig, QuantLinear, check_group_size, rtn_codes, pack_bits, skip_tied
from .repro import threads


def _check_flag(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {v!r}")
    return v


# ---------------------------------------------------------------------------------------------------------
# The quantization grid (labkit.quantize's conventions) for one group of columns
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """bits and symmetry as in labkit.quantize: symmetric codes in [−qmax, qmax] with fp16 scale = max|w|/qmax;
    asymmetric codes in [0, 2**bits − 1] with fp16 zero = min(w) and scale = (max − zero)/(2**bits − 1)."""
    bits: int = 4
    group_size: int | None = None   # None = per output channel (one scale per row)
    symmetric: bool = True

    def __post_init__(self):
        if whole_number("Grid.bits", self.bits, 1, "2, 3, 4 or 8") not in (2, 3, 4, 8):
            raise ValueError(f"Grid.bits={self.bits} is not packed by labkit.quantize; use 2, 3, 4 or 8")
        if self.group_size is not None:
            whole_number("Grid.group_size", self.group_size, 1, "or None: one scale per output channel")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"Grid.symmetric must be True or False, got {self.symmetric!r}")

    def params(self, w: torch.Tensor):
        """(scale [rows, 1], zero [rows, 1] or None) of the grid for the columns w [rows, g] — the same values
        labkit.quantize.quantize computes for that group."""
        _, scales, zeros, _, _ = rtn_codes(w.float(), self.bits, "channel", None, self.symmetric, torch.float16)
        return scales, zeros

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """Unsigned codes of w (any shape broadcastable with scale)."""
        s = scale.double()
        if self.symmetric:
            qmax = 2 ** (self.bits - 1) - 1
            return torch.clamp(torch.round(w / s), -qmax, qmax) + 2 ** (self.bits - 1)
        return torch.clamp(torch.round((w - zero.double()) / s), 0, 2 ** self.bits - 1)

    def value(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        if self.symmetric:
            return (codes - 2 ** (self.bits - 1)) * scale.double()
        return codes * scale.double() + zero.double()

    def round(self, w, scale, zero):
        return self.value(self.codes(w, scale, zero), scale, zero)


# ---------------------------------------------------------------------------------------------------------
# The solver
# ---------------------------------------------------------------------------------------------------------
@dataclass
class SolveResult:
    weight: torch.Tensor                 # Ŵ, float32 [out, in]
    mask: torch.Tensor | None = None     # keep-mask (SparseGPT)
    codes: torch.Tensor | None = None    # unsigned codes [out, in] (GPTQ)
    scales: torch.Tensor | None = None   # [out, groups]
    zeros: torch.Tensor | None = None    # [out, groups] or None


def obs_solve(weight: torch.Tensor, H: torch.Tensor, *, grid: Grid | None = None, sparsity: float | None = None,
              nm: tuple[int, int] | None = None, mask_rows: bool = False, blocksize: int = 128, damp: float = 0.01,
              act_order: bool = False, dtype: torch.dtype = torch.float32) -> SolveResult:
    """Process the columns of W left to right (or by decreasing H_jj with act_order), rounding each to `grid`
    (GPTQ) or zeroing the pruned ones (SparseGPT: `sparsity` chosen per block of columns by w²/[U]_jj², or `nm`),
    and spreading each column's error over the columns not yet processed (lazy batched OBS updates).
    Runs on one thread: the loop is many small operations, which extra threads only slow down."""
    with threads(1):
        return _obs_solve(weight, H, grid, sparsity, nm, mask_rows, blocksize, damp, act_order, dtype)


def _obs_solve(weight, H, grid, sparsity, nm, mask_rows, blocksize, damp, act_order, dtype) -> SolveResult:
    if grid is None and sparsity is None and nm is None:
        raise ValueError("obs_solve needs grid=Grid(...) (GPTQ), sparsity=… or nm=(2, 4) (SparseGPT)")
    check_hessian(H, check_weight("weight", weight).shape[1])
    if grid is not None and not isinstance(grid, Grid):
        raise TypeError(f"grid must be a lk.second_order.Grid (e.g. Grid(bits=4, group_size=64)) or None, got "
                        f"{type(grid).__name__}")
    if sparsity is not None and not (0.0 <= real_number("sparsity", sparsity, "a fraction in [0, 1)") < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if nm is not None:
        if not isinstance(nm, (tuple, list)) or len(nm) != 2:
            raise TypeError(f"nm must be a pair (N, M) such as (2, 4), or None; got {nm!r}")
        nm = (whole_number("nm[0]", nm[0], 1, "N of N:M, e.g. 2"), whole_number("nm[1]", nm[1], 1, "M, e.g. 4"))
    blocksize = whole_number("blocksize", blocksize, 1, "columns per lazy update, e.g. 128")
    _check_flag("mask_rows", mask_rows)
    _check_flag("act_order", act_order)
    rows, cols = weight.shape
    gs = None if grid is None else (grid.group_size or cols)
    if gs is not None and cols % gs:
        raise ValueError(f"group_size={gs} does not divide in_features={cols}")
    if nm is not None and (cols % nm[1] or not 0 < nm[0] < nm[1]):
        raise ValueError(f"N:M={nm} needs 0 < N < M and M dividing in_features={cols}")
    if gs is not None and gs < cols:
        blocksize = max(gs, blocksize // gs * gs)        # a group never straddles two blocks
    if nm is not None:
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])
    H, W = prepare_hessian(H, weight, damp)
    W_orig = W.clone()
    perm = torch.arange(cols)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    U = inverse_cholesky(H).to(dtype)
    W = W.to(dtype)
    prune_mask = torch.zeros(rows, cols, dtype=torch.bool)      # True = pruned
    codes = torch.zeros(rows, cols, dtype=torch.float64) if grid else None
    n_groups = 1 if gs is None else cols // gs
    scales = torch.zeros(rows, n_groups, dtype=torch.float16) if grid else None
    zeros = torch.zeros(rows, n_groups, dtype=torch.float16) if grid and not grid.symmetric else None
    static = act_order and grid is not None                  # with act_order, groups are fixed from the start
    if static:
        for g in range(n_groups):
            s, z = grid.params(W_orig[:, g * gs:(g + 1) * gs])
            scales[:, g:g + 1] = s
            if zeros is not None:
                zeros[:, g:g + 1] = z

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Q1, E1 = torch.zeros_like(W1), torch.zeros_like(W1)
        d = torch.diag(U1)
        m1 = torch.zeros_like(W1, dtype=torch.bool)
        if sparsity is not None and nm is None:
            score = W1 ** 2 / d.view(1, -1) ** 2
            if mask_rows:
                k = int(round(float(sparsity) * (i2 - i1)))
                if k:
                    m1.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
            else:
                k = int(round(float(sparsity) * score.numel()))
                if k:
                    m1.view(-1)[torch.topk(score.reshape(-1), k, largest=False).indices] = True
        for i in range(i2 - i1):
            col = i1 + i
            w = W1[:, i]
            if nm is not None and i % nm[1] == 0:
                score = W1[:, i:i + nm[1]] ** 2 / d[i:i + nm[1]].view(1, -1) ** 2
                m1.scatter_(1, i + torch.topk(score, nm[1] - nm[0], dim=1, largest=False).indices, True)
            q = w.clone()
            if grid is not None:
                g = int(perm[col]) // gs
                if not static and col % gs == 0:
                    # groups fit in a block; a per-channel grid is set at column 0, before any update
                    src = W1[:, i:i + gs] if i + gs <= i2 - i1 else W[:, col:col + gs]
                    s, z = grid.params(src)
                    scales[:, g:g + 1] = s
                    if zeros is not None:
                        zeros[:, g:g + 1] = z
                s = scales[:, g].double()
                z = None if zeros is None else zeros[:, g].double()
                c = grid.codes(w.double(), s, z)
                codes[:, col] = c
                q = grid.value(c, s, z).to(dtype)
            q[m1[:, i]] = 0.0
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i1:i2] = Q1
        prune_mask[:, i1:i2] = m1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]

    inv = torch.argsort(perm)
    out = SolveResult(weight=W[:, inv].float())
    if sparsity is not None or nm is not None:
        out.mask = ~prune_mask[:, inv]
    if grid is not None:
        out.codes, out.scales, out.zeros = codes[:, inv].to(torch.uint8), scales, zeros
    return out


# ---------------------------------------------------------------------------------------------------------
# GPTQ and SparseGPT on one weight
# ---------------------------------------------------------------------------------------------------------
def gptq(weight: torch.Tensor, H: torch.Tensor, grid: Grid, *, act_order: bool = False, blocksize: int = 128,
         damp: float = 0.01) -> QTensor:
    """GPTQ: quantize W column by column to `grid`, correcting the rest with OBS. Returns a packed QTensor with
    the same layout, scales and bytes as labkit.quantize.quantize (so bits per weight are equal to RTN's)."""
    if not isinstance(grid, Grid):
        raise TypeError(f"gptq needs a Grid, got {type(grid).__name__}; e.g. Grid(bits=3, group_size=64)")
    r = obs_solve(weight, H, grid=grid, act_order=act_order, blocksize=blocksize, damp=damp)
    rows, cols = weight.shape
    gs = grid.group_size or cols
    return QTensor(packed=pack_bits(r.codes.reshape(-1), grid.bits), scales=r.scales, zeros=r.zeros,
                   bits=grid.bits, group_size=gs, shape=tuple(weight.shape), symmetric=grid.symmetric,
                   granularity="channel" if gs == cols else "group", dtype=weight.dtype)


def sparsegpt(weight: torch.Tensor, H: torch.Tensor, sparsity: float = 0.5, *, nm: tuple[int, int] | None = None,
              mask_rows: bool = False, blocksize: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: prune W to `sparsity` (or N:M) choosing the mask block by block by w²/[U]_jj² and updating the
    kept weights with OBS. Returns (Ŵ, keep-mask)."""
    r = obs_solve(weight, H, sparsity=None if nm else sparsity, nm=nm, mask_rows=mask_rows,
                  blocksize=blocksize, damp=damp)
    return r.weight, r.mask


def layer_error(weight: torch.Tensor, new_weight: torch.Tensor, x: torch.Tensor) -> float:
    """Relative layer-wise error ‖XWᵀ − XŴᵀ‖_F / ‖XWᵀ‖_F on inputs x [..., in]."""
    if check_weight("new_weight", new_weight).shape != check_weight("weight", weight).shape:
        raise ValueError(f"weight {tuple(weight.shape)} and new_weight {tuple(new_weight.shape)} must have one shape")
    torch_tensor("x", x, "the layer's inputs [..., in_features]", kind="float", finite=True)
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must end in the weight's {weight.shape[1]} input features, got shape {tuple(x.shape)}")
    x = x.reshape(-1, x.shape[-1]).float()
    ref = x @ weight.detach().float().T
    return float((ref - x @ new_weight.detach().float().T).norm() / ref.norm())


# ---------------------------------------------------------------------------------------------------------
# Whole model, one decoder layer at a time (inputs come from the already-processed layers before it)
# ---------------------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _stat_hooks(linears: dict[str, nn.Module]):
    """Forward hooks feeding each Linear's inputs to a HessianAccumulator; a Linear that reads the very tensor the
    previous one read (q/k/v, gate/up) shares its accumulator. Returns (accs, handles, new_batch)."""
    accs: dict[str, HessianAccumulator] = {}
    last: list = [None, None]          # (input tensor, fqn whose accumulator saw it)

    def hook(mod, a, o, n):
        x = a[0]
        if last[0] is x:
            accs.setdefault(n, accs[last[1]])
            return
        accs.setdefault(n, HessianAccumulator(mod.in_features)).add(x)
        last[:] = [x, n]

    handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n)) for n, m in linears.items()]
    return accs, handles, lambda: last.__setitem__(slice(None), [None, None])


@torch.no_grad()
def calibrate_layers(model: nn.Module, batches: torch.Tensor,
                     process: Callable[[str, nn.Module, dict[str, tuple[nn.Linear, HessianAccumulator]]], None],
                     filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Run `batches` [B, T] to the first decoder layer, then for each layer: collect the statistics of its Linears
    (forward hooks), call process(layer_name, layer, {fqn: (linear, accumulator)}) — which may change the layer in
    place — and feed the layer's new outputs to the next layer. Linears that read the very same input tensor
    (q/k/v, gate/up) share one accumulator. Works for Llama-style models (model.model.layers); returns the model."""
    layers = check_llama(model).model.layers
    check_token_ids("batches", batches, model, dims=2)
    if not callable(process):
        raise TypeError(f"process must be a function (layer_name, layer, found) -> None, got {process!r}")
    check_filter(filter_fn)
    filter_fn = filter_fn or (lambda m, fqn: isinstance(m, nn.Linear))
    caught = {}

    def catch(mod, args, kwargs):
        caught["x"], caught["kw"] = args[0] if args else kwargs.pop("hidden_states"), kwargs
        raise _Stop

    was_training = model.training
    model.eval()
    h = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    xs, kw = [], None
    try:
        for b in batches.split(4):
            try:
                model(b, use_cache=False)
            except _Stop:
                xs.append(caught["x"])
                kw = caught["kw"]
    finally:
        h.remove()
    prefix = {id(l): n for n, l in model.named_modules()}
    try:
        for layer in layers:
            lname = prefix[id(layer)]
            linears = {f"{lname}.{n}": m for n, m in layer.named_modules()
                       if isinstance(m, nn.Linear) and filter_fn(m, f"{lname}.{n}")}
            accs, hooks, new_batch = _stat_hooks(linears)
            try:
                for x in xs:
                    new_batch()
                    layer(x, **kw)
            finally:
                for hk in hooks:
                    hk.remove()
                new_batch()
            process(lname, layer, {n: (m, accs[n]) for n, m in linears.items()})
            del accs
            xs = [layer(x, **kw) for x in xs]
            xs = [x[0] if isinstance(x, tuple) else x for x in xs]
    finally:
        model.train(was_training)
    return model


@contextlib.contextmanager
def recording(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None):
    """`with recording(model) as stats: <run inputs through model>` — stats fills with {fqn: HessianAccumulator}
    for every selected nn.Linear (Linears that read the same tensor share one); the hooks go on exit."""
    torch_module("model", model, "a model such as lk.load_model()[0]")
    check_filter(filter_fn)
    filter_fn = filter_fn or (lambda m, fqn: isinstance(m, nn.Linear))
    linears = {n: m for n, m in model.named_modules() if n and isinstance(m, nn.Linear) and filter_fn(m, n)}
    if not linears:
        raise ValueError("recording: filter_fn selected no nn.Linear")
    accs, hooks, new_batch = _stat_hooks(linears)
    try:
        yield accs
    finally:
        for hk in hooks:
            hk.remove()
        new_batch()


@torch.no_grad()
def collect_stats(model: nn.Module, batches: torch.Tensor,
                  filter_fn: Callable[[nn.Module, str], bool] | None = None) -> dict[str, HessianAccumulator]:
    """One pass of the unchanged model over token batches [B, T] (4 sequences at a time): the input statistics
    (H and mean |x|) of every selected Linear, {fqn: HessianAccumulator}."""
    check_token_ids("batches", batches, model, dims=2)
    was_training = model.training
    model.eval()
    try:
        with recording(model, filter_fn) as accs:
            for b in batches.split(4):
                model(b, use_cache=False)
    finally:
        model.train(was_training)
    return accs


def sequential_(model: nn.Module, batches: torch.Tensor, solve: Callable[[str, nn.Linear, torch.Tensor], None],
                filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """GPTQ/SparseGPT's layer-by-layer pass (calibrate_layers): for each Linear, solve(fqn, linear, H) changes the
    linear in place, and the next decoder layer sees the outputs of the already-processed ones. Returns the model."""
    if not callable(solve):
        raise TypeError(f"solve must be a function (fqn, linear, H) -> None, got {solve!r}")

    def process(lname, layer, found):
        for n, (m, acc) in found.items():
            solve(n, m, acc.hessian)
    return calibrate_layers(model, batches, process, filter_fn)


def check_stats(stats, model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of the model's modules that `stats` (collect_stats / recording) describes; TypeError unless it
    maps names to HessianAccumulator, ValueError for a name the model does not have."""
    if not isinstance(stats, dict) or not all(isinstance(v, HessianAccumulator) for v in stats.values()):
        raise TypeError("the statistics must be a dict {Linear name: HessianAccumulator}, from "
                        "lk.second_order.collect_stats(model, batches) or recording(model)")
    modules = dict(torch_module("model", model, "the model the statistics were collected on").named_modules())
    missing = [n for n in stats if n not in modules]
    if missing:
        raise ValueError(f"the statistics name {missing[0]!r}, which this model does not have; collect them on this "
                         "model")
    return {n: modules[n] for n in stats}


def gptq_(model: nn.Module, calibration, config: QuantConfig, *, act_order: bool = True, blocksize: int = 128,
          damp: float = 0.01, filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """GPTQ on a whole model, in place (torchao's quantize_ shape); each selected Linear becomes a QuantLinear
    holding GPTQ's packed codes (RTN's bytes exactly). `config` is a labkit.quantize.QuantConfig.

    calibration = token batches [B, T]: the paper's sequential pass (Llama-style models) — decoder layer by
    decoder layer, each Linear solved on the inputs the already quantized layers produce.
    calibration = the dict collect_stats returned for this unchanged model: every Linear solved on the fp32
    model's inputs (one pass, shared with AWQ; faster, any model). Returns the model."""
    if not isinstance(config, QuantConfig):
        raise TypeError(f"gptq_ needs a labkit QuantConfig, got {type(config).__name__}; e.g. QuantConfig(3, group_size=64)")
    if config.granularity == "tensor":
        raise ValueError("GPTQ here quantizes per channel or per group, not per tensor")
    grid = Grid(config.bits, config.group_size, config.symmetric)
    blocksize = whole_number("blocksize", blocksize, 1, "columns per lazy update, e.g. 128")
    real_number("damp", damp, "a fraction of the mean diagonal, e.g. 0.01")
    _check_flag("act_order", act_order)
    if isinstance(calibration, dict):          # as quantize_: not a lm_head tied to the embedding
        keep = check_filter(filter_fn) if filter_fn is not None else skip_tied(torch_module("model", model))
        linears = {n: m for n, m in check_stats(calibration, model).items() if isinstance(m, nn.Linear) and keep(m, n)}
    else:
        check_token_ids("calibration", calibration, check_llama(model), dims=2)
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and check_filter(filter_fn)(m, n)}
    check_group_size(config, linears)
    saved = {n: m.weight.detach().clone() for n, m in linears.items()}
    done: dict[str, QTensor] = {}

    def solve(fqn, lin, H):
        q = gptq(lin.weight, H, grid, act_order=act_order, blocksize=blocksize, damp=damp)
        with torch.no_grad():
            lin.weight.copy_(q.dequantize())        # what the next layers see during a sequential pass
        done[fqn] = q

    try:   # all-or-nothing: a failure on a later layer puts the weights already solved back
        if isinstance(calibration, dict):
            for fqn, lin in linears.items():
                solve(fqn, lin, calibration[fqn].hessian)
        else:
            sequential_(model, calibration, solve, filter_fn)
    except BaseException:
        with torch.no_grad():
            for n, m in linears.items():
                m.weight.copy_(saved[n])
        raise
    for fqn, q in done.items():
        lin = model.get_submodule(fqn)
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, QuantLinear(q, lin.bias))
    return model
