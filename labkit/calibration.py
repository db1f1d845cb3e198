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

from .checks import torch_module, torch_tensor, whole_number
from .evaluate import check_token_ids
from .memory import check_fits, estimate_activation_bytes

FilterFn = Callable[[nn.Module, str], bool]


def default_filter(module: nn.Module, fqn: str) -> bool:
    """Every nn.Linear except the output head: embeddings and lm_head stay dense (tied in SmolLM2)."""
    if not isinstance(fqn, str):
        raise TypeError(f"fqn must be the module's name (a str such as 'model.layers.0.mlp.up_proj'), got {fqn!r}")
    return isinstance(module, nn.Linear) and not fqn.split(".")[-1] == "lm_head"


def check_filter(filter_fn) -> FilterFn:
    """filter_fn, or default_filter for None; TypeError unless it is a function (module, fqn) -> bool."""
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a function (module, fqn) -> bool, or None for every Linear but lm_head; "
                        f"got {filter_fn!r}")
    return filter_fn or default_filter


def select_linears(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, nn.Linear]:
    """{fqn: module} of the Linear layers `prune_` will touch."""
    torch_module("model", model, "a model such as lk.load_model()[0]")
    filter_fn = check_filter(filter_fn)
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and filter_fn(mod, name)}


def calibration_batches(tokens: torch.Tensor, n_samples: int = 8, seq_len: int = 128) -> torch.Tensor:
    """[n_samples, seq_len] windows spread evenly over a 1-D token tensor (deterministic)."""
    if isinstance(tokens, (list, tuple)):
        tokens = torch.tensor(tokens)
    tokens = torch_tensor("tokens", tokens, "token ids, e.g. lk.data.tokens('train', tok)", kind="int").reshape(-1)
    seq_len = whole_number("seq_len", seq_len, 1, "tokens per calibration window, e.g. 128")
    if tokens.numel() < seq_len:
        raise ValueError(f"need at least seq_len={seq_len} tokens for calibration, got {tokens.numel()}")
    last = tokens.numel() - seq_len
    n_samples = whole_number("n_samples", n_samples, 1, f"windows, at most the {last + 1} distinct ones of these "
                             "tokens", high=last + 1)
    starts = torch.linspace(0, last, n_samples).long().tolist()
    return torch.stack([tokens[s:s + seq_len] for s in starts])


def check_windows(model: nn.Module, tokens, seq_len: int, batch_size: int) -> torch.Tensor:
    """The 1-D token ids a training or evaluation loop cuts [batch_size, seq_len] windows from, checked before the
    loop starts: ids this model reads, windows it can read, enough tokens for one, a batch that fits in RAM."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    seq_len = whole_number("seq_len", seq_len, 2, "tokens per window, e.g. 128", high=limit)
    batch_size = whole_number("batch_size", batch_size, 1, "windows per step, e.g. 4")
    tokens = torch.tensor(tokens) if isinstance(tokens, (list, tuple)) else tokens
    tokens = check_token_ids("tokens", tokens, model).reshape(-1)
    if tokens.numel() < seq_len + 2:
        raise ValueError(f"tokens has {tokens.numel()} ids; windows of seq_len={seq_len} need at least {seq_len + 2} "
                         "(pass a whole split, e.g. lk.data.tokens('train', tok))")
    if hasattr(model, "config"):
        check_fits(f"a step on batch_size={batch_size} × seq_len={seq_len}",
                   estimate_activation_bytes(model.config, batch_size, seq_len)["total"], "use a smaller batch_size")
    return tokens


@torch.no_grad()
def collect_input_norms(model: nn.Module, tokens: torch.Tensor, filter_fn: FilterFn | None = None,
                        n_samples: int = 8, seq_len: int = 128, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ over calibration tokens for every input feature j of each selected Linear (forward hooks).

    `tokens` is a 1-D tensor (e.g. the train split) cut into windows, or an already-batched [B, T] tensor.
    """
    torch_module("model", model, "a language model such as lk.load_model()[0]")
    two_d = isinstance(tokens, torch.Tensor) and tokens.dim() == 2
    batches = check_token_ids("tokens", tokens if two_d else calibration_batches(tokens, n_samples, seq_len), model)
    batch_size = whole_number("batch_size", batch_size, 1, "windows per forward pass, e.g. 4")
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
