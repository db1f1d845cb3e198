"""The teacher's targets: run the teacher once over the training text and keep a little of what it says.

Defined in notebook 03 (Distillation, §3 "The teacher's targets: run once, store a little"). `teacher_topk` keeps
the k largest logits per token (k·8 bytes instead of vocab·4, `logit_cache_bytes`) in a `TopKLogits`, plus the
log-mass of the other tokens at a few temperatures (`tail_logmass`, 4 bytes each), so the KD loss can still count
what the top k leave out (`topk_mass`). lk.distill re-exports every name here; its `kd_loss` reads a TopKLogits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .checks import real_number, torch_tensor, whole_number


def check_temperature(temperature) -> float:
    """The temperature as a float; TypeError for a non-number, ValueError unless finite and > 0."""
    t = real_number("temperature", temperature, "1 = the model's own distribution, 2–4 = softer targets")
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a finite number > 0 (1 = the model's own distribution, "
                         f"2–4 = softer targets); got {temperature}")
    return t


def vocab_size_of(model_or_config) -> int:
    """The vocabulary size of a model or of its config."""
    cfg = getattr(model_or_config, "config", model_or_config)
    v = getattr(cfg, "vocab_size", None)
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"need a language model or its config (with a vocab_size), e.g. lk.load_model()[0] or "
                        f"model.config; got {type(model_or_config).__name__}")
    return v


def check_temps(temps) -> tuple:
    """temps as a tuple of floats, each a valid temperature (finite, > 0); () is allowed (no tail stored)."""
    if isinstance(temps, (str, bytes)) or not isinstance(temps, (list, tuple)):
        raise TypeError(f"temperatures must be a list of numbers > 0, e.g. (1.0, 2.0, 4.0); got {temps!r}")
    return tuple(check_temperature(t) for t in temps)


def check_topk(tl) -> "TopKLogits":
    if not isinstance(tl, TopKLogits):
        raise TypeError(f"need a TopKLogits (from teacher_topk), got {type(tl).__name__}")
    return tl


# Temperatures at which the teacher-logit cache also keeps the log-mass of the tokens outside its top k.
TAIL_TEMPERATURES = (1.0, 2.0, 4.0)


@dataclass
class TopKLogits:
    """The teacher's k largest logits per position (values float32, indices int32), shape [..., k].

    `tail[..., j]` (optional, float32) is log Σ_{i ∉ top-k} exp(logit_i / tail_temps[j]): the softened mass of
    the other V − k tokens, so the KD loss can keep it as one extra bucket instead of pretending it is zero.
    """
    values: torch.Tensor
    indices: torch.Tensor
    vocab_size: int
    tail: torch.Tensor | None = None
    tail_temps: tuple = ()

    def __post_init__(self):
        torch_tensor("TopKLogits.values", self.values, "the k largest logits [..., k]", kind="float")
        torch_tensor("TopKLogits.indices", self.indices, "their token ids [..., k]", kind="int")
        self.vocab_size = whole_number("TopKLogits.vocab_size", self.vocab_size, 1, "the teacher's vocabulary size")
        if self.indices.numel() and (int(self.indices.min()) < 0 or int(self.indices.max()) >= self.vocab_size):
            raise ValueError(f"TopKLogits.indices must be token ids in 0 … {self.vocab_size - 1}")
        if self.tail is not None:
            torch_tensor("TopKLogits.tail", self.tail, "the tail log-mass [..., len(tail_temps)]", kind="float")
        if self.values.shape != self.indices.shape:
            raise ValueError(f"values {tuple(self.values.shape)} and indices {tuple(self.indices.shape)} differ")
        self.tail_temps = check_temps(self.tail_temps)
        if self.tail is not None and tuple(self.tail.shape) != (*self.values.shape[:-1], len(self.tail_temps)):
            raise ValueError(f"tail {tuple(self.tail.shape)} must be [..., {len(self.tail_temps)}] "
                             f"(one log-mass per temperature in tail_temps)")

    def __getitem__(self, idx) -> "TopKLogits":
        tail = self.tail[idx] if self.tail is not None else None
        return TopKLogits(self.values[idx], self.indices[idx], self.vocab_size, tail, self.tail_temps)

    @property
    def k(self) -> int:
        return int(self.values.shape[-1])

    def tail_at(self, temperature: float) -> torch.Tensor | None:
        """The stored tail log-mass at this temperature ([...]), or None when it was not cached."""
        for j, t in enumerate(self.tail_temps):
            if self.tail is not None and math.isclose(t, float(temperature)):
                return self.tail[..., j]
        return None

    @property
    def nbytes(self) -> int:
        tail = 0 if self.tail is None else self.tail.numel() * self.tail.element_size()
        return (self.values.numel() * self.values.element_size()
                + self.indices.numel() * self.indices.element_size() + tail)


def tail_logmass(logits: torch.Tensor, indices: torch.Tensor, temps=TAIL_TEMPERATURES) -> torch.Tensor:
    """[..., len(temps)]: log Σ exp(logits/T) over the tokens *not* in `indices`, one column per T."""
    torch_tensor("logits", logits, "logits [..., vocab]", kind="float", finite=True)
    torch_tensor("indices", indices, "token ids [..., k] of the kept logits", kind="int", empty=True)
    if logits.dim() == 0 or indices.shape[:-1] != logits.shape[:-1] or indices.dim() != logits.dim():
        raise ValueError(f"indices {tuple(indices.shape)} must be [..., k] over the positions of logits "
                         f"{tuple(logits.shape)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= logits.shape[-1]):
        raise ValueError(f"indices must be token ids in 0 … {logits.shape[-1] - 1}")
    if not check_temps(temps):
        raise ValueError("temps is empty; pass at least one temperature, e.g. (1.0, 2.0, 4.0)")
    rest = logits.float().scatter(-1, indices.long(), float("-inf"))
    return torch.stack([(rest / check_temperature(t)).logsumexp(-1) for t in temps], dim=-1)


@torch.no_grad()
def teacher_topk(teacher, seqs: torch.Tensor, k: int = 32, batch_size: int = 4, progress: bool = False,
                 tail_temps=TAIL_TEMPERATURES) -> TopKLogits:
    """Run the teacher once over `seqs[:, :-1]`; keep its k largest logits and the tail log-mass per position."""
    from tqdm.auto import tqdm
    from .evaluate import check_token_ids
    from .models import check_llama

    check_token_ids("seqs", seqs, check_llama(teacher, "teacher"), dims=2)
    if seqs.shape[1] < 2:
        raise ValueError(f"seqs must be [n, T + 1] with T ≥ 1 (inputs plus one label), got {tuple(seqs.shape)}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    tail_temps = check_temps(tail_temps)
    k = whole_number("k", k, 1, f"how many logits to keep per token, at most the vocabulary {vocab_size_of(teacher)}")
    if k > vocab_size_of(teacher):
        raise ValueError(f"k must be in [1, vocab size {vocab_size_of(teacher)}], got {k}")
    batch_size = whole_number("batch_size", batch_size, 1, "sequences per teacher forward pass")
    vals, idxs, tails = [], [], []
    was_training = teacher.training
    teacher.eval()
    for i in tqdm(range(0, seqs.shape[0], batch_size), desc="teacher top-k", disable=not progress):
        logits = teacher(input_ids=seqs[i:i + batch_size, :-1]).logits.float()
        v, ix = logits.topk(int(k), dim=-1)
        vals.append(v)
        idxs.append(ix.to(torch.int32))
        if tail_temps:
            tails.append(tail_logmass(logits, ix, tail_temps))
        del logits
    teacher.train(was_training)
    return TopKLogits(torch.cat(vals), torch.cat(idxs), vocab_size_of(teacher),
                      torch.cat(tails) if tail_temps else None, tuple(tail_temps))


def topk_mass(tl: TopKLogits, temperature: float = 1.0) -> float:
    """Mean share of the teacher's softened probability (at T) that falls on its top k tokens (needs the tail)."""
    check_topk(tl)
    tail = tl.tail_at(check_temperature(temperature))
    if tail is None:
        raise ValueError(f"no tail log-mass stored at T = {temperature:g} (stored: {tl.tail_temps})")
    top = (tl.values.float() / float(temperature)).logsumexp(-1)
    return float((top - torch.logaddexp(top, tail.float())).exp().mean())


def logit_cache_bytes(n_tokens: int, vocab_size: int, k: int | None = None, n_tail: int = 0) -> int:
    """Estimate: full fp32 logits = n·V·4 bytes; top-k = n·(k·(4 B value + 4 B int32 index) + 4 B per tail T)."""
    n_tokens = whole_number("n_tokens", n_tokens, 0, "tokens whose logits are kept")
    vocab_size = whole_number("vocab_size", vocab_size, 1, "the vocabulary size")
    n_tail = whole_number("n_tail", n_tail, 0, "tail temperatures stored")
    if k is None:
        return n_tokens * vocab_size * 4
    return n_tokens * (whole_number("k", k, 1, "logits kept per token, or None for all") * 8 + 4 * n_tail)
