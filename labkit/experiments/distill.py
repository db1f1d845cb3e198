"""The distillation experiment behind notebook 03: students cut from SmolLM2, recovered with KD vs CE.

`python -m labkit results distill` runs `make_results()` and writes data/results/distill.json; `bench()` prints
the headline figures; the notebook's live run, size table and widget helpers are here too.

The regime: **scarce data**. Each seed takes its own fixed slice of the training books (n_train_seqs × seq_len
tokens) and trains on it for many epochs, as Hinton et al. (2015) did with 3% of their speech data. Hard labels
(CE) let the student memorise the slice; the teacher's soft targets (KD, cached top-k + tail) say much more per
token. α and T are chosen, and early stopping is done, on the *test* books; the reported perplexity is the lab's
protocol on the *validation* books (lk.evaluate), which no choice looks at.
"""
from __future__ import annotations

import hashlib
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import distill as D
from ..checks import whole_number
from ..evaluate import HEADLINE_TOKENS, LIVE_TOKENS, gap_closed, perplexity
from ..memory import count_params, kv_cache_bytes
from ..repro import ChecksumError, cache_dir, read_verified_torch, write_verified_torch

TEACHER = "smollm2-135m"
SLICE_STRIDE = 65_536  # seed s trains on the slice starting at token s · SLICE_STRIDE of the training books


# ----------------------------------------------------------------------------------------------------------
# The teacher's targets, computed once per slice and cached (checksummed) under lk.cache_dir()

def _fingerprint(teacher) -> str:
    """A cheap identity for a teacher: its class, size and a checksum of a few weights."""
    h = hashlib.sha256()
    h.update(f"{type(teacher).__name__}:{count_params(teacher)}:{int(teacher.config.vocab_size)}".encode())
    for _, p in list(teacher.named_parameters())[:3]:
        h.update(p.detach().reshape(-1)[:4096].float().numpy().tobytes())
    return h.hexdigest()[:16]


