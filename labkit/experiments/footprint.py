"""Experiments of notebook 00 (where the memory goes): the bench figures.

The estimates and measurements live in lk.memory and lk.footprint; this module gathers the headline numbers
for `python -m labkit bench`.
"""
from __future__ import annotations

from ..footprint import estimate_footprint, measure_inference, measure_training_step
from ..memory import count_params, tensor_bytes


def bench() -> dict:
    """Headline figures of notebook 00: size, KV bytes per token, perplexity, forward and training-step memory."""
    import time

    from ..evaluate import HEADLINE_TOKENS, eval_tokens, perplexity
    from ..memory import estimate_params, kv_bytes_per_token
    from ..models import load_model
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    load_s = time.perf_counter() - t0
    n = count_params(model)
    t0 = time.perf_counter()
    ppl = {split: round(perplexity(model, eval_tokens(tok, split), max_tokens=HEADLINE_TOKENS), 2) for split in ("validation", "test")}
    fwd = measure_inference("smollm2-135m", [(1, 512)])[0]
    step = measure_training_step("smollm2-135m", 1, 64)
    est = estimate_footprint(model.config, n, "fp32", 1, 512)
    return {"params": n, "params_estimate": estimate_params(model.config)["total"],
            "fp32_bytes": tensor_bytes(model), "kv_bytes_per_token_fp32": kv_bytes_per_token(model.config),
            "perplexity_tokens": HEADLINE_TOKENS, "perplexity": ppl, "eval_seconds": round(time.perf_counter() - t0, 1),
            "load_seconds_from_cache": round(load_s, 2),
            "forward_1x512_peak_bytes": fwd["peak_bytes"], "forward_1x512_estimate_bytes": est["activations"] + est["kv_cache"],
            "train_step_state_bytes_per_param": round((step["weights"] + step["gradients"] + step["optimizer_state"]) / n, 2),
            "train_step_peak_bytes": step["peak_bytes"]}
