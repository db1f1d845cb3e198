"""Charts for the notebooks: matplotlib only; every function takes results and returns the Axes.

Plots never compute; the numbers come from labkit functions. Each lesson appends its own block below.
"""
from __future__ import annotations

import matplotlib

matplotlib.use(matplotlib.get_backend() if "inline" in matplotlib.get_backend() else "Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402

PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


def new_axes(ax=None, figsize=(6.4, 3.6)):
    """The given Axes, or a fresh figure's."""
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def _mb(x):
    return x / 1e6



# --- the lab's signature chart: memory against accuracy (every lesson) ---

# One colour per technique, the same in every notebook.
TECHNIQUE_COLORS = {
    "fp32": "#222222", "dense": "#222222", "reference": "#222222",
    "bf16": "#8C8C8C", "fp16": "#8C8C8C", "mixed precision": "#8C8C8C",
    "magnitude": "#4C72B0", "wanda": "#55A868", "sparsegpt": "#2E8B57", "2:4": "#64B5CD", "structured": "#1F3A93",
    "rtn": "#DD8452", "int8": "#DD8452", "int4": "#E8A33D", "int3": "#C0642B", "gptq": "#C44E52", "awq": "#8172B3",
    "smoothquant": "#B279A2", "torchao": "#937860",
    "kmeans": "#DA8BC3", "huffman": "#7F3C8D", "zstd": "#A5AA99", "deep compression": "#7F3C8D",
    "distillation": "#17BECF", "kd": "#17BECF", "ce": "#9EDAE5", "from scratch": "#BCBD22",
    "kv fp32": "#222222", "kv bf16": "#8C8C8C", "kv int8": "#DD8452", "kv int4": "#E8A33D", "gqa": "#4C72B0", "mha": "#C44E52",
    "mqa": "#55A868", "paged": "#55A868", "contiguous": "#C44E52",
    "checkpointing": "#55A868", "accumulation": "#64B5CD", "8-bit adam": "#DD8452", "4-bit adam": "#E8A33D",
    "ddp": "#937860", "zero": "#8172B3", "fsdp": "#B279A2",
    "csr": "#4C72B0", "coo": "#C44E52", "bitmap": "#55A868", "bsr": "#8172B3",
}
MEMORY_KINDS = ("disk", "RAM", "KV cache", "training peak", "storage")


def technique_color(technique: str) -> str:
    """The lab's colour for a technique (case-insensitive); an unknown one gets a stable colour of the palette."""
    key = str(technique).lower()
    if key in TECHNIQUE_COLORS:
        return TECHNIQUE_COLORS[key]
    import zlib
    return PALETTE[zlib.crc32(key.encode()) % len(PALETTE)]


def bytes_formatter(x, _pos=None) -> str:
    """Tick label for a byte count: 512 kB, 3 MB, 1.2 GB (decimal units, as everywhere in the lab)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= size:
            v = x / size
            return f"{v:.0f} {unit}" if v >= 10 or v == int(v) else f"{v:.1f} {unit}"
    return f"{x:.0f} B"


def _log_locator(lo: float, hi: float):
    """Major ticks of a log axis: 1 per decade over a wide range, 1-2-5 steps when it is short."""
    from matplotlib.ticker import LogLocator
    decades = max(hi, 1e-300) / max(lo, 1e-300)
    subs = (1.0,) if decades > 50 else (1.0, 2.0, 5.0) if decades > 4 else (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0)
    return LogLocator(base=10, subs=subs)


def log_bytes_axis(ax, axis: str = "x") -> None:
    """A log axis of bytes with readable kB/MB/GB labels on at least two ticks (1-2-5 steps when a decade is short)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter
    a = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    lo, hi = (ax.get_xlim() if axis == "x" else ax.get_ylim())
    a.set_major_locator(_log_locator(max(lo, 1), max(hi, 1)))
    a.set_major_formatter(FuncFormatter(bytes_formatter))
    a.set_minor_formatter(NullFormatter())


def plain_number(v, _pos=None) -> str:
    """Tick label without powers of ten: 20, 150, 1,000, 0.5."""
    return f"{v:,.0f}" if abs(v) >= 10 else f"{v:g}"


def log_axis(ax, axis: str = "y") -> None:
    """A log axis with plain-number labels (20, 50, 100 — not 2×10¹) on 1-2-5 steps when the range is short,
    and on evenly spaced ticks with enough decimals when it spans less than a factor of 2 (36.1, 36.2, …).
    Call it after the data is drawn (the steps follow the data's range)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter
    a = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    lo, hi = (ax.get_xlim() if axis == "x" else ax.get_ylim())
    if hi / max(lo, 1e-300) >= 2:
        a.set_major_locator(_log_locator(lo, hi))
        a.set_major_formatter(FuncFormatter(plain_number))
    else:
        loc = MaxNLocator(nbins=5)
        ticks = [t for t in loc.tick_values(lo, hi) if lo <= t <= hi]
        step = min((b - a_ for a_, b in zip(ticks, ticks[1:])), default=hi - lo) or 1.0
        import math
        digits = max(0, -math.floor(math.log10(step) + 1e-9))
        a.set_major_locator(loc)
        a.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:,.{digits}f}"))
    a.set_minor_formatter(NullFormatter())


def place_labels(ax, texts, points_px=(), pad: float = 2.0) -> int:
    """Move point labels (annotations with offset points) so they overlap neither each other, nor a marker, nor
    the axes' edge: each tries a few offsets around its point and keeps the first free one. Returns how many
    labels still overlap something (0 when every one found a free place)."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    dpi = fig.dpi / 72.0
    markers = [(x - 4 * dpi, y - 4 * dpi, x + 4 * dpi, y + 4 * dpi) for x, y in points_px]
    placed, clashes = [], 0
    offsets = [(6, 4, "left"), (6, -11, "left"), (-6, 4, "right"), (-6, -11, "right"), (6, 13, "left"),
               (-6, 13, "right"), (6, -20, "left"), (-6, -20, "right"), (0, 22, "center"), (0, -28, "center")]

    def box(t):
        b = t.get_window_extent(renderer)
        return (b.x0 - pad, b.y0 - pad, b.x1 + pad, b.y1 + pad)

    def hits(b, others):
        return any(b[0] < o[2] and o[0] < b[2] and b[1] < o[3] and o[1] < b[3] for o in others)

    def inside(b):
        return frame.x0 <= b[0] and b[2] <= frame.x1 and frame.y0 <= b[1] and b[3] <= frame.y1

    for t in texts:
        own = t.xy
        best = None
        for dx, dy, ha in offsets:
            t.set_position((dx, dy))
            t.set_horizontalalignment(ha)
            b = box(t)
            others = placed + [m for m in markers
                               if not (m[0] <= ax.transData.transform(own)[0] <= m[2]
                                       and m[1] <= ax.transData.transform(own)[1] <= m[3])]
            if inside(b) and not hits(b, others):
                best = b
                break
        if best is None:  # nothing free: back to the first place, counted
            t.set_position(offsets[0][:2])
            t.set_horizontalalignment("left")
            best = box(t)
            clashes += 1
        placed.append(best)
    return clashes


def pareto(points: list[dict], x: str = "bytes", y: str = "quality", higher_is_better: bool = False) -> list[dict]:
    """The points no other point beats on both axes (less memory and better quality), sorted by memory."""
    sign = -1 if higher_is_better else 1
    front, best = [], float("inf")
    for p in sorted(points, key=lambda p: (p[x], sign * p[y])):
        if sign * p[y] < best:
            front.append(p)
            best = sign * p[y]
    return front


def memory_quality(points: list[dict], memory: str = "RAM", quality: str = "perplexity", tokens: int | None = None,
                   higher_is_better: bool = False, log_y: bool | None = None, budget: float | None = None,
                   title: str = "", ax=None, annotate: bool = True, legend: str = "outside"):
    """The lab's signature chart: memory (log x, kB/MB/GB) against quality, one marker per point.

    points: dicts with "bytes" (the memory of `memory` kind: disk, RAM, KV cache, training peak, storage),
    "quality" (perplexity by default — pass `tokens` to name the protocol's budget), "technique" (sets the
    colour, the same in every notebook) and "label"; optional "reference": True (the fp32/dense/teacher point,
    drawn as a black star) and "marker". The Pareto frontier (less memory and better quality) is drawn as a
    staircase. Labels are moved off each other and off the markers (place_labels). Returns the Axes."""
    if not points:
        raise ValueError("memory_quality needs at least one point (dicts with 'bytes', 'quality', 'technique')")
    for p in points:
        missing = {"bytes", "quality"} - set(p)
        if missing:
            raise ValueError(f"point {p.get('label', p)!r} lacks {sorted(missing)}")
    ax = new_axes(ax, figsize=(7.2, 4.2))
    seen = set()
    for p in points:
        tech = p.get("technique", p.get("label", "?"))
        ref = p.get("reference", False)
        kw = dict(marker="*" if ref else p.get("marker", "o"), s=180 if ref else 46, zorder=5 if ref else 3,
                  color="#222222" if ref else technique_color(tech), edgecolors="white", linewidths=0.6)
        lab = ("reference: " + str(p.get("label", tech))) if ref else tech
        ax.scatter([p["bytes"]], [p["quality"]], label=None if lab in seen else lab, **kw)
        seen.add(lab)
    front = pareto(points, "bytes", "quality", higher_is_better)
    if len(front) > 1:
        fx, fy = [p["bytes"] for p in front], [p["quality"] for p in front]
        ax.step(fx, fy, where="post", color="k", lw=1.0, alpha=0.6, zorder=2, label="Pareto frontier")
    xs = [p["bytes"] for p in points]
    lo, hi = min(xs), max(xs)
    ax.set_xlim(lo / 1.5, hi * 1.5)
    log_bytes_axis(ax, "x")
    ys = [p["quality"] for p in points]
    if log_y is None:
        log_y = (not higher_is_better) and min(ys) > 0 and max(ys) / min(ys) > 20
    ax.margins(y=0.08)
    if log_y:
        log_axis(ax, "y")
    if budget:
        ax.axvline(budget, color=PALETTE[3], ls="--", lw=1, label=f"budget {bytes_formatter(budget)}")
    if annotate:
        on_front = {id(p) for p in front}
        texts = [ax.annotate(str(p["label"]), (p["bytes"], p["quality"]), fontsize=7, xytext=(6, 4),
                             textcoords="offset points", zorder=6,
                             bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.7))
                 for p in points
                 if p.get("label") and (id(p) in on_front or p.get("reference") or p.get("annotate"))]
        if texts:
            ax.figure.canvas.draw()  # the scales and text sizes are final only after a draw
            place_labels(ax, texts, ax.transData.transform([(p["bytes"], p["quality"]) for p in points]))
    kind = memory if memory in MEMORY_KINDS else memory
    ax.set_xlabel(f"memory: {kind} (bytes, log scale)")
    qname = quality
    if quality == "perplexity" and tokens:
        from .evaluate import ppl_label
        qname = f"perplexity ({ppl_label(tokens)}, held-out)"
    ax.set_ylabel(qname + (" ↑ better" if higher_is_better else " ↓ better"))
    ax.set_title(title or f"Memory ({kind}) against {quality}")
    ax.grid(True, which="major", alpha=0.3)
    if legend == "outside":
        ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False)
    elif legend:
        ax.legend(fontsize=7.5, loc=legend)
    return ax


