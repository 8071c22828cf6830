"""What a compression did, for people (a console table, a plot) and for programs (JSON)."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

from flarc.core.files import write_bytes_atomic, write_text_atomic
from flarc.core.targets import Skipped, Target
from flarc.pipeline import CompressResult, TargetRow


def _fmt(x: float | None, spec: str = ".2e") -> str:
    return "-" if x is None else format(x, spec)


def targets_table(targets: list[Target], skipped: list[Skipped], title: str = "targets"):
    """Two rich tables: the targets (``n x m``, parameters, ``k_equiv``, weight path, storage form,
    nodes reading the weight) and the skipped nodes with their reasons."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("node", "op", "n x m", "params", "k_equiv", "weight", "stored as", "uses"):
        table.add_column(col, justify="right" if col in ("params", "k_equiv", "uses") else "left")
    for t in targets:
        table.add_row(
            t.name,
            t.op_type,
            f"{t.n} x {t.m}",
            f"{t.params:,}",
            f"{t.k_equiv:.1f}",
            weight_path_label(t),
            t.storage.label if t.storage.kind != "float" else t.dtype,
            str(len(t.all_uses)),
        )
    skipped_table = Table(title="skipped")
    skipped_table.add_column("node")
    skipped_table.add_column("op")
    skipped_table.add_column("reason")
    for s in skipped:
        skipped_table.add_row(s.node, s.op_type, s.reason)
    return table, skipped_table


def weight_path_label(t: Target) -> str:
    """The stored tensor, then the ops on its path: ``w_q -> DequantizeLinear -> Transpose``."""
    if not t.path:
        return t.weight
    return " -> ".join([t.weight, *t.path_ops]) if t.path_ops else t.weight


def short_names(names: list[str]) -> list[str]:
    """Node names without the prefix they all share (tables stay readable)."""
    if len(names) < 2:
        return names
    prefix = os.path.commonprefix(names)  # noqa: RUF071 (cut at the last "/" below)
    prefix = prefix[: prefix.rfind("/") + 1] if "/" in prefix else ""
    return [n[len(prefix) :] or n for n in names]


def rows_table(rows: list[TargetRow]):
    """The factorization table, one line per target: rank (or dense), ``k_equiv``, fraction of its
    parameters kept, predicted and held-out error, shrinkage, calibration rows, and Fisher alpha
    when any row has one."""
    from rich.table import Table

    table = Table(title="factorization")
    cols = (
        "node",
        "n x m",
        "rank",
        "k_equiv",
        "kept params",
        "kept bytes",
        "pred. err",
        "held-out err",
        "lambda",
        "rows",
    )
    for col in cols:
        table.add_column(col, justify="left" if col in ("node", "n x m") else "right")
    if any(r.alpha is not None for r in rows):
        table.add_column("alpha", justify="right")
    for r, label in zip(rows, short_names([r.name for r in rows]), strict=True):
        cells = [
            label,
            f"{r.n} x {r.m}",
            "dense" if r.rank is None else str(r.rank),
            f"{r.k_equiv:.0f}",
            f"{r.kept_params / r.params:.0%}",
            f"{r.kept_bytes / r.stored_bytes:.0%}" if r.stored_bytes else "-",
            _fmt(r.predicted_error),
            _fmt(r.heldout_error),
            f"{r.shrinkage:.3f}",
            f"{r.rows:,}",
        ]
        if any(x.alpha is not None for x in rows):
            cells.append(_fmt(r.alpha))
        table.add_row(*cells)
    return table


def comparison_table(result: CompressResult, label: str = "held-out"):
    """Original vs compressed model per output (cosine, max and mean absolute and relative error);
    ``label`` names the inputs they ran on."""
    from rich.table import Table

    table = Table(title=f"original vs compressed ({label} inputs, polygraphy comparator)")
    for col in ("output", "cosine", "max abs", "mean abs", "max rel", "mean rel"):
        table.add_column(col, justify="left" if col == "output" else "right")
    for c in result.comparison:
        table.add_row(
            c.name,
            f"{c.cosine:.6f}",
            _fmt(c.max_abs),
            _fmt(c.mean_abs),
            _fmt(c.max_rel),
            _fmt(c.mean_rel),
        )
    return table


