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
    ax.legend(fontsize=8, loc="upper left")
    return ax


def estimate_vs_measured(xs, estimated, measured, xlabel: str, title: str = "", ax=None):
    """A line for the estimate and dots for the measurements, against one variable (bytes → MB)."""
    ax = new_axes(ax)
    ax.plot(xs, [_mb(v) for v in estimated], "-", color=PALETTE[0], label="estimate")
    ax.plot(xs, [_mb(v) for v in measured], "o", color=PALETTE[1], label="measured")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("MB")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return ax
