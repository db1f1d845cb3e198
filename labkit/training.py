"""Training memory: parameter sharing, mixed precision, activation checkpointing, gradient accumulation,
optimizer state, and the stacked memory estimate (params + grads + optimizer + activations) per rank.

Defined in notebook 06 ("Other memory-saving designs"). In-place transforms end in `_` and take a config,
torchao style: `share_(model, ShareConfig(group_size=4))`, `checkpoint_(model, every=4)`, `untie_(model)`.
Estimates come beside measurements: `saved_activation_bytes` counts the tensors autograd keeps for backward,
`measure_step` measures the peak RSS of a training step (run it in a fresh process per variant).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from . import memory, repro
from .checks import whole_number
from .models import LlamaSpec, build_llama

PRECISIONS = ("fp32", "bf16")
CHECKPOINTING = ("none", "sqrt", "every")


# ----------------------------------------------------------------------------------------------------------
# A small Llama and byte-level KJV data

#: The small Llama notebook 06 trains and measures (16 layers, 11.7M parameters, byte vocabulary).
SMALL = LlamaSpec(hidden_size=256, num_hidden_layers=16, intermediate_size=688, tie_word_embeddings=False)


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
    if len(tokens) <= seq_len:
        raise ValueError(f"need more than seq_len={seq_len} tokens, got {len(tokens)}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len, (steps, batch), generator=g)
    return tokens[starts[..., None] + torch.arange(seq_len)]


@torch.no_grad()
def eval_loss(model, tokens: torch.Tensor, seq_len: int = 128, max_windows: int = 32) -> float:
    """Mean next-token loss over the first `max_windows` consecutive windows of `tokens` (deterministic)."""
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
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight.untyped_storage().data_ptr() == inp.weight.untyped_storage().data_ptr()


def untie_(model):
    """Give the output head its own copy of the embedding (costs vocab × hidden × bytes per element)."""
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
    layers = model.model.layers
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

def sqrt_interval(depth: int) -> int:
    """The segment length that minimises n/k + k: round(√depth)."""
    return max(1, round(math.sqrt(depth)))


def resolve_interval(mode, depth: int) -> int | None:
    """'none' → None, 'every' → 1, 'sqrt' → round(√depth), an int k → k (1 ≤ k ≤ depth)."""
    if mode in (None, "none", 0):
        return None
    if mode == "every":
        return 1
    if mode == "sqrt":
        return sqrt_interval(depth)
    if isinstance(mode, bool) or not isinstance(mode, int):
        raise ValueError(f"checkpointing must be 'none', 'sqrt', 'every' or an int interval, got {mode!r}")
    if not 1 <= mode <= depth:
        raise ValueError(f"checkpoint interval {mode} must be between 1 and the depth ({depth} layers)")
    return mode


def checkpoint_(model, every="sqrt"):
    """Checkpoint the decoder in segments of `every` layers (in place): the forward keeps only each
    segment's input; the backward recomputes one segment at a time. every='none' undoes it."""
    from torch.utils.checkpoint import checkpoint

    layers = model.model.layers
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
    if x.shape[0] % micro_batches:
        raise ValueError(f"batch {x.shape[0]} is not divisible into {micro_batches} micro-batches")
    total = 0.0
    for part in x.chunk(micro_batches):
        with autocast(precision):
            loss = model(input_ids=part, labels=part, use_cache=False).loss / micro_batches
        loss.backward()
        total += loss.item()
    return total


def train(model, data: torch.Tensor, lr: float = 3e-3, precision: str = "fp32", micro_batches: int = 1,
          optimizer=None) -> list[float]:
    """Train on `data` [steps, batch, seq] with Adam; return the loss of every step."""
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


def time_variants(variants: dict, cfg: LlamaSpec | None = None, batch: int = 4, seq_len: int = 128,
                  repeats: int = 3) -> dict:
    """Seconds per training step (median of `repeats`, variants interleaved in ONE process, one thread).
    `variants` maps a name to {"precision": ..., "checkpoint": ...}. Compare the results as ratios."""
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


