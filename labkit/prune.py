"""Pruning: magnitude, Wanda, SparseGPT and N:M masks, an in-place `prune_`, structured MLP pruning, recovery.

Defined in notebook 01 (01_pruning.ipynb); notebook 04 (sparse storage) imports the masks from here. The masks
themselves (pure functions on tensors) are in labkit/masks.py; selecting the Linear layers and the calibration
inputs (Wanda's activation norms) in labkit/calibration.py — both re-exported here.

Conventions: a mask is a bool tensor shaped like the weight, True = KEEP, False = pruned (zero).
`sparsity` is the fraction of weights set to zero; the number pruned is round(sparsity * numel), the same
rule as `torch.nn.utils.prune` (so our masks equal torch's on the same weights).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

# Choosing the layers and calibrating them has its own module; re-exported (notebook 01 uses
# lk.prune.select_linears, lk.prune.calibration_batches and lk.prune.collect_input_norms).
from .calibration import (  # noqa: F401
    FilterFn, calibration_batches, check_windows, collect_input_norms, default_filter, select_linears,
)
from .checks import MAX_STEPS, real_number, torch_module, torch_tensor, whole_number
from .evaluate import check_token_ids
from .masks import (  # noqa: F401  (notebook 01 uses lk.prune.magnitude_mask, nm_mask, wanda_scores, ...)
    check_nm, check_sparsity, check_tensor_dict, global_magnitude_masks, global_masks_from_scores, magnitude_mask,
    mask_from_scores, n_to_prune, nm_mask, nm_mask_from_scores, row_mask_from_scores, sparsity_of, wanda_scores,
)
from .models import check_llama

METHODS = ("magnitude", "wanda", "sparsegpt", "nm")
SCORES = ("magnitude", "wanda", "sparsegpt")
SCOPES = ("layer", "global", "row")


# ---------------------------------------------------------------------------------------------------------
# Config and validation
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PruneConfig:
    """What `prune_` does (notebook 01 §1). Frozen: build a new one to change a field.

    method: "magnitude" (score |W|), "wanda" (score |W|·‖X‖₂, needs calibration), "sparsegpt" (mask by
        w²/[H⁻¹]_jj per block of columns and the kept weights updated by OBS, needs calibration; notebook 01 §6)
        or "nm" (N of every M kept).
    sparsity: fraction of weights to zero, in [0, 1) (ignored by "nm": there it is 1 − n/m).
    scope: which weights compete: "layer" (within each matrix; SparseGPT: within each block of 128 columns),
        "global" (all selected matrices together) or "row" (within each output row, as in the Wanda paper).
    n, m: the N:M pattern for method "nm" (2:4 = keep 2 of every 4 consecutive input weights).
    score: what "nm" ranks by inside each group: "magnitude", "wanda" or "sparsegpt".
    """

    method: str = "magnitude"
    sparsity: float = 0.5
    scope: str = "layer"
    n: int = 2
    m: int = 4
    score: str = "magnitude"

    def __post_init__(self):
        for field in ("method", "scope", "score"):
            if not isinstance(getattr(self, field), str):
                raise TypeError(f"PruneConfig.{field} must be a string, got {getattr(self, field)!r}")
        if self.method not in METHODS:
            raise ValueError(f"PruneConfig.method={self.method!r} is unknown; use one of {METHODS}")
        if self.scope not in SCOPES:
            raise ValueError(f"PruneConfig.scope={self.scope!r} is unknown; use one of {SCOPES}")
        if self.score not in SCORES:
            raise ValueError(f"PruneConfig.score={self.score!r} is unknown; use one of {SCORES}")
        if self.method == "sparsegpt" and self.scope == "global":
            raise ValueError("SparseGPT chooses its mask within each layer; use scope='layer' or 'row'")
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
        check_nm(self.n, self.m)

    @property
    def needs_calibration(self) -> bool:
        """True when the score uses activation norms (Wanda)."""
        return self.method in ("wanda", "sparsegpt") or (self.method == "nm" and self.score != "magnitude")

    @property
    def second_order(self) -> bool:
        """True for SparseGPT (weights updated by the OBS solver, not just masked)."""
        return self.method == "sparsegpt" or (self.method == "nm" and self.score == "sparsegpt")

    @property
    def label(self) -> str:
        """Short name for tables and plots, e.g. 'magnitude 50%' or '2:4 wanda'."""
        if self.method == "nm":
            return f"{self.n}:{self.m} {self.score}"
        return f"{self.method} {self.sparsity:.0%}"


def _check_prune_config(config) -> None:
    if not isinstance(config, PruneConfig):
        raise TypeError(f"prune_ needs a PruneConfig, got {type(config).__name__}; "
                        "e.g. prune_(model, PruneConfig(method='magnitude', sparsity=0.5))")


# ---------------------------------------------------------------------------------------------------------
# In-place pruning (torchao-style)
# ---------------------------------------------------------------------------------------------------------
def compute_masks(model: nn.Module, config: PruneConfig, filter_fn: FilterFn | None = None,
                  input_norms: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{fqn: keep-mask} for the selected Linear weights, without changing the model (not for SparseGPT, whose
    masks depend on the weight updates: use prune_ / pruned)."""
    torch_module("model", model, "a model such as lk.load_model()[0]")
    _check_prune_config(config)
    if input_norms is not None:
        check_tensor_dict("input_norms", input_norms)
    if config.second_order:
        raise ValueError("SparseGPT's masks come with weight updates; call prune_(model, config, calib_tokens=…) "
                         "or `with pruned(model, config, calib_tokens=…) as masks:`")
    linears = select_linears(model, filter_fn)
    if not linears:
        raise ValueError("filter_fn selected no nn.Linear modules; check the names with "
                         "[n for n, m in model.named_modules()]")
    if config.needs_calibration:
        if input_norms is None:
            raise ValueError(f"{config.label} needs activation norms: pass calib_tokens=<1-D train tokens> or "
                             "input_norms=collect_input_norms(model, tokens)")
        missing = [n for n in linears if n not in input_norms]
        if missing:
            raise ValueError(f"input_norms lacks {missing[:3]}…; collect them with the same filter_fn")
        scores = {n: wanda_scores(mod.weight, input_norms[n]) for n, mod in linears.items()}
    else:
        scores = {n: mod.weight.detach().abs() for n, mod in linears.items()}

    if config.method == "nm":
        return {n: nm_mask_from_scores(s, config.n, config.m) for n, s in scores.items()}
    if config.scope == "global":
        return global_masks_from_scores(scores, config.sparsity)
    if config.scope == "row":
        return {n: row_mask_from_scores(s, config.sparsity) for n, s in scores.items()}
    return {n: mask_from_scores(s, config.sparsity) for n, s in scores.items()}


