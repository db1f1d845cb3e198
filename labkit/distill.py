"""Knowledge distillation: a student learns from SmolLM2's soft targets.

Defined in notebook 03 (Distillation). The pieces, in the order the notebook teaches them:
- students that share the teacher's tokenizer (so logits align): `make_depth_student` keeps a subset of the
  teacher's own decoder layers and its tied embedding; `make_student` builds a small one from random weights;
- `kd_loss`: α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, labels) (Hinton et al. 2015);
- `teacher_topk`: the teacher runs once per batch of text; its top-k logits are kept (k·8 bytes per token
  instead of vocab·4), plus the log-mass of the other tokens at a few temperatures (4 bytes each) — in
  labkit/teacher_targets.py, re-exported here;
- `train_student`: AdamW, a progress bar, checksummed checkpoints and resume after an interruption.
The on-disk cache of the teacher's targets (`cached_teacher_topk`, checksummed, rebuilt when damaged), the stored
experiment, bench figures and widget helpers live in `labkit.experiments.distill`.
"""
from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .checks import MAX_STEPS, real_number, torch_module, torch_tensor, whole_number
from .evaluate import check_token_ids
from .memory import check_fits
from .models import LlamaSpec, build_llama, check_llama
# The teacher's targets (top-k logits and their tail mass) have their own module; re-exported (notebook 03 uses
# distill.TopKLogits, distill.tail_logmass, distill.topk_mass, distill.logit_cache_bytes, distill.TAIL_TEMPERATURES).
from .teacher_targets import (  # noqa: F401
    TAIL_TEMPERATURES, TopKLogits, check_temperature, check_temps, check_topk, logit_cache_bytes, tail_logmass,
    teacher_topk, topk_mass, vocab_size_of,
)

# ----------------------------------------------------------------------------------------------------------
# Inputs that are checked everywhere


def check_alpha(alpha) -> float:
    """α as a float; TypeError for a non-number (a string too), ValueError outside [0, 1]."""
    a = real_number("alpha", alpha, "0 = hard labels only, 1 = distillation only")
    if not (0.0 <= a <= 1.0):
        raise ValueError(f"alpha must be in [0, 1] (0 = hard labels only, 1 = distillation only); got {alpha}")
    return a


def check_vocab(teacher, student, tokenizer=None) -> int:
    """Raise ValueError unless teacher and student (and the tokenizer, if given) share one vocabulary."""
    tv = vocab_size_of(teacher)
    sv = vocab_size_of(student)
    if tv != sv:
        raise ValueError(f"vocabulary mismatch: teacher has {tv} tokens, student has {sv}; distillation compares "
                         f"their logits token by token, so build the student with make_student(teacher.config)")
    if tokenizer is not None:
        from .data import check_tokenizer
        check_tokenizer(tokenizer)
    if tokenizer is not None and len(tokenizer) > sv:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the models only {sv}; "
                         f"use the teacher's own tokenizer")
    return tv


# ----------------------------------------------------------------------------------------------------------
# Students


def make_depth_student(teacher, keep, freeze_embedding: bool = True):
    """A copy of `teacher` with only the decoder layers `keep` (indices, in order); the teacher is unchanged.

    The tied embedding/output matrix and the final norm come along (frozen when `freeze_embedding`: it was
    learned from far more text than any recovery run sees). DistilBERT kept one layer in two; keeping the first
    layers and the last two (a contiguous cut of the middle) starts far better than every k-th layer."""
    layers = check_llama(teacher, "teacher").model.layers
    n = len(layers)
    if isinstance(keep, (str, bytes)) or not hasattr(keep, "__iter__"):
        raise TypeError(f"keep must be a list of layer indices in [0, {n}), got {keep!r}")
    keep = [whole_number("layer index", i, 0, f"0 … {n - 1}") for i in keep]
    if not keep or any(i >= n for i in keep) or sorted(set(keep)) != keep:
        raise ValueError(f"keep must list distinct layer indices in increasing order within [0, {n}), got {keep}")
    if not isinstance(freeze_embedding, bool):
        raise TypeError(f"freeze_embedding must be True or False, got {freeze_embedding!r}")
    try:  # copy only the kept layers: swap them in for the deepcopy, then put the teacher's back
        teacher.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
        student = copy.deepcopy(teacher)
    finally:
        teacher.model.layers = layers
    for j, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = j  # the KV cache is indexed by position in the stack
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    student.get_input_embeddings().weight.requires_grad_(not freeze_embedding)
    return student.float().eval()