# ----------------------------------------------------------------------------------------------------------
# Estimates: the stacked memory of one rank

def layer_activation_bytes(cfg: LlamaSpec, batch: int, seq_len: int, precision: str = "fp32") -> int:
    """Bytes one decoder layer saves for backward: lk.memory.layer_activation_bytes (one formula for the lab)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return memory.layer_activation_bytes(cfg, batch, seq_len, precision)


def activation_bytes(cfg: LlamaSpec, batch: int, seq_len: int, precision: str = "fp32",
                     checkpoint="none") -> int:
    """Estimated peak activation bytes of a step: n·layer without checkpointing; with segments of k layers
    (n/k)·(one hidden state) + k·layer (one segment recomputed at a time); plus the logits' loss tensors."""
    n = cfg.num_hidden_layers
    k = resolve_interval(checkpoint, n)
    T = batch * seq_len
    parts = memory.estimate_activation_bytes(cfg, batch, seq_len, torch.float32 if precision == "fp32" else
                                             torch.bfloat16, training=True)
    per_layer = layer_activation_bytes(cfg, batch, seq_len, precision)
    head = parts["logits"] + parts["embeddings"]
    if k is None:
        return parts["total"]
    return math.ceil(n / k) * T * cfg.hidden_size * 4 + k * per_layer + head


def estimate_stack(n_params: int, cfg: LlamaSpec | None = None, batch: int = 4, seq_len: int = 128,
                   precision: str = "fp32", checkpoint="none", zero_stage: int = 0, ranks: int = 1) -> dict:
    """Per-rank bytes of a training step with Adam, by part: params, grads, optimizer, activations.

    fp32: 4 + 4 + 8 = 16 bytes/param. precision="bf16" means bf16 *autocast*: the fp32 weights, gradients and Adam
    state stay (the same 16 bytes/param) and autocast adds a 2-byte bf16 copy of each weight while the step runs,
    so 18 bytes/param in all — not ZeRO's "mixed" precision (bf16 weights and gradients + an fp32 master copy,
    16 bytes/param, lk.memory.estimate_training_bytes(..., "mixed")). ZeRO stage 1 splits the optimizer state over
    `ranks`, stage 2 also the gradients, stage 3 also the parameters (lk.memory.estimate_training_bytes, the one
    estimator). Activations are per rank: `batch` is the per-rank batch.
    """
    cfg = cfg or SMALL
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    resolve_interval(checkpoint, cfg.num_hidden_layers)  # validates the interval against the depth
    state = memory.estimate_training_bytes(n_params, "fp32", "adam", zero_stage=zero_stage, ranks=ranks)
    params, grads, optim = state["weights"], state["gradients"], state["optimizer_state"]
    if precision == "bf16":  # autocast keeps a bf16 copy of every weight it casts, sharded with the weights
        params += 2 * n_params // (ranks if zero_stage >= 3 else 1)
    return {"params": int(params), "grads": int(grads), "optimizer": int(optim),
            "activations": int(activation_bytes(cfg, batch, seq_len, precision, checkpoint))}


LOWBIT_ADAM = {8: dict(block=256, qmap=256, min_numel=4096), 4: dict(block=128, qmap=16, min_numel=4096)}


