"""Evaluation: perplexity of a causal LM on held-out KJV books, with a fixed, deterministic token budget.

Defined in notebook 00; every lesson measures accuracy with it.
"""
from __future__ import annotations

import math

import torch

from .repro import full_mode


def default_budget() -> int:
    """Tokens scored by perplexity(): 4,096 by default, 32,768 with LABKIT_FULL=1."""
    return 32768 if full_mode() else 4096


def windows(tokens: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    """[n, seq_len] non-overlapping windows spread evenly over tokens, n = max_tokens // seq_len."""
    tokens = torch.as_tensor(tokens).flatten()
    if seq_len < 2:
        raise ValueError(f"seq_len must be ≥ 2, got {seq_len}")
    total = len(tokens) // seq_len
    n = min(total, max(1, max_tokens // seq_len))
    if total == 0:
        raise ValueError(f"need at least seq_len={seq_len} tokens, got {len(tokens)}")
    starts = torch.linspace(0, total - 1, n).round().long() * seq_len
    return torch.stack([tokens[s: s + seq_len] for s in starts.tolist()])


@torch.inference_mode()
def mean_nll(model, tokens: torch.Tensor, seq_len: int = 256, max_tokens: int | None = None,
             batch_size: int = 4) -> float:
    """Mean next-token negative log-likelihood (nats) over evenly spread windows of tokens."""
    max_tokens = default_budget() if max_tokens is None else int(max_tokens)
    data = windows(tokens, seq_len, max_tokens)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(data), batch_size):
            x = data[i: i + batch_size]
            logits = model(input_ids=x).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                    x[:, 1:].reshape(-1), reduction="sum")
            total += nll.item()
            count += x[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / count


def perplexity(model, tokens: torch.Tensor, seq_len: int = 256, max_tokens: int | None = None,
               batch_size: int = 4) -> float:
    """exp(mean NLL) over a fixed budget of tokens (deterministic: the same windows every time)."""
    return math.exp(mean_nll(model, tokens, seq_len, max_tokens, batch_size))


def eval_tokens(tokenizer, split: str = "validation") -> torch.Tensor:
    """The standard evaluation tokens: the held-out validation books."""
    from .data import tokens
    return tokens(split, tokenizer)
