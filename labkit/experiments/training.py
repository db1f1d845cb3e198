"""Experiments of notebook 06 (training memory): the cached runs and the bench figures.

The ideas (sharing, autocast, checkpointing, the estimates) live in lk.training; this module runs them on the
small Llama to produce data/results/training.json (`python -m labkit results training`) and `bench`.
"""
from __future__ import annotations

from dataclasses import asdict, replace

from ..repro import threads
from ..models import LlamaSpec
from ..training import (SMALL, STEP_VARIANTS, ShareConfig, batches, byte_tokens, eval_loss, share_, small_llama,
                        step_memory, time_variants, train)

#: The narrower, shallower small Llama that the training comparisons train (8 layers, hidden 128).
TRAIN_SPEC = replace(SMALL, hidden_size=128, num_hidden_layers=8, intermediate_size=344)


def compare_training(variants: dict, steps: int = 60, cfg: LlamaSpec | None = None, batch: int = 8,
                     seq_len: int = 128, lr: float = 3e-3) -> dict:
    """Train the same small Llama (same init, same KJV byte batches) once per variant, e.g.
    {"shared 8": {"share": 8}, "bf16": {"precision": "bf16"}}; params, bytes, losses, validation loss."""
    from labkit.memory import count_params, model_bytes
    cfg = cfg or TRAIN_SPEC
    train_tok, val_tok = byte_tokens("train"), byte_tokens("validation")
    data = batches(train_tok, steps, batch, seq_len, seed=1)
    out = {}
    for name, v in variants.items():
        model = small_llama(cfg)
        if v.get("share", 1) > 1:
            share_(model, ShareConfig(group_size=v["share"]))
        losses = train(model, data, lr=lr, precision=v.get("precision", "fp32"))
        out[name] = {"n_params": count_params(model), "bytes": model_bytes(model), "train_losses": losses,
                     "val_loss": eval_loss(model, val_tok, seq_len)}
    return out


def sharing_experiment(group_sizes=(1, 2, 8), steps: int = 60, **kw) -> dict:
    """compare_training of unshared (group 1) and ALBERT-style shared groups of layers, keyed by group size."""
    return compare_training({str(g): {"share": g} for g in group_sizes}, steps, **kw)


def depth_sweep(depths=(4, 8, 16, 24), batch: int = 4, seq_len: int = 128) -> dict:
    """Measured step peaks (one fresh process per depth) and estimates for every variant of STEP_VARIANTS."""
    out = {}
    for layers in depths:
        rows = step_memory(batch, seq_len, replace(SMALL, num_hidden_layers=layers), fresh_each=False)
        out[str(layers)] = {k: {"peak_bytes": v["peak_bytes"], "estimate_bytes": v["estimate_bytes"]}
                            for k, v in rows.items()}
    return out


def make_results() -> dict:
    """The cached runs of notebook 06 (`python -m labkit results training`, a few minutes on 2 cores):
    peak memory vs depth, ALBERT-style sharing and fp32 vs bf16 after the same 150 training steps."""
    with threads(1):
        return {"depth_sweep": depth_sweep(), "config": asdict(SMALL), "batch": 4, "seq_len": 128,
                "sharing": sharing_experiment(steps=150),
                "precision": compare_training({"fp32": {}, "bf16": {"precision": "bf16"}}, steps=150),
                "train_config": asdict(TRAIN_SPEC),
                "train": {"steps": 150, "batch": 8, "seq_len": 128, "lr": 3e-3}}


def bench() -> dict:
    """Headline figures of notebook 06: step memory/time by variant, per-rank optimizer bytes, sharing."""
    from labkit import sharding
    mem = step_memory()
    t = time_variants(STEP_VARIANTS, repeats=2)
    base_m, base_t = mem["fp32"]["peak_bytes"], t["fp32"]
    steps = {k: {"peak_MB": round(v["peak_bytes"] / 1e6, 1), "estimate_MB": round(v["estimate_bytes"] / 1e6, 1),
                 "mem_ratio": round(v["peak_bytes"] / base_m, 2), "seconds": round(t[k], 3),
                 "time_ratio": round(t[k] / base_t, 2)} for k, v in mem.items()}
    one = [r["zero1"] for r in sharding.launch(sharding.train_worker, 1, args=(("zero1",), None))]
    two = [r["zero1"] for r in sharding.launch(sharding.train_worker, 2, args=(("zero1",), None))]
    share = sharing_experiment(group_sizes=(1, 8), steps=30)
    return {"step": steps,
            "zero1_optimizer_bytes_per_rank": {"1": [r["optimizer_state_bytes"] for r in one],
                                               "2": [r["optimizer_state_bytes"] for r in two]},
            "sharing": {g: {"n_params": v["n_params"], "val_loss": round(v["val_loss"], 3)}
                        for g, v in share.items()}}
