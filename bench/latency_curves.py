"""Rank-latency curves on onnxruntime CPU for the target shapes of the real models.

Per model (its distinct target shapes n -> m, at the token counts of 1 and 8 sequences or
images), at 1 and 2 threads: dense time, the pair's time over the aligned rank grid, and the
break-even rank (the largest aligned rank whose pair is still faster) against k_equiv.

- minilm: 384->384, 384->1536, 1536->384 at 128 and 8 x 128 tokens (sentences of 128 tokens);
- vit: the same shapes at 257 and 8 x 257 tokens (DINOv2 ViT-S/14 on 224 x 224 images);
- qwen: 896->896, 896->128 (k/v), 896->4864, 4864->896 at 1 and 8 tokens (a decode step of 1
  and 8 sequences) and 128 tokens (a prefill), align 32.

Prints a table, writes bench/results/latency_curves[_<model>].{json,md,png}. Numbers depend on
the machine; nothing is asserted.

    python bench/latency_curves.py [--model minilm vit qwen] [--threads 1 2] [--no-cache]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flarc.core.files import write_text_atomic
from flarc.core.progress import RichProgress
from flarc.latency.backend import get_backend
from flarc.latency.cache import LatencyCache
from flarc.latency.model import LatencyModel
from flarc.latency.profile import LatencyProfile, profile_specs
from flarc.latency.show import plot_profiles
from flarc.latency.spec import LayerSpec
from flarc.latency.timing import TimingConfig

SHAPES = [(384, 384), (384, 1536), (1536, 384)]
MODELS = {
    "minilm": dict(title="MiniLM-L6, 128-token sentences", shapes=SHAPES, tokens=[128, 8 * 128],
                   align=8, file="latency_curves"),
    "vit": dict(title="DINOv2 ViT-S/14, 224x224 images (257 tokens)", shapes=SHAPES,
                tokens=[257, 8 * 257], align=8, file="latency_curves_vit"),
    "qwen": dict(title="Qwen2.5-0.5B, decode of 1 and 8 sequences, 128-token prefill",
                 shapes=[(896, 896), (896, 128), (896, 4864), (4864, 896)], tokens=[1, 8, 128],
                 align=32, file="latency_curves_qwen"),
}  # fmt: skip
RESULTS = Path(__file__).resolve().parent / "results"
# Fewer repeats than the CLI default: ~400 layers in a few minutes, median CI still ~3%.
TIMING = TimingConfig(warmup=3, min_repeats=9, max_repeats=40, rel_ci=0.03, max_seconds=1.0)


def run(
    threads: list[int], tokens: list[int], shapes: list, align: int, cache: LatencyCache
) -> dict:
    specs = [LayerSpec("linear", n, m, (t, n)) for t in tokens for n, m in shapes]
    profiles = {}
    for th in threads:
        backend = get_backend("ort-cpu", threads=th, timing=TIMING)
        shapes = profile_specs(specs, backend, align, cache, RichProgress())
        profiles[f"{th}T"] = LatencyProfile(
            backend=backend.name,
            backend_version=backend.version(),
            device=backend.fingerprint(),
            threads=th,
            dtype="fp32",
            align=align,
            input_shapes={},
            shapes=shapes,
            targets={},
        )
    return profiles


def rows(profiles: dict[str, LatencyProfile]) -> list[dict]:
    out = []
    for label, profile in profiles.items():
        lm = LatencyModel(profile)
        for key, sp in profile.shapes.items():
            half = int(sp.spec.k_equiv / 2 // profile.align * profile.align)
            out.append(
                {
                    "threads": profile.threads,
                    "shape": key,
                    "tokens": sp.spec.tokens,
                    "n": sp.spec.n,
                    "m": sp.spec.m,
                    "dense_ms": sp.dense.median * 1e3,
                    "dense_spread": sp.dense.spread,
                    "k_equiv": sp.spec.k_equiv,
                    "break_even": lm.break_even(sp.spec, profile.align),
                    "recov_at_half_k_equiv": lm.lat_recov(sp.spec, half) if half else None,
                    "half_k_equiv_rank": half,
                    "label": label,
                }
            )
    return out


COLUMNS = ("threads", "tokens", "n->m", "dense ms", "IQR", "break-even", "k_equiv", "be/k_eq",
           "recov@k_eq/2")  # fmt: skip


def cells(r: dict) -> list[str]:
    be = r["break_even"]
    return [
        str(r["threads"]),
        str(r["tokens"]),
        f"{r['n']}->{r['m']}",
        f"{r['dense_ms']:.3f}",
        f"{100 * r['dense_spread']:.1f}%",
        "never" if be is None else str(be),
        f"{r['k_equiv']:.0f}",
        "-" if be is None else f"{be / r['k_equiv']:.2f}",
        "-" if r["recov_at_half_k_equiv"] is None else f"{r['recov_at_half_k_equiv']:.2f}",
    ]


def markdown(title: str, result_rows: list[dict], device: str) -> str:
    lines = [f"# ort-cpu rank-latency curves: {title}", "", f"device: {device}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]  # fmt: skip
    lines += ["| " + " | ".join(cells(r)) + " |" for r in result_rows]
    return "\n".join(lines) + "\n"


def table(title: str, result_rows: list[dict]) -> Table:
    t = Table(title=f"ort-cpu rank-latency curves ({title})")
    for col in COLUMNS:
        t.add_column(col, justify="right")
    for r in result_rows:
        t.add_row(*cells(r))
    return t


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", nargs="+", default=["minilm"], choices=sorted(MODELS))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-cache", action="store_true", help="measure again, ignore the cache")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cache = LatencyCache(enabled=not args.no_cache)
    console = Console()
    for name in args.model:
        spec = MODELS[name]
        profiles = run(args.threads, spec["tokens"], spec["shapes"], spec["align"], cache)
        result_rows = rows(profiles)
        console.print(table(spec["title"], result_rows))
        first = next(iter(profiles.values()))
        device = f"{first.device}; onnxruntime {first.backend_version}"
        console.print(f"device: {device}")
        out = RESULTS / f"{spec['file']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "model": name,
            "title": spec["title"],
            "timing": TIMING.__dict__,
            "rows": result_rows,
            "profiles": {label: p.to_dict() for label, p in profiles.items()},
        }
        write_text_atomic(out, json.dumps(payload, indent=1) + "\n")
        write_text_atomic(out.with_suffix(".md"), markdown(spec["title"], result_rows, device))
        plot_profiles(profiles, out.with_suffix(".png"))
        console.print(f"-> {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
