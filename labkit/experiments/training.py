"""Experiments of notebook 06 (training memory): the cached runs and the bench figures.

The ideas (sharing, autocast, checkpointing, the estimates) live in lk.training; this module runs them on the
small Llama to produce data/results/training.json (`python -m labkit results training`) and `bench`.
"""
from __future__ import annotations

from dataclasses import asdict, replace

import torch

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


#: The designs of the signature chart (notebook 06 §5), each one change to the same Adam step of the small Llama:
#: precision, checkpointing, micro-batches, low-bit optimizer state, or two data-parallel ranks (DDP, ZeRO-1, FSDP).
DESIGNS = {
    "fp32 Adam": {},
    "bf16 autocast": {"precision": "bf16"},
    "checkpoint every layer": {"checkpoint": "every"},
    "accumulate 4 micro-batches": {"micro_batches": 4},
    "8-bit Adam": {"adam_bits": 8},
    "4-bit Adam": {"adam_bits": 4},
    "DDP × 2 ranks": {"ranks": 2, "parallel": "ddp"},
    "ZeRO-1 × 2 ranks": {"ranks": 2, "parallel": "zero1"},
    "FSDP × 2 ranks": {"ranks": 2, "parallel": "fsdp"},
}


def design_worker(rank: int, world_size: int, design: dict, spec: dict, steps: int, batch: int, seq_len: int,
                  lr: float) -> dict:
    """Train SMALL-like `spec` for `steps` Adam steps with one design (see DESIGNS), on this rank's share of each
    batch; measure this process's peak RSS growth from before the model exists (weights + gradients + optimizer
    state + activations + temporaries), the median step time (after 2 warm-up steps) and the validation loss.
    Runs as a rank of lk.sharding.launch (world_size 1 for the single-process designs)."""
    import statistics
    import time

    from ..memory import measure_memory
    from ..training import accumulate_grads, checkpoint_, lowbit_adam
    cfg = LlamaSpec(**spec)
    data = batches(byte_tokens("train"), steps, batch, seq_len, seed=1)[:, rank::world_size]
    val = byte_tokens("validation")
    mode = design.get("parallel")

    def build():
        model = small_llama(cfg)
        if mode in ("ddp", "zero1"):
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = DDP(model)
        elif mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh("cpu", (world_size,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        checkpoint_(model.module if mode in ("ddp", "zero1") else model, design.get("checkpoint", "none"))
        if mode == "zero1":
            from torch.distributed.optim import ZeroRedundancyOptimizer
            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=lr)
        elif design.get("adam_bits"):
            opt = lowbit_adam(model.parameters(), bits=design["adam_bits"], lr=lr, weight_decay=0.0)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=lr)
        return model, opt

    def step(model, opt, x):
        loss = accumulate_grads(model, x, design.get("micro_batches", 1), design.get("precision", "fp32"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    # Steps change the model, so they are timed one by one as training runs (repro.time_call would rerun one).
    model, opt = build()  # warm-up: torch.compile (low-bit Adam), thread pools and gloo buffers stay outside the
    step(model, opt, data[0])  # measurement (MALLOC_MMAP_THRESHOLD_ makes freed tensors leave RSS)
    del model, opt
    times, losses = [], []
    with measure_memory() as m:
        model, opt = build()
        for i, x in enumerate(data):
            t = time.perf_counter()
            losses.append(step(model, opt, x))
            if i >= min(2, len(data) - 1):  # the first two steps warm up
                times.append(time.perf_counter() - t)
    return {"peak_bytes": int(m.peak_bytes), "step_seconds": statistics.median(times), "train_losses": losses,
            "val_loss": eval_loss(model, val, seq_len)}


def designs(steps: int = 60, batch: int = 4, seq_len: int = 64, lr: float = 3e-3, names=None,
            spec: LlamaSpec | None = None) -> dict:
    """Every design of DESIGNS (or `names`), each in fresh processes with MALLOC_MMAP_THRESHOLD_=65536: per-rank
    peak training memory, step time and validation loss after `steps` steps (the same batches, one thread each).
    `train_losses` are rank 0's: with two ranks, the loss of its half of each batch."""
    from ..memory import QUIET_MALLOC, child_environment
    from ..sharding import launch
    unknown = [n for n in (names or ()) if n not in DESIGNS]
    if unknown:
        raise ValueError(f"unknown design(s) {unknown}; choose from {list(DESIGNS)}")
    spec = asdict(spec or SMALL)
    out = {}
    with child_environment(QUIET_MALLOC):  # launch() spawns its ranks with this process's environment
        for name in names or DESIGNS:
            d = DESIGNS[name]
            ranks = d.get("ranks", 1)
            res = launch(design_worker, ranks, args=(d, spec, steps, batch, seq_len, lr), timeout=1800)
            out[name] = {"ranks": ranks, "design": d, "peak_bytes_per_rank": [r["peak_bytes"] for r in res],
                         "peak_bytes": max(r["peak_bytes"] for r in res),
                         "step_seconds": max(r["step_seconds"] for r in res),
                         "val_loss": res[0]["val_loss"], "train_losses": res[0]["train_losses"]}
    return {"steps": steps, "batch": batch, "seq_len": seq_len, "lr": lr, "config": spec, "runs": out}


def make_results() -> dict:
    """The cached runs of notebook 06 (`python -m labkit results training`, ~20 minutes on 2 cores):
    peak memory vs depth, ALBERT-style sharing, fp32 vs bf16 after the same 150 training steps, and every design
    of DESIGNS trained 60 steps (the signature chart)."""
    with threads(1):
        return {"depth_sweep": depth_sweep(), "config": asdict(SMALL), "batch": 4, "seq_len": 128,
                "designs": designs(),
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