def _check_masks(model: nn.Module, masks) -> dict[str, nn.Module]:
    """The model's {fqn: module}, after checking that every mask is a bool tensor shaped like its module's weight."""
    torch_module("model", model, "the model the masks were computed on")
    check_tensor_dict("masks", masks)
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        if name not in modules or not hasattr(modules[name], "weight"):
            raise ValueError(f"mask {name!r} names no module with a weight in this model")
        if mask.shape != modules[name].weight.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask {name!r} must be a bool tensor of shape {tuple(modules[name].weight.shape)}")
    return modules


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero the pruned weights in place (weight *= mask); every mask is checked before any weight changes."""
    modules = _check_masks(model, masks)
    for name, mask in masks.items():
        modules[name].weight.mul_(mask.to(modules[name].weight.dtype))
    return model


@torch.no_grad()
def sparsegpt_(model: nn.Module, config: PruneConfig, calib_tokens: torch.Tensor,
               filter_fn: FilterFn | None = None) -> dict[str, torch.Tensor]:
    """SparseGPT on every selected Linear, one decoder layer at a time (inputs from the layers already pruned);
    returns the keep-masks. All-or-nothing: the weights are restored if anything fails (notebook 01 §6)."""
    from .second_order import sequential_, sparsegpt
    check_llama(model)
    _check_prune_config(config)
    linears = select_linears(model, filter_fn)
    if not linears:
        raise ValueError("filter_fn selected no nn.Linear modules")
    if config.method == "nm":
        bad = [n for n, m in linears.items() if m.in_features % config.m]
        if bad:
            raise ValueError(f"N:M with M={config.m} needs in_features divisible by {config.m}: {bad[:3]}")
    two_d = isinstance(calib_tokens, torch.Tensor) and calib_tokens.dim() == 2
    batches = check_token_ids("calib_tokens", calib_tokens if two_d else calibration_batches(calib_tokens), model)
    saved = {n: mod.weight.detach().clone() for n, mod in linears.items()}
    masks = {}

    def solve(name, lin, H):
        nm = (config.n, config.m) if config.method == "nm" else None
        w, keep = sparsegpt(lin.weight, H, config.sparsity, nm=nm, mask_rows=config.scope == "row")
        lin.weight.copy_(w.to(lin.weight.dtype))
        masks[name] = keep

    try:
        sequential_(model, batches, solve, lambda m, fqn: fqn in linears)
    except BaseException:
        for n, mod in linears.items():
            mod.weight.copy_(saved[n])
        raise
    return masks


def prune_with_masks_(model: nn.Module, config: PruneConfig, filter_fn: FilterFn | None = None, *,
                      calib_tokens: torch.Tensor | None = None,
                      input_norms: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """prune_ that returns the {fqn: keep-mask} it used instead of the model."""
    torch_module("model", model, "a model such as lk.load_model()[0]")
    _check_prune_config(config)
    if config.second_order:
        if calib_tokens is None:
            raise ValueError(f"{config.label} needs calibration tokens: pass calib_tokens=<1-D train tokens>")
        return sparsegpt_(model, config, calib_tokens, filter_fn)
    if config.needs_calibration and input_norms is None and calib_tokens is not None:
        input_norms = collect_input_norms(model, calib_tokens, filter_fn)
    masks = compute_masks(model, config, filter_fn, input_norms)   # every mask before any weight changes
    apply_masks_(model, masks)
    return masks


def prune_(model: nn.Module, config: PruneConfig, filter_fn: FilterFn | None = None, *,
           calib_tokens: torch.Tensor | None = None,
           input_norms: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Prune the selected Linear weights of `model` in place and return the model (notebook 01 §2).

    Like torchao's `quantize_(model, config, filter_fn)`: filter_fn(module, fqn) -> bool picks the layers
    (default: every Linear but lm_head). Wanda needs `calib_tokens` (1-D train tokens) or `input_norms`;
    SparseGPT needs `calib_tokens`. All-or-nothing: every mask is computed (or every SparseGPT update done, with
    a roll-back on failure) before the model is left changed. The weights stay dense tensors with zeros in
    them: this alone saves no memory and no time. Pruning twice prunes the already-pruned weights again (the
    zeros are the smallest scores, so a second magnitude pass at the same sparsity changes nothing)."""
    prune_with_masks_(model, config, filter_fn, calib_tokens=calib_tokens, input_norms=input_norms)
    return model