def _lowbit_moment_bytes(numel: int, bits: int) -> int:
    """Bytes of one Adam moment as torchao.optim.AdamW8bit / AdamW4bit store it: bit-packed codes, one fp32 scale
    per block and a fp32 code map (its quantization levels); tensors under 4,096 values, or not a whole number of
    blocks, stay fp32 (torchao follows bitsandbytes there)."""
    spec = LOWBIT_ADAM[bits]
    if numel < spec["min_numel"] or numel % spec["block"]:
        return 4 * numel
    return math.ceil(numel * bits / 8) + 4 * (numel // spec["block"]) + 4 * spec["qmap"]


def optimizer_estimates(model) -> dict:
    """Optimizer-state bytes (without Adam's 4-byte step counters): Adam fp32 (two fp32 moments, 8 B/param);
    8-bit and 4-bit Adam as torchao.optim stores them (Dettmers et al.'s block-wise scheme: codes + a scale per
    block of 256 / 128 values + a code map; bitsandbytes uses blocks of 2048); Adafactor (factored second moment:
    rows + columns per matrix, no first moment)."""
    adam = adam8 = adam4 = factored = 0
    for p in model.parameters():
        adam += 8 * p.numel()
        adam8 += 2 * _lowbit_moment_bytes(p.numel(), 8)
        adam4 += 2 * _lowbit_moment_bytes(p.numel(), 4)
        factored += 4 * (p.shape[0] + p.shape[1]) if p.dim() == 2 else 4 * p.numel()
    return {"adam_fp32": adam, "adam_8bit": adam8, "adam_4bit": adam4, "adafactor": factored}


def lowbit_adam(params, bits: int = 8, **kwargs):
    """torchao's AdamW8bit or AdamW4bit (pure PyTorch + torch.compile: it runs on a CPU; the first step compiles,
    ~10–20 s on 2 cores). Measure its state with state_after_step."""
    import logging
    import warnings

    from labkit.quantize import quiet_torchao
    if bits not in LOWBIT_ADAM:
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


def step_estimate(cfg: LlamaSpec, n: int, batch: int, seq_len: int, precision="fp32", checkpoint="none") -> int:
    """Estimated peak growth during forward + backward (Adam state and weights already exist).

    Gradients (G = 4 bytes/param) appear while activations are freed, so the peak is not their sum.
    Without checkpointing it comes at the start of the backward: every layer's saved tensors (L each) + the
    loss's + one layer's backward temporaries (≈ two MLP-wide tensors). With segments of k layers it comes while
    segment j (from the bottom) is recomputed: the inputs still stored below it (j · T·h floats) + k·L + the
    gradients of the layers above it; the estimate takes the largest j. bf16 autocast adds the 2-byte weight
    copies that autocast saves for backward (all layers', or one segment's when checkpointing).
    """
    k = resolve_interval(checkpoint, cfg.num_hidden_layers)
    n_layers, T = cfg.num_hidden_layers, batch * seq_len
    L = layer_activation_bytes(cfg, batch, seq_len, precision)
    temps = 2 * T * cfg.intermediate_size * 4
    G = 4 * n
    copies = 2 * n if precision == "bf16" else 0
    if k is None:
        return max(activation_bytes(cfg, batch, seq_len, precision), G) + copies + temps
    h_in = T * cfg.hidden_size * 4
    segments = math.ceil(n_layers / k)
    peak = max(j * h_in + k * L + G * max(0, n_layers - j * k) / n_layers for j in range(1, segments + 1))
    return int(peak + copies * k / n_layers + temps)


def step_memory(batch: int = 4, seq_len: int = 128, cfg: LlamaSpec | None = None, fresh_each: bool = True,
                variants: dict | None = None) -> dict:
    """Peak growth of forward + backward per variant beside its estimate. fresh_each=True: one fresh process
    per variant (cleanest); False: all variants one after the other in one fresh process (faster)."""
    cfg = cfg or SMALL
    variants = variants or STEP_VARIANTS
    base = {**asdict(cfg), "batch": batch, "seq_len": seq_len}
    if fresh_each:
        runs = {name: _measure_fresh({**base, **v})["variants"]["step"] for name, v in variants.items()}
    else:
        runs = _measure_fresh(base, variants)["variants"]
    n = memory.estimate_params(cfg)["total"]
    return {name: {**runs[name], "estimate_bytes": step_estimate(cfg, n, batch, seq_len, **variants[name])}
            for name in variants}
