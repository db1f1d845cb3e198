"""Knowledge distillation: a small student learns from SmolLM2's soft targets.

Defined in notebook 03 (Distillation). The pieces, in the order the notebook teaches them:
- `make_student`: a small LlamaForCausalLM that shares the teacher's tokenizer (so logits align);
- `kd_loss`: α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, labels) (Hinton et al. 2015);
- `teacher_topk` / `cached_teacher_topk`: the teacher runs once per batch of text; its top-k logits are
  kept (k·8 bytes per token instead of vocab·4), plus the log-mass of the other tokens at a few temperatures
  (4 bytes each), and cached under `lk.cache_dir()`;
- `train_student`: AdamW, a progress bar, atomic checkpoints and resume after an interruption;
- `make_results()` (the stored experiment, `python -m labkit results distill`) and `bench()`.
"""
from __future__ import annotations

import hashlib
import io
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# Inputs that are checked everywhere


def _check_temperature(temperature) -> float:
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}") from None
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a finite number > 0 (1 = the model's own distribution, "
                         f"2–4 = softer targets); got {temperature}")
    return t


def _check_alpha(alpha) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}") from None
    if not (0.0 <= a <= 1.0):
        raise ValueError(f"alpha must be in [0, 1] (0 = hard labels only, 1 = distillation only); got {alpha}")
    return a


def check_vocab(teacher, student, tokenizer=None) -> int:
    """Raise ValueError unless teacher and student (and the tokenizer, if given) share one vocabulary."""
    tv = _vocab_size(teacher)
    sv = _vocab_size(student)
    if tv != sv:
        raise ValueError(f"vocabulary mismatch: teacher has {tv} tokens, student has {sv}; distillation compares "
                         f"their logits token by token, so build the student with make_student(teacher.config)")
    if tokenizer is not None and len(tokenizer) > sv:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the models only {sv}; "
                         f"use the teacher's own tokenizer")
    return tv


def _vocab_size(model_or_config) -> int:
    cfg = getattr(model_or_config, "config", model_or_config)
    return int(cfg.vocab_size)


# ----------------------------------------------------------------------------------------------------------
# The student


@dataclass
class StudentConfig:
    """Width and depth of the student; the vocabulary always comes from the teacher."""
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 256
    tie_embeddings: bool = True
    max_position_embeddings: int = 512


