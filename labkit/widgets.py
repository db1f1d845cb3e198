"""ipywidgets builders: sliders over pure labkit functions that redraw a chart.

Each lesson appends its own block below. Widgets never compute more than the function they wrap.
"""
from __future__ import annotations


def interact_chart(draw, **controls):
    """ipywidgets.interact over draw(**values) -> Axes, with plt.show() so the chart redraws in place."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    def _show(**values):
        draw(**values)
        plt.show()

    return w.interact(_show, **controls)
