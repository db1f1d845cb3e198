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