# --- where the memory goes (notebook 00) ---

def bytes_bars(parts: dict[str, float], title: str = "", ax=None, unit: str = "MB"):
    """Horizontal bars of bytes by part (e.g. from lk.memory.bytes_by_module)."""
    ax = new_axes(ax)
    names = list(parts)
    vals = [_mb(parts[k]) for k in names]
    ax.barh(names, vals, color=PALETTE[: len(names)])
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
    ax.set_xlabel(unit)
    ax.set_title(title)
    ax.invert_yaxis()
    return ax


def stacked_memory(columns: dict[str, dict[str, float]], measured: dict[str, float] | None = None,
                   title: str = "", ax=None):
    """Stacked bars: one column per scenario, one colour per component (bytes); measured totals as dots."""
    ax = new_axes(ax)
    labels = list(columns)
    parts = list(dict.fromkeys(k for col in columns.values() for k in col))
    bottom = [0.0] * len(labels)
    for i, part in enumerate(parts):
        vals = [_mb(columns[c].get(part, 0)) for c in labels]
        ax.bar(labels, vals, bottom=bottom, label=part, color=PALETTE[i % len(PALETTE)])
        bottom = [b + v for b, v in zip(bottom, vals)]
    if measured:
        xs = [labels.index(k) for k in measured if k in labels]
        ax.scatter(xs, [_mb(measured[labels[x]]) for x in xs], color="black", zorder=3, marker="D",
                   label="measured")
    ax.set_ylabel("MB")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside, never on the bars
    return ax


