"""Where the bytes go: sizes of tensors and models, estimates, and one way to measure a real peak.

Estimates and measurements always come in pairs (notebook 00 "Where the memory goes").
"""
from __future__ import annotations

import contextlib
import gc
import math
import numbers
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
import multiprocessing as mp

import torch

from .checks import real_number, whole_number

DTYPE_BYTES = {"fp32": 4, "float32": 4, "tf32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2,
               "int8": 1, "uint8": 1, "fp8": 1, "int4": 0.5, "int2": 0.25, "fp64": 8, "float64": 8}


def dtype_bytes(dtype) -> float:
    """Bytes per element of a torch dtype or a name such as "bf16" or "int4"."""
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    key = str(dtype).replace("torch.", "").lower()
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use a torch dtype or one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[key]


def fmt_bytes(n: float) -> str:
    """Human-readable decimal size: 1 kB = 1e3 bytes, 1 MB = 1e6 bytes."""
    if isinstance(n, torch.Tensor) and n.numel() == 1 and not n.dtype.is_complex:
        n = n.item()
    if isinstance(n, bool) or not isinstance(n, numbers.Real):
        raise TypeError(f"fmt_bytes needs a number of bytes (int or float), got {type(n).__name__} {n!r}")
    n = float(n)
    if not (math.isfinite(n) and n >= 0):
        raise ValueError(f"fmt_bytes needs a finite size ≥ 0 bytes, got {n!r}; format a difference as "
                         "fmt_bytes(abs(d)) with its sign in front")
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


# ---- sizes of what exists ------------------------------------------------------------------------

def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _tensors(v)


def _is_wrapper_subclass(t: torch.Tensor) -> bool:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    return is_traceable_wrapper_subclass(t)


def _storages(t: torch.Tensor):
    """(key, bytes) of the memory blocks behind a tensor; sparse tensors have several."""
    if type(t).__name__ == "DTensor":  # a sharded tensor: this process holds only its local shard
        yield from _storages(t.to_local())
        return
    if t.layout == torch.sparse_coo:
        yield from _storages(t._indices())
        yield from _storages(t._values())
    elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
        for part in (t.crow_indices(), t.col_indices(), t.values()):
            yield from _storages(part)
    elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
        for part in (t.ccol_indices(), t.row_indices(), t.values()):
            yield from _storages(part)
    elif t.device.type == "meta":
        yield ("meta", id(t)), t.numel() * t.element_size()
    elif _is_wrapper_subclass(t):      # torchao's quantized weights and 8-/4-bit optimizer states: their parts
        for name in t.__tensor_flatten__()[0]:
            yield from _storages(getattr(t, name))
    else:
        s = t.untyped_storage()
        yield (t.device.type, s.data_ptr()), s.nbytes()


def tensor_bytes(obj) -> int:
    """Bytes held by the tensors in obj (tensor, module, list, dict, state dict), each storage once.

    Views and tied weights share one storage, so they are counted once, and a view is charged for the
    whole storage it keeps alive, because that is what memory holds.
    """
    if not isinstance(obj, (torch.Tensor, torch.nn.Module, dict, list, tuple, set)):
        raise TypeError(f"tensor_bytes needs a tensor, a module or a list/dict of tensors, got {type(obj).__name__}")
    seen, total = set(), 0
    for t in _tensors(obj):
        for key, nbytes in _storages(t):
            if key not in seen:
                seen.add(key)
                total += nbytes
    return total


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers, tied/shared storages counted once."""
    _check_module(model, "model_bytes", "lk.tensor_bytes(t) for tensors")
    return tensor_bytes(model)


def _check_module(model, fn: str, instead: str) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{fn} needs a torch.nn.Module (a model or one of its layers), got {type(model).__name__}; "
                        f"use {instead}")


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters, shared parameters counted once."""
    _check_module(model, "count_params", "lk.memory.estimate_params(config) for a config, t.numel() for a tensor")
    seen, n = set(), 0
    for p in model.parameters():
        key = (p.untyped_storage().data_ptr(), p.storage_offset(), p.shape) if p.device.type != "meta" else id(p)
        if key not in seen:
            seen.add(key)
            n += p.numel()
    return n


