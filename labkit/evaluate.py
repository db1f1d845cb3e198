"""Evaluation: the lab's one protocol for perplexity, and its one gap metric.

Defined in notebook 00 ("How we measure accuracy"); every lesson measures accuracy with it.

The protocol: the held-out validation books of the corpus (lk.data.SPLITS), cut into non-overlapping windows of
256 tokens spread evenly over the whole split, scored with the next-token cross-entropy; perplexity = exp(mean NLL).
The headline budget is HEADLINE_TOKENS; where a live cell cannot afford it, LIVE_TOKENS is used, and the number
is always printed with its token count ("ppl₁₀₂₄ = 30.47"), so two numbers on different budgets are never mixed up.
Any other text can be scored the same way (lk.data.text_tokens), e.g. to re-check a claim outside the KJV.
"""
from __future__ import annotations

import math

import torch

from .checks import real_number, torch_module, torch_tensor, whole_number
from .repro import full_mode

SEQ_LEN = 256            # window length of the protocol
HEADLINE_TOKENS = 4096   # the budget of every headline perplexity (cached results, bench, README)
LIVE_TOKENS = 1024       # the smaller budget a live notebook cell uses when the headline one is too slow
_SUBSCRIPT = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def default_budget() -> int:
    """Tokens scored by perplexity() when no budget is given: HEADLINE_TOKENS, 32,768 with LABKIT_FULL=1."""
    return 32768 if full_mode() else HEADLINE_TOKENS


def _check_budget(max_tokens, seq_len: int) -> int:
    return whole_number("max_tokens", max_tokens, seq_len, f"tokens: at least one full window of seq_len={seq_len}; "
                        f"the protocol's budgets are {LIVE_TOKENS} and {HEADLINE_TOKENS}")


def _check_tokens(tokens) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a 1-D torch tensor of token ids (e.g. lk.data.tokens(...)), got "
                        f"{type(tokens).__name__}; wrap a list with torch.tensor(ids)")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be one 1-D stream of ids, got shape {tuple(tokens.shape)}; the protocol "
                         "cuts its own windows (pass tokens.flatten() if the rows are one text)")
    return tokens