def estimate_vs_measured(xs, estimated, measured, xlabel: str, title: str = "", ax=None):
    """A line for the estimate and dots for the measurements, against one variable (bytes → MB)."""
    ax = new_axes(ax)
    ax.plot(xs, [_mb(v) for v in estimated], "-", color=PALETTE[0], label="estimate")
    ax.plot(xs, [_mb(v) for v in measured], "o", color=PALETTE[1], label="measured")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("MB")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", frameon=False)  # the curves rise to the right: the corner stays free
    return ax


# --- memory pools and paged KV cache (notebook 05) ---

def address_space(maps: dict, title: str = "", ax=None):
    """One strip per allocator: each byte coloured by the buffer that owns it, free bytes white.

    maps: {label: 1-D array of owner ids (−1 = free)}, e.g. VariableAllocator.address_map().
    """
    import numpy as np
    from matplotlib.colors import ListedColormap
    ax = new_axes(ax, figsize=(7.5, 0.55 * len(maps) + 0.9))
    cmap = ListedColormap(["white"] + PALETTE)
    for row, (label, m) in enumerate(maps.items()):
        m = np.asarray(m)
        img = np.where(m < 0, 0, 1 + (m % len(PALETTE)))[None, :]
        ax.imshow(img, cmap=cmap, vmin=0, vmax=len(PALETTE), aspect="auto", interpolation="nearest",
                  extent=(0, len(m), row + 0.9, row + 0.1))
    ax.set_ylim(len(maps), 0)
    ax.set_yticks([r + 0.5 for r in range(len(maps))], list(maps))
    ax.set_xlabel("address (bytes)")
    ax.set_title(title)
    return ax