def bytes_by_dtype(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of parameters and buffers grouped by dtype (each storage once)."""
    _check_module(model, "bytes_by_dtype", "lk.tensor_bytes(t) for tensors")
    seen, out = set(), {}
    for t in _tensors(model):
        for key, nbytes in _storages(t):
            if key not in seen:
                seen.add(key)
                name = str(t.dtype).replace("torch.", "")
                out[name] = out.get(name, 0) + nbytes
    return out


KIND_PATTERNS = (
    ("embeddings", ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type")),
    ("lm_head", ("lm_head",)),
    ("attention", ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj")),
    ("mlp", ("mlp", "intermediate", "output.dense", "gate_proj", "up_proj", "down_proj", "fc")),
    ("norms", ("norm", "ln_")),
)


def param_kind(name: str) -> str:
    """Which part of a transformer a parameter name belongs to (embeddings, attention, mlp, norms...)."""
    if not isinstance(name, str):
        raise TypeError(f"param_kind needs a parameter name such as 'model.layers.0.mlp.up_proj.weight', got {name!r}")
    low = name.lower()
    if "norm" in low:
        return "norms"
    for kind, pats in KIND_PATTERNS:
        if any(p in low for p in pats):
            return kind
    return "other"


def bytes_by_module(model: torch.nn.Module) -> dict[str, int]:
    """Bytes by part of the model (embeddings, attention, mlp, norms, lm_head, other).

    A tied lm_head shares the embedding's storage and so adds 0 bytes here.
    """
    _check_module(model, "bytes_by_module", "lk.tensor_bytes(t) for tensors")
    seen, out = set(), {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        kind = param_kind(name)
        out.setdefault(kind, 0)
        for key, nbytes in _storages(t):
            if key not in seen:
                seen.add(key)
                out[kind] += nbytes
    return out


def check_fits(what: str, nbytes: float, hint: str = "") -> None:
    """ValueError when `what` would need more than this machine's RAM (nbytes, an estimate made from the arguments
    before any allocation): said at once, instead of torch's "can't allocate memory" after the work started."""
    import psutil
    total = psutil.virtual_memory().total
    if nbytes > total:
        raise ValueError(f"{what} would need {fmt_bytes(nbytes)}, more than this machine's {fmt_bytes(total)} of RAM"
                         + (f"; {hint}" if hint else ""))


# ---- estimates -----------------------------------------------------------------------------------

def estimate_param_bytes(n_params: int, dtype="fp32") -> int:
    """Bytes of n_params weights stored in dtype (numel × bytes per element)."""
    real_number("n_params", n_params, low=0)
    return int(math.ceil(n_params * dtype_bytes(dtype)))


