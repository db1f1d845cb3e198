"""ipywidgets builders: sliders over pure labkit functions that redraw a chart.

Each lesson appends its own block below. Widgets never compute more than the function they wrap.
"""
from __future__ import annotations


def interact_chart(draw, **controls):
    """ipywidgets.interact over draw(**values) -> Axes, with plt.show() so the chart redraws in place.
    Every control shows its whole description (description_width 'initial', never "temperat…")."""
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from ipywidgets.widgets.widget_description import DescriptionStyle

    for control in controls.values():
        if isinstance(getattr(control, "style", None), DescriptionStyle):
            control.style.description_width = "initial"

    def _show(**values):
        draw(**values)
        plt.show()

    return w.interact(_show, **controls)


# --- memory pools and paged KV cache (notebook 05) ---

def serving_widget():
    """Block size and request-length distribution → utilisation, waste, sequences running and the block map."""
    import ipywidgets as w

    from . import plots, pool

    def draw(block_size, dist):
        return plots.serving_dashboard(pool.serving_comparison(block_size=block_size, dist=dist))

    return interact_chart(draw, block_size=w.SelectionSlider(options=[1, 2, 4, 8, 16, 32, 64, 128, 256], value=16,
                                                             description="block size"),
                          dist=w.Dropdown(options=list(pool.DISTRIBUTIONS), value="uniform", description="lengths"))



def kv_quant_widget(model, tokenizer):
    """Bits and group size of the KV cache → its bytes per token and its greedy agreement with fp32, as a point on
    the memory-against-quality chart (each setting computed once, on the button: about a second)."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from . import plots
    from .experiments import kvcache as kvx

    seen = {}

    def show(bits=8, group_size=64):
        key = (bits, group_size)
        if key not in seen:
            print(f"quantizing the KV cache to int{bits}, groups of {group_size}: scoring 4 × 64 greedy steps …")
            seen[key] = kvx.kv_quant_point(model, tokenizer, bits, group_size)
        ref = kvx.kv_quant_point(model, tokenizer, 32)
        pts = [ref] + [dict(p, annotate=k == key, marker="D" if k == key else "o") for k, p in seen.items()]
        plots.memory_quality(pts, memory="KV cache", quality="greedy agreement with fp32", higher_is_better=True,
                             title=f"int{bits} KV, groups of {group_size}: {seen[key]['bytes']:,} B/token, "
                                   f"agreement {seen[key]['quality']:.1%}")
        plt.show()

    style = {"description_width": "initial"}
    return w.interact_manual(show, bits=w.ToggleButtons(options=[8, 4], value=8, description="bits", style=style),
                             group_size=w.SelectionSlider(options=[8, 16, 32, 64], value=64,
                                                          description="group size (channels)", style=style))

# --- where the memory goes (notebook 00) ---

def footprint_widget(config, n_params: int):
    """Sliders for dtype, batch, context length and mode → the stacked memory estimate, redrawn."""
    import ipywidgets as w

    from . import footprint, plots

    def draw(dtype="fp32", batch=1, context=512, mode="generate"):
        keep = 1 if mode == "generate" else None  # generate asks for the last position's logits only
        chosen = footprint.estimate_footprint(config, n_params, dtype, batch, context, mode == "training step",
                                              logits_to_keep=keep)
        reference = footprint.estimate_footprint(config, n_params, "fp32", 1, 512, False, logits_to_keep=1)
        return plots.stacked_memory({f"{mode}\n{dtype}, {batch}×{context}": chosen,
                                     "reference\nfp32 generate 1×512": reference},
                                    title="Estimated memory by component")

    style = {"description_width": "initial"}
    return interact_chart(
        draw,
        dtype=w.Dropdown(options=["fp32", "bf16"], value="fp32", description="dtype", style=style),
        batch=w.IntSlider(value=1, min=1, max=64, description="batch", style=style),
        context=w.SelectionSlider(options=[2 ** k for k in range(6, 16)], value=512, description="context (tokens)",
                                  style=style),
        mode=w.ToggleButtons(options=["generate", "score every token", "training step"], value="generate",
                             description="mode", style=style))


# --- distillation (notebook 03) ---

def distill_temperature(model, tokenizer, prompt: str = "And God said, Let there be", top: int = 10):
    """Temperature slider → the model's softened next-token distribution for a prompt, with its entropy."""
    import ipywidgets as w

    from . import plots
    from .experiments.distill import softened_next_token

    def draw(temperature):
        return plots.distill_softened(softened_next_token(model, tokenizer, prompt, temperature, top=top))

    return interact_chart(draw, temperature=w.FloatSlider(value=1.0, min=0.25, max=8.0, step=0.25))


