"""A model's whole memory footprint: the estimate by component, and the measurement of the same thing.

Defined in notebook 00 "Where the memory goes": weights, gradients, optimizer state, activations, KV cache.
Measurements run in a fresh process each, with glibc told to hand freed memory back, so one variant
cannot hide inside memory another variant freed.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checks import real_number, whole_number
from .memory import (check_fits, count_params, dtype_bytes, estimate_activation_bytes, estimate_kv_cache_bytes,
                     estimate_training_bytes, kv_cache_bytes, measure_memory, run_in_subprocess, tensor_bytes,
                     QUIET_MALLOC)

COMPONENTS = ("weights", "gradients", "master_weights", "optimizer_state", "activations", "kv_cache")
FLOAT_DTYPES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


def _check_dtype(dtype) -> torch.dtype:
    """The torch dtype a footprint is measured in: fp32, or bf16 for a 16-bit name."""
    if not (dtype in FLOAT_DTYPES or (isinstance(dtype, torch.dtype) and dtype.is_floating_point)):
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES} (a float format the model runs in), got {dtype!r}")
    return torch.float32 if dtype_bytes(dtype) == 4 else torch.bfloat16


def _check_name(name: str):
    """A registered model name or a local folder (these measurements never reach for the hub); returns its config
    when it is already on disk (for the RAM checks), else None."""
    from .models import REGISTRY, model_cache_dir
    if not isinstance(name, str):
        raise TypeError(f"name must be a registered model ({', '.join(REGISTRY)}) or a folder, got {name!r}")
    folder = model_cache_dir(name) if name in REGISTRY else Path(name).expanduser()
    if name not in REGISTRY and not (folder / "config.json").is_file():
        raise ValueError(f"name must be a registered model ({', '.join(REGISTRY)}) or a folder with a config.json, "
                         f"got {name!r}")
    if not (folder / "config.json").is_file():
        return None
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(str(folder))


def _check_shape(config, batch, seq_len, what: str, training: bool = False, logits_to_keep=None) -> None:
    batch = whole_number("batch", batch, 1, "sequences, e.g. 1")
    seq_len = whole_number("seq_len", seq_len, 2 if training else 1, "tokens per sequence, e.g. 64")
    if config is not None:
        check_fits(f"{what} on batch={batch} × seq_len={seq_len}", estimate_activation_bytes(
            config, batch, seq_len, training=training, logits_to_keep=logits_to_keep)["total"], "use a smaller shape")


def _check_shapes(config, shapes, logits_to_keep) -> None:
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, (list, tuple)) \
            or not all(isinstance(s, (list, tuple)) and len(s) == 2 for s in shapes):
        raise TypeError(f"shapes must be a list of (batch, seq_len) pairs, e.g. [(1, 512), (8, 512)]; got {shapes!r}")
    if logits_to_keep is not None:
        whole_number("logits_to_keep", logits_to_keep, 1, "or None for every position; 1 for generation")
    for batch, seq_len in shapes:
        _check_shape(config, batch, seq_len, "a forward pass", logits_to_keep=logits_to_keep)


def estimate_footprint(config, n_params: int, dtype: str = "fp32", batch: int = 1, seq_len: int = 512,
                       training: bool = False, logits_to_keep: int | None = None) -> dict[str, int]:
    """Estimated bytes by component for inference (weights, activations, KV cache) or an Adam training step.

    Training in "bf16"/"fp16" means mixed precision: 16-bit weights and gradients, fp32 master weights
    and Adam moments (ZeRO's 16 bytes/param). Inference keeps a KV cache of batch·seq_len tokens; it scores
    every position (logits_to_keep=None, as perplexity does) or, like `model.generate`, keeps only the last
    position's logits (logits_to_keep=1).
    """
    for name, v in (("batch", batch), ("seq_len", seq_len)):
        whole_number(name, v, -2**63, "a whole number ≥ 1")     # the type; the range just below
    if batch < 1 or seq_len < 1:
        raise ValueError(f"batch and seq_len must be ≥ 1, got batch={batch}, seq_len={seq_len}")
    real_number("n_params", n_params, "parameters, e.g. lk.count_params(model)", low=0)
    if not isinstance(training, bool):
        raise TypeError(f"training must be True or False, got {training!r}")
    b = dtype_bytes(dtype)
    act_dtype = torch.float32 if b == 4 else torch.bfloat16
    out = dict.fromkeys(COMPONENTS, 0)
    if training:
        state = estimate_training_bytes(n_params, "fp32" if b == 4 else "mixed", "adam")
        out.update({k: state[k] for k in ("weights", "gradients", "master_weights", "optimizer_state")})
        out["activations"] = estimate_activation_bytes(config, batch, seq_len, act_dtype, training=True)["total"]
    else:
        out["weights"] = int(n_params * b)
        out["activations"] = estimate_activation_bytes(config, batch, seq_len, act_dtype, training=False,
                                                       logits_to_keep=logits_to_keep)["total"]
        out["kv_cache"] = estimate_kv_cache_bytes(config, batch, seq_len, act_dtype)
    return out


def inference_peaks(name: str, shapes: list[tuple[int, int]], dtype: str = "fp32",
                    logits_to_keep: int | None = None) -> list[dict]:
    """For each (batch, seq_len): one forward pass that fills a KV cache; measured peak and KV bytes.

    logits_to_keep=1 is the prefill of `model.generate` (only the last position's logits); None scores every
    position. Runs where it is called; use measure_inference() to run it in a fresh process.
    """
    from transformers import DynamicCache

    from .models import load_model
    torch_dtype = _check_dtype(dtype)
    _check_shapes(_check_name(name), shapes, logits_to_keep)
    torch.manual_seed(0)
    model, _ = load_model(name, dtype=torch_dtype)
    with torch.inference_mode():  # touch every weight once, so that loading is not counted as activations
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    rows = []
    for batch, seq_len in shapes:
        ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
        cache = DynamicCache(config=model.config)
        with torch.inference_mode(), measure_memory() as m:
            extra = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, **extra)
        rows.append({"batch": batch, "seq_len": seq_len, "peak_bytes": m.peak_bytes,
                     "kv_bytes": kv_cache_bytes(cache), "logits_bytes": tensor_bytes(out.logits)})
        del out, cache
    return rows


def measure_inference(name: str, shapes: list[tuple[int, int]], dtype: str = "fp32",
                      logits_to_keep: int | None = None) -> list[dict]:
    """inference_peaks() in a fresh process (returns its rows)."""
    _check_dtype(dtype)
    _check_shapes(_check_name(name), shapes, logits_to_keep)     # before the process starts
    return run_in_subprocess(inference_peaks, name, shapes, dtype, logits_to_keep, env=QUIET_MALLOC)[0]


def load_footprint(name: str, dtype: str = "fp32") -> dict:
    """Load a model in dtype and touch every weight; the peak while loading and what stays resident after."""
    from .models import load_model
    torch_dtype = _check_dtype(dtype)
    _check_name(name)
    load_model(name, dtype=torch_dtype)  # a first load pays for imports and the tokenizer; then measure
    with measure_memory() as m:
        model, _ = load_model(name, dtype=torch_dtype)
        touched = sum(float(p.detach().float().abs().sum()) > -1 for p in model.parameters())
    return {"dtype": dtype, "weights": tensor_bytes(model), "peak_bytes": m.peak_bytes,
            "resident_bytes": m.end_bytes - m.baseline_bytes, "tensors": touched}


def measure_load(name: str, dtype: str = "fp32") -> dict:
    """load_footprint() in a fresh process."""
    _check_dtype(dtype)
    _check_name(name)
    return run_in_subprocess(load_footprint, name, dtype, env=QUIET_MALLOC)[0]


def training_step(name: str, batch: int, seq_len: int, lr: float = 1e-5) -> dict:
    """One Adam step from a freshly loaded model; bytes of weights, gradients and optimizer state, and the peak.

    The peak is measured from before the model loads, so it holds everything a training step needs.
    """
    from .models import load_model
    _check_shape(_check_name(name), batch, seq_len, "a training step", training=True)
    if not 0 < real_number("lr", lr, "Adam's learning rate, e.g. 1e-5", low=0) <= 1:
        raise ValueError(f"lr must be in (0, 1] (e.g. 1e-5), got {lr!r}")
    torch.manual_seed(0)
    with measure_memory() as m:
        model, _ = load_model(name)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = tensor_bytes([p.grad for p in model.parameters() if p.grad is not None])
        opt.step()
    return {"n_params": count_params(model), "weights": tensor_bytes(model), "gradients": grads,
            "optimizer_state": tensor_bytes(opt.state_dict()["state"]), "peak_bytes": m.peak_bytes,
            "loss": loss.item()}


def measure_training_step(name: str, batch: int = 1, seq_len: int = 64) -> dict:
    """training_step() in a fresh process."""
    _check_shape(_check_name(name), batch, seq_len, "a training step", training=True)   # before the process starts
    return run_in_subprocess(training_step, name, batch, seq_len, env=QUIET_MALLOC)[0]