@contextlib.contextmanager
def pruned(model: nn.Module, config: PruneConfig, filter_fn: FilterFn | None = None, **kwargs):
    """Temporarily prune: `with pruned(model, cfg) as masks: ...` restores the dense weights on exit."""
    linears = select_linears(model, filter_fn)
    saved = {n: mod.weight.detach().clone() for n, mod in linears.items()}
    try:
        yield prune_with_masks_(model, config, filter_fn, **kwargs)
    finally:
        with torch.no_grad():
            for n, mod in linears.items():
                mod.weight.copy_(saved[n])
        del saved


# ---------------------------------------------------------------------------------------------------------
# Structured pruning: whole MLP neurons (the matrices really shrink)
# ---------------------------------------------------------------------------------------------------------
def _mlps(model: nn.Module) -> dict[str, nn.Module]:
    return {name: mod for name, mod in model.named_modules()
            if all(isinstance(getattr(mod, a, None), nn.Linear) for a in ("gate_proj", "up_proj", "down_proj"))}


def _slice_linear(lin: nn.Linear, idx: torch.Tensor, dim: int) -> nn.Linear:
    w = lin.weight.detach().index_select(dim, idx).clone()
    out_f, in_f = w.shape
    new = nn.Linear(in_f, out_f, bias=lin.bias is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach().index_select(0, idx) if dim == 0 else lin.bias.detach())
    return new


