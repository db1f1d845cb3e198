"""Sharding across processes: launch local gloo ranks from a notebook, ZeRO-1 and FSDP2 on CPU.

Defined in notebook 06 ("Beyond one process"). `launch(worker, world_size=2)` starts `world_size` spawned
processes that join one gloo process group on 127.0.0.1 (a free port, a timeout, one thread per rank), runs
`worker(rank, world_size, *args)` in each and returns the per-rank results, passed back through files in a
temporary folder (child prints never reach a notebook cell). If one rank fails, every rank is ended and
`RankFailedError` names the rank and says why: its Python error, or its exit signal and the last lines of
its stderr (each rank writes fd 2 to a file in that folder). The processes are always terminated (then
killed) in a `finally`, so an interrupted cell leaves no stray processes behind.

The workers (`train_worker`, `failing_worker`) live here because spawn can only start functions that an
importable module defines: a function typed into a notebook fails.
"""
from __future__ import annotations

import datetime
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import nn

from .checks import MAX_STEPS, real_number, whole_number
from .memory import check_fits, count_params, estimate_training_bytes, tensor_bytes

#: PIDs of the processes started by the last `launch` (tests check that none is left alive).
LAST_PIDS: list[int] = []


class RankFailedError(RuntimeError):
    """A rank of a `launch` failed; `.rank` says which, the message carries its traceback."""

    def __init__(self, rank: int, message: str):
        super().__init__(f"rank {rank} failed (every other rank was stopped): {message}")
        self.rank = rank


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_importable(fn) -> None:
    mod, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not callable(fn) or mod in (None, "__main__") or "<locals>" in qual or "<lambda>" in qual:
        raise TypeError(
            f"launch() needs a worker defined at the top level of an importable module, got {fn!r}; "
            "a function typed into a notebook cannot be started by spawn — put it in a .py file "
            "(e.g. labkit/sharding.py) and pass it from there")


def _entry(rank: int, fn, world_size: int, port: int, outdir: str, args: tuple, gloo_timeout: float) -> None:
    """Runs in each spawned process: join the gloo group, run the worker, write the result to a file."""
    import torch.distributed as dist

    out = Path(outdir)
    _stderr_to_file(out / f"rank{rank}.stderr")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=gloo_timeout))
    try:
        result = fn(rank, world_size, *args)
        tmp = out / f".rank{rank}.pt"
        torch.save(result, tmp)
        os.replace(tmp, out / f"rank{rank}.pt")
        del result
        if world_size > 1:
            dist.barrier()  # no rank tears the group down while a peer may still be communicating
    except BaseException:
        tb = traceback.format_exc()
        (out / f"rank{rank}.err").write_text(tb)
        try:  # the first rank to fail claims first.err; ranks that fail because a peer died come later
            fd = os.open(out / "first.err", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            os.write(fd, str(rank).encode())
            os.close(fd)
        except FileExistsError:
            pass
        raise
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # pragma: no cover - the group may already be broken
            pass
    # Success: leave now, without interpreter finalization. Finalizing a process that has used gloo (its
    # worker threads, DDP's and FSDP's C++ state) can abort in a C++ destructor after the work is done:
    # notebook 06 once failed in CI with rank 1 "exited with code -6" (SIGABRT), and a local repro printed
    # "terminate called without an active exception". The result is on disk and the group destroyed, so
    # skipping finalization loses nothing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _stderr_to_file(path: Path) -> None:
    """Point this process's file descriptor 2 at `path`, so a C++ abort's message (which bypasses Python)
    is kept and `launch` can report it."""
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)


def _failure_detail(outdir: str, rank: int, exitcode) -> str:
    """What went wrong on `rank`: the last line of its Python traceback, else its exit code (and signal)
    and the last lines it wrote to stderr."""
    err = Path(outdir) / f"rank{rank}.err"
    if err.exists():
        return err.read_text().strip().splitlines()[-1]
    how = f"exited with code {exitcode}"
    if isinstance(exitcode, int) and exitcode < 0:
        try:
            how += f" ({signal.Signals(-exitcode).name})"
        except ValueError:
            pass
    detail = f"{how} without a Python error"
    log = Path(outdir) / f"rank{rank}.stderr"
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines:
        detail += "; its stderr ended with: " + " | ".join(lines[-3:])
    return detail


