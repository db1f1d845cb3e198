"""labkit — the library behind LLM Memory Lab. Notebooks do `import labkit as lk`.

The most used functions are exported here; every module is also reachable lazily as lk.<module>
(lk.prune, lk.quantize, lk.pool, ...), so importing labkit stays fast.
"""
from __future__ import annotations

import importlib
import os

import logging

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# transformers imports torchao, which logs that its CUDA-only kernels cannot load on a CPU, and torch logs a
# deprecation about torchao's enums: noise for a learner, so those two loggers only report errors.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from .checks import check, check_between, check_close, ok  # noqa: E402
from .memory import (  # noqa: E402
    count_params, estimate_kv_cache_bytes, fmt_bytes, measure_memory, model_bytes, tensor_bytes,
)
from .repro import cache_dir, full_mode, seed_everything  # noqa: E402

__version__ = "0.1.0"


def load_model(name_or_path: str = "smollm2-135m", **kwargs):
    """(model, tokenizer) — see labkit.models.load_model."""
    from .models import load_model as _load
    return _load(name_or_path, **kwargs)


def perplexity(model, tokens, **kwargs) -> float:
    """Perplexity over a fixed token budget — see labkit.evaluate.perplexity."""
    from .evaluate import perplexity as _ppl
    return _ppl(model, tokens, **kwargs)


def __getattr__(name: str):
    if name.startswith("_"):
        raise AttributeError(name)
    try:
        module = importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            raise AttributeError(f"labkit has no attribute or module {name!r}") from None
        raise
    globals()[name] = module
    return module