#: The student built from random weights: narrow and shallow; make_student takes its vocabulary from the teacher.
STUDENT = LlamaSpec(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=256, tie_word_embeddings=True)


def make_student(teacher_config, spec: LlamaSpec | None = None, seed: int = 0, **overrides):
    """A small LlamaForCausalLM of `spec` (default STUDENT; `overrides` are LlamaSpec fields, e.g.
    tie_word_embeddings=False) with the teacher's vocabulary, special tokens and norm epsilon (random, seeded)."""
    tc = getattr(teacher_config, "config", teacher_config)
    vocab_size_of(tc)     # a TypeError naming what to pass when it is not a model's config
    if spec is not None and not isinstance(spec, LlamaSpec):
        raise TypeError(f"spec must be a lk.models.LlamaSpec, got {type(spec).__name__}")
    if "vocab_size" in overrides:
        raise ValueError("the student's vocabulary is always the teacher's (distillation compares logits token by "
                         "token); drop vocab_size")
    teacher = {"vocab_size": tc.vocab_size, "rms_norm_eps": getattr(tc, "rms_norm_eps", 1e-5),
               **{k: getattr(tc, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}
    return build_llama(replace(spec or STUDENT, **teacher, **overrides),
                       whole_number("seed", seed, 0, "any whole number ≥ 0"))


def embedding_share(model) -> float:
    """Fraction of the (deduplicated) parameters that sit in the token-embedding table."""
    from .memory import count_params

    emb = getattr(torch_module("model", model, "a language model such as lk.load_model()[0]"),
                  "get_input_embeddings", lambda: None)()
    if emb is None:
        raise TypeError(f"model must have a token embedding (get_input_embeddings), got {type(model).__name__}")
    return emb.weight.numel() / count_params(model)


# ----------------------------------------------------------------------------------------------------------
# The loss


def kd_loss(student_logits, teacher_logits, labels=None, temperature: float = 1.0, alpha: float = 0.5,
            ignore_index: int = -100, return_parts: bool = False):
    """α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, labels), averaged over tokens.

    `student_logits[..., i, :]` predicts `labels[..., i]` (shift before calling). `teacher_logits` is either a
    full tensor of the same shape or a `TopKLogits`. With top-k logits that carry the tail log-mass at this
    temperature, the KL is taken over k + 1 buckets (the k tokens, then "everything else" for both models):
    exact for the teacher's probabilities, a lower bound of the full KL, equal to it when k = vocab. Without
    a stored tail, the teacher is renormalised over its k tokens — fine at T = 1 where the top 32 hold most of
    the mass, badly wrong at T = 4 where they hold a few percent and the student is pushed to put everything
    on them. Positions whose label is `ignore_index` are skipped.
    The T² factor keeps the soft-target gradients the same size whatever T (Hinton et al. 2015, §2).
    """
    t = check_temperature(temperature)
    a = check_alpha(alpha)
    torch_tensor("student_logits", student_logits, "the student's logits [..., vocab]", kind="float", finite=True)
    topk = isinstance(teacher_logits, TopKLogits)
    if not topk:
        torch_tensor("teacher_logits", teacher_logits, "the teacher's logits [..., vocab] or a TopKLogits", kind="float",
                     finite=True)
    if student_logits.dim() == 0 or (not topk and teacher_logits.dim() == 0):
        raise ValueError("student_logits and teacher_logits must be [..., vocab], got a 0-d tensor")
    ignore_index = whole_number("ignore_index", ignore_index, -2**63, "the label of skipped positions, e.g. -100")
    if not isinstance(return_parts, bool):
        raise TypeError(f"return_parts must be True or False, got {return_parts!r}")
    V = student_logits.shape[-1]
    if topk:
        if teacher_logits.vocab_size != V:
            raise ValueError(f"vocabulary mismatch: teacher top-k logits come from a {teacher_logits.vocab_size}-"
                             f"token vocabulary, the student's logits have {V}")
        tshape = teacher_logits.values.shape[:-1]
    else:
        if teacher_logits.shape[-1] != V:
            raise ValueError(f"vocabulary mismatch: teacher logits have {teacher_logits.shape[-1]} entries per "
                             f"position, the student's {V}; both models must use the teacher's tokenizer")
        tshape = teacher_logits.shape[:-1]
    if tuple(tshape) != tuple(student_logits.shape[:-1]):
        raise ValueError(f"teacher positions {tuple(tshape)} != student positions "
                         f"{tuple(student_logits.shape[:-1])}; feed both the same token batch")
    if labels is None and a < 1.0:
        raise ValueError("labels are needed when alpha < 1 (the hard-label cross-entropy term)")
    if labels is not None and tuple(torch_tensor("labels", labels, "next-token ids", kind="int", empty=True).shape) \
            != tuple(student_logits.shape[:-1]):
        raise ValueError(f"labels {tuple(labels.shape)} must have the student's positions "
                         f"{tuple(student_logits.shape[:-1])} (shift them first)")
    if labels is not None and bool(((labels != ignore_index) & ((labels < 0) | (labels >= V))).any()):
        raise ValueError(f"labels must be token ids in 0 … {V - 1} (or ignore_index={ignore_index})")

    s = student_logits.reshape(-1, V).float()
    mask = (labels.reshape(-1) != ignore_index) if labels is not None else torch.ones(s.shape[0], dtype=torch.bool)
    n = mask.sum().clamp(min=1)

    log_q = F.log_softmax(s / t, dim=-1)
    if topk:
        k = teacher_logits.k
        idx = teacher_logits.indices.reshape(-1, k).long()
        z_p = teacher_logits.values.reshape(-1, k).float() / t
        tail = teacher_logits.tail_at(t)
        if tail is not None and k < V:  # k + 1 buckets: the top k, then the rest of the vocabulary for both models
            rest_q = log_q.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
            z_p = torch.cat([z_p, tail.reshape(-1, 1).float()], dim=-1)
            log_q = torch.cat([log_q.gather(-1, idx), rest_q], dim=-1)
        else:
            log_q = log_q.gather(-1, idx)
        log_p = F.log_softmax(z_p, dim=-1)
    else:
        log_p = F.log_softmax(teacher_logits.reshape(-1, V).float() / t, dim=-1)
    p = log_p.exp()  # a bucket the teacher gives no mass (empty tail when k = V) adds nothing
    kl_tok = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    kd = (kl_tok * mask).sum() / n * (t * t)

    if labels is not None:
        with torch.set_grad_enabled(torch.is_grad_enabled() and a < 1.0):  # at α = 1 CE is only logged
            ce = F.cross_entropy(s, labels.reshape(-1).long(), ignore_index=ignore_index,
                                 reduction="sum") / n
    else:
        ce = torch.zeros((), dtype=s.dtype)
    loss = a * kd + (1.0 - a) * ce if a < 1.0 else kd
    if return_parts:
        return loss, {"kd": float(kd.detach()), "ce": float(ce.detach())}
    return loss


# ----------------------------------------------------------------------------------------------------------
# Data


def make_sequences(tokens: torch.Tensor, seq_len: int, n_seqs: int, offset: int = 0) -> torch.Tensor:
    """[n_seqs, seq_len + 1] non-overlapping windows of a 1-D token tensor (inputs + one shifted label)."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.is_floating_point():
        raise TypeError(f"tokens must be a 1-D tensor of token ids (e.g. lk.data.tokens(...)), got "
                        f"{type(tokens).__name__} {tuple(getattr(tokens, 'shape', ()))}")
    seq_len = whole_number("seq_len", seq_len, 1, "tokens per training sequence, e.g. 128")
    n_seqs = whole_number("n_seqs", n_seqs, 1, "how many sequences")
    offset = whole_number("offset", offset, 0, "where in `tokens` to start")
    need = offset + n_seqs * (seq_len + 1)
    if tokens.numel() < need:
        raise ValueError(f"{n_seqs} sequences of {seq_len}+1 tokens need {need} tokens, only {tokens.numel()}")
    return tokens[offset:need].reshape(n_seqs, seq_len + 1).clone()


# ----------------------------------------------------------------------------------------------------------
# Training with checkpoints


@dataclass(frozen=True)
class TrainConfig:
    """One student run. alpha=0 is plain hard-label training (the teacher is not used). Checked when built."""
    steps: int = 200
    batch_size: int = 2
    lr: float = 3e-3
    warmup: int = 10
    weight_decay: float = 0.01
    clip: float = 1.0
    temperature: float = 1.0
    alpha: float = 0.0
    seed: int = 0

    def __post_init__(self):
        whole_number("TrainConfig.steps", self.steps, 1, "optimizer steps, e.g. 100", high=MAX_STEPS)
        whole_number("TrainConfig.batch_size", self.batch_size, 1, "sequences per step, e.g. 4")
        whole_number("TrainConfig.warmup", self.warmup, 0, "warm-up steps, 0 for none")
        whole_number("TrainConfig.seed", self.seed, 0, "the batch-order seed")
        lr = real_number("TrainConfig.lr", self.lr, "the peak learning rate, e.g. 3e-4")
        if not (0 < lr <= 1):
            raise ValueError(f"TrainConfig.lr must be a finite number > 0 (e.g. 3e-4) and ≤ 1 (a larger step diverges "
                             f"to NaN losses), got {self.lr}")
        for name in ("weight_decay", "clip"):
            v = real_number(f"TrainConfig.{name}", getattr(self, name), "≥ 0; 0 turns it off")
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"TrainConfig.{name} must be a finite number ≥ 0 (0 turns it off), got {v}")
        check_temperature(self.temperature)
        check_alpha(self.alpha)
        for name in ("lr", "weight_decay", "clip", "temperature", "alpha"):  # one type per field
            object.__setattr__(self, name, float(getattr(self, name)))


def batch_order(n_seqs: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """[steps, batch_size] sequence indices: a fresh seeded shuffle every epoch; a pure function of its inputs."""
    n_seqs = whole_number("n_seqs", n_seqs, 1, "how many training sequences")
    steps = whole_number("steps", steps, 1, "optimizer steps", high=MAX_STEPS)
    batch_size = whole_number("batch_size", batch_size, 1, "sequences per step, at most n_seqs")
    seed = whole_number("seed", seed, 0, "the batch-order seed", high=2**63 - 1)
    check_fits(f"a shuffle of n_seqs={n_seqs} sequences", 8 * n_seqs, "pass the number of sequences you have")
    if batch_size > n_seqs:
        raise ValueError(f"batch_size {batch_size} > {n_seqs} sequences")
    per_epoch = n_seqs // batch_size
    g = torch.Generator().manual_seed(int(seed))
    perms = [torch.randperm(n_seqs, generator=g)[: per_epoch * batch_size]
             for _ in range(-(-steps // per_epoch))]
    return torch.cat(perms)[: steps * batch_size].reshape(steps, batch_size)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based `step`: linear warm-up to cfg.lr, then cosine decay to 10% of it at the end."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a distill.TrainConfig, got {type(cfg).__name__}")
    step = whole_number("step", step, 0, "a 0-based optimizer step")
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


CHECKPOINT_KIND = "distill-checkpoint"


def save_checkpoint(path, state: dict) -> Path:
    """Write a training state atomically with a sha256 sidecar (lk.repro.write_verified_torch); Ctrl-C waits."""
    from .repro import write_verified_torch

    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of tensors, numbers and lists (a training state), got "
                        f"{type(state).__name__}")
    return write_verified_torch(path, state, CHECKPOINT_KIND, {"step": int(state.get("step", 0))})


def load_checkpoint(path) -> dict:
    """A checkpoint written by save_checkpoint; lk.repro.ChecksumError if it was corrupted, truncated or edited."""
    from .repro import read_verified_torch

    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be the checkpoint's path (str or pathlib.Path), got {path!r}")
    return read_verified_torch(path, CHECKPOINT_KIND, fix=f"it cannot be trusted to resume from: delete "
                                                          f"{Path(path).name} and its .sha256.json to train from the start")[0]


def _targets_id(teacher_logits) -> str:
    """A checksum of the soft targets, so a checkpoint never resumes against different teacher logits."""
    h = hashlib.sha256()
    if isinstance(teacher_logits, TopKLogits):
        h.update(f"top{teacher_logits.k}:{teacher_logits.tail_temps}".encode())
        parts = [teacher_logits.values, teacher_logits.indices] + (
            [teacher_logits.tail] if teacher_logits.tail is not None else [])
    else:
        parts = [teacher_logits]
    for t in parts:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _check_targets(student, seqs, cfg, teacher_logits) -> None:
    if cfg.alpha > 0:
        if teacher_logits is None:
            raise ValueError("alpha > 0 needs teacher_logits (from teacher_topk); alpha = 0 is hard labels")
        tv = teacher_logits.vocab_size if isinstance(teacher_logits, TopKLogits) else teacher_logits.shape[-1]
        if tv != vocab_size_of(student):
            raise ValueError(f"vocabulary mismatch: teacher logits cover {tv} tokens, the student has "
                             f"{vocab_size_of(student)}; build the student with make_student(teacher.config)")
        n_t = (teacher_logits.values if isinstance(teacher_logits, TopKLogits) else teacher_logits).shape[:2]
        if tuple(n_t) != (seqs.shape[0], seqs.shape[1] - 1):
            raise ValueError(f"teacher logits cover {tuple(n_t)} positions, seqs need "
                             f"{(seqs.shape[0], seqs.shape[1] - 1)}; compute them on the same seqs")
    if int(seqs.max()) >= vocab_size_of(student):
        raise ValueError(f"token id {int(seqs.max())} ≥ student vocabulary {vocab_size_of(student)}")


def train_student(student, seqs: torch.Tensor, cfg: TrainConfig, teacher_logits: TopKLogits | torch.Tensor | None = None,
                  checkpoint: str | Path | None = None, checkpoint_every: int = 50, progress: bool = True,
                  callback=None, eval_fn=None, eval_every: int = 0, stop_at: int | None = None) -> dict:
    """Train `student` in place on `seqs` ([N, T+1]); return the history (per-step loss, kd, ce, lr, eval).

    Only parameters with requires_grad train (a frozen embedding stays as it is). With `checkpoint` (a path
    under lk.cache_dir()), the student, optimizer and history are written atomically with a checksum every
    `checkpoint_every` steps and at the end; calling again with the same path resumes from the last checkpoint
    and gives the same final weights as an uninterrupted run (a corrupted checkpoint raises ChecksumError).
    `callback(step, history)` runs after every step (raise from it to interrupt); `eval_fn(student) -> float`
    runs every `eval_every` steps; `stop_at` ends the run early while the schedule still spans cfg.steps.
    """
    from tqdm.auto import tqdm

    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a distill.TrainConfig, got {type(cfg).__name__}")
    check_token_ids("seqs", seqs, check_llama(student, "student"), dims=2)
    if seqs.shape[1] < 2:
        raise ValueError(f"seqs must be [n, T + 1] with T ≥ 1 (from make_sequences), got {tuple(seqs.shape)}")
    if teacher_logits is not None and not isinstance(teacher_logits, (TopKLogits, torch.Tensor)):
        raise TypeError(f"teacher_logits must be a TopKLogits (teacher_topk), a logits tensor or None, got "
                        f"{type(teacher_logits).__name__}")
    if checkpoint is not None and not isinstance(checkpoint, (str, Path)):
        raise TypeError(f"checkpoint must be a path (str or pathlib.Path) or None, got {checkpoint!r}")
    for name, fn in (("callback", callback), ("eval_fn", eval_fn)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be a function or None, got {fn!r}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    checkpoint_every = whole_number("checkpoint_every", checkpoint_every, 1, "steps between checkpoints, e.g. 50")
    eval_every = whole_number("eval_every", eval_every, 0, "steps between evaluations, 0 for none")
    stop = cfg.steps if stop_at is None else min(cfg.steps, whole_number("stop_at", stop_at, 1, "a step count"))
    _check_targets(student, seqs, cfg, teacher_logits)

    order = batch_order(seqs.shape[0], cfg.steps, cfg.batch_size, cfg.seed)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters (requires_grad is False everywhere)")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    hist = {"loss": [], "kd": [], "ce": [], "lr": [], "eval": []}
    start = 0
    ident = {"config": asdict(cfg), "n_seqs": int(seqs.shape[0]), "seq_len": int(seqs.shape[1] - 1),
             "data": hashlib.sha256(seqs.to(torch.int64).numpy().tobytes()).hexdigest()[:16],
             "teacher": _targets_id(teacher_logits) if cfg.alpha > 0 else None}
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        state = load_checkpoint(path)
        if state.get("ident") != ident:
            raise ValueError(f"checkpoint {path} belongs to another run ({state.get('ident')}); "
                             f"delete it or choose another checkpoint path")
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        hist, start = state["history"], int(state["step"])

    def save(step):
        if path is not None:
            save_checkpoint(path, {"ident": ident, "step": step, "student": student.state_dict(),
                                   "optimizer": opt.state_dict(), "history": hist})

    student.train()
    bar = tqdm(range(start, stop), initial=start, total=stop, disable=not progress,
               desc=f"α={cfg.alpha:g} T={cfg.temperature:g}")
    try:
        for step in bar:
            idx = order[step]
            batch = seqs[idx]
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            logits = student(input_ids=batch[:, :-1]).logits
            if cfg.alpha > 0:
                loss, parts = kd_loss(logits, teacher_logits[idx], batch[:, 1:], cfg.temperature, cfg.alpha,
                                      return_parts=True)
            else:  # hard labels: plain next-token cross-entropy, the teacher is not used
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
                parts = {"ce": float(loss.detach())}
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            hist["loss"].append(round(float(loss.detach()), 5))
            hist["kd"].append(round(parts["kd"], 5) if cfg.alpha > 0 else None)
            hist["ce"].append(round(parts["ce"], 5))
            hist["lr"].append(lr)
            bar.set_postfix(ce=f"{parts['ce']:.3f}")
            done = step + 1
            if eval_fn is not None and eval_every and (done % eval_every == 0 or done == cfg.steps):
                student.eval()
                hist["eval"].append([done, float(eval_fn(student))])
                student.train()
            if done % checkpoint_every == 0 or done == cfg.steps:
                save(done)
            if callback is not None:
                callback(done, hist)
    finally:
        bar.close()
        student.eval()
    return hist


def weights_sha256(model) -> str:
    """sha256 of a model's state_dict tensors in name order: the fingerprint of a trained student."""
    torch_module("model", model, "a model such as a trained student")
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()
