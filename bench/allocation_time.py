"""How long choosing ranks takes, per method, on one shared analysis (not CI).

FLRC reports its Fisher allocation as far faster than FLAR-SVD's search; this measures it on
MiniLM: one ``analyze`` with Fisher importances (timed apart, Fisher part included), then
``choose_ranks`` alone for each rank policy at the same parameter budget, and how many model
evaluations the output-criterion search made.

    python bench/allocation_time.py [--budget 0.8]

Writes bench/results/allocation_time.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    from quality import minilm_setup

    from flarc.core.modelio import load_model
    from flarc.core.targets import find_targets
    from flarc.pipeline import AnalysisOptions, analyze
    from flarc.rewrite.policy import RankOptions, choose_ranks

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.8)
    args = ap.parse_args()
    path, data, _, _ = minilm_setup()
    model = load_model(path)
    targets = find_targets(model)
    t0 = time.perf_counter()
    analysis = analyze(model, targets, data, AnalysisOptions(fisher="auto"))
    analyze_s = time.perf_counter() - t0
    b = args.budget
    policies = {
        "FLRC: --allocate fisher": RankOptions(allocate="fisher", budget=b),
        "flarc: --allocate global": RankOptions(allocate="global", budget=b),
        "flarc: --allocate global --output-weighted": RankOptions(
            allocate="global", budget=b, output_weighted=True
        ),
        "FLAR-SVD: --search bisect --criterion output --threshold auto": RankOptions(
            search="bisect", criterion="output", threshold="auto", budget=b
        ),
    }
    rows = []
    for label, opts in policies.items():
        t1 = time.perf_counter()
        ranks = choose_ranks(analysis, opts, model, analysis.probe_feeds)
        seconds = time.perf_counter() - t1
        kept = sum(
            t.rank_params(ranks[t.name].rank) if ranks[t.name].rank else t.params
            for t in targets.targets
        ) / sum(t.params for t in targets.targets)
        rows.append({"policy": label, "seconds": seconds, "kept": kept})
        print(f"{label:70s} {seconds:8.2f} s  kept {kept:.3f}", flush=True)
    result = {
        "model": "all-MiniLM-L6-v2",
        "targets": len(targets.targets),
        "budget": b,
        "analyze_with_fisher_s": analyze_s,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "allocation_time.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Time to choose ranks, MiniLM ({len(targets.targets)} targets), budget {b}",
        "",
        f"Shared analysis (statistics, spectra, Fisher importances): {analyze_s:.1f} s.",
        "",
        "| policy | choose_ranks s | kept params |",
        "|---|---|---|",
        *(f"| {r['policy']} | {r['seconds']:.2f} | {r['kept']:.3f} |" for r in rows),
    ]
    (RESULTS / "allocation_time.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
