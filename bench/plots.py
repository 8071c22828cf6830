"""One way the benchmarks draw a figure: matplotlib's object API on the Agg canvas (no pyplot
state, no backend switch), labelled and saved atomically."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def axes(path: Path, xlabel: str, ylabel: str, size=(7, 4.5)) -> Iterator:
    """Yield one axes; on exit label it, add the legend, and write the PNG to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from flarc.core.files import atomic_path

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    yield ax
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
