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


def _controls(ui):
    return {c.description or c._kwarg: c for c in ui.widget.children if not isinstance(c, (w.Output, w.Button))}


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
