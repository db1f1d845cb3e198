"""Training memory: parameter sharing, mixed precision, activation checkpointing, gradient accumulation,
optimizer state, and the stacked memory estimate (params + grads + optimizer + activations) per rank.

Defined in notebook 06 ("Other memory-saving designs"). In-place transforms end in `_` and take a config,
torchao style: `share_(model, ShareConfig(group_size=4))`, `checkpoint_(model, every=4)`, `untie_(model)`.
Estimates come beside measurements: `saved_activation_bytes` counts the tensors autograd keeps for backward,
`measure_step` measures the peak RSS of a training step (run it in a fresh process per variant); the estimates
(per layer, with checkpointing, of Adam's state, the stack per rank) are in labkit/training_estimates.py.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from . import memory, repro
from .calibration import check_filter, check_windows
from .checks import MAX_STEPS, real_number, torch_module, torch_tensor, whole_number
from .evaluate import check_token_ids
from .models import LlamaSpec, build_llama, check_llama
# The estimates of a step have their own module; re-exported (notebook 06 uses T.estimate_stack, T.activation_bytes,
# T.layer_activation_bytes, T.optimizer_estimates, T.resolve_interval, T.SMALL, ...).
from .training_estimates import (  # noqa: F401
    CHECKPOINTING, LOWBIT_ADAM, PRECISIONS, SMALL, activation_bytes, check_spec, check_step, estimate_stack,
    layer_activation_bytes, lowbit_moment_bytes, optimizer_estimates, resolve_interval, sqrt_interval, step_estimate,
)


def _check_trainable(model):
    """model: a Llama-style causal LM, or one wrapped for data parallelism (DistributedDataParallel's .module)."""
    check_llama(getattr(model, "module", model))
    return model


# ----------------------------------------------------------------------------------------------------------
# A small Llama and byte-level KJV data

#: The models of the notebook-06 widget: the small Llama we measure and SmolLM2-135M's shapes.
MODEL_CONFIGS = {
    "small Llama (measured)": SMALL,
    "SmolLM2-135M": LlamaSpec(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                              num_key_value_heads=3, intermediate_size=1536, tie_word_embeddings=True),
}


def small_llama(spec: LlamaSpec | None = None, seed: int = 0):
    """A randomly initialised LlamaForCausalLM of `spec` (default SMALL) in train mode (lk.models.build_llama)."""
    return build_llama(spec or SMALL, seed).train()


def byte_tokens(split: str = "train") -> torch.Tensor:
    """KJV text of a split (held-out books, see lk.data) as UTF-8 byte ids 0–255."""
    from labkit import data
    text = "\n".join(data.texts(split))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def batches(tokens: torch.Tensor, steps: int, batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """[steps, batch, seq_len] random windows of `tokens` (deterministic for a seed)."""
    torch_tensor("tokens", tokens, "1-D token ids, e.g. byte_tokens('train')", dims=1, kind="int")
    steps = whole_number("steps", steps, 1, "training steps", high=MAX_STEPS)
    batch = whole_number("batch", batch, 1, "sequences per step, e.g. 4")
    seq_len = whole_number("seq_len", seq_len, 1, "tokens per sequence, e.g. 128")
    seed = whole_number("seed", seed, 0, "any whole number ≥ 0")
    memory.check_fits(f"{steps} × {batch} × {seq_len} token ids", 8 * steps * batch * seq_len, "use fewer steps")
    if len(tokens) <= seq_len:
        raise ValueError(f"need more than seq_len={seq_len} tokens, got {len(tokens)}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len, (steps, batch), generator=g)
    return tokens[starts[..., None] + torch.arange(seq_len)]


@torch.no_grad()
def eval_loss(model, tokens: torch.Tensor, seq_len: int = 128, max_windows: int = 32) -> float:
    """Mean next-token loss over the first `max_windows` consecutive windows of `tokens` (deterministic)."""
    tokens = check_windows(_check_trainable(model), tokens, seq_len, 8)
    max_windows = whole_number("max_windows", max_windows, 1, "windows to score, e.g. 32")
    was = model.training
    model.eval()
    n = min(max_windows, (len(tokens) - 1) // seq_len)
    x = tokens[: n * seq_len].view(n, seq_len)
    losses = [model(input_ids=x[i:i + 8], labels=x[i:i + 8]).loss.item() for i in range(0, n, 8)]
    model.train(was)
    return float(sum(losses) / len(losses))


# ----------------------------------------------------------------------------------------------------------
# Parameter sharing

def is_tied(model) -> bool:
    """True when the output head shares storage with the input embedding (tied embeddings)."""
    _check_lm(model)
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight.untyped_storage().data_ptr() == inp.weight.untyped_storage().data_ptr()


def _check_lm(model) -> None:
    if not all(callable(getattr(torch_module("model", model, "a language model such as small_llama()"), f, None))
               for f in ("get_input_embeddings", "get_output_embeddings")):
        raise TypeError(f"model must be a language model with input and output embeddings (small_llama(), "
                        f"lk.load_model()[0]), got {type(model).__name__}")


def untie_(model):
    """Give the output head its own copy of the embedding (costs vocab × hidden × bytes per element)."""
    _check_lm(model)
    out = model.get_output_embeddings()
    if is_tied(model):
        out.weight = nn.Parameter(out.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    return model


@dataclass(frozen=True)
class ShareConfig:
    """ALBERT-style cross-layer sharing: consecutive groups of `group_size` decoder layers use the weights of
    the group's first layer (group_size = depth shares one layer everywhere, as ALBERT does)."""
    group_size: int = 2

    def __post_init__(self):
        whole_number("ShareConfig.group_size", self.group_size, 1, "decoder layers per group, e.g. 2")


def _default_filter(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) or "norm" in type(module).__name__.lower()


def share_(model, config: ShareConfig, filter_fn=None):
    """Tie the weights of decoder layers in groups (in place); `filter_fn(module, fqn)` picks what to share
    inside a layer (default: every Linear and norm). Returns the model."""
    layers = check_llama(model).model.layers
    if filter_fn is not None:
        check_filter(filter_fn)
    n = len(layers)
    if not isinstance(config, ShareConfig):
        raise TypeError(f"share_ needs a lk.training.ShareConfig, got {type(config).__name__}")
    g = whole_number("ShareConfig.group_size", config.group_size, 1, "at most the model's depth", high=n)
    filter_fn = filter_fn or _default_filter
    for i, layer in enumerate(layers):
        src = layers[(i // g) * g]
        if src is layer:
            continue
        for fqn, mod in layer.named_modules():
            if not fqn or not filter_fn(mod, fqn):
                continue
            src_mod = src.get_submodule(fqn)
            for pname, _ in list(mod.named_parameters(recurse=False)):
                setattr(mod, pname, getattr(src_mod, pname))
    return model


# ----------------------------------------------------------------------------------------------------------
# Activation checkpointing (Chen et al. 2016): keep only each segment's input; recompute the segment

def checkpoint_(model, every="sqrt"):
    """Checkpoint the decoder in segments of `every` layers (in place): the forward keeps only each
    segment's input; the backward recomputes one segment at a time. every='none' undoes it."""
    from torch.utils.checkpoint import checkpoint

    layers = check_llama(model).model.layers
    for layer in layers:  # undo any previous setting
        layer.__dict__.pop("forward", None)
    k = resolve_interval(every, len(layers))
    model._labkit_checkpoint_every = k
    if k is None:
        return model
    for start in range(0, len(layers), k):
        seg = list(layers[start:start + k])

        def run(hidden, *args, _seg=seg, **kwargs):
            for lay in _seg:
                hidden = type(lay).forward(lay, hidden, *args, **kwargs)
            return hidden

        def seg_forward(hidden, *args, _run=run, _first=seg[0], **kwargs):
            if _first.training and torch.is_grad_enabled():
                if kwargs.get("past_key_values") is not None:
                    raise ValueError("checkpointing is for training: call the model with use_cache=False")
                # reentrant: the forward runs under no_grad and keeps only `hidden`; the backward reruns the
                # segment with grad and backpropagates through it. (use_reentrant=False measured higher peaks
                # here for segments of several layers.) The closure carries the masks and rotary tables.
                return checkpoint(lambda h: _run(h, *args, **kwargs), hidden, use_reentrant=True)
            return _run(hidden, *args, **kwargs)

        seg[0].forward = seg_forward
        for lay in seg[1:]:
            lay.forward = lambda hidden, *a, **kw: hidden  # already computed by the segment's first layer
    return model


# ----------------------------------------------------------------------------------------------------------
# Training steps

def autocast(precision: str):
    """Context for a forward pass: fp32 → nothing; bf16 → torch.autocast (weights stay fp32 masters)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def accumulate_grads(model, x: torch.Tensor, micro_batches: int = 1, precision: str = "fp32") -> float:
    """Forward + backward over `x` split into `micro_batches` equal parts, each loss divided by their number:
    the gradients equal those of the whole batch, but only one part's activations are alive at a time."""
    check_token_ids("x", x, _check_trainable(model), dims=2)
    micro_batches = whole_number("micro_batches", micro_batches, 1, f"parts of the batch of {x.shape[0]}")
    autocast(precision)                       # checks the precision before any forward
    if x.shape[0] % micro_batches:
        raise ValueError(f"batch {x.shape[0]} is not divisible into {micro_batches} micro-batches")
    total = 0.0
    for part in x.chunk(micro_batches):
        with autocast(precision):
            loss = model(input_ids=part, labels=part, use_cache=False).loss / micro_batches
        loss.backward()
        total += loss.item()
    return total


def layer_forwards(model, x: torch.Tensor, every="none") -> int:
    """How many decoder-layer forwards one training step on `x` runs (forward + backward) with checkpointing
    `every`: n layers without it, 2n with it (each segment runs again in the backward pass) — the compute that
    checkpointing pays for its memory, counted instead of timed. Counted on each layer's MLP; the model's own
    checkpoint setting is restored and its gradients cleared afterwards."""
    before = getattr(model, "_labkit_checkpoint_every", None)
    checkpoint_(model, every)
    count = [0]
    hooks = [layer.mlp.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
             for layer in model.model.layers]
    try:
        accumulate_grads(model, x)
    finally:
        for h in hooks:
            h.remove()
        checkpoint_(model, before if before is not None else "none")
        model.zero_grad(set_to_none=True)
    return count[0]


def train(model, data: torch.Tensor, lr: float = 3e-3, precision: str = "fp32", micro_batches: int = 1,
          optimizer=None) -> list[float]:
    """Train on `data` [steps, batch, seq] with Adam; return the loss of every step."""
    torch_tensor("data", data, "token ids [steps, batch, seq], e.g. batches(tokens, steps, batch, seq_len)", dims=3,
                 kind="int")
    check_token_ids("data", data.reshape(-1, data.shape[-1]), _check_trainable(model), dims=2)
    whole_number("steps", data.shape[0], 1, "the first dimension of data", high=MAX_STEPS)
    if optimizer is None and not 0 < real_number("lr", lr, "Adam's learning rate in (0, 1], e.g. 3e-3", low=0) <= 1:
        raise ValueError(f"lr must be in (0, 1] (e.g. 3e-3), got {lr!r}; a larger step diverges to NaN losses")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch optimizer (or None for Adam), got {type(optimizer).__name__}")
    autocast(precision)
    if data.shape[1] % whole_number("micro_batches", micro_batches, 1, "parts of each batch"):
        raise ValueError(f"batch {data.shape[1]} is not divisible into {micro_batches} micro-batches")
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for x in data:
        losses.append(accumulate_grads(model, x, micro_batches, precision))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


# ----------------------------------------------------------------------------------------------------------
# Measurements

def saved_activation_bytes(model, x: torch.Tensor, precision: str = "fp32") -> int:
    """Bytes of the tensors autograd saves for backward in one forward (parameters excluded; each storage
    once). Counts what stays alive between forward and backward without checkpointing."""
    check_token_ids("x", x, _check_trainable(model), dims=2)
    autocast(precision)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(precision):
        loss = model(input_ids=x, labels=x, use_cache=False).loss
    del loss
    return sum(seen.values())


def optimizer_state_bytes(opt) -> int:
    """Bytes of an optimizer's state tensors (Adam: exp_avg and exp_avg_sq, plus a scalar step each; a DTensor
    counts its local shard, a torchao low-bit state its codes, scales and code map)."""
    if not isinstance(getattr(opt, "state", None), dict):
        raise TypeError(f"opt must be a torch optimizer (it has a .state), got {type(opt).__name__}")
    return memory.tensor_bytes([dict(s) for s in opt.state.values()])


def measure_step(cfg: dict, variants: dict | None = None) -> dict:
    """Peak RSS growth of the forward + backward of a training step, per variant, in THIS process.

    Run it in a fresh process (`lk.memory.run_in_subprocess(measure_step, cfg)`), with
    MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors go back to the OS (see `_measure_fresh`).
    The model and Adam's state exist before the measurement (they are the same for every variant), so the
    growth is activations + gradients + temporaries: the part that precision and checkpointing change.
    cfg keys: every LlamaSpec field, batch, seq_len, precision, checkpoint ('none'|'sqrt'|'every'|int),
    micro_batches; `variants` ({name: overrides of cfg}) measures several, one after the other.
    """
    from labkit.memory import count_params, measure_memory

    _check_variants(variants, allow_none=True)
    if not isinstance(cfg, dict):
        raise TypeError(f"cfg must be a dict of LlamaSpec fields, batch, seq_len, precision, checkpoint, "
                        f"micro_batches; got {type(cfg).__name__}")
    torch.set_num_threads(1)
    keys = {f.name for f in fields(LlamaSpec)}
    mc = LlamaSpec(**{k: v for k, v in cfg.items() if k in keys})
    model = small_llama(mc)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():  # Adam's state, allocated up front as after any first step
        opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.zeros_like(p)}
    x = batches(torch.randint(0, mc.vocab_size, (4096,), generator=torch.Generator().manual_seed(0)),
                1, cfg.get("batch", 4), cfg.get("seq_len", 128))[0]
    accumulate_grads(model, x[:1], 1, "bf16")  # warm-up: one-time allocations (thread pools, autocast,
    accumulate_grads(model, x[:1], 1, "fp32")  # kernels' workspaces) stay out of the first variant's peak
    out = {}
    for name, v in (variants or {"step": {}}).items():
        c = {**cfg, **v}
        checkpoint_(model, c.get("checkpoint", "none"))
        model.zero_grad(set_to_none=True)
        with measure_memory() as m:
            loss = accumulate_grads(model, x, c.get("micro_batches", 1), c.get("precision", "fp32"))
        opt.step()
        out[name] = {"peak_bytes": int(m.peak_bytes), "seconds": float(m.seconds), "loss": loss}
    return {"variants": out, "n_params": count_params(model), "optimizer_state_bytes": optimizer_state_bytes(opt),
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def _check_variants(variants, allow_none: bool = False) -> None:
    if variants is None and allow_none:
        return
    if not isinstance(variants, dict) or not variants or not all(isinstance(v, dict) for v in variants.values()):
        raise TypeError(f"variants must be a non-empty dict {{name: {{'precision': ..., 'checkpoint': ...}}}}, e.g. "
                        f"STEP_VARIANTS; got {variants!r:.80}")


def time_variants(variants: dict, cfg: LlamaSpec | None = None, batch: int = 4, seq_len: int = 128,
                  repeats: int = 3) -> dict:
    """Seconds per training step (median of `repeats`, variants interleaved in ONE process, one thread).
    `variants` maps a name to {"precision": ..., "checkpoint": ...}. Compare the results as ratios."""
    _check_variants(variants)
    spec = check_spec(cfg or SMALL)
    check_step(spec, batch, seq_len)
    repeats = whole_number("repeats", repeats, 1, "timed rounds, e.g. 3", high=1000)
    with repro.threads(1):
        model = small_llama(cfg)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every variant sees the same weights
        x = torch.randint(0, model.config.vocab_size, (batch, seq_len),
                          generator=torch.Generator().manual_seed(0))
        times = {name: [] for name in variants}
        for r in range(repeats + 1):
            for name, v in variants.items():
                checkpoint_(model, v.get("checkpoint", "none"))
                t = time.perf_counter()
                accumulate_grads(model, x, 1, v.get("precision", "fp32"))
                opt.step()
                opt.zero_grad(set_to_none=True)
                if r:  # the first round warms up
                    times[name].append(time.perf_counter() - t)
        checkpoint_(model, "none")
        return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def lowbit_adam(params, bits: int = 8, **kwargs):
    """torchao's AdamW8bit or AdamW4bit (pure PyTorch + torch.compile: it runs on a CPU; the first step compiles,
    ~10–20 s on 2 cores). Measure its state with state_after_step."""
    import logging
    import warnings

    from labkit.quantize import quiet_torchao
    params = list(params) if not isinstance(params, (str, bytes, torch.Tensor)) and hasattr(params, "__iter__") \
        else None
    if not params or not all(isinstance(p, (torch.Tensor, dict)) for p in params):
        raise TypeError("params must be a non-empty list of tensors (e.g. model.parameters()) or parameter groups")
    if isinstance(bits, bool) or bits not in LOWBIT_ADAM:
        raise ValueError(f"low-bit Adam comes in {sorted(LOWBIT_ADAM)} bits (torchao.optim), got {bits!r}")
    quiet_torchao()
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)     # a deprecation notice at import
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.optim import AdamW4bit, AdamW8bit
    return (AdamW8bit if bits == 8 else AdamW4bit)(params, **kwargs)


def state_after_step(model: nn.Module, opt, x: torch.Tensor) -> int:
    """One training step of `model` on tokens x with optimizer `opt` (its state appears on the first step);
    returns the bytes of the optimizer's state (optimizer_state_bytes: a torchao low-bit state counts its codes,
    scales and code map)."""
    import warnings

    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"opt must be a torch optimizer, e.g. lowbit_adam(model.parameters()), got {type(opt).__name__}")
    accumulate_grads(model, x)
    with warnings.catch_warnings():            # torch.compile's notices about torchao's tensor subclasses
        warnings.simplefilter("ignore")
        opt.step()
    model.zero_grad(set_to_none=True)
    return optimizer_state_bytes(opt)


# ----------------------------------------------------------------------------------------------------------
# Results and bench

def _measure_fresh(cfg: dict, variants: dict | None = None) -> dict:
    """measure_step in a fresh process with a fixed malloc mmap threshold (freed tensors leave RSS)."""
    from labkit import memory
    result, _ = memory.run_in_subprocess(measure_step, cfg, variants, env=memory.QUIET_MALLOC)
    return result


STEP_VARIANTS = {
    "fp32": {"precision": "fp32", "checkpoint": "none"},
    "bf16": {"precision": "bf16", "checkpoint": "none"},
    "ckpt_sqrt": {"precision": "fp32", "checkpoint": "sqrt"},
    "ckpt_every": {"precision": "fp32", "checkpoint": "every"},
}


def step_memory(batch: int = 4, seq_len: int = 128, cfg: LlamaSpec | None = None, fresh_each: bool = True,
                variants: dict | None = None) -> dict:
    """Peak growth of forward + backward per variant beside its estimate. fresh_each=True: one fresh process
    per variant (cleanest); False: all variants one after the other in one fresh process (faster)."""
    cfg = check_spec(SMALL if cfg is None else cfg)
    _check_variants(variants, allow_none=True)
    check_step(cfg, batch, seq_len)                   # before any process starts
    if not isinstance(fresh_each, bool):
        raise TypeError(f"fresh_each must be True or False, got {fresh_each!r}")
    variants = variants or STEP_VARIANTS
    base = {**asdict(cfg), "batch": batch, "seq_len": seq_len}
    if fresh_each:
        runs = {name: _measure_fresh({**base, **v})["variants"]["step"] for name, v in variants.items()}
    else:
        runs = _measure_fresh(base, variants)["variants"]
    n = memory.estimate_params(cfg)["total"]
    return {name: {**runs[name], "estimate_bytes": step_estimate(cfg, n, batch, seq_len, **variants[name])}
            for name in variants}
