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


def _label_boxes(ax):
    ax.figure.canvas.draw()
    r = ax.figure.canvas.get_renderer()
    return [t.get_window_extent(r) for t in ax.texts]


def test_point_labels_do_not_overlap_each_other_or_leave_the_axes():
    # a cluster like notebook 01's: several methods at the same bytes with close perplexities
    pts = [{"bytes": 538e6, "quality": 36.2, "technique": "dense", "label": "dense", "reference": True}]
    for i, q in enumerate([70, 73, 75, 80, 105, 151]):
        pts.append({"bytes": 330e6, "quality": q, "technique": "wanda", "label": f"method {i} 50%", "annotate": True})
    pts.append({"bytes": 500e6, "quality": 36.0, "technique": "magnitude", "label": "magnitude 10%", "annotate": True})
    ax = plots.memory_quality(pts, tokens=4096)
    boxes = _label_boxes(ax)
    assert len(boxes) == len(pts)
    frame = ax.get_window_extent()
    overlaps = [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    assert not overlaps, f"labels overlap: {overlaps}"
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    plt.close("all")


@pytest.mark.parametrize("lo,hi", [(35.9, 36.3), (20.5, 42.0), (30.0, 130_000.0)])
def test_log_axis_labels_are_plain_and_distinct(lo, hi):
    ax = plots.new_axes()
    ax.plot([0, 1], [lo, hi])
    plots.log_axis(ax, "y")
    ax.figure.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()
              and lo * 0.9 <= t.get_position()[1] <= hi * 1.1]
    assert len(labels) >= 2, labels
    assert len(set(labels)) == len(labels), f"repeated tick labels {labels}"
    assert not any("10^" in s or "times" in s or "×" in s for s in labels), labels
    plt.close("all")


def test_quantization_sweep_labels_each_bit_width_once_without_overlap():
    smol, mini = [], []
    for g, (gran, size) in enumerate([("channel", None), ("group", 192), ("group", 64), ("group", 32)]):
        for bits in (2, 3, 4, 8):
            common = dict(bits=bits, granularity=gran, group_size=size, symmetric=True)
            smol.append(dict(common, name=f"int{bits}-{g}", model_bytes=(130 + bits * 12 + g) * 1e6, ppl=30 * 9.0 ** (8 - bits)))
            mini.append(dict(common, linear_bytes=(bits * 1.4 + g * 0.1) * 1e6, mean=1 - 0.1 * (8 - bits)))
    a, b = plots.memory_vs_accuracy(smol, mini)
    for ax in (a, b):
        boxes = _label_boxes(ax)
        assert sorted(t.get_text() for t in ax.texts) == ["2-bit", "3-bit", "4-bit", "8-bit"]
        assert not [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    plt.close("all")


def _log_x_labels(ax):
    ax.figure.canvas.draw()
    lo, hi = ax.get_xlim()
    return [t.get_text() for t in ax.get_xticklabels() if t.get_text() and lo <= t.get_position()[0] <= hi]


def test_quantization_dashboard_puts_every_setting_on_the_signature_chart():
    import torch
    res = [dict(name=f"int{b}-g64", layer="model.layers.0.self_attn.q_proj", errors=torch.randn(500) * 0.01,
                scale_max=0.02, ppl=p, fp32_ppl=36.0, tokens=256, linear_bytes=mb * 1e6, fp32_bytes=400e6,
                bits_per_weight=b + 0.25, model_bytes=(140 + mb) * 1e6, fp32_model_bytes=540e6)
           for b, p, mb in ((8, 36.1, 110), (4, 40.0, 60), (3, 80.0, 45))]
    hist, chart = plots.quant_dashboard(res[1], res)
    assert "RAM" in chart.get_xlabel() and "ppl₂₅₆" in chart.get_ylabel() and chart.get_xscale() == "log"
    assert len(_log_x_labels(chart)) >= 2
    offsets = [c.get_offsets()[0].tolist() for c in chart.collections if len(c.get_offsets()) == 1]
    assert [540e6, 36.0] in offsets and len(offsets) == 4  # fp32 + the three settings tried
    assert any(line.get_label() == "Pareto frontier" for line in chart.get_lines())
    assert any("int4-g64" in t.get_text() for t in chart.texts)  # the current setting is labelled
    plt.close(chart.figure)