def launch(worker, world_size: int = 2, args: tuple = (), timeout: float = 300.0,
           gloo_timeout: float = 60.0) -> list:
    """Run `worker(rank, world_size, *args)` in `world_size` local gloo processes; return [result per rank].

    A result travels back through a file read with `torch.load(weights_only=True)`, so it must be built from
    tensors, numbers, strings, lists, tuples and dicts (no arbitrary objects).

    Raises RankFailedError (with `.rank`) when a rank raises or dies, TimeoutError after `timeout` seconds;
    in every case all processes are ended before it returns.
    """
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException

    _check_importable(worker)
    whole_number("world_size", world_size, 1, "local processes: more than 8 is too many for a laptop", high=8)
    if isinstance(args, (str, bytes)) or not isinstance(args, (tuple, list)):
        raise TypeError(f"args must be a tuple of the worker's extra arguments, e.g. (cfg,), got {args!r}")
    for name, t in (("timeout", timeout), ("gloo_timeout", gloo_timeout)):
        if not real_number(name, t, "seconds, e.g. 60", low=0) > 0:
            raise ValueError(f"{name} must be > 0 seconds, got {t!r}")
    outdir = tempfile.mkdtemp(prefix="labkit-launch-")
    ctx = None
    LAST_PIDS.clear()
    try:
        ctx = mp.start_processes(_entry, args=(worker, world_size, free_port(), outdir, tuple(args),
                                               float(gloo_timeout)),
                                 nprocs=world_size, join=False, start_method="spawn")
        LAST_PIDS.extend(ctx.pids())
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=0.5, grace_period=2.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"launch(): ranks still running after {timeout:.0f} s; all were "
                                       "stopped — raise timeout= or make the worker smaller")
        except (ProcessRaisedException, ProcessExitedException) as e:
            _stop(ctx.processes)
            rank = _root_cause(outdir, [p.exitcode for p in ctx.processes], e.error_index)
            raise RankFailedError(rank, _failure_detail(outdir, rank, ctx.processes[rank].exitcode)) from None
        results = []
        for rank in range(world_size):
            path = Path(outdir) / f"rank{rank}.pt"
            if not path.exists():
                raise RankFailedError(rank, "exited without writing a result")
            results.append(torch.load(path, weights_only=True))
        return results
    finally:
        if ctx is not None:
            _stop(ctx.processes)
        shutil.rmtree(outdir, ignore_errors=True)