def make_student(teacher_config, cfg: StudentConfig | None = None, seed: int = 0, **overrides):
    """A small LlamaForCausalLM with the teacher's vocabulary and special tokens (random init, seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = StudentConfig(**{**asdict(cfg or StudentConfig()), **overrides})
    tc = getattr(teacher_config, "config", teacher_config)
    lc = LlamaConfig(
        vocab_size=tc.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        intermediate_size=cfg.intermediate_size, tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=getattr(tc, "rms_norm_eps", 1e-5),
        bos_token_id=getattr(tc, "bos_token_id", None), eos_token_id=getattr(tc, "eos_token_id", None),
        pad_token_id=getattr(tc, "pad_token_id", None))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(lc)
    return model.float().eval()


def embedding_share(model) -> float:
    """Fraction of the (deduplicated) parameters that sit in the token-embedding table."""
    from .memory import count_params

    return model.get_input_embeddings().weight.numel() / count_params(model)


# ----------------------------------------------------------------------------------------------------------
# The loss


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
        if self.values.shape != self.indices.shape:
            raise ValueError(f"values {tuple(self.values.shape)} and indices {tuple(self.indices.shape)} differ")
        self.tail_temps = tuple(float(t) for t in self.tail_temps)
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

    def nbytes(self) -> int:
        tail = 0 if self.tail is None else self.tail.numel() * self.tail.element_size()
        return (self.values.numel() * self.values.element_size()
                + self.indices.numel() * self.indices.element_size() + tail)


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
    t = _check_temperature(temperature)
    a = _check_alpha(alpha)
    V = student_logits.shape[-1]
    topk = isinstance(teacher_logits, TopKLogits)
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
    if labels is not None and tuple(labels.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(f"labels {tuple(labels.shape)} must have the student's positions "
                         f"{tuple(student_logits.shape[:-1])} (shift them first)")

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
# Data and the teacher-logit cache


def make_sequences(tokens: torch.Tensor, seq_len: int, n_seqs: int, offset: int = 0) -> torch.Tensor:
    """[n_seqs, seq_len + 1] non-overlapping windows of a 1-D token tensor (inputs + one shifted label)."""
    need = offset + n_seqs * (seq_len + 1)
    if tokens.numel() < need:
        raise ValueError(f"{n_seqs} sequences of {seq_len}+1 tokens need {need} tokens, only {tokens.numel()}")
    return tokens[offset:need].reshape(n_seqs, seq_len + 1).clone()


def tail_logmass(logits: torch.Tensor, indices: torch.Tensor, temps=TAIL_TEMPERATURES) -> torch.Tensor:
    """[..., len(temps)]: log Σ exp(logits/T) over the tokens *not* in `indices`, one column per T."""
    rest = logits.float().scatter(-1, indices.long(), float("-inf"))
    return torch.stack([(rest / _check_temperature(t)).logsumexp(-1) for t in temps], dim=-1)


@torch.no_grad()
def teacher_topk(teacher, seqs: torch.Tensor, k: int = 32, batch_size: int = 4, progress: bool = False,
                 tail_temps=TAIL_TEMPERATURES) -> TopKLogits:
    """Run the teacher once over `seqs[:, :-1]`; keep its k largest logits and the tail log-mass per position."""
    from tqdm.auto import tqdm

    if not (1 <= int(k) <= _vocab_size(teacher)):
        raise ValueError(f"k must be in [1, vocab size {_vocab_size(teacher)}], got {k}")
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
    return TopKLogits(torch.cat(vals), torch.cat(idxs), _vocab_size(teacher),
                      torch.cat(tails) if tail_temps else None, tuple(tail_temps))


def _fingerprint(teacher) -> str:
    """A cheap identity for a teacher: its class, size and a checksum of a few weights."""
    from .memory import count_params

    h = hashlib.sha256()
    h.update(f"{type(teacher).__name__}:{count_params(teacher)}:{_vocab_size(teacher)}".encode())
    for _, p in list(teacher.named_parameters())[:3]:
        h.update(p.detach().reshape(-1)[:4096].float().numpy().tobytes())
    return h.hexdigest()[:16]


def topk_cache_path(teacher, seqs: torch.Tensor, k: int) -> Path:
    """Where `cached_teacher_topk` keeps the top-k logits for these sequences (under lk.cache_dir())."""
    from .repro import cache_dir

    h = hashlib.sha256(seqs.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    return cache_dir() / "distill" / f"topk-{_fingerprint(teacher)}-{h}-k{int(k)}-tail.pt"


def cached_teacher_topk(teacher, seqs: torch.Tensor, k: int = 32, batch_size: int = 4,
                        progress: bool = False) -> TopKLogits:
    """`teacher_topk`, computed once and cached atomically under lk.cache_dir()/distill/ (never data/)."""
    from .repro import atomic_write_bytes

    path = topk_cache_path(teacher, seqs, k)
    if path.exists():
        try:
            d = torch.load(path, weights_only=True)
            out = TopKLogits(d["values"], d["indices"], int(d["vocab_size"]), d["tail"],
                             tuple(float(t) for t in d["tail_temps"]))
            if (out.values.shape[:2] == (seqs.shape[0], seqs.shape[1] - 1) and out.k == int(k)
                    and out.tail_temps == TAIL_TEMPERATURES):
                return out
        except Exception:  # a corrupt cache file is rebuilt, never used
            pass
    out = teacher_topk(teacher, seqs, k=k, batch_size=batch_size, progress=progress)
    buf = io.BytesIO()
    torch.save({"values": out.values, "indices": out.indices, "vocab_size": out.vocab_size, "tail": out.tail,
                "tail_temps": torch.tensor(out.tail_temps)}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return out


def topk_mass(tl: TopKLogits, temperature: float = 1.0) -> float:
    """Mean share of the teacher's softened probability (at T) that falls on its top k tokens (needs the tail)."""
    tail = tl.tail_at(_check_temperature(temperature))
    if tail is None:
        raise ValueError(f"no tail log-mass stored at T = {temperature:g} (stored: {tl.tail_temps})")
    top = (tl.values.float() / float(temperature)).logsumexp(-1)
    return float((top - torch.logaddexp(top, tail.float())).exp().mean())


