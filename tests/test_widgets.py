"""labkit.widgets: controls show their whole description; the chart is drawn once per change."""
import ipywidgets as w
import matplotlib

matplotlib.use("Agg")

from labkit import widgets  # noqa: E402


def test_interact_chart_shows_whole_descriptions_and_draws_each_setting():
    seen = []

    def draw(temperature, kind):
        seen.append((temperature, kind))

    ui = widgets.interact_chart(draw, temperature=w.FloatSlider(value=1.0, min=0.25, max=8.0, description="temperature"),
                                kind=w.ToggleButtons(options=["disk", "ram"], description="budget of"))
    controls = [c for c in ui.widget.children if not isinstance(c, w.Output)]
    assert [c.style.description_width for c in controls] == ["initial", "initial"]
    assert seen == [(1.0, "disk")]
    controls[0].value = 2.0
    assert seen[-1] == (2.0, "disk")


def test_sparse_widget_moves_the_pruned_weight_on_the_storage_chart():
    import matplotlib.pyplot as plt
    import torch

    from labkit import sparse as S
    from labkit.experiments import sparse as xs

    wt = torch.randn(32, 48, generator=torch.Generator().manual_seed(0))
    pts = xs.pruned_points(wt, 0.75, ("csr32", "bitmap", "coo"))
    kept = wt.numel() - round(0.75 * wt.numel())  # magnitude pruning keeps exactly this many (no ties here)
    assert all(p["bytes"] == p["formula"] == S.formula_bytes(p["format"], wt.shape, kept) for p in pts)
    pruned = wt * (wt.abs() > wt.abs().flatten().kthvalue(round(0.75 * wt.numel())).values)
    assert abs(pts[0]["quality"] - float((wt - pruned).norm() / wt.norm())) < 1e-6
    assert len({p["quality"] for p in pts}) == 1 and 0 < pts[0]["quality"] < 1
    ui = widgets.sparse_density_widget(wt, n=64, k=8)
    slider = next(c for c in ui.widget.children if isinstance(c, w.FloatSlider))
    slider.value = 0.5
    ax = plt.gcf().axes[0]
    assert "storage" in ax.get_xlabel() and "relative error" in ax.get_ylabel()
    diamonds = [c.get_offsets()[0].tolist() for c in ax.collections if c.get_paths() and len(c.get_offsets()) == 1]
    assert any(abs(y - xs.pruned_points(wt, 0.5)[0]["quality"]) < 1e-9 for _, y in diamonds)
    plt.close("all")


class _ByteTokenizer:
    """Just enough of a tokenizer for lk.models.generate on tiny_llama (vocab 256): one byte per token."""
    pad_token_id = eos_token_id = 2

    def __call__(self, text, return_tensors="pt"):
        import torch
        ids = torch.tensor([list(text.encode()[:64])])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) % 128 for i in ids).decode("ascii", "replace")


def _controls(ui):
    return {c.description or c._kwarg: c for c in ui.widget.children if not isinstance(c, (w.Output, w.Button))}


def test_prune_widget_2_4_ignores_the_slider_and_marks_the_current_setting(monkeypatch, tiny, capsys):
    """Moving the sparsity slider under 2:4 recomputed the same 2:4 model (up to 80 s) and stacked duplicate points;
    now the slider is greyed out, a line says why, and the setting shown is the diamond on the chart."""
    import matplotlib.pyplot as plt
    import torch

    from labkit.experiments import prune as xp

    calls, results = [], []
    real = xp.prune_and_measure

    def counted(*a, **k):
        calls.append(a[3:5])
        results.append(real(*a, **k))
        return results[-1]

    monkeypatch.setattr(xp, "prune_and_measure", counted)
    tokens = torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(0))
    ui = widgets.prune_widget(tiny, _ByteTokenizer(), tokens, None, max_tokens=256)
    c = _controls(ui)
    assert calls == [("magnitude", 0.5)] and not c["sparsity"].disabled
    c["method"].value = "2:4"
    c["sparsity"].value = 0.30000000000000004   # what the browser sends for 3 steps of 0.1
    assert calls == [("magnitude", 0.5), ("2:4", 0.5)] and c["sparsity"].disabled
    assert "always 50%" in capsys.readouterr().out
    ax = plt.gcf().axes[0]
    diamonds = [o.get_offsets()[0].tolist() for o in ax.collections
                if len(o.get_offsets()) == 1 and len(o.get_paths()[0].vertices) <= 5]   # a circle has more
    assert [y for _, y in diamonds] == [float(results[1]["perplexity"])]
    assert any(t.get_text() == "2:4 50%" for t in ax.texts)
    c["method"].value = "magnitude"
    assert calls[-1][0] == "magnitude" and abs(calls[-1][1] - 0.3) < 1e-9 and not c["sparsity"].disabled
    plt.close("all")


def test_distill_runs_offers_only_stored_runs(capsys):
    """α = 0.5 had no stored run and silently showed CE (a tie in nearest_run); T moved nothing at α = 0. Now the
    sliders hold only stored values, T is greyed out at α = 0 and a line names the run shown."""
    import matplotlib.pyplot as plt

    from labkit.repro import load_results

    res = load_results("distill")
    ui = widgets.distill_runs(res)
    c = _controls(ui)
    runs = res["grid_seed0"].values()
    assert list(c["alpha"].options) == sorted({r["alpha"] for r in runs})
    assert all(any(r["alpha"] == a and (a == 0 or r["temperature"] == t) for r in runs)
               for a in c["alpha"].options for t in c["temperature"].options)
    c["alpha"].value = 0.0
    assert c["temperature"].disabled and "T does not enter the loss" in capsys.readouterr().out
    c["alpha"].value, c["temperature"].value = 1.0, max(c["temperature"].options)
    assert not c["temperature"].disabled and "kd_a1_T2" in capsys.readouterr().out.splitlines()[-1]
    plt.close("all")