def windows(tokens: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    """[n, seq_len] non-overlapping windows spread evenly over tokens, n = max_tokens // seq_len."""
    tokens = _check_tokens(tokens)
    seq_len = whole_number("seq_len", seq_len, 2, f"tokens per window, e.g. {SEQ_LEN}")
    max_tokens = _check_budget(max_tokens, seq_len)
    total = len(tokens) // seq_len
    if total == 0:
        raise ValueError(f"need at least seq_len={seq_len} tokens, got {len(tokens)}")
    n = min(total, max_tokens // seq_len)
    starts = torch.linspace(0, total - 1, n).round().long() * seq_len
    return torch.stack([tokens[s: s + seq_len] for s in starts.tolist()])


def _vocab_size(model) -> int | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb, torch.nn.Embedding):
        emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    return emb.num_embeddings if emb is not None else getattr(getattr(model, "config", None), "vocab_size", None)


def _check_model(model, tokens, name: str = "token ids") -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch module (e.g. lk.load_model()), got {type(model).__name__}")
    vocab = _vocab_size(model)
    if vocab is not None and tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise ValueError(f"{name} run from {int(tokens.min())} to {int(tokens.max())} but the model's vocabulary "
                         f"has {vocab} ids (0 … {vocab - 1}): tokenize with this model's own tokenizer")


def check_token_ids(name: str, ids, model, dims=(1, 2)) -> torch.Tensor:
    """ids if they are integer token ids `model` can read — `dims` dimensions ([tokens] or [batch, seq]), every id
    in 0 … vocab − 1, rows no longer than the model's max_position_embeddings — else a TypeError/ValueError naming
    `name`. Every function that runs a model on token ids checks them here before any work."""
    torch_tensor(name, ids, "token ids from the model's own tokenizer, e.g. lk.data.tokens(...)", dims=dims,
                 kind="int")
    if _vocab_size(torch_module("model", model)) is None:
        raise TypeError(f"model must read token ids through an embedding (lk.load_model()[0], "
                        f"lk.models.tiny_llama()), got a {type(model).__name__} without one")
    _check_model(model, ids, name)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if ids.dim() == 2 and isinstance(limit, int) and ids.shape[1] > limit:
        raise ValueError(f"{name} has rows of {ids.shape[1]} tokens but the model reads at most "
                         f"max_position_embeddings={limit}; pass shorter sequences")
    return ids


@torch.inference_mode()
def mean_nll(model, tokens: torch.Tensor, seq_len: int = SEQ_LEN, max_tokens: int | None = None,
             batch_size: int = 4) -> float:
    """Mean next-token negative log-likelihood (nats) over evenly spread windows of tokens."""
    max_tokens = default_budget() if max_tokens is None else max_tokens
    data = windows(tokens, seq_len, max_tokens)
    _check_model(model, tokens)
    check_token_ids("tokens", data, model, dims=2)       # a model that reads ids, windows it can read
    batch_size = whole_number("batch_size", batch_size, 1, "windows per forward pass, e.g. 4")
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
    if not math.isfinite(total):
        raise ValueError("the model's loss is not finite (NaN/inf logits): its weights hold NaN/inf or overflowed "
                         "— check them with [n for n, p in model.named_parameters() if not p.isfinite().all()]")
    return total / count


class Perplexity(float):
    """A perplexity that remembers its budget: a float, printed as 'ppl₁₀₂₄ = 30.47'."""

    tokens: int

    def __new__(cls, value: float, tokens: int):
        obj = super().__new__(cls, real_number("value", value, "a perplexity, e.g. 30.47", low=0))
        obj.tokens = whole_number("tokens", tokens, 1, "the tokens it was measured on, e.g. 1024")
        return obj

    @property
    def label(self) -> str:
        return ppl_label(self.tokens)

    def __str__(self) -> str:
        return f"{self.label} = {float(self):,.2f}"

    def __repr__(self) -> str:
        return f"Perplexity({float(self)!r}, tokens={self.tokens})"

    def __reduce__(self):
        return (Perplexity, (float(self), self.tokens))


def ppl_label(tokens: int) -> str:
    """'ppl₁₀₂₄' — the name of a perplexity on the protocol with that many tokens."""
    return "ppl" + str(whole_number("tokens", tokens, 0, "a token count, e.g. 1024")).translate(_SUBSCRIPT)


def perplexity(model, tokens: torch.Tensor, seq_len: int = SEQ_LEN, max_tokens: int | None = None,
               batch_size: int = 4) -> Perplexity:
    """exp(mean NLL) over a fixed budget of tokens (deterministic: the same windows every time).

    Returns a float that prints with its budget; `.tokens` is the number of windows × seq_len scored."""
    max_tokens = default_budget() if max_tokens is None else max_tokens
    n_windows = len(windows(tokens, seq_len, max_tokens))
    _check_model(model, tokens)
    return Perplexity(math.exp(mean_nll(model, tokens, seq_len, max_tokens, batch_size)), n_windows * seq_len)


def eval_tokens(tokenizer, split: str = "validation") -> torch.Tensor:
    """The protocol's tokens: the held-out validation books (or another split of the corpus)."""
    from .data import tokens
    return tokens(split, tokenizer)


def gap_closed(reference: float, baseline: float, method: float) -> float:
    """Share of the log-perplexity gap that a method closes: (log baseline − log method) / (log baseline − log reference).

    The lab's one gap metric (pruning recovery, quantizers after RTN, distillation, capstone). 1.0 = the method
    reaches the reference (e.g. the dense or fp32 model, or the teacher); 0.0 = no better than the baseline;
    negative = worse than the baseline. Log-perplexity is the mean loss, so the metric does not let one huge
    perplexity dominate."""
    vals = []
    for name, v in (("reference", reference), ("baseline", baseline), ("method", method)):
        vals.append(math.log(real_number(name, v, "a perplexity", low=1.0)))
    ref, base, meth = vals
    if base <= ref:
        raise ValueError(f"baseline perplexity {baseline} is not above the reference {reference}: there is no gap "
                         "to close (pass the worse model as baseline)")
    return (base - meth) / (base - ref)
