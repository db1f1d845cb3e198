"""The memory of a training step, estimated: what each decoder layer saves for backward, what checkpointing keeps
(segments of `resolve_interval` layers), Adam's and low-bit Adam's state, and the stack per rank.

Defined in notebook 06 ("Other memory-saving designs", the estimates beside each measurement); lk.training
re-exports every name here and measures the same things (saved_activation_bytes, step_memory, state_after_step).
"""
from __future__ import annotations

import math

import torch

from . import memory
from .checks import real_number, torch_module, whole_number
from .models import LlamaSpec

PRECISIONS = ("fp32", "bf16")
CHECKPOINTING = ("none", "sqrt", "every")

#: The small Llama notebook 06 trains and measures (16 layers, 11.7M parameters, byte vocabulary).
SMALL = LlamaSpec(hidden_size=256, num_hidden_layers=16, intermediate_size=688, tie_word_embeddings=False)


def sqrt_interval(depth: int) -> int:
    """The segment length that minimises n/k + k: round(√depth)."""
    depth = whole_number("depth", depth, 1, "decoder layers")
    return max(1, round(math.sqrt(depth)))


def resolve_interval(mode, depth: int) -> int | None:
    """'none' → None, 'every' → 1, 'sqrt' → round(√depth), an int k → k (1 ≤ k ≤ depth)."""
    depth = whole_number("depth", depth, 1, "decoder layers")
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


def check_spec(cfg) -> LlamaSpec:
    """cfg, if it is a LlamaSpec (the estimates read its fields), else a TypeError saying what to pass."""
    if not isinstance(cfg, LlamaSpec):
        raise TypeError(f"cfg must be a lk.models.LlamaSpec (e.g. lk.training.SMALL), got {type(cfg).__name__}")
    return cfg


def check_step(spec: LlamaSpec, batch, seq_len) -> None:
    """batch and seq_len of a training step on `spec`: whole numbers, a window it can read, a step that fits."""
    batch = whole_number("batch", batch, 1, "sequences per step, e.g. 4")
    seq_len = whole_number("seq_len", seq_len, 2, "tokens per sequence, e.g. 128", high=spec.max_position_embeddings)
    memory.check_fits(f"a training step on batch={batch} × seq_len={seq_len}",
                      memory.estimate_activation_bytes(spec, batch, seq_len)["total"], "use a smaller batch")


def layer_activation_bytes(cfg: LlamaSpec, batch: int, seq_len: int, precision: str = "fp32") -> int:
    """Bytes one decoder layer saves for backward: lk.memory.layer_activation_bytes (one formula for the lab)."""
    check_spec(cfg)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return memory.layer_activation_bytes(cfg, batch, seq_len, precision)


def activation_bytes(cfg: LlamaSpec, batch: int, seq_len: int, precision: str = "fp32",
                     checkpoint="none") -> int:
    """Estimated peak activation bytes of a step: n·layer without checkpointing; with segments of k layers
    (n/k)·(one hidden state) + k·layer (one segment recomputed at a time); plus the logits' loss tensors."""
    n = check_spec(cfg).num_hidden_layers
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
    cfg = check_spec(SMALL if cfg is None else cfg)
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


def lowbit_moment_bytes(numel: int, bits: int) -> int:
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
    for p in torch_module("model", model, "a model such as small_llama()").parameters():
        adam += 8 * p.numel()
        adam8 += 2 * lowbit_moment_bytes(p.numel(), 8)
        adam4 += 2 * lowbit_moment_bytes(p.numel(), 4)
        factored += 4 * (p.shape[0] + p.shape[1]) if p.dim() == 2 else 4 * p.numel()
    return {"adam_fp32": adam, "adam_8bit": adam8, "adam_4bit": adam4, "adafactor": factored}


def step_estimate(cfg: LlamaSpec, n: int, batch: int, seq_len: int, precision="fp32", checkpoint="none") -> int:
    """Estimated peak growth during forward + backward (Adam state and weights already exist).

    Gradients (G = 4 bytes/param) appear while activations are freed, so the peak is not their sum.
    Without checkpointing it comes at the start of the backward: every layer's saved tensors (L each) + the
    loss's + one layer's backward temporaries (≈ two MLP-wide tensors). With segments of k layers it comes while
    segment j (from the bottom) is recomputed: the inputs still stored below it (j · T·h floats) + k·L + the
    gradients of the layers above it; the estimate takes the largest j. bf16 autocast adds the 2-byte weight
    copies that autocast saves for backward (all layers', or one segment's when checkpointing).
    """
    k = resolve_interval(checkpoint, check_spec(cfg).num_hidden_layers)
    real_number("n", n, "parameters, e.g. lk.count_params(model)", low=0)
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