def neuron_scores(mlp: nn.Module, down_input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each intermediate neuron j of a Llama MLP: ‖X_j‖₂·‖W_down[:, j]‖₂ with calibration
    norms (Wanda-style), else ‖W_gate[j]‖·‖W_up[j]‖·‖W_down[:, j]‖ from the weights alone."""
    if not all(isinstance(getattr(mlp, a, None), nn.Linear) for a in ("gate_proj", "up_proj", "down_proj")):
        raise TypeError(f"mlp must be a Llama MLP (gate_proj, up_proj, down_proj), e.g. model.model.layers[0].mlp; "
                        f"got {type(mlp).__name__}")
    down = mlp.down_proj.weight.detach().norm(dim=0)
    if down_input_norm is not None:
        torch_tensor("down_input_norm", down_input_norm, "‖X_j‖₂ of down_proj's inputs, from collect_input_norms",
                     kind="real", finite=True)
        if down_input_norm.shape != down.shape:
            raise ValueError(f"down_input_norm must have one value per neuron, shape {tuple(down.shape)}; got "
                             f"{tuple(down_input_norm.shape)}")
        return down_input_norm.to(down.dtype) * down
    return mlp.gate_proj.weight.detach().norm(dim=1) * mlp.up_proj.weight.detach().norm(dim=1) * down


@torch.no_grad()
def prune_mlp_neurons_(model: nn.Module, sparsity: float,
                       input_norms: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Remove the lowest-scoring round(sparsity·I) neurons from every gated MLP (gate/up rows, down columns).

    The Linear layers are replaced by smaller ones and `model.config.intermediate_size` is updated, so the
    bytes and the matmul time really shrink (notebook 01 §5). Returns {mlp fqn: kept neuron indices}.
    """
    sparsity = check_sparsity(sparsity)
    torch_module("model", model, "a Llama-style model such as lk.load_model()[0]")
    if input_norms is not None:
        check_tensor_dict("input_norms", input_norms)
    mlps = _mlps(model)
    if not mlps:
        raise ValueError("no gated MLP (gate_proj/up_proj/down_proj) found; prune_mlp_neurons_ expects a Llama-style model")
    kept = {}
    for name, mlp in mlps.items():   # every choice before any layer changes (all-or-nothing)
        inter = mlp.gate_proj.out_features
        n_keep = inter - n_to_prune(inter, sparsity)
        if n_keep < 1:
            raise ValueError(f"sparsity {sparsity} would remove every neuron of {name}; use a smaller sparsity")
        norm = None if input_norms is None else input_norms.get(f"{name}.down_proj")
        kept[name] = torch.topk(neuron_scores(mlp, norm), n_keep).indices.sort().values
    for name, mlp in mlps.items():
        idx, n_keep = kept[name], len(kept[name])
        mlp.gate_proj = _slice_linear(mlp.gate_proj, idx, 0)
        mlp.up_proj = _slice_linear(mlp.up_proj, idx, 0)
        mlp.down_proj = _slice_linear(mlp.down_proj, idx, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = n_keep
    sizes = {len(v) for v in kept.values()}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "intermediate_size") and len(sizes) == 1:
        config.intermediate_size = sizes.pop()
    return kept


# ---------------------------------------------------------------------------------------------------------
# Recovery fine-tune (masks re-applied after every step, so sparsity is kept)
# ---------------------------------------------------------------------------------------------------------
def recovery_finetune_(model: nn.Module, tokens: torch.Tensor, masks: dict[str, torch.Tensor] | None = None,
                       steps: int = 20, lr: float = 1e-4, seq_len: int = 128, batch_size: int = 4,
                       train_filter: FilterFn | None = None, seed: int = 0) -> list[float]:
    """A few AdamW steps of next-token loss on `tokens` (train split), training only the selected Linear
    weights (default: the pruned ones), re-applying the masks after each step. Returns the loss per step."""
    tokens = check_windows(check_llama(model), tokens, seq_len, batch_size)
    steps = whole_number("steps", steps, 0, "AdamW steps, e.g. 20", high=MAX_STEPS)
    if not 0 < real_number("lr", lr, "a learning rate in (0, 1], e.g. 1e-4", low=0) <= 1:
        raise ValueError(f"lr must be in (0, 1] (e.g. 1e-4), got {lr!r}; a larger step diverges to NaN losses")
    seed = whole_number("seed", seed, 0, "any whole number ≥ 0")
    if masks is not None:
        _check_masks(model, masks)
    params = [mod.weight for mod in select_linears(model, train_filter).values()]
    if not params:
        raise ValueError("train_filter selected no nn.Linear to train; check it against "
                         "[n for n, m in model.named_modules()]")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    was_training = model.training
    model.train()
    try:
        for _ in range(steps):
            starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=g).tolist()
            batch = torch.stack([tokens[s:s + seq_len] for s in starts])
            loss = model(batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if masks:
                apply_masks_(model, masks)
            losses.append(float(loss.detach()))
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.train(was_training)
        del opt
    return losses


# ---------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------
def state_dict_bytes(module: nn.Module) -> int:
    """Bytes of everything in module.state_dict() (parameters AND buffers such as weight_mask)."""
    torch_module("module", module, "a model or a layer, e.g. model.model.layers[0].mlp.up_proj")
    seen, total = set(), 0
    for t in module.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