def logit_cache_bytes(n_tokens: int, vocab_size: int, k: int | None = None, n_tail: int = 0) -> int:
    """Estimate: full fp32 logits = n·V·4 bytes; top-k = n·(k·(4 B value + 4 B int32 index) + 4 B per tail T)."""
    return int(n_tokens) * (int(vocab_size) * 4 if k is None else int(k) * 8 + 4 * int(n_tail))


# ----------------------------------------------------------------------------------------------------------
# Training with checkpoints


@dataclass
class TrainConfig:
    """One student run. alpha=0 is plain hard-label training (the teacher is not used)."""
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
        _check_temperature(self.temperature)
        _check_alpha(self.alpha)
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be ≥ 1")


def batch_order(n_seqs: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """[steps, batch_size] sequence indices: a fresh seeded shuffle every epoch; a pure function of its inputs."""
    if batch_size > n_seqs:
        raise ValueError(f"batch_size {batch_size} > {n_seqs} sequences")
    per_epoch = n_seqs // batch_size
    g = torch.Generator().manual_seed(int(seed))
    perms = [torch.randperm(n_seqs, generator=g)[: per_epoch * batch_size]
             for _ in range(-(-steps // per_epoch))]
    return torch.cat(perms)[: steps * batch_size].reshape(steps, batch_size)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _save_checkpoint(path: Path, state: dict) -> None:
    from .repro import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


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


def train_student(student, seqs: torch.Tensor, cfg: TrainConfig, teacher_logits: TopKLogits | torch.Tensor | None = None,
                  checkpoint: str | Path | None = None, checkpoint_every: int = 50, progress: bool = True,
                  callback=None, eval_fn=None, eval_every: int = 0) -> dict:
    """Train `student` in place on `seqs` ([N, T+1]); return the history (per-step loss, kd, ce, lr).

    With `checkpoint` (a path under lk.cache_dir()), the student, optimizer and history are written atomically
    every `checkpoint_every` steps and at the end; calling again with the same path resumes from the last
    checkpoint and gives the same final weights as an uninterrupted run. `callback(step, history)` runs after
    every step (raise from it to interrupt); `eval_fn(student) -> float` runs every `eval_every` steps.
    """
    from tqdm.auto import tqdm

    if cfg.alpha > 0:
        if teacher_logits is None:
            raise ValueError("alpha > 0 needs teacher_logits (from cached_teacher_topk); alpha = 0 is hard labels")
        tv = teacher_logits.vocab_size if isinstance(teacher_logits, TopKLogits) else teacher_logits.shape[-1]
        if tv != _vocab_size(student):
            raise ValueError(f"vocabulary mismatch: teacher logits cover {tv} tokens, the student has "
                             f"{_vocab_size(student)}; build the student with make_student(teacher.config)")
        n_t = (teacher_logits.values if isinstance(teacher_logits, TopKLogits) else teacher_logits).shape[:2]
        if tuple(n_t) != (seqs.shape[0], seqs.shape[1] - 1):
            raise ValueError(f"teacher logits cover {tuple(n_t)} positions, seqs need "
                             f"{(seqs.shape[0], seqs.shape[1] - 1)}; compute them on the same seqs")
    if int(seqs.max()) >= _vocab_size(student):
        raise ValueError(f"token id {int(seqs.max())} ≥ student vocabulary {_vocab_size(student)}")

    order = batch_order(seqs.shape[0], cfg.steps, cfg.batch_size, cfg.seed)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    hist = {"loss": [], "kd": [], "ce": [], "lr": [], "eval": []}
    start = 0
    ident = {"config": asdict(cfg), "n_seqs": int(seqs.shape[0]), "seq_len": int(seqs.shape[1] - 1),
             "data": hashlib.sha256(seqs.to(torch.int64).numpy().tobytes()).hexdigest()[:16],
             "teacher": _targets_id(teacher_logits) if cfg.alpha > 0 else None}
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        state = torch.load(path, weights_only=True)  # tensors, numbers, lists and dicts only
        if state.get("ident") != ident:
            raise ValueError(f"checkpoint {path} belongs to another run ({state.get('ident')}); "
                             f"delete it or choose another checkpoint path")
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        hist, start = state["history"], int(state["step"])

    def save(step):
        if path is not None:
            _save_checkpoint(path, {"ident": ident, "step": step, "student": student.state_dict(),
                                    "optimizer": opt.state_dict(), "history": hist})

    student.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress,
               desc=f"α={cfg.alpha:g} T={cfg.temperature:g}")
    try:
        for step in bar:
            idx = order[step]
            batch = seqs[idx]
            lr = _lr_at(step, cfg)
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
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip)
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


def run_checkpoint_path(name: str) -> Path:
    """A checkpoint path for a named run under lk.cache_dir()/distill/ (never inside data/)."""
    from .repro import cache_dir

    return cache_dir() / "distill" / f"ckpt-{name}.pt"


# ----------------------------------------------------------------------------------------------------------
# Softened distributions (the widget), KV cache and speed


@torch.no_grad()
def softened_next_token(model, tokenizer, prompt: str, temperature: float = 1.0, top: int = 10) -> dict:
    """softmax(logits/T) of `model` for the token after `prompt`: its `top` tokens, probabilities, entropy (nats)."""
    t = _check_temperature(temperature)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    logits = model(input_ids=ids).logits[0, -1].float()
    logp = F.log_softmax(logits / t, dim=-1)
    p = logp.exp()
    top_p, top_i = p.topk(int(top))
    return {"temperature": t, "tokens": [tokenizer.decode([int(i)]) for i in top_i],
            "probs": [float(x) for x in top_p], "entropy": float(-(p * logp).sum()),
            "max_entropy": math.log(p.numel())}


def kv_cache_bytes_measured(model, seq_len: int = 64) -> int:
    """Bytes held by the DynamicCache after a forward pass over `seq_len` tokens at batch 1."""
    ids = torch.zeros(1, seq_len, dtype=torch.long)
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def tokens_per_second(model, tokens: torch.Tensor, batch: int = 2, seq_len: int = 128, repeats: int = 3) -> float:
    """Forward-pass throughput (tokens/s, best of `repeats`) over a [batch, seq_len] slice of `tokens`."""
    ids = tokens[: batch * seq_len].reshape(batch, seq_len)
    model(input_ids=ids[:, :8])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(input_ids=ids)
        best = min(best, time.perf_counter() - t0)
    return batch * seq_len / best


def speed_ratio(teacher, student, tokens: torch.Tensor, threads: int = 1, **kw) -> dict:
    """Tokens/s of teacher and student measured in one run, on `threads` threads, and their ratio."""
    from .repro import set_threads

    old = set_threads(threads)
    try:
        ts = tokens_per_second(teacher, tokens, **kw)
        ss = tokens_per_second(student, tokens, **kw)
    finally:
        set_threads(old)
    return {"teacher_tok_s": ts, "student_tok_s": ss, "ratio": ss / ts}


def gap_closed(ppl_teacher: float, ppl_hard: float, ppl_kd: float) -> float:
    """Share of the hard-label student's gap to the teacher that distillation closes, in log-perplexity (nats)."""
    gap = math.log(ppl_hard) - math.log(ppl_teacher)
    if gap <= 0:
        raise ValueError("the hard-label student is not worse than the teacher: there is no gap to close")
    return (math.log(ppl_hard) - math.log(ppl_kd)) / gap


# ----------------------------------------------------------------------------------------------------------
# The stored experiment and the headline figures


@dataclass
class Experiment:
    """The stored experiment (make_results) and the notebook's live demo use the same code with two sizes."""
    n_train_seqs: int = 128
    seq_len: int = 128
    top_k: int = 32
    student: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100, batch_size=4, lr=3e-3, warmup=10))
    eval_tokens: int = 4096
    eval_every: int = 25
    runs: tuple = ((0.0, 1.0), (1.0, 1.0), (1.0, 2.0), (1.0, 4.0), (0.5, 1.0), (0.5, 2.0))