def topk_cache_path(teacher, seqs: torch.Tensor, k: int) -> Path:
    """Where `cached_teacher_topk` keeps the top-k logits for these sequences (under lk.cache_dir())."""
    h = hashlib.sha256(seqs.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    return cache_dir() / "distill" / f"topk-{_fingerprint(teacher)}-{h}-k{int(k)}-tail.pt"


TOPK_KIND = "distill-teacher-topk"


def cached_teacher_topk(teacher, seqs: torch.Tensor, k: int = 32, batch_size: int = 4,
                        progress: bool = False) -> D.TopKLogits:
    """`teacher_topk`, computed once and cached under lk.cache_dir()/distill/ (never data/) with a sha256
    sidecar: a cache that is corrupted, truncated, edited or of another shape is rebuilt, never used."""
    k = whole_number("k", k, 1, "how many logits to keep per token, e.g. 32")
    path = topk_cache_path(teacher, seqs, k)
    if path.exists():
        try:
            d, _ = read_verified_torch(path, TOPK_KIND, fix="it is rebuilt")
            out = D.TopKLogits(d["values"], d["indices"], int(d["vocab_size"]), d["tail"],
                               tuple(float(t) for t in d["tail_temps"]))
            if (out.values.shape[:2] == (seqs.shape[0], seqs.shape[1] - 1) and out.k == k
                    and out.tail_temps == D.TAIL_TEMPERATURES):
                return out
        except (ChecksumError, KeyError, ValueError, RuntimeError):
            pass  # rebuilt below
    out = D.teacher_topk(teacher, seqs, k=k, batch_size=batch_size, progress=progress)
    write_verified_torch(path, {"values": out.values, "indices": out.indices, "vocab_size": out.vocab_size,
                                "tail": out.tail, "tail_temps": torch.tensor(out.tail_temps)},
                         TOPK_KIND, {"k": k, "tokens": int(seqs[:, :-1].numel())})
    return out


# ----------------------------------------------------------------------------------------------------------
# The experiment

@dataclass(frozen=True)
class Experiment:
    """Everything the stored experiment depends on; the notebook checks the stored copy equals this."""
    keep_layers: tuple = tuple(range(9)) + (28, 29)  # 11 of 30 layers: ≤ 50% of the teacher's bytes
    freeze_embedding: bool = True
    n_train_seqs: int = 8
    seq_len: int = 128
    top_k: int = 32
    train: D.TrainConfig = field(default_factory=lambda: D.TrainConfig(
        steps=32, batch_size=2, lr=3e-4, warmup=4, weight_decay=0.0, clip=1.0))
    seeds: tuple = (0, 1, 2)
    grid: tuple = ((1.0, 1.0), (1.0, 2.0))  # (α, T) tried on seed 0, chosen on the test books
    eval_every: int = 4  # steps between selection-split evaluations (one epoch of the slice)
    scratch_lr: float = 3e-3  # the from-scratch contrast (random weights learn faster at a higher rate)

    def __post_init__(self):
        if not isinstance(self.train, D.TrainConfig):
            raise TypeError("Experiment.train must be a distill.TrainConfig")


def run_name(alpha: float, temperature: float) -> str:
    return "ce" if alpha == 0 else f"kd_a{alpha:g}_T{temperature:g}"


def train_slice(tokenizer, exp: Experiment, seed: int) -> torch.Tensor:
    """The fixed training slice of one seed: [n_train_seqs, seq_len + 1] tokens of the training books."""
    from .. import data
    return D.make_sequences(data.tokens("train", tokenizer), exp.seq_len, exp.n_train_seqs,
                            offset=seed * SLICE_STRIDE)


def run_one(student, seqs, cfg: D.TrainConfig, targets, select_tokens, val_tokens, eval_every: int,
            progress=False) -> dict:
    """Train one student; curve on the selection split; validation ppl at the end and at its best evaluation."""
    best = {"ppl": math.inf, "state": None}

    def select(m):
        ppl = float(perplexity(m, select_tokens, max_tokens=SELECT_TOKENS))
        if ppl < best["ppl"]:
            best.update(ppl=ppl, state={k: v.detach().clone() for k, v in m.state_dict().items()})
        return ppl

    t0 = time.perf_counter()
    hist = D.train_student(student, seqs, cfg, targets if cfg.alpha > 0 else None, progress=progress,
                           eval_fn=select, eval_every=eval_every)
    best_step = int(min(hist["eval"], key=lambda e: e[1])[0])
    final = float(perplexity(student, val_tokens, max_tokens=HEADLINE_TOKENS))
    if best_step == cfg.steps:
        best_val = final
    else:
        kept = {k: v.clone() for k, v in student.state_dict().items()}
        student.load_state_dict(best["state"])
        best_val = float(perplexity(student, val_tokens, max_tokens=HEADLINE_TOKENS))
        student.load_state_dict(kept)
    return {"alpha": cfg.alpha, "temperature": cfg.temperature, "seed": cfg.seed,
            "loss": hist["loss"], "ce": hist["ce"],
            "select_ppl_curve": [[s, round(p, 3)] for s, p in hist["eval"]],
            "select_ppl": round(hist["eval"][-1][1], 3), "val_ppl": round(final, 3),
            "best_step": best_step, "best_val_ppl": round(best_val, 3),
            "weights_sha256": D.weights_sha256(student), "seconds": round(time.perf_counter() - t0, 1)}


def run_seed(teacher, tokenizer, exp: Experiment, seed: int, settings, select_tokens, val_tokens, log=print,
             student_fn=None, lr: float | None = None) -> dict:
    """One seed: its slice, the teacher's cached top-k targets, one student per (α, T) in `settings`."""
    seqs = train_slice(tokenizer, exp, seed)
    targets = cached_teacher_topk(teacher, seqs, k=exp.top_k)
    student_fn = student_fn or (lambda: D.make_depth_student(teacher, exp.keep_layers, exp.freeze_embedding))
    out = {}
    for alpha, temp in settings:
        cfg = D.TrainConfig(**{**asdict(exp.train), "alpha": alpha, "temperature": temp, "seed": seed,
                               **({"lr": lr} if lr else {})})
        r = run_one(student_fn(), seqs, cfg, targets, select_tokens, val_tokens, exp.eval_every)
        out[run_name(alpha, temp)] = r
        log(f"seed {seed} {run_name(alpha, temp)}: val ppl {r['val_ppl']:.1f} (best step {r['best_step']}: "
            f"{r['best_val_ppl']:.1f}), test-books curve {[p for _, p in r['select_ppl_curve']]} ({r['seconds']} s)")
    return out


def summarize(teacher_ppl: float, ce: list[float], kd: list[float], ce_best: list[float]) -> dict:
    """Means, spreads (max − min over seeds) and the log-perplexity gap closed (lk.evaluate.gap_closed)."""
    mean = statistics.fmean
    return {"teacher_ppl": round(teacher_ppl, 3), "seeds": len(ce),
            "ce_ppl": ce, "kd_ppl": kd, "ce_best_epoch_ppl": ce_best,
            "ce_ppl_mean": round(mean(ce), 3), "kd_ppl_mean": round(mean(kd), 3),
            "ce_ppl_spread": round(max(ce) - min(ce), 3), "kd_ppl_spread": round(max(kd) - min(kd), 3),
            "ce_best_epoch_ppl_mean": round(mean(ce_best), 3),
            "gap_closed_pct": round(100 * gap_closed(teacher_ppl, mean(ce), mean(kd)), 1),
            "gap_closed_vs_early_stopping_pct": round(100 * gap_closed(teacher_ppl, mean(ce_best), mean(kd)), 1),
            "gap_closed_per_seed_pct": [round(100 * gap_closed(teacher_ppl, c, k), 1) for c, k in zip(ce, kd)],
            "kd_better_every_seed": all(k < c for c, k in zip(ce, kd)),
            "kd_better_than_early_stopped_ce_every_seed": all(k < c for c, k in zip(ce_best, kd))}


SELECT_TOKENS = 512  # test-book tokens per selection evaluation (2 windows of the protocol)


def _worker(job: list, extras: tuple) -> dict:
    """Part of the stored experiment in its own process (one thread): `job` = [(seed, [(α, T), ...]), ...];
    extras: "teacher" (its perplexities), "init" (the cut student before training), "scratch" (the contrast)."""
    from .. import data
    from ..models import load_model
    from ..repro import seed_everything

    seed_everything(0)
    torch.set_num_threads(1)   # this worker's own process
    exp = Experiment()
    teacher, tok = load_model(TEACHER)
    val, select = data.tokens("validation", tok), data.tokens("test", tok)
    lines = []
    out = {"runs": {}}
    for seed, settings in job:
        out["runs"][seed] = run_seed(teacher, tok, exp, seed, settings, select, val, log=lines.append)
    if "teacher" in extras:
        out["teacher_ppl"] = float(perplexity(teacher, val, max_tokens=HEADLINE_TOKENS))
        out["teacher_select"] = float(perplexity(teacher, select, max_tokens=SELECT_TOKENS))
    if "init" in extras:
        probe = D.make_depth_student(teacher, exp.keep_layers, exp.freeze_embedding)
        out["init_ppl"] = float(perplexity(probe, val, max_tokens=HEADLINE_TOKENS))
    if "scratch" in extras:
        out["scratch"] = run_seed(teacher, tok, exp, exp.seeds[0], ((0.0, 1.0),) + exp.grid, select, val,
                                  log=lines.append, student_fn=lambda: D.make_student(teacher.config),
                                  lr=exp.scratch_lr)
    out["log"] = lines
    return out


def make_results() -> dict:
    """The stored experiment: `python -m labkit results distill` writes data/results/distill.json.

    Five processes of one thread each share the runs (every seed runs CE and the whole (α, T) grid; α and T are
    chosen on seed 0's test-book perplexity only)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from ..memory import count_params, model_bytes
    from ..models import load_model

    t_all = time.perf_counter()
    exp = Experiment()
    s0, s1, s2 = exp.seeds
    ce_kd1, rest = [(0.0, 1.0), exp.grid[0]], list(exp.grid[1:])
    jobs = [([(s0, ce_kd1)], ()), ([(s0, rest)], ("scratch",)), ([(s1, ce_kd1)], ()), ([(s2, ce_kd1)], ()),
            ([(s1, rest), (s2, rest)], ("teacher", "init"))]
    with ProcessPoolExecutor(len(jobs), mp_context=mp.get_context("spawn")) as pool:
        parts = [f.result() for f in [pool.submit(_worker, j, e) for j, e in jobs]]
    lines = [line for p in parts for line in p["log"]]
    runs = {s: {} for s in exp.seeds}
    info = {}
    for p in parts:
        for s, r in p["runs"].items():
            runs[s].update(r)
        info.update({k: v for k, v in p.items() if k not in ("runs", "log")})
    teacher, _ = load_model(TEACHER)
    probe = D.make_depth_student(teacher, exp.keep_layers, exp.freeze_embedding)
    teacher_ppl = info["teacher_ppl"]
    seed0 = runs[s0]
    chosen = min((n for n in seed0 if n != "ce"), key=lambda n: seed0[n]["select_ppl"])
    lines.append(f"chosen on seed 0's test-book perplexity: {chosen}")
    seeds = {s: {"ce": runs[s]["ce"], "kd": runs[s][chosen]} for s in exp.seeds}
    ce = [seeds[s]["ce"]["val_ppl"] for s in exp.seeds]
    kd = [seeds[s]["kd"]["val_ppl"] for s in exp.seeds]
    ce_best = [seeds[s]["ce"]["best_val_ppl"] for s in exp.seeds]
    summary = summarize(teacher_ppl, ce, kd, ce_best)
    summary.update(student_bytes_over_teacher=round(model_bytes(probe) / model_bytes(teacher), 4),
                   student_params=count_params(probe), init_ppl=round(info["init_ppl"], 1))
    wall = round(time.perf_counter() - t_all)
    lines += [f"summary: {summary}", f"total {wall} s"]
    print("\n".join(lines), flush=True)
    scratch_student = D.make_student(teacher.config)
    return {
        "command": "python -m labkit results distill", "config": _jsonable(asdict(exp)),
        "teacher": {"name": TEACHER, "val_ppl": round(teacher_ppl, 3), "select_ppl": round(info["teacher_select"], 3),
                    "params": count_params(teacher), "bytes": model_bytes(teacher)},
        "eval": {"val_tokens": HEADLINE_TOKENS, "select_tokens": SELECT_TOKENS, "select_split": "test"},
        "chosen": {"run": chosen, "alpha": seed0[chosen]["alpha"], "temperature": seed0[chosen]["temperature"]},
        "grid_seed0": seed0, "grid": {str(s): runs[s] for s in exp.seeds},
        "seeds": {str(s): v for s, v in seeds.items()},
        "scratch": {"runs": info["scratch"], "params": count_params(scratch_student),
                    "bytes": model_bytes(scratch_student)},
        "depth": {**summary, "bytes": model_bytes(probe)},
        "n_train_tokens": exp.n_train_seqs * exp.seq_len,
        "wall_s": wall, "log": lines, "torch": torch.__version__,
    }


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


# ---- the notebook's helpers -------------------------------------------------------------------------------

def live_run(teacher, tokenizer, results: dict, steps: int = 5) -> dict:
    """The first `steps` steps of seed 0's CE and chosen KD runs, recomputed now (same slice, schedule, seed)."""
    exp = Experiment()
    seqs = train_slice(tokenizer, exp, exp.seeds[0])
    targets = cached_teacher_topk(teacher, seqs, k=exp.top_k)
    c = results["chosen"]
    out = {}
    for name, (alpha, temp) in {"ce": (0.0, 1.0), "kd": (c["alpha"], c["temperature"])}.items():
        cfg = D.TrainConfig(**{**asdict(exp.train), "alpha": alpha, "temperature": temp, "seed": exp.seeds[0]})
        student = D.make_depth_student(teacher, exp.keep_layers, exp.freeze_embedding)
        out[name] = D.train_student(student, seqs, cfg, targets if alpha > 0 else None, progress=False,
                                    stop_at=steps)
    return out


def width_student(teacher, max_fraction: float = 0.5):
    """SmolLM2 with MLP neurons removed (lk.prune.prune_mlp_neurons_) until its bytes are ≤ max_fraction."""
    import copy
    from ..prune import prune_mlp_neurons_
    cfg = teacher.config
    per_neuron = 3 * cfg.hidden_size * cfg.num_hidden_layers  # gate row, up row, down column in every layer
    from ..memory import count_params
    need = count_params(teacher) * (1 - max_fraction)
    n_remove = math.ceil(need / per_neuron)
    student = copy.deepcopy(teacher)
    prune_mlp_neurons_(student, n_remove / cfg.intermediate_size)
    return student.eval()


def tokens_per_second(model, tokens: torch.Tensor, batch: int = 1, seq_len: int = 128) -> float:
    """Forward-pass throughput over a [batch, seq_len] slice of tokens on one thread (lk.repro.time_call)."""
    from ..repro import time_call
    ids = tokens[: batch * seq_len].reshape(batch, seq_len)
    with torch.no_grad():
        return batch * seq_len / time_call(lambda: model(input_ids=ids), min_run_time=0.2, n_threads=1)


def size_table(models: dict, tokens: torch.Tensor, speed: bool = True) -> dict:
    """Per model: parameters, fp32 bytes and KV bytes/token — estimated from the config and measured — and
    forward tokens/s measured on one thread (estimate: the teacher's speed × its parameters / the model's)."""
    from ..memory import count_params, estimate_param_bytes, estimate_params, kv_bytes_per_token, model_bytes
    rows = {}
    for name, m in models.items():
        rows[name] = {"params_est": estimate_params(m.config)["total"], "params": count_params(m),
                      "bytes_est": estimate_param_bytes(estimate_params(m.config)["total"]),
                      "bytes": model_bytes(m), "kv_est": kv_bytes_per_token(m.config),
                      "kv": kv_cache_bytes_measured(m, 16) // 16}
        if speed:
            rows[name]["tok_s"] = tokens_per_second(m, tokens)
    first = next(iter(rows.values()))
    for r in rows.values():
        r["bytes_over_teacher"] = r["bytes"] / first["bytes"]
        if speed:
            r["tok_s_est"] = first["tok_s"] * first["params"] / r["params"]
    return rows


def chart_points(results: dict) -> list[dict]:
    """The signature chart's points: teacher, from-scratch student and teacher-initialised students (CE, KD)."""
    d, sc = results["depth"], results["scratch"]
    c = results["chosen"]["run"]
    n = len(results["config"]["keep_layers"])
    mean = statistics.fmean
    return [
        {"bytes": results["teacher"]["bytes"], "quality": results["teacher"]["val_ppl"], "technique": "fp32",
         "label": "teacher SmolLM2-135M", "reference": True},
        {"bytes": sc["bytes"], "quality": sc["runs"]["ce"]["val_ppl"], "technique": "from scratch",
         "label": "from scratch, CE", "annotate": True},
        {"bytes": sc["bytes"], "quality": sc["runs"][c]["val_ppl"], "technique": "from scratch",
         "label": "from scratch, KD", "marker": "D", "annotate": True},
        {"bytes": d["bytes"], "quality": d["ce_ppl_mean"], "technique": "ce",
         "label": f"{n} layers, CE", "annotate": True},
        {"bytes": d["bytes"], "quality": d["ce_best_epoch_ppl_mean"], "technique": "ce early stopping",
         "label": f"{n} layers, CE best epoch", "annotate": True},
        {"bytes": d["bytes"], "quality": mean(d["kd_ppl"]), "technique": "kd", "label": f"{n} layers, KD"},
    ]


def nearest_run(results: dict, alpha: float, temperature: float) -> str:
    """The stored seed-0 run closest to (alpha, temperature); alpha = 0 is the CE run whatever T."""
    a, t = D.check_alpha(alpha), D.check_temperature(temperature)
    runs = results["grid_seed0"]
    return min(runs, key=lambda n: (abs(runs[n]["alpha"] - a),
                                    0.0 if runs[n]["alpha"] == 0 else abs(math.log(runs[n]["temperature"] / t))))


def bench() -> dict:
    """Headline figures: perplexities from the stored results; bytes, KV/token and tokens/s measured now."""
    from .. import data
    from ..models import load_model
    from ..repro import load_results

    res = load_results("distill")
    teacher, tok = load_model(TEACHER)
    exp = Experiment()
    depth = D.make_depth_student(teacher, exp.keep_layers, exp.freeze_embedding)
    rows = size_table({"teacher": teacher, "depth": depth, "width": width_student(teacher),
                       "scratch": D.make_student(teacher.config)}, data.tokens("validation", tok))
    keys = ("teacher_ppl", "ce_ppl_mean", "kd_ppl_mean", "ce_ppl_spread", "kd_ppl_spread", "seeds",
            "gap_closed_pct", "student_bytes_over_teacher", "ce_best_epoch_ppl_mean",
            "gap_closed_vs_early_stopping_pct", "kd_better_every_seed")
    sc = res["scratch"]["runs"]
    return {
        "teacher_ppl": res["teacher"]["val_ppl"], "chosen": res["chosen"]["run"],
        "students": {
            f"depth_{len(exp.keep_layers)}of30": {k: res["depth"][k] for k in keys},
            "scratch": {"ce_ppl": sc["ce"]["val_ppl"], "kd_ppl": sc[res["chosen"]["run"]]["val_ppl"], "seeds": 1,
                        "student_bytes_over_teacher": round(rows["scratch"]["bytes_over_teacher"], 4)},
        },
        "sizes": {name: {"params": r["params"], "bytes": r["bytes"], "kv_bytes_per_token": r["kv"],
                         "tokens_per_s": round(r["tok_s"], 1), "tokens_per_s_estimate": round(r["tok_s_est"], 1),
                         "estimates_match": r["params"] == r["params_est"] and r["kv"] == r["kv_est"]}
                  for name, r in rows.items()},
        "wall_s_results": res["wall_s"],
    }


# ----------------------------------------------------------------------------------------------------------
# The softened distribution of the widget, and the KV cache a student keeps

@torch.no_grad()
def softened_next_token(model, tokenizer, prompt: str, temperature: float = 1.0, top: int = 10) -> dict:
    """softmax(logits/T) of `model` for the token after `prompt`: its `top` tokens, probabilities, entropy (nats)."""
    t = D.check_temperature(temperature)
    top = whole_number("top", top, 1, "how many tokens to show, e.g. 10")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    logits = model(input_ids=ids).logits[0, -1].float()
    logp = torch.log_softmax(logits / t, dim=-1)
    p = logp.exp()
    top_p, top_i = p.topk(top)
    return {"temperature": t, "tokens": [tokenizer.decode([int(i)]) for i in top_i],
            "probs": [float(x) for x in top_p], "entropy": float(-(p * logp).sum()),
            "max_entropy": math.log(p.numel())}


@torch.no_grad()
def kv_cache_bytes_measured(model, seq_len: int = 64) -> int:
    """Bytes of the DynamicCache after a forward pass over `seq_len` tokens at batch 1 (lk.memory.kv_cache_bytes)."""
    return kv_cache_bytes(model(input_ids=torch.zeros(1, seq_len, dtype=torch.long), use_cache=True).past_key_values)