def distill_runs(results: dict):
    """α and T sliders over the stored seed-0 runs → that run's test-books curve beside CE's, and its point on the
    memory-vs-perplexity chart (lk.experiments.distill.nearest_run; stored runs only, nothing is trained). The
    sliders offer only the α and T of stored runs; at α = 0 (cross-entropy only) T does not enter the loss, so the
    T slider is greyed out."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from . import plots
    from .experiments.distill import chart_points, nearest_run

    runs = results["grid_seed0"]
    alphas = sorted({float(r["alpha"]) for r in runs.values()})
    temps = sorted({float(r["temperature"]) for r in runs.values() if r["alpha"] > 0}) or [1.0]
    style = {"description_width": "initial"}
    t_slider = w.SelectionSlider(options=temps, value=1.0 if 1.0 in temps else temps[0], description="temperature",
                                 style=style)

    def draw(alpha, temperature):
        name = nearest_run(results, alpha, temperature)
        t_slider.disabled = alpha == 0
        r = runs[name]
        how = "cross-entropy only: T does not enter the loss" if r["alpha"] == 0 else f"α = {r['alpha']:g}, T = {r['temperature']:g}"
        print(f"stored run {name!r} ({how}): validation perplexity {r['val_ppl']:.1f}")
        _, axes = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1, 1.3]})
        plots.distill_curves(runs, ["ce", name] if name != "ce" else ["ce"], teacher_ppl=results["teacher"]["select_ppl"],
                             ax=axes[0], title=f"seed 0, stored run: {name}")
        moved = {"bytes": results["depth"]["bytes"], "quality": r["val_ppl"], "marker": "X",
                 "technique": "ce" if name == "ce" else "kd", "label": f"seed 0: {name}", "annotate": True}
        return plots.memory_quality(chart_points(results) + [moved], memory="RAM", tokens=results["eval"]["val_tokens"],
                                    ax=axes[1], title="the chosen run on the memory chart")

    return interact_chart(draw, alpha=w.SelectionSlider(options=alphas, value=max(alphas), description="alpha",
                                                        style=style),
                          temperature=t_slider)


# --- pruning (notebook 01) ---

def prune_widget(model, tokenizer, eval_tokens, input_norms, max_tokens: int = 512):
    """Sparsity slider + method → the pruned model's perplexity against its bytes in the best storage format
    (every setting tried stays on the chart, with the frontier; the current one is the diamond), and a greedy
    sample beside the dense one (labkit.experiments.prune.prune_and_measure; the dense weights are restored after
    each move). 2:4 keeps 2 of every 4 weights, so its sparsity is 50% whatever the slider says: the slider is
    greyed out for it and a 2:4 setting is computed once."""
    import ipywidgets as w

    from . import plots
    from .evaluate import perplexity
    from .experiments.prune import prune_and_measure, sweep_config
    from .memory import model_bytes
    from .models import generate
    dense_ppl = perplexity(model, eval_tokens, max_tokens=max_tokens)
    dense_sample = generate(model, tokenizer, "In the beginning", 12)
    history = {}
    slider = w.FloatSlider(value=0.5, min=0.0, max=0.9, step=0.1, continuous_update=False)

    def draw(method="magnitude", sparsity=0.5):
        fixed = sweep_config(method).method == "nm"   # N:M: the pattern sets the sparsity, not the slider
        slider.disabled = fixed
        key = (method, None if fixed else round(float(sparsity), 4))
        if fixed:
            print(f"{method} keeps 2 of every 4 weights, so its sparsity is always 50%: the slider only moves "
                  "magnitude, magnitude_row and wanda", flush=True)
        if key not in history:  # each setting is computed once (a few seconds): say so while it runs
            to = "2 of every 4" if fixed else f"{sparsity:.0%}"
            print(f"pruning {method} to {to} and measuring perplexity on {max_tokens} tokens …", flush=True)
            history[key] = prune_and_measure(model, tokenizer, eval_tokens, method, sparsity, input_norms, max_tokens)
        r = history[key]
        print(f"dense : {dense_ppl} | In the beginning{dense_sample}")
        print(f"pruned: {r['perplexity']} | In the beginning{r['sample']}")
        return plots.prune_widget_chart(list(history.values()), dense_ppl, model_bytes(model), current=r)

    return interact_chart(draw, method=w.Dropdown(options=["magnitude", "magnitude_row", "wanda", "2:4", "2:4 wanda"],
                                                  value="magnitude"),
                          sparsity=slider)


# --- sparse storage (notebook 04) ---

def sparse_density_widget(weight, n: int = 1024, k: int = 64):
    """Sparsity slider → `weight` magnitude-pruned to it, stored as CSR/int32, bitmap and COO: its points
    (diamonds) move on the storage chart of notebook 04 §6 (bytes against relative error, beside every way of
    storing it at 50/70/90%, the frontier redrawn), and dense/CSR/BSR matmul times of an n×n matrix at that
    density (one thread)."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from . import plots
    from .experiments import sparse as xs

    background = xs.storage_points(weight)
    shape = "×".join(map(str, weight.shape))

    def draw(sparsity=0.8):
        live = [dict(p, marker="D", annotate=True, label=f"{p['format']} {sparsity:.0%} (slider)")
                for p in xs.pruned_points(weight, sparsity, ("csr32", "bitmap", "coo"))]
        fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1.7, 1]})
        plots.memory_quality([dict(p, annotate=False) if not p.get("reference") else p for p in background] + live,
                             memory="storage", quality="relative error", log_y=False, ax=a,
                             title=f"One {shape} weight: bytes against error")
        plots.sparse_density_report(xs.density_report(1 - sparsity, n=n, k=k), axes=(None, b))
        fig.tight_layout()
        return a

    return interact_chart(draw, sparsity=w.FloatSlider(value=0.8, min=0.0, max=0.99, step=0.01, readout_format=".2f",
                                                       description="sparsity (fraction pruned)",
                                                       continuous_update=False))


