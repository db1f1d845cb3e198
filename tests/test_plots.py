"""The signature chart (lk.plots.memory_quality) renders with labelled axes and readable log ticks."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from labkit import plots  # noqa: E402

FIXTURE = [
    {"bytes": 538e6, "quality": 36.2, "technique": "fp32", "label": "fp32", "reference": True},
    {"bytes": 135e6, "quality": 36.3, "technique": "int8", "label": "int8"},
    {"bytes": 75e6, "quality": 69.5, "technique": "int4", "label": "int4"},
    {"bytes": 300e6, "quality": 513.0, "technique": "magnitude", "label": "magnitude 50%"},
    {"bytes": 300e6, "quality": 70.0, "technique": "sparsegpt", "label": "SparseGPT 50%"},
]


@pytest.mark.parametrize("kind", ["disk", "RAM", "KV cache", "training peak", "storage"])
def test_memory_quality_has_labelled_axes_and_log_ticks(kind):
    ax = plots.memory_quality(FIXTURE, memory=kind, tokens=4096)
    fig = ax.figure
    fig.canvas.draw()
    assert kind in ax.get_xlabel() and "bytes" in ax.get_xlabel()
    assert "ppl₄₀₉₆" in ax.get_ylabel() and "better" in ax.get_ylabel()
    assert ax.get_xscale() == "log"
    lo, hi = ax.get_xlim()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text() and lo <= t.get_position()[0] <= hi]
    assert len(labels) >= 2 and all(u in " ".join(labels) for u in ["MB"]), labels
    assert ax.get_legend() is not None
    plt.close(fig)


def test_pareto_frontier_and_colours():
    front = plots.pareto([dict(p) for p in FIXTURE], "bytes", "quality")
    assert [p["label"] for p in front] == ["int4", "int8", "fp32"]
    assert plots.technique_color("GPTQ") == plots.technique_color("gptq")
    assert plots.technique_color("something new") == plots.technique_color("something new")
    assert plots.bytes_formatter(1.5e9) == "1.5 GB" and plots.bytes_formatter(512e3) == "512 kB"
    with pytest.raises(ValueError):
        plots.memory_quality([])
    with pytest.raises(ValueError, match="lacks"):
        plots.memory_quality([{"bytes": 1}])
