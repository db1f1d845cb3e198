"""Calibration: which Linear layers a transform touches, and what their inputs look like on real text.

Defined in notebook 01 (01_pruning.ipynb, §3 Wanda and §6 SparseGPT): `select_linears` picks the layers (by
default every nn.Linear but the output head), `calibration_batches` cuts a few windows of training tokens, and
`collect_input_norms` runs them once with forward hooks to get ‖X_j‖₂ per input feature — what Wanda multiplies
|W| by. The same windows feed GPTQ and AWQ (notebook 02). `lk.prune` re-exports all of them.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

FilterFn = Callable[[nn.Module, str], bool]


def default_filter(module: nn.Module, fqn: str) -> bool:
    """Every nn.Linear except the output head: embeddings and lm_head stay dense (tied in SmolLM2)."""
    return isinstance(module, nn.Linear) and not fqn.split(".")[-1] == "lm_head"


def select_linears(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, nn.Linear]:
    """{fqn: module} of the Linear layers `prune_` will touch."""
    filter_fn = filter_fn or default_filter
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and filter_fn(mod, name)}


def calibration_batches(tokens: torch.Tensor, n_samples: int = 8, seq_len: int = 128) -> torch.Tensor:
    """[n_samples, seq_len] windows spread evenly over a 1-D token tensor (deterministic)."""
    tokens = torch.as_tensor(tokens).reshape(-1)
    if tokens.numel() < seq_len:
        raise ValueError(f"need at least seq_len={seq_len} tokens for calibration, got {tokens.numel()}")
    last = tokens.numel() - seq_len
    starts = torch.linspace(0, last, n_samples).long().tolist()
    return torch.stack([tokens[s:s + seq_len] for s in starts])


@torch.no_grad()
def collect_input_norms(model: nn.Module, tokens: torch.Tensor, filter_fn: FilterFn | None = None,
                        n_samples: int = 8, seq_len: int = 128, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ over calibration tokens for every input feature j of each selected Linear (forward hooks).

    `tokens` is a 1-D tensor (e.g. the train split) cut into windows, or an already-batched [B, T] tensor.
    """
    batches = tokens if torch.as_tensor(tokens).dim() == 2 else calibration_batches(tokens, n_samples, seq_len)
    linears = select_linears(model, filter_fn)
    sumsq = {name: torch.zeros(mod.in_features, dtype=torch.float64) for name, mod in linears.items()}

    def hook(name):
        def fn(mod, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sumsq[name] += (x * x).sum(0)
        return fn

    handles = [mod.register_forward_hook(hook(name)) for name, mod in linears.items()]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, batches.shape[0], batch_size):
            model(batches[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: s.sqrt().float() for name, s in sumsq.items()}