# --- quantization (notebook 02) ---

def quantize_widget(model, tokens, max_tokens: int = 256, fp32_ppl: float | None = None):
    """Bits, group size (0 = per channel), symmetric → the error histogram of one layer and the point (whole-model
    RAM, perplexity) on the signature chart beside fp32 and every setting tried, with their frontier
    (lk.experiments.quantize.explore). A setting is computed on the Run button (a status line says what runs) and
    kept: going back is instant."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from . import plots
    from . import quantize as Q
    from .evaluate import perplexity
    from .experiments import quantize as xq

    if fp32_ppl is None:
        fp32_ppl = perplexity(model, tokens, max_tokens=max_tokens)
    keep = Q.skip_tied(model)
    n_linear = sum(1 for fqn, m in model.named_modules() if fqn and keep(m, fqn))
    seen = {}

    def show(bits=4, group_size=64, symmetric=True):
        key = (bits, group_size, symmetric)
        if key not in seen:
            g = f"groups of {group_size}" if group_size else "per channel"
            print(f"quantizing {n_linear} Linears to int{bits}, {g}, {'symmetric' if symmetric else 'asymmetric'}; "
                  f"scoring {max_tokens} tokens … (a few seconds)", flush=True)
            seen[key] = xq.explore(model, tokens, bits, group_size, symmetric, max_tokens=max_tokens,
                                   fp32_ppl=fp32_ppl)
        print(f"{len(seen)} setting(s) computed so far (all on the chart); revisiting one is instant")
        plots.quant_dashboard(seen[key], list(seen.values()))
        plt.show()

    style = {"description_width": "initial"}
    return w.interact_manual(show, bits=w.Dropdown(options=[8, 4, 3, 2], value=4, description="bits", style=style),
                             group_size=w.Dropdown(options=[("per channel", 0), ("192", 192), ("64", 64), ("32", 32)],
                                                   value=64, description="group size", style=style),
                             symmetric=w.Checkbox(value=True, description="symmetric", style=style))


# --- other memory-saving designs (notebook 06) ---

def training_memory_widget(reference: dict | None = None):
    """Model, batch, sequence length, precision, checkpointing, ZeRO stage and ranks → the stacked per-rank
    estimate (lk.training.estimate_stack); `reference` = {"estimate": parts, "measured": bytes} adds the
    measured setting beside it."""
    import ipywidgets as w

    from . import memory, plots, training

    def draw(model, batch, seq_len, precision, checkpoint, zero_stage, ranks):
        cfg = training.MODEL_CONFIGS[model]
        parts = training.estimate_stack(memory.estimate_params(cfg)["total"], cfg, batch, seq_len, precision, checkpoint,
                                        zero_stage, ranks)
        columns = {f"{model}\n{precision}, {batch}×{seq_len}, ZeRO-{zero_stage} × {ranks}": parts}
        measured = None
        if reference:
            columns["measured step\nsmall Llama fp32 4×128"] = reference["estimate"]
            measured = {"measured step\nsmall Llama fp32 4×128": reference["measured"]}
        return plots.stacked_memory(columns, measured, title="Estimated bytes per rank")

    return interact_chart(
        draw,
        model=w.Dropdown(options=list(training.MODEL_CONFIGS), value="small Llama (measured)", description="model"),
        batch=w.IntSlider(value=4, min=1, max=32, description="batch"),
        seq_len=w.SelectionSlider(options=[64, 128, 256, 512, 1024, 2048], value=128, description="seq len"),
        precision=w.ToggleButtons(options=list(training.PRECISIONS), value="fp32", description="precision"),
        checkpoint=w.ToggleButtons(options=list(training.CHECKPOINTING), value="none", description="checkpoint"),
        zero_stage=w.IntSlider(value=0, min=0, max=3, description="ZeRO stage"),
        ranks=w.SelectionSlider(options=[1, 2, 4, 8], value=1, description="ranks"))


def checkpoint_widget(points: list[dict], measured: dict | None = None, cfg=None, batch: int = 4, seq_len: int = 128):
    """Checkpoint interval slider → that interval measured live, as a point (diamond) on notebook 06's memory-against-
    time chart beside `points` (its fp32, bf16 and checkpointing points), the frontier redrawn. A point is the
    weights and Adam state (12 bytes per parameter) + the step's peak, measured in a fresh process
    (lk.training.step_memory), against its step time ÷ fp32's, both timed in one run on one thread
    (lk.training.time_variants). Each interval is measured once (~10 s) and kept on the chart; `measured` maps
    intervals already measured to their point in `points` (they move onto the slider's track, nothing reruns)."""
    import ipywidgets as w

    from . import plots, training
    from .memory import estimate_params

    cfg = cfg or training.SMALL
    n = estimate_params(cfg)["total"]
    seen = dict(measured or {})
    background = [p for p in points if not any(p is q for q in seen.values())]

    def draw(every=4):
        if every not in seen:
            print(f"checkpointing every {every} layer(s): measuring one step's peak in a fresh process and timing it "
                  "against fp32 (about 10 s) …", flush=True)
            v = {"fp32": {"precision": "fp32", "checkpoint": "none"}, "k": {"precision": "fp32", "checkpoint": every}}
            peak = training.step_memory(batch, seq_len, cfg, fresh_each=False, variants={"k": v["k"]})["k"]
            secs = training.time_variants(v, cfg, batch, seq_len, repeats=2)
            seen[every] = {"bytes": 12 * n + peak["peak_bytes"], "quality": secs["k"] / secs["fp32"],
                           "technique": "checkpointing", "label": f"checkpoint every {every} (slider)"}
        print(f"every {every}: {seen[every]['bytes'] / 1e6:.1f} MB, {seen[every]['quality']:.2f}× fp32's step time")
        live = [dict(p, marker="D", annotate=k == every) for k, p in seen.items()]
        return plots.memory_quality(background + live, memory="training peak", quality="step time (× fp32)",
                                    log_y=False, title="Small Llama, one Adam step: checkpoint interval on the chart")

    layers = cfg.num_hidden_layers
    slider = w.IntSlider(value=4 if 4 in seen else 2, min=1, max=layers, description="checkpoint every k layers",
                         continuous_update=False)
    return interact_chart(draw, every=slider)


# --- capstone (notebook 07) ---

def capstone_budget_widget(results: dict):
    """Disk or RAM? + a budget slider (fraction of the fp32 bytes) → the best cached recipe that fits that kind of
    budget (lk.capstone.best_recipe), on the memory_quality chart of the same kind."""
    import ipywidgets as w

    from . import capstone, plots
    from .experiments.capstone import chart_points

    def draw(kind="disk", fraction=0.125):
        key = "bytes" if kind == "disk" else "ram_bytes"
        budget = int(fraction * results["fp32_bytes"])
        try:
            chosen = capstone.best_recipe(capstone.search_points(results), budget, key=key)
            print(f"{kind} budget {budget / 1e6:.1f} MB → {chosen['name']}: {chosen[key] / 1e6:.1f} MB {kind}, "
                  f"perplexity {chosen['ppl']:.2f}")
        except capstone.BudgetError as e:
            print(e)
        return plots.memory_quality(chart_points(results, kind), memory="disk" if kind == "disk" else "RAM",
                                    tokens=results["eval"]["max_tokens"], budget=budget,
                                    title=f"SmolLM2-135M recipes: {kind} bytes against perplexity")

    return interact_chart(draw, kind=w.ToggleButtons(options=["disk", "ram"], value="disk", description="budget of"),
                          fraction=w.FloatLogSlider(value=0.125, base=2, min=-6, max=0, step=0.25,
                                                    description="budget × fp32", readout_format=".3f",
                                                    continuous_update=False, style={"description_width": "initial"}))