def estimate_training_bytes(n_params: int, precision: str = "fp32", optimizer: str = "adam",
                            zero_stage: int = 0, ranks: int = 1) -> dict[str, int]:
    """Weights + gradients + optimizer state of one model, per rank (ZeRO's accounting) — the lab's one estimator.

    precision "fp32": 4 (weights) + 4 (grads) bytes/param; "mixed": bf16/fp16 weights and gradients (2 + 2) plus a
    4-byte fp32 master copy. optimizer "adam"/"adamw": two fp32 moments (8 bytes/param); "sgd_momentum": 4; "sgd": 0.
    Mixed-precision Adam totals 16 bytes/param, as in Rajbhandari et al. 2020 — and so does fp32 Adam.
    ZeRO over `ranks`: stage 1 splits the optimizer state (and the fp32 master copy), stage 2 also the gradients,
    stage 3 also the weights (FSDP); a share is rounded down when the bytes do not divide evenly.
    """
    if precision not in ("fp32", "mixed"):
        raise ValueError(f"precision must be 'fp32' or 'mixed', got {precision!r}")
    state = {"adam": 8, "adamw": 8, "sgd_momentum": 4, "sgd": 0}
    if optimizer not in state:
        raise ValueError(f"optimizer must be one of {sorted(state)}, got {optimizer!r}")
    if isinstance(zero_stage, bool) or zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    whole_number("ranks", ranks, 1, "how many processes share the state, e.g. 2")
    real_number("n_params", n_params, low=0)
    w = 4 if precision == "fp32" else 2
    split = {"weights": zero_stage >= 3, "gradients": zero_stage >= 2, "master_weights": zero_stage >= 1,
             "optimizer_state": zero_stage >= 1}
    full = {"weights": w * n_params, "gradients": w * n_params,
            "master_weights": 0 if precision == "fp32" else 4 * n_params,
            "optimizer_state": state[optimizer] * n_params}
    out = {k: int(v // ranks if split[k] else v) for k, v in full.items()}
    out["total"] = sum(out.values())
    return out


def _cfg(config, *names, default=None):
    if config is None or isinstance(config, (dict, str, numbers.Number)):
        raise TypeError(f"config must be a model config object (model.config, a transformers LlamaConfig or a "
                        f"lk.models.LlamaSpec), got {type(config).__name__}")
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    if default is None:
        raise ValueError(f"config has none of {names}; pass a transformers config of a decoder model")
    return default


def estimate_params(config) -> dict[str, int]:
    """Parameters of a Llama-style decoder by part, from its config alone (nanoGPT's sizing, for GQA).

    Takes a transformers config or a lk.models.LlamaSpec (the same field names), the lab's one counter
    from shapes; lk.count_params counts a built model.

    Per layer: attention h·q + 2·h·kv + q·h (q = heads·head_dim, kv = kv_heads·head_dim), MLP 3·h·f
    (gate, up, down), two RMSNorm weights 2·h. A tied lm_head adds nothing.
    """
    h = _cfg(config, "hidden_size")
    f = _cfg(config, "intermediate_size")
    heads = _cfg(config, "num_attention_heads")
    kv_heads = _cfg(config, "num_key_value_heads", default=heads)
    hd = getattr(config, "head_dim", None) or h // heads
    layers, vocab = _cfg(config, "num_hidden_layers"), _cfg(config, "vocab_size")
    q, kv = heads * hd, kv_heads * hd
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = {"embeddings": vocab * h, "attention": layers * (2 * h * q + 2 * h * kv), "mlp": layers * 3 * h * f,
           "norms": layers * 2 * h + h, "lm_head": 0 if tied else vocab * h}
    out["total"] = sum(out.values())
    return out


def kv_layout(config, kv_heads: int | None = None) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder config; `kv_heads` overrides the model's (MHA/GQA/MQA what-ifs)."""
    layers = _cfg(config, "num_hidden_layers", "n_layer")
    heads = _cfg(config, "num_attention_heads", "n_head")
    if kv_heads is None:
        kv_heads = _cfg(config, "num_key_value_heads", default=heads)
    head_dim = getattr(config, "head_dim", None) or _cfg(config, "hidden_size", "n_embd") // heads
    return layers, whole_number("kv_heads", kv_heads, 1, f"at most the {heads} query heads (MHA)", high=heads), head_dim


def kv_bytes_per_token(config, dtype=torch.float32, kv_heads: int | None = None) -> int:
    """KV-cache bytes for one token: 2 (K and V) · layers · kv_heads · head_dim · bytes per value — the lab's one
    KV formula (lk.kvcache.kv_token_bytes adds the group scales of a quantized cache to it)."""
    layers, kv_heads, head_dim = kv_layout(config, kv_heads)
    return int(2 * layers * kv_heads * head_dim * dtype_bytes(dtype))


def estimate_kv_cache_bytes(config, batch: int, seq_len: int, dtype=torch.float32) -> int:
    """KV-cache bytes for batch sequences of seq_len tokens (vLLM's formula)."""
    whole_number("batch", batch)
    whole_number("seq_len", seq_len)
    return kv_bytes_per_token(config, dtype) * batch * seq_len


def kv_cache_bytes(cache) -> int:
    """Measured bytes of a transformers KV cache (e.g. a DynamicCache after a forward with use_cache=True): the
    keys and values of every layer — the measurement beside estimate_kv_cache_bytes."""
    if not hasattr(cache, "layers"):
        raise TypeError(f"kv_cache_bytes needs a transformers Cache (model(..., use_cache=True).past_key_values), "
                        f"got {type(cache).__name__}")
    return tensor_bytes([t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None])


def layer_activation_bytes(config, batch: int, seq_len: int, precision: str = "fp32") -> int:
    """Bytes one Llama decoder layer saves for backward, counted tensor by tensor (the tests check it against
    autograd's saved tensors through torch.autograd.graph.saved_tensors_hooks).

    T = batch·seq_len tokens, h hidden, kv = kv_heads·head_dim, f MLP width. fp32: 8·T·h (two RMSNorms keep
    input and output, the q/k/v input, q, the attention output, the o_proj input, the MLP input) + 2·T·kv (k, v)
    + 4·T·f (gate, up, silu(gate), their product) floats, plus the attention log-sum-exp and the norms' 1/rms.
    "bf16" (autocast): the norms and the residual stream stay fp32 (4·T·h floats); the rest is 2 bytes."""
    whole_number("batch", batch)
    whole_number("seq_len", seq_len)
    T = batch * seq_len
    h = _cfg(config, "hidden_size", "n_embd")
    f = _cfg(config, "intermediate_size", default=4 * h)
    heads = _cfg(config, "num_attention_heads", "n_head")
    kv_heads = _cfg(config, "num_key_value_heads", default=heads)
    kv = kv_heads * (getattr(config, "head_dim", None) or h // heads)
    small = 4 * T * heads + 8 * T  # attention log-sum-exp, RMSNorm 1/rms
    if precision == "bf16":
        return 4 * 4 * T * h + 2 * (5 * T * h + 2 * T * kv + 4 * T * f) + small
    if precision != "fp32":
        raise ValueError(f"precision must be 'fp32' or 'bf16' (autocast), got {precision!r}")
    return 4 * (8 * T * h + 2 * T * kv + 4 * T * f) + small


def estimate_activation_bytes(config, batch: int, seq_len: int, dtype=torch.float32,
                              training: bool = True, logits_to_keep: int | None = None) -> dict[str, int]:
    """Activation bytes of a Llama-style decoder forward pass, by part (N = batch·seq_len tokens).

    training=True counts what autograd saves for backward: layers × layer_activation_bytes (bf16 dtype = autocast),
    the loss's tensors over the vocabulary (logits, log-softmax and its gradient: 3·N·vocab fp32 floats) and the
    embedding output. The same formula drives notebook 06's step estimates.
    training=False counts what is alive at once in inference: one layer's working set plus the logits. A forward
    that scores every token (perplexity) keeps batch·seq_len·vocab logits; `model.generate` asks the model for the
    last position's logits only (transformers' `logits_to_keep=1`), so pass logits_to_keep=1 for generation.
    """
    if not isinstance(training, bool):
        raise TypeError(f"training must be True or False, got {training!r}")
    if logits_to_keep is not None:
        whole_number("logits_to_keep", logits_to_keep, 1, "or None for every position; 1 for generation")
    whole_number("batch", batch)
    whole_number("seq_len", seq_len)
    b = dtype_bytes(dtype)
    n = batch * seq_len
    h = _cfg(config, "hidden_size", "n_embd")
    layers = _cfg(config, "num_hidden_layers", "n_layer")
    vocab = _cfg(config, "vocab_size")
    if training:
        per_layer = layer_activation_bytes(config, batch, seq_len, "fp32" if b == 4 else "bf16")
        out = {"layers": int(layers * per_layer), "logits": int(3 * n * vocab * 4), "embeddings": int(n * h * 4)}
    else:
        f = _cfg(config, "intermediate_size", default=4 * h)
        heads = _cfg(config, "num_attention_heads", "n_head")
        kv_heads = _cfg(config, "num_key_value_heads", default=heads)
        hd = getattr(config, "head_dim", None) or h // heads
        q, kv = heads * hd, kv_heads * hd
        kept = batch * (seq_len if logits_to_keep is None else min(logits_to_keep, seq_len))
        out = {"layers": int(n * (2 * h + 3 * f + q + 2 * kv) * b), "logits": int(kept * vocab * b),
               "embeddings": int(n * h * b)}
    out["total"] = sum(out.values())
    return out


# ---- measurement ---------------------------------------------------------------------------------

def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    rss = _status_kb("VmRSS")
    if rss is None:
        import psutil
        rss = psutil.Process().memory_info().rss
    return rss


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


@dataclass
class MemoryMeasurement:
    """What measure_memory saw: the RSS at entry, the peak above it, and the wall time."""
    baseline_bytes: int = 0
    peak_bytes: int = 0
    end_bytes: int = 0
    seconds: float = 0.0
    method: str = ""

    def __repr__(self) -> str:
        return (f"MemoryMeasurement(peak={fmt_bytes(self.peak_bytes)} above a baseline of "
                f"{fmt_bytes(self.baseline_bytes)}, {self.seconds:.2f} s, {self.method})")


@contextlib.contextmanager
def measure_memory(sample_interval: float = 0.001):
    """Measure the peak resident memory reached inside the block, above the RSS at entry.

    On Linux the kernel's high-water mark (VmHWM) is reset by writing 5 to /proc/self/clear_refs, so the
    peak is exact even for allocations shorter than any sampling interval. Elsewhere a thread samples RSS.
    tracemalloc would miss this memory: torch allocates outside Python's allocator.
    """
    if not 0 < real_number("sample_interval", sample_interval, "seconds, e.g. 0.001", low=0) <= 10:
        raise ValueError(f"sample_interval must be > 0 and at most 10 seconds (e.g. 0.001), got {sample_interval!r}")
    gc.collect()
    m = MemoryMeasurement()
    exact = _reset_peak()
    m.baseline_bytes = current_rss()
    m.method = "VmHWM" if exact else f"RSS sampled every {sample_interval * 1e3:.0f} ms"
    stop, peak = threading.Event(), [m.baseline_bytes]
    sampler = None
    if not exact:
        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], current_rss())
                time.sleep(sample_interval)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        m.seconds = time.perf_counter() - t0
        m.end_bytes = current_rss()
        if exact:
            top = _status_kb("VmHWM") or m.end_bytes
        else:
            stop.set()
            sampler.join()
            top = max(peak[0], m.end_bytes)
        m.peak_bytes = max(0, top - m.baseline_bytes)


def _measured_call(fn, args, kwargs):
    with measure_memory() as m:
        result = fn(*args, **kwargs)
    return result, m.peak_bytes


def run_in_subprocess(fn, *args, env: dict[str, str] | None = None, **kwargs):
    """Run fn(*args, **kwargs) in a fresh spawned process; return (result, peak RSS growth in bytes).

    A fresh process per variant keeps one measurement from inheriting another's freed-but-kept memory
    (glibc does not hand freed memory back). fn must be importable (defined in a module, not a notebook).
    `env` sets environment variables for the child only (e.g. MALLOC_MMAP_THRESHOLD_; a None value unsets one);
    the caller's environment is left exactly as it was.
    """
    if not callable(fn):
        raise TypeError(f"run_in_subprocess needs a function, got {type(fn).__name__}")
    if env is not None and not (isinstance(env, dict) and all(isinstance(k, str) and (v is None or isinstance(v, str))
                                                              for k, v in env.items())):
        raise TypeError(f"env must be a dict of str to str (or None to unset a variable), got {env!r}")
    if getattr(fn, "__module__", "__main__") == "__main__" or "<locals>" in getattr(fn, "__qualname__", ""):
        raise ValueError(f"{getattr(fn, '__name__', fn)} must be defined at the top level of an importable "
                         "module (e.g. labkit or a .py file beside the notebook), not in the notebook")
    with child_environment(env):  # a spawned child copies the environment when it starts
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
            return ex.submit(_measured_call, fn, args, kwargs).result()


@contextlib.contextmanager
def child_environment(env: dict[str, str | None] | None):
    """Set environment variables (None unsets one) for the processes started inside the block, and put this
    process's environment back exactly as it was when the block ends (also on an error)."""
    saved = {k: os.environ.get(k) for k in (env or {})}
    try:
        for k, v in (env or {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


QUIET_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # freed blocks > 64 kB go back to the OS: per-variant RSS peaks