def summary_lines(result: CompressResult) -> list[str]:
    """Console lines: targets factorized, target and whole-model parameters before -> after, and
    the bytes the file stores (what falls for fp16 or int8 weights, whose factors keep their form)."""
    factorized = sum(1 for r in result.rows if r.rank is not None)
    return [
        f"targets factorized: {factorized} of {len(result.rows)}",
        f"target parameters: {result.params_before:,} -> {result.params_after:,} "
        f"({1 - result.params_after / max(result.params_before, 1):.1%} fewer)",
        f"model parameters:  {result.model_params_before:,} -> {result.model_params_after:,} "
        f"({1 - result.model_params_after / max(result.model_params_before, 1):.1%} fewer)",
        f"stored bytes:      {_size(result.model_bytes_before)} -> {_size(result.model_bytes_after)} "
        f"({1 - result.model_bytes_after / max(result.model_bytes_before, 1):.1%} fewer; targets "
        f"{_size(result.bytes_before)} -> {_size(result.bytes_after)})",
    ]


def _size(n: int) -> str:
    """Bytes for people: ``812 B``, ``3.4 KB``, ``2.24 GB``."""
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def latency_lines(timing: dict) -> list[str]:
    """Console lines of an end-to-end timing (as :func:`flarc.latency.end_to_end.measure_end_to_end`
    returns it, plus ``predicted_speedup``): median ms and spread of each model, measured and
    predicted speedup."""
    o, c = timing["original"], timing["compressed"]
    return [
        f"{timing['backend']} latency on {timing['feeds']}: original {o['median'] * 1e3:.2f} ms "
        f"(spread {o['spread']:.1%}), compressed {c['median'] * 1e3:.2f} ms (spread {c['spread']:.1%})",
        f"measured speedup {timing['speedup']:.2f}x, predicted {timing['predicted_speedup']:.2f}x",
    ]


def report_dict(result: CompressResult, meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON report (``flarc_report`` 1): ``meta``, a parameter summary, the output guard, and
    one entry per target row and per compared output."""
    return {
        "flarc_report": 1,
        **meta,
        "summary": {
            "targets": len(result.rows),
            "factorized": sum(1 for r in result.rows if r.rank is not None),
            "target_params_before": result.params_before,
            "target_params_after": result.params_after,
            "model_params_before": result.model_params_before,
            "model_params_after": result.model_params_after,
            "target_bytes_before": result.bytes_before,
            "target_bytes_after": result.bytes_after,
            "model_bytes_before": result.model_bytes_before,
            "model_bytes_after": result.model_bytes_after,
        },
        "output_guard": result.guard,
        "targets": [r.to_dict() for r in result.rows],
        "comparison": [c.to_dict() for c in result.comparison],
    }


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically; values JSON cannot encode (numpy scalars) are
    written as floats."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=float) + "\n")


def projection_type(name: str) -> str:
    """A coarse label for grouping targets across depth: the node name without layer indices."""
    parts = [p for p in re.split(r"[/.]", name) if p and not p.isdigit()]
    base = re.sub(
        r"_\d+$",
        "",
        parts[-2]
        if len(parts) >= 2 and parts[-1] in ("MatMul", "Gemm", "Conv")
        else parts[-1]
        if parts
        else name,
    )
    return re.sub(r"\d+", "", base) or name


def plot_ranks(rows: list[TargetRow], path: str | Path, title: str = "rank allocation") -> None:
    """Kept fraction of k_equiv per target in graph order, one series per projection type."""
    # The object API with the Agg canvas: no pyplot state, no backend switch for the process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6, len(rows) * 0.18), 6))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    groups: dict[str, list[tuple[int, TargetRow]]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(projection_type(r.name), []).append((i, r))
    for label, items in groups.items():
        xs = [i for i, _ in items]
        ax1.plot(xs, [(r.rank or r.k_equiv) / r.k_equiv for _, r in items], "o", label=label)
        ax2.plot(xs, [r.predicted_error or 0.0 for _, r in items], "o", label=label)
    ax1.set_ylabel("rank / k_equiv (1 = dense)")
    ax2.set_ylabel("predicted whitened error")
    ax2.set_yscale("symlog", linthresh=1e-4)
    ax2.set_xlabel("target (graph order)")
    ax1.set_title(title)
    ax1.legend(fontsize="small", ncol=min(4, len(groups)))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes_atomic(path, buf.getvalue())