# The live demonstration in notebook 03: the first 16 of the same training sequences, 30 short steps.
DEMO = Experiment(n_train_seqs=16, seq_len=128, train=TrainConfig(steps=30, batch_size=2, lr=3e-3, warmup=5),
                  eval_tokens=2048, eval_every=15, runs=((0.0, 1.0), (1.0, 1.0)))


def weights_sha256(model) -> str:
    """sha256 of a model's state_dict tensors in name order: the fingerprint of a trained student."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_name(alpha: float, temperature: float) -> str:
    return "hard" if alpha == 0 else f"kd_a{alpha:g}_T{temperature:g}"


def run_experiment(teacher, tokenizer, exp: Experiment, progress: bool = True, log=print,
                   checkpoints: bool = False, tag: str = "main") -> dict:
    """Train one student per (alpha, temperature) of `exp` on the same data and steps; return curves and ppl."""
    from . import data as lkdata
    from .evaluate import perplexity

    check_vocab(teacher, make_student(teacher.config, exp.student))
    train_tokens = lkdata.tokens("train", tokenizer)
    val = lkdata.tokens("validation", tokenizer)[: exp.eval_tokens]
    seqs = make_sequences(train_tokens, exp.seq_len, exp.n_train_seqs)
    t0 = time.perf_counter()
    tl = cached_teacher_topk(teacher, seqs, k=exp.top_k, progress=progress)
    log(f"teacher top-{exp.top_k} logits for {seqs.shape[0]}×{exp.seq_len} tokens: "
        f"{time.perf_counter() - t0:.1f} s (cached under lk.cache_dir())")

    def ev(m):
        return perplexity(m, val, seq_len=exp.seq_len, max_tokens=exp.eval_tokens)

    out = {}
    for alpha, temp in exp.runs:
        name = run_name(alpha, temp)
        cfg = TrainConfig(**{**asdict(exp.train), "alpha": alpha, "temperature": temp})
        student = make_student(teacher.config, exp.student, seed=cfg.seed)
        t0 = time.perf_counter()
        ck = run_checkpoint_path(f"{tag}-{name}") if checkpoints else None
        hist = train_student(student, seqs, cfg, tl if alpha > 0 else None, checkpoint=ck, progress=progress,
                             eval_fn=ev, eval_every=exp.eval_every)
        ppl = hist["eval"][-1][1]
        out[name] = {"alpha": alpha, "temperature": temp, "loss": hist["loss"], "ce": hist["ce"],
                     "kd": hist["kd"], "val_ppl_curve": [[s, round(p, 3)] for s, p in hist["eval"]],
                     "val_ppl": round(ppl, 3), "weights_sha256": weights_sha256(student)}
        log(f"{name}: val ppl {ppl:.2f} after {cfg.steps} steps ({time.perf_counter() - t0:.1f} s)")
    return {"runs": out, "n_train_tokens": int(seqs[:, :-1].numel()),
            "topk_mass": {f"{t:g}": round(topk_mass(tl, t), 4) for t in tl.tail_temps},
            "topk_bytes": tl.nbytes(), "full_logits_bytes_estimate": logit_cache_bytes(
                seqs[:, :-1].numel(), _vocab_size(teacher))}


def make_results() -> dict:
    """The stored experiment: `python -m labkit results distill` writes data/results/distill.json."""
    from .evaluate import perplexity
    from .memory import count_params
    from .models import load_model
    from . import data as lkdata
    from .repro import seed_everything, set_threads

    seed_everything(0)
    set_threads(1)  # one thread: steadier on a shared machine, and the numbers do not depend on the core count
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    t_all = time.perf_counter()
    teacher, tok = load_model("smollm2-135m")
    exp = Experiment()
    val = lkdata.tokens("validation", tok)[: exp.eval_tokens]
    teacher_ppl = perplexity(teacher, val, seq_len=exp.seq_len, max_tokens=exp.eval_tokens)
    log(f"teacher val ppl {teacher_ppl:.3f} on {exp.eval_tokens} tokens")
    main = run_experiment(teacher, tok, exp, log=log, checkpoints=True, tag="main")
    demo = run_experiment(teacher, tok, DEMO, log=log, progress=False, tag="demo")
    hard = main["runs"]["hard"]["val_ppl"]
    best = min((r for n, r in main["runs"].items() if n != "hard"), key=lambda r: r["val_ppl"])
    log(f"total {time.perf_counter() - t_all:.0f} s")
    return {
        "command": "python -m labkit results distill",
        "config": _jsonable(asdict(exp)), "demo_config": _jsonable(asdict(DEMO)),
        "teacher": {"name": "smollm2-135m", "val_ppl": round(teacher_ppl, 3), "params": count_params(teacher)},
        "runs": main["runs"], "demo_runs": demo["runs"],
        "n_train_tokens": main["n_train_tokens"], "topk_bytes": main["topk_bytes"],
        "tail_temperatures": list(TAIL_TEMPERATURES), "topk_mass": main["topk_mass"],
        "full_logits_bytes_estimate": main["full_logits_bytes_estimate"],
        "headline": {"hard_ppl": hard, "kd_ppl": best["val_ppl"],
                     "kd_run": run_name(best["alpha"], best["temperature"]),
                     "gap_closed": round(gap_closed(teacher_ppl, hard, best["val_ppl"]), 4)},
        "log": lines,
        "torch": torch.__version__,
    }


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def bench() -> dict:
    """Headline figures: perplexities from the stored results; params, bytes, KV/token and tokens/s measured now."""
    from .memory import count_params, estimate_kv_cache_bytes, model_bytes
    from .models import load_model
    from .repro import load_results
    from . import data as lkdata

    res = load_results("distill")
    teacher, tok = load_model("smollm2-135m")
    student = make_student(teacher.config, StudentConfig(**res["config"]["student"]))
    toks = lkdata.tokens("validation", tok)
    speed = speed_ratio(teacher, student, toks)
    h = res["headline"]
    return {
        "teacher_ppl": round(res["teacher"]["val_ppl"], 2), "hard_student_ppl": round(h["hard_ppl"], 2),
        "distilled_student_ppl": round(h["kd_ppl"], 2), "distilled_run": h["kd_run"],
        "gap_closed_pct": round(100 * h["gap_closed"], 1),
        "teacher_params": count_params(teacher), "student_params": count_params(student),
        "teacher_bytes": model_bytes(teacher), "student_bytes": model_bytes(student),
        "teacher_kv_bytes_per_token": kv_cache_bytes_measured(teacher, 16) // 16,
        "student_kv_bytes_per_token": kv_cache_bytes_measured(student, 16) // 16,
        "student_kv_estimate_match": kv_cache_bytes_measured(student, 16) == estimate_kv_cache_bytes(
            student.config, 1, 16),
        "student_vs_teacher_tokens_per_s": round(speed["ratio"], 1),
    }


def nearest_run(results: dict, alpha: float, temperature: float) -> str:
    """The stored run closest to (alpha, temperature); alpha = 0 is the hard-label run whatever T."""
    a, t = _check_alpha(alpha), _check_temperature(temperature)
    runs = results["runs"]
    return min(runs, key=lambda n: (abs(runs[n]["alpha"] - a),
                                    0.0 if runs[n]["alpha"] == 0 else abs(math.log(runs[n]["temperature"] / t))))