def slot_map(slots, width: int = 128, title: str = "", ax=None):
    """A KV-cache budget drawn as rows of token slots: free, reserved but empty (waste), holding a real token."""
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    ax = new_axes(ax, figsize=(5, 3))
    s = np.asarray(slots)
    rows = -(-len(s) // width)
    img = np.full(rows * width, 0, dtype=np.int8)
    img[: len(s)] = s
    colors = ["#EEEEEE", PALETTE[3], PALETTE[2]]
    ax.imshow(img.reshape(rows, width), cmap=ListedColormap(colors), vmin=0, vmax=2, aspect="auto",
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    ax.legend(handles=[Patch(color=c, label=l) for c, l in zip(colors, ["free", "reserved, empty", "token"])],
              fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, frameon=False)  # below the map
    return ax


def serving_bars(comparison: dict, ax=None):
    """Contiguous vs paged: utilisation, sequences running at once, tokens per step (one simulation each)."""
    import numpy as np
    ax = new_axes(ax, figsize=(5, 3))
    metrics = [("utilisation", "utilisation ×10"), ("mean_running", "seqs running"), ("throughput", "tokens/step")]
    x = np.arange(len(metrics))
    for i, pol in enumerate(("contiguous", "paged")):
        vals = [comparison[pol][k] * (10 if k == "utilisation" else 1) for k, _ in metrics]
        ax.bar(x + (i - 0.5) * 0.38, vals, 0.38, label=pol, color=PALETTE[i])
        for xi, v in zip(x, vals):
            ax.text(xi + (i - 0.5) * 0.38, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [m for _, m in metrics])
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)           # headroom: the legend sits above the bars
    ax.legend(fontsize=8, loc="upper left", ncol=2, frameon=False)
    return ax


def serving_dashboard(comparison: dict, width: int = 128):
    """Bars plus the two slot maps at each policy's busiest step (for the block-size widget)."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    serving_bars(comparison, ax=axes[0])
    c, p = comparison["contiguous"], comparison["paged"]
    axes[0].set_title(f"block {p['block_size']}: waste {c['waste']:.0%} → {p['waste']:.0%}", fontsize=9)
    slot_map(c["slot_map"], width, f"contiguous (max-length reservations), {c['peak_running']} seqs", ax=axes[1])
    slot_map(p["slot_map"], width, f"paged, {p['peak_running']} seqs", ax=axes[2])
    fig.tight_layout()
    return axes


def waste_vs_block_size(runs: list, anchors: dict | None = None, ax=None):
    """Waste of paging against block size, one line per length distribution; contiguous as dashed lines;
    published ranges (e.g. vLLM's 60–80 % for existing servers, < 4 % paged) as shaded bands."""
    ax = new_axes(ax)
    dists = list(dict.fromkeys(r["dist"] for r in runs))
    for i, d in enumerate(dists):
        paged = sorted((r["block_size"], r["waste"]) for r in runs if r["dist"] == d and r["policy"] == "paged")
        ax.plot([b for b, _ in paged], [100 * w for _, w in paged], "o-", color=PALETTE[i], label=f"paged, {d}")
        cont = [r["waste"] for r in runs if r["dist"] == d and r["policy"] == "contiguous"]
        if cont:
            ax.axhline(100 * cont[0], ls="--", color=PALETTE[i], lw=1, label=f"contiguous, {d}")
    for label, (lo, hi) in (anchors or {}).items():
        ax.axhspan(100 * lo, 100 * hi, color="grey", alpha=0.15)
        ax.text(1, 100 * hi, label, fontsize=7, va="bottom")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size (tokens)")
    ax.set_ylabel("waste (% of reserved slots)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False)
    return ax


def copied_bytes_per_step(copies: dict, per_token: int | None = None, ax=None):
    """Bytes a KV cache copies in one decode step against the context length: the gathering cache (a contiguous
    copy of every cached token, every layer) vs attention that reads the blocks in place (the new token only)."""
    ax = new_axes(ax)
    for i, (mode, label) in enumerate((("gather", "gather: contiguous copy per step"),
                                       ("paged", "in place: the new token only"))):
        xs = sorted(int(k) for k in copies[mode])
        ys = [copies[mode][k] if k in copies[mode] else copies[mode][str(k)] for k in xs]
        ax.plot(xs, ys, "o-", color=PALETTE[3 if mode == "gather" else 2], label=label)
        for x, y in zip(xs, ys):
            ax.annotate(bytes_formatter(y), (x, y), fontsize=7, xytext=(0, 5), textcoords="offset points",
                        ha="center")
    if per_token:
        ax.axhline(per_token, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:,}" for x in xs])
    ax.set_ylim(min(ys) / 3, max(max(copies["gather"].values()) * 4, min(ys) * 10))
    log_bytes_axis(ax, "y")
    ax.set_xlabel("tokens already cached (context)")
    ax.set_ylabel("bytes copied per decode step")
    ax.set_title("Bytes a decode step copies (all layers, batch 1)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False)
    return ax


def kv_memory_quality(points: list[dict], layouts: dict | None = None, tokens: int | None = None,
                      budget_bytes: float = 1e9, seq_len: int = 1024, quality: str = "perplexity",
                      higher_is_better: bool = False):
    """Notebook 05's signature chart: KV-cache bytes per token against quality (memory_quality), with the bytes
    other attention layouts would need marked as dotted lines (`layouts` {label: bytes per token}); beside it
    the serving view: how many sequences of `seq_len` tokens fit in `budget_bytes` of KV cache at each point."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.45, 1]})
    ax = memory_quality(points, memory="KV cache", quality=quality, tokens=tokens, higher_is_better=higher_is_better,
                        ax=axes[0], title="KV cache per token against quality", legend=False)
    xs = [p["bytes"] for p in points] + list((layouts or {}).values())
    ax.set_xlim(min(xs) / 1.5, max(xs) * 1.5)
    log_bytes_axis(ax, "x")
    for label, b in (layouts or {}).items():
        ax.axvline(b, color=technique_color(label.split()[0]), ls=":", lw=1.2)
        ax.text(b, 0.55, label, rotation=90, va="center", ha="right", fontsize=7, color="#444444",
                transform=ax.get_xaxis_transform(), bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8))
    ax.set_xlabel("KV cache per token (bytes, log scale)")
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(0.0, -0.16), ncol=3, frameon=False)
    fits = [int(budget_bytes // (p["bytes"] * seq_len)) for p in points]
    names = [str(p.get("label", p.get("technique"))) for p in points]
    bars = axes[1].barh(names, fits, color=[("#222222" if p.get("reference") else technique_color(p.get("technique", "")))
                                            for p in points])
    axes[1].bar_label(bars, [f"{f:,}" for f in fits], fontsize=8, padding=3)
    axes[1].invert_yaxis()
    axes[1].set_xlim(0, max(fits) * 1.2)
    axes[1].set_xlabel(f"sequences of {seq_len:,} tokens in {bytes_formatter(budget_bytes)} of KV cache")
    axes[1].set_title("Serving view: sequences that fit")
    fig.tight_layout()
    return axes


# --- distillation (notebook 03) ---

def distill_softened(dist: dict, ax=None):
    """Bars of a softened next-token distribution (labkit.experiments.distill.softened_next_token), entropy as title."""
    ax = new_axes(ax, figsize=(6.4, 3.0))
    labels = [repr(t) for t in dist["tokens"]]
    ax.bar(range(len(labels)), dist["probs"], color=PALETTE[0])
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("probability")
    ax.set_title(f"T = {dist['temperature']:g}: entropy {dist['entropy']:.2f} nats "
                 f"(uniform: {dist['max_entropy']:.2f})")
    return ax


def distill_curves(runs: dict, names=None, key: str = "select_ppl_curve", teacher_ppl: float | None = None,
                   ax=None, title: str = "", ylabel: str = "perplexity, test books (selection split)"):
    """Perplexity against step for stored/live runs ({name: {key: [[step, ppl], ...]}}), log scale."""
    ax = new_axes(ax)
    for i, name in enumerate(names or list(runs)):
        pts = runs[name][key]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=PALETTE[i % len(PALETTE)], label=name,
                markersize=3)
    if teacher_ppl is not None:
        ax.axhline(teacher_ppl, color="black", ls="--", lw=1, label="teacher")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return ax


def distill_loss_curves(runs: dict, names=None, series: str = "ce", ax=None, title: str = ""):
    """Per-step training curves (hard-label cross-entropy by default) of stored/live runs."""
    ax = new_axes(ax)
    for i, name in enumerate(names or list(runs)):
        ys = runs[name][series]
        ax.plot(range(1, len(ys) + 1), ys, color=PALETTE[i % len(PALETTE)], label=name, lw=1)
    ax.set_xlabel("training step")
    ax.set_ylabel({"ce": "training cross-entropy (nats)", "loss": "training loss"}.get(series, series))
    ax.set_title(title)
    ax.legend(fontsize=8)
    return ax


# --- pruning (notebook 01) ---

def prune_sweep(results: dict, live: dict | None = None, ax=None, title: str = "SmolLM2-135M: perplexity vs sparsity"):
    """Perplexity (log scale) against sparsity: one line per unstructured method, 2:4 as markers at 50%, the
    dense baseline dashed; `live` {label: (sparsity, ppl)} adds points recomputed in the notebook."""
    ax = new_axes(ax)
    dense = results["dense"]
    for i, (method, pts) in enumerate(results["sweep"].items()):
        xs = [0.0] + [float(s) for s in pts]
        ax.plot(xs, [dense] + list(pts.values()), "o-", ms=4, color=PALETTE[i], label=method)
    for j, (score, v) in enumerate(results.get("nm_2_4", {}).items()):
        ax.plot([0.5], [v], marker="s^v"[j % 3], ms=8, ls="none", color=PALETTE[2 + j], label=f"2:4 {score}")
    for j, (label, v) in enumerate(results.get("at_50", {}).items()):   # single points at 50%
        ax.plot([0.5], [v], marker="Dph"[j % 3], ms=7, ls="none", color=PALETTE[5 + j], label=f"{label} 50%")
    for label, (x, y) in (live or {}).items():
        ax.plot([x], [y], marker="x", ms=10, mew=2, ls="none", color="black", label=label)
    ax.axhline(dense, ls="--", color="grey", lw=1, label=f"dense {dense:.1f}")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (fraction of decoder Linear weights set to zero)")
    ax.set_ylabel("perplexity (validation)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    return ax


def prune_widget_chart(results: list[dict], dense_ppl, dense_model_bytes: int, ax=None, current: dict | None = None):
    """The pruning widget's signature chart: each pruned setting tried (labkit.experiments.prune.prune_and_measure)
    at the whole model's RAM bytes with its pruned weights in their best storage format, against perplexity on
    the widget's budget; the dense model as the reference; `current` (one of `results`) as a labelled diamond."""
    tokens = getattr(dense_ppl, "tokens", None)
    pts = [{"bytes": dense_model_bytes, "quality": float(dense_ppl), "technique": "dense", "label": "dense",
            "reference": True}]
    for r in results:
        tech = "2:4" if r["method"].startswith("2:4") else r["method"].split("_")[0]
        now = {"marker": "D", "annotate": True} if r is current else {}
        pts.append({"bytes": dense_model_bytes - r["dense_bytes"] + r["best_bytes"], "quality": float(r["perplexity"]),
                    "technique": tech, "label": f"{r['method']} {r['sparsity']:.0%}", **now})
    return memory_quality(pts, memory="RAM", tokens=tokens, ax=ax, log_y=True,
                          title="pruned model in its best storage format")


# --- sparse storage and compression (notebook 04) ---

def sparse_break_even(densities, storage: dict, sweep: dict, ax=None,
                      title: str = "Relative to dense: bytes (lines) and matmul time (markers)"):
    """Storage ratio per format (lines, from lk.sparse.storage_curves) and measured time ratio of CSR/BSR
    matmul (markers, from lk.sparse.speed_sweep) against density; below 1 = better than dense."""
    ax = new_axes(ax, figsize=(7.2, 4.2))
    for i, (fmt, vals) in enumerate(storage.items()):
        ax.plot(densities, vals, "-", color=PALETTE[i % len(PALETTE)], label=f"bytes: {fmt}")
    ds = [r["density"] for r in sweep["rows"]]
    ax.plot(ds, [r["csr_ratio"] for r in sweep["rows"]], "o--", color="black", label="time: CSR @ X")
    ax.plot(ds, [r["bsr_ratio"] for r in sweep["rows"]], "s:", color="gray", label="time: BSR 16×16 @ X")
    ax.axhline(1.0, color="red", lw=0.8)
    for key, style in (("csr_crossover", "--"), ("bsr_crossover", ":")):
        x = sweep.get(key)
        if x == x and x is not None:  # not nan
            ax.axvline(x, color="black", ls=style, lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("density (fraction of nonzeros)")
    ax.set_ylabel("÷ dense")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    return ax


def sparse_density_report(report: dict, axes=None):
    """Two panels for lk.experiments.sparse.density_report: bytes per format, and dense/CSR/BSR matmul
    milliseconds. `axes` = (bytes axes, time axes); either may be None to leave that panel out."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    if axes[0] is not None:
        b = {k: v for k, v in report["bytes"].items() if v is not None}
        axes[0].bar(list(b), [_mb(v) for v in b.values()], color=PALETTE[: len(b)])
        axes[0].set_ylabel("MB")
        axes[0].set_title(f"bytes at density {report['density']:.0%}", fontsize=10)
        axes[0].tick_params(axis="x", labelsize=8)
    if axes[1] is not None:
        s = report["seconds"]
        axes[1].bar(list(s), [v * 1e3 for v in s.values()], color=PALETTE[: len(s)])
        axes[1].set_ylabel("ms (one thread)")
        axes[1].set_title(f"W @ X at density {report['density']:.0%}, W {report['n']}² fp32", fontsize=10)
    return axes


def bits_per_weight(comparison: dict, ax=None, title: str = "Bits per weight"):
    """Bars of bits per weight (from lk.compress.compare) with the entropy as a line."""
    ax = new_axes(ax)
    names = [k for k in comparison if k != "entropy"]
    ax.bar(names, [comparison[k] for k in names], color=PALETTE[: len(names)])
    ax.axhline(comparison["entropy"], color="red", ls="--", lw=1, label=f"entropy H = {comparison['entropy']:.2f}")
    for i, k in enumerate(names):
        ax.text(i, comparison[k], f"{comparison[k]:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("bits per weight")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return ax


# --- quantization (notebook 02) ---

def weight_formats(abs_values, formats: list[dict], title: str = "", ax=None):
    """Histogram of log10|w| with each float format's smallest normal and largest value marked."""
    import numpy as np
    ax = new_axes(ax)
    v = np.asarray(abs_values, dtype=np.float64)
    v = v[v > 0]
    ax.hist(np.log10(v), bins=80, color=PALETTE[0], alpha=0.8)
    for i, f in enumerate(formats):
        c = PALETTE[(i + 1) % len(PALETTE)]
        ax.axvline(np.log10(f["smallest_normal"]), color=c, ls="--", lw=1, label=f"{f['name']} smallest normal")
        if f["max"] < 1e6:
            ax.axvline(np.log10(f["max"]), color=c, ls=":", lw=1, label=f"{f['name']} max")
    ax.set_xlabel("log10 |weight|")
    ax.set_ylabel("count")
    ax.set_title(title or "weights against each format's range")
    ax.legend(fontsize=7)
    return ax


def error_vs_bits(rows: list[dict], title: str = "", ax=None):
    """Relative weight error (log) against bits per weight, one line per granularity (from layer_error_table)."""
    ax = new_axes(ax)
    for i, g in enumerate(dict.fromkeys(r["granularity"] for r in rows)):
        rs = sorted((r for r in rows if r["granularity"] == g), key=lambda r: r["bits_per_weight"])
        ax.plot([r["bits_per_weight"] for r in rs], [r["rel_fro"] for r in rs], "o-", color=PALETTE[i], label=g)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (scales included)")
    ax.set_ylabel("relative error ‖Ŵ−W‖/‖W‖")
    ax.set_title(title or "one layer: error against bits")
    ax.legend(fontsize=8)
    return ax


def distinct_hist(hist: list[int], title: str = "", ax=None, color=None):
    """Bars: how many blocks of 32 weights hold k distinct values."""
    ax = new_axes(ax)
    ax.bar(range(len(hist)), hist, color=color or PALETTE[0])
    ax.axvline(16.5, color=PALETTE[3], ls="--", lw=1, label="16 = 2⁴ codes")
    ax.set_xlabel("distinct values in a block of 32 weights")
    ax.set_ylabel("blocks")
    ax.set_title(title or "distinct values per block of 32")
    ax.legend(fontsize=8)
    return ax


def _gran_label(p):
    if p.get("granularity") == "channel":
        return "per-channel"
    return f"g{p['group_size']}" + ("" if p.get("symmetric", True) else " asym")


def ppl_vs_bits(points: list[dict], title: str = "", ax=None):
    """Perplexity (log) against bits per weight, a line per granularity; fp32/bf16 as horizontal lines."""
    ax = new_axes(ax)
    base = {p["name"]: p["ppl"] for p in points if p["name"] in ("fp32", "bf16")}
    qs = [p for p in points if "bits" in p]
    for i, g in enumerate(dict.fromkeys(_gran_label(p) for p in qs)):
        ps = sorted((p for p in qs if _gran_label(p) == g), key=lambda p: p["bits_per_weight"])
        ax.plot([p["bits_per_weight"] for p in ps], [p["ppl"] for p in ps], "o-", color=PALETTE[i % 8], label=g)
    for k, ls in (("fp32", "-"), ("bf16", ":")):
        if k in base:
            ax.axhline(base[k], color="k", ls=ls, lw=1, label=f"{k} {base[k]:.1f}")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (scales included)")
    ax.set_ylabel("perplexity")
    ax.set_title(title or "SmolLM2-135M: perplexity against bits")
    ax.legend(fontsize=7, ncol=2)
    return ax


def memory_vs_accuracy(smol: list[dict], minilm: list[dict], minilm_fp32_bytes: float | None = None):
    """One figure: SmolLM2 model MB vs perplexity (left) and MiniLM Linear MB vs cosine to fp32 (right)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, g in enumerate(dict.fromkeys(_gran_label(p) for p in smol if "bits" in p)):
        ps = [p for p in smol if "bits" in p and _gran_label(p) == g]
        a.scatter([_mb(p["model_bytes"]) for p in ps], [p["ppl"] for p in ps], color=PALETTE[i % 8], label=g)
    for p in smol:
        if p["name"] in ("fp32", "bf16"):
            a.scatter([_mb(p["model_bytes"])], [p["ppl"]], color="k", marker="s")
            a.annotate(p["name"], (_mb(p["model_bytes"]), p["ppl"]), fontsize=8, xytext=(3, 2),
                       textcoords="offset points")
    a.set_yscale("log")
    a.set_xlabel("model bytes (MB; embedding/lm_head stays fp32)")
    a.set_ylabel("perplexity (lower is better)")
    a.set_title("SmolLM2-135M")
    a.legend(fontsize=7)
    for i, g in enumerate(dict.fromkeys(_gran_label(p) for p in minilm)):
        ps = [p for p in minilm if _gran_label(p) == g]
        b.scatter([_mb(p["linear_bytes"]) for p in ps], [p["mean"] for p in ps], color=PALETTE[i % 8], label=g)
    if minilm_fp32_bytes:
        b.scatter([_mb(minilm_fp32_bytes)], [1.0], color="k", marker="s")
        b.annotate("fp32", (_mb(minilm_fp32_bytes), 1.0), fontsize=8, xytext=(3, -10), textcoords="offset points")
    fig.tight_layout()
    # one "N-bit" label per bit width (at its per-channel point), placed off the other labels and markers
    for ax, pts, key, q in ((a, [p for p in smol if "bits" in p], "model_bytes", "ppl"), (b, minilm, "linear_bytes", "mean")):
        first = {}
        for p in pts:
            first.setdefault(p["bits"], p)
        texts = [ax.annotate(f"{bits}-bit", (_mb(p[key]), p[q]), fontsize=7, xytext=(6, 4), textcoords="offset points",
                             bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.7))
                 for bits, p in first.items()]
        fig.canvas.draw()
        place_labels(ax, texts, ax.transData.transform([(_mb(p[key]), p[q]) for p in pts]))
    b.set_xlabel("Linear weight bytes (MB)")
    b.set_ylabel("mean cosine to fp32 embeddings (higher is better)")
    b.set_title("MiniLM (never quantized before)")
    b.legend(fontsize=7)
    fig.tight_layout()
    return a, b


def feature_absmax(absmax, threshold: float = 6.0, title: str = "", ax=None):
    """Max |activation| per input feature of one layer, with the LLM.int8() outlier threshold."""
    import numpy as np
    ax = new_axes(ax)
    v = np.asarray(absmax)
    ax.bar(np.arange(len(v)), v, width=1.0, color=PALETTE[0])
    ax.axhline(threshold, color=PALETTE[3], ls="--", lw=1, label=f"threshold {threshold}")
    ax.axhline(float(np.median(v)), color="k", ls=":", lw=1, label=f"median {np.median(v):.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("input feature")
    ax.set_ylabel("max |x| over tokens")
    ax.set_title(title or "activation outlier features")
    ax.legend(fontsize=8)
    return ax


def bandwidth_bars(bw: dict, ax=None):
    """Achieved GB/s of weights read by each matrix-vector path against the read bandwidth of the same run
    (lk.experiments.quantize.bandwidth)."""
    ax = new_axes(ax, figsize=(8.5, 3.8))
    names = list(bw["paths"])
    vals = [bw["paths"][k]["gb_per_s"] for k in names]
    ax.barh(names, vals, color=[PALETTE[i % 8] for i in range(len(names))])
    ax.axvline(bw["read_gb_per_s"], color="k", ls="--", lw=1, label=f"read bandwidth {bw['read_gb_per_s']:.1f} GB/s")
    for i, k in enumerate(names):
        p = bw["paths"][k]
        ax.annotate(f"{p['achieved_speedup']:.2f}× (bound {p['bound_speedup']:.1f}×)", (vals[i], i), fontsize=8,
                    xytext=(3, -3), textcoords="offset points")
    ax.set_xlim(0, 1.45 * max(vals + [bw["read_gb_per_s"]]))
    ax.invert_yaxis()
    ax.set_xlabel("weight bytes read per second (GB/s)")
    ax.set_title(f"y = W·x, W = {bw['weight_mb_fp32']:.0f} MB in fp32, {bw['threads']} thread")
    ax.legend(fontsize=8, loc="lower right")
    return ax


def quant_dashboard(res: dict, history: list[dict] | None = None):
    """Two panels from lk.experiments.quantize.explore: the error histogram of one layer, and the signature chart
    (memory_quality: whole-model RAM against perplexity) with fp32, every setting in `history` (the settings tried
    so far; default: just `res`) and `res` drawn as a diamond, the Pareto frontier redrawn over all of them."""
    import numpy as np
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 3.9), gridspec_kw={"width_ratios": [1, 1.6]})
    e = np.asarray(res["errors"])
    a.hist(e, bins=60, color=PALETTE[0])
    a.axvline(-res["scale_max"] / 2, color=PALETTE[3], ls="--", lw=1, label="± max scale/2")
    a.axvline(res["scale_max"] / 2, color=PALETTE[3], ls="--", lw=1)
    a.set_title(f"{res['name']}: error of {res['layer'].split('.', 2)[-1]}", fontsize=9)
    a.set_xlabel("Ŵ − W")
    a.legend(fontsize=7)
    pts = [dict(bytes=res["fp32_model_bytes"], quality=res["fp32_ppl"], technique="fp32", label="fp32",
                reference=True)]
    for r in history or [res]:
        now = r is res or r["name"] == res["name"]
        pts.append(dict(bytes=r["model_bytes"], quality=r["ppl"], technique="rtn", annotate=now,
                        label=f"{r['name']} ({r['bits_per_weight']:.2f} b/w)", marker="D" if now else "o"))
    if not any(p["marker"] == "D" for p in pts[1:]):
        pts.append(dict(bytes=res["model_bytes"], quality=res["ppl"], technique="rtn", annotate=True, marker="D",
                        label=f"{res['name']} ({res['bits_per_weight']:.2f} b/w)"))
    memory_quality(pts, memory="RAM", tokens=res.get("tokens"), ax=b,
                   title="SmolLM2-135M, RTN: whole model in RAM against perplexity")
    fig.tight_layout()
    return a, b


# --- distillation (notebook 03), continued ---

def distill_cache_bytes(rows: dict, ax=None, title: str = "Teacher targets per training token"):
    """Horizontal bars of bytes per token for each way of storing the teacher's logits ({label: bytes}), log x."""
    ax = new_axes(ax, figsize=(6.4, 2.8))
    labels = list(rows)
    ax.barh(range(len(labels)), [rows[k] for k in labels], color=[PALETTE[i % len(PALETTE)] for i in range(len(labels))])
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i, k in enumerate(labels):
        ax.text(rows[k], i, f" {rows[k]:,.0f} B", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("bytes per token")
    ax.set_title(title)
    return ax


# --- other memory-saving designs (notebook 06) ---

TRAINING_VARIANT_LABELS = {"fp32": "fp32", "bf16": "bf16 autocast", "ckpt_sqrt": "checkpoint every √n layers",
                           "ckpt_every": "checkpoint every layer"}


def training_depth_sweep(sweep: dict, ax=None, title: str = "Training-step peak vs depth"):
    """Peak growth of a training step against the number of layers: measured (markers, solid) and estimated
    (dashed) per variant; `sweep` is {layers: {variant: {"peak_bytes", "estimate_bytes"}}}."""
    ax = new_axes(ax)
    depths = sorted(sweep, key=int)
    xs = [int(d) for d in depths]
    for i, v in enumerate(sweep[depths[0]]):
        c = PALETTE[i % len(PALETTE)]
        ax.plot(xs, [_mb(sweep[d][v]["peak_bytes"]) for d in depths], "o-", color=c,
                label=TRAINING_VARIANT_LABELS.get(v, v))
        ax.plot(xs, [_mb(sweep[d][v]["estimate_bytes"]) for d in depths], "--", color=c, lw=1)
    ax.plot([], [], "k--", lw=1, label="estimate")
    ax.set_xlabel("decoder layers")
    ax.set_ylabel("peak above model + Adam (MB)")
    ax.set_xticks(xs)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return ax
