"""Present a latency profile: a rich table (dense time, break-even rank vs k_equiv per shape)
and a PNG of ``lat_recov`` against rank."""

from __future__ import annotations

import os

from rich.table import Table

from flarc.core.files import atomic_path
from flarc.latency.model import LatencyModel
from flarc.latency.profile import LatencyProfile


def summary_rows(profile: LatencyProfile) -> list[dict]:
    """One dict per measured shape: target count, dense ms and spread, ``k_equiv``, break-even rank
    (None: no pair is faster or none was timed), lowest ``lat_recov``, ranks timed."""
    lm = LatencyModel(profile)
    rows = []
    for key, sp in profile.shapes.items():
        recov = sp.lat_recov()
        rows.append(
            {
                "shape": key,
                "targets": len(sp.targets),
                "dense_ms": sp.dense.median * 1e3,
                "spread": sp.dense.spread,
                "k_equiv": sp.spec.k_equiv,
                "break_even": lm.break_even(sp.spec, profile.align) if sp.pair else None,
                "min_recov": min(recov.values()) if recov else None,
                "ranks": len(sp.pair),
            }
        )
    return rows


def summary_table(profile: LatencyProfile, title: str | None = None) -> Table:
    """The profile as a rich table (:func:`summary_rows`), titled with backend, dtype and threads
    unless ``title`` is given."""
    threads = profile.threads if profile.threads is not None else "default"
    table = Table(
        title=title
        or f"{profile.backend} {profile.backend_version} | {profile.dtype} | threads {threads}"
    )
    for col in (
        "shape",
        "targets",
        "dense ms",
        "spread",
        "ranks",
        "best recov",
        "break-even / k_equiv",
    ):
        table.add_column(col, justify="left" if col == "shape" else "right")
    for r in summary_rows(profile):
        be = "never faster" if r["break_even"] is None else str(r["break_even"])
        table.add_row(
            r["shape"],
            str(r["targets"]),
            f"{r['dense_ms']:.4f}",
            f"{100 * r['spread']:.1f}%",
            str(r["ranks"]),
            "-" if r["min_recov"] is None else f"{r['min_recov']:.2f}",
            f"{be} / {r['k_equiv']:.0f}",
        )
    return table


def plot_profiles(profiles: dict[str, LatencyProfile], path: str | os.PathLike) -> None:
    """One line per (label, shape): ``lat_recov`` against rank, with the break-even line at 1."""
    # The object API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, profile in profiles.items():
        for key, sp in profile.shapes.items():
            recov = sp.lat_recov()
            if not recov:
                continue
            name = f"{label} {key}" if label else key
            lines = ax.plot(list(recov), list(recov.values()), marker=".", label=name)
            ax.axvline(sp.spec.k_equiv, color=lines[0].get_color(), linestyle=":", linewidth=0.8)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xlabel("rank k (dotted: k_equiv)")
    ax.set_ylabel("t_pair(k) / t_dense")
    ax.set_title("Latency recovery of factor pairs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
