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