def _stop(processes) -> None:
    """Terminate, then kill, every process still alive; reap them all."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _root_cause(outdir: str, exitcodes: list, detected: int) -> int:
    """Which rank failed first. A rank that died without a Python error (os._exit, a signal other than our
    SIGTERM, the OOM killer) is the cause: its peers only fail because it vanished. Otherwise the first rank
    to raise (it claimed first.err). Falls back to the rank that torch noticed."""
    hard = [r for r, code in enumerate(exitcodes) if code not in (0, None, -15)
            and not (Path(outdir) / f"rank{r}.err").exists()]
    if hard:
        return hard[0]
    first = Path(outdir) / "first.err"
    if first.exists() and first.read_text().strip().isdigit():
        return int(first.read_text())
    return detected


# ----------------------------------------------------------------------------------------------------------
# Workers (must be importable for spawn)

def failing_worker(rank: int, world_size: int, bad_rank: int = 1, how: str = "raise"):
    """Test worker: `bad_rank` raises (or exits hard with how="exit", or aborts like a C++ crash with
    how="abort", writing a line to stderr first); the others wait in a collective."""
    import torch.distributed as dist

    if rank == bad_rank:
        if how == "exit":
            os._exit(3)
        if how == "abort":
            os.write(2, f"rank {rank}: simulated C++ abort\n".encode())
            os.abort()
        raise RuntimeError(f"rank {rank} was told to fail")
    dist.barrier()  # blocks: the failed rank never arrives
    return rank


def sleeping_worker(rank: int, world_size: int, seconds: float = 60.0):
    """Test worker: sleeps (to test timeouts and interrupts)."""
    time.sleep(seconds)
    return rank


def _train_batches(cfg: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.get("data_seed", 1))
    return torch.randint(0, cfg["vocab_size"], (cfg["steps"], cfg["batch"], cfg["seq_len"]), generator=g)


class Block(nn.Module):
    """A residual MLP block (pre-norm), the unit that FSDP shards."""

    def __init__(self, hidden: int):
        super().__init__()
        hidden = whole_number("hidden", hidden, 1, "the block's width, e.g. 64")
        check_fits(f"a Block of width {hidden}", 4 * 9 * hidden * hidden, "use a smaller width")
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    """A small next-token model in plain torch (no transformers import: each rank starts in ~3 s)."""

    def __init__(self, vocab_size: int = 256, hidden_size: int = 64, layers: int = 4):
        super().__init__()
        vocab_size = whole_number("vocab_size", vocab_size, 1, "tokens, e.g. 256")
        hidden_size = whole_number("hidden_size", hidden_size, 1, "the width, e.g. 64")
        layers = whole_number("layers", layers, 1, "blocks, e.g. 4")
        check_fits(f"a TinyLM of {layers} layers × width {hidden_size}",
                   4 * (2 * vocab_size * hidden_size + layers * 9 * hidden_size * hidden_size), "make it smaller")
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(Block(hidden_size) for _ in range(layers))
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        logits = self.head(h)
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())


DEFAULT_DIST_CFG = dict(vocab_size=256, hidden_size=64, layers=4, steps=3, batch=4, seq_len=32, lr=1e-2,
                        dtype="float32", seed=0)


def check_cfg(cfg) -> dict:
    """DEFAULT_DIST_CFG updated by cfg (None or a dict of its keys), every value checked."""
    if cfg is not None and not isinstance(cfg, dict):
        raise TypeError(f"cfg must be a dict of {sorted(DEFAULT_DIST_CFG)} (or None), got {type(cfg).__name__}")
    unknown = sorted(set(cfg or {}) - set(DEFAULT_DIST_CFG) - {"data_seed"})
    if unknown:
        raise ValueError(f"cfg has unknown keys {unknown}; use {sorted(DEFAULT_DIST_CFG)} (or 'data_seed')")
    full = {**DEFAULT_DIST_CFG, **(cfg or {})}
    for k in ("vocab_size", "hidden_size", "layers", "steps", "batch", "seq_len"):
        whole_number(f"cfg[{k!r}]", full[k], 2 if k == "seq_len" else 1, f"default {DEFAULT_DIST_CFG[k]}",
                     high=MAX_STEPS if k == "steps" else None)
    whole_number("cfg['seed']", full["seed"], 0, "any whole number ≥ 0")
    if not 0 < real_number("cfg['lr']", full["lr"], "Adam's learning rate, e.g. 1e-2", low=0) <= 1:
        raise ValueError(f"cfg['lr'] must be in (0, 1], got {full['lr']!r}")
    if full["dtype"] not in ("float32", "float64", "bfloat16", "float16"):
        raise ValueError(f"cfg['dtype'] must be 'float32', 'float64', 'bfloat16' or 'float16', got {full['dtype']!r}")
    return full


def build_model(cfg: dict | None = None) -> TinyLM:
    """The model every rank (and the one-process reference) starts from: same seed, same weights."""
    cfg = check_cfg(cfg)
    torch.manual_seed(cfg["seed"])
    return TinyLM(cfg["vocab_size"], cfg["hidden_size"], cfg["layers"]).to(getattr(torch, cfg["dtype"]))


def _train_mode(model, opt, cfg, rank, world_size) -> list[float]:
    import torch.distributed as dist
    losses = []
    for batch in _train_batches(cfg):
        x = batch[rank::world_size]  # this rank's rows: equal halves, so the mean of means is the full mean
        loss = model(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(t)
        losses.append(t.item() / world_size)
    return losses


def train_worker(rank: int, world_size: int, modes=("zero1", "fsdp"), cfg: dict | None = None) -> dict:
    """Train the same TinyLM on this rank's slice of each batch, once per mode in {"ddp", "zero1", "fsdp"}.

    Returns, per mode, this rank's optimizer-state bytes and parameter bytes (local shards), the losses,
    and on rank 0 the final full weights (to compare with one process).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg = check_cfg(cfg)
    if isinstance(modes, str):
        modes = (modes,)
    out = {}
    for mode in modes:
        model = build_model(cfg)
        if mode == "ddp":
            model = DDP(model)
            opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
            state = opt.state
        elif mode == "zero1":
            from torch.distributed.optim import ZeroRedundancyOptimizer
            model = DDP(model)
            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=cfg["lr"])
            state = opt.optim.state  # only this rank's partition of the parameters
        elif mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh("cpu", (world_size,))
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
            state = opt.state  # DTensor shards
        else:
            raise ValueError(f"mode must be 'ddp', 'zero1' or 'fsdp', got {mode!r}")
        losses = _train_mode(model, opt, cfg, rank, world_size)
        inner = model.module if hasattr(model, "module") else model
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                for k, v in inner.state_dict().items()}  # full_tensor is a collective: every rank calls it
        out[mode] = {"rank": rank, "world_size": world_size, "losses": losses,
                     "optimizer_state_bytes": tensor_bytes([dict(s) for s in state.values()]),
                     "param_bytes": tensor_bytes(list(model.parameters())),
                     "state_dict": full if rank == 0 else None}
    return out


def train_single(cfg: dict | None = None) -> dict:
    """The reference: the same training in this one process on the full batch with plain Adam."""
    cfg = check_cfg(cfg)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    losses = _train_mode(model, opt, cfg, 0, 1)
    return {"losses": losses, "optimizer_state_bytes": tensor_bytes([dict(s) for s in opt.state.values()]),
            "param_bytes": tensor_bytes(list(model.parameters())),
            "n_params": count_params(model),
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def max_weight_diff(a: dict, b: dict) -> float:
    """Largest |difference| between two state dicts with the same keys."""
    for name, d in (("a", a), ("b", b)):
        if not isinstance(d, dict) or not all(isinstance(t, torch.Tensor) for t in d.values()):
            raise TypeError(f"{name} must be a state dict {{name: tensor}}, got {type(d).__name__}")
    if a.keys() != b.keys():
        raise ValueError(f"state dicts differ in keys: {sorted(set(a) ^ set(b))[:5]}")
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def zero_state_bytes(n_params: int, ranks: int, stage: int = 1, optimizer: str = "adam") -> int:
    """ZeRO formula: optimizer-state bytes per rank (8·Ψ/N for fp32 Adam from stage 1 on, else 8·Ψ) — read off
    lk.memory.estimate_training_bytes, the lab's one estimator of training state."""
    return estimate_training_bytes(n_params, "fp32", optimizer, zero_stage=stage, ranks=ranks)["optimizer_state"]


def compare_sharded(world_size: int = 2, modes=("zero1", "fsdp"), cfg: dict | None = None,
                    timeout: float = 240.0) -> dict:
    """One process vs `modes` over `world_size` ranks (one launch): per-rank bytes and weight differences."""
    full = check_cfg(cfg)
    if isinstance(modes, str) or not isinstance(modes, (tuple, list)) or not modes \
            or any(m not in ("ddp", "zero1", "fsdp") for m in modes):
        raise ValueError(f"modes must be a non-empty tuple of 'ddp', 'zero1' and 'fsdp', got {modes!r}")
    if not real_number("timeout", timeout, "seconds, e.g. 240", low=0) > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    if full["batch"] % whole_number("world_size", world_size, 1, "a rank count such as 1, 2 or 4"):
        raise ValueError(f"batch {full['batch']} cannot be split evenly over {world_size!r} ranks; use a rank "
                         f"count that divides it (e.g. 1, 2, 4) or a larger batch")
    single = train_single(cfg)
    out = {"n_params": single["n_params"], "world_size": world_size,
           "single": {k: single[k] for k in ("optimizer_state_bytes", "param_bytes", "losses")}}
    res = launch(train_worker, world_size, args=(tuple(modes), cfg), timeout=timeout)
    for mode in modes:
        out[mode] = {"optimizer_state_bytes": [r[mode]["optimizer_state_bytes"] for r in res],
                     "param_bytes": [r[mode]["param_bytes"] for r in res],
                     "losses": res[0][mode]["losses"],
                     "max_weight_diff": max_weight_diff(res[0][mode]["state_dict"], single["state_dict"])}
    return out
