"""Decoding schedules compared step by step on the dense model's continuation (not CI).

Free-running agreement (bench/progressive_decoding.py) is noisy: after the first differing token
the two continuations part, so ROUGE-L over a few dozen prompts cannot separate schedules whose
mean budgets are equal. Here each schedule decodes the original model's greedy continuation
teacher-forced: step t reads the dense token t-1, its bucket is picked by the schedule from its
own history (budgets, entropies), and it is scored against the original's next-token
distribution at the same position: top-1 agreement and KL(dense || bucket) in nats, averaged
over every step of every prompt. Same buckets, prompts and domains as
bench/progressive_decoding.py (run that first: it builds the buckets).

    python bench/schedule_agreement.py [--prompts 8] [--new-tokens 64]

Writes bench/results/schedule_agreement.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import progressive_decoding as pd

RESULTS = Path(__file__).resolve().parent / "results"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities, in float64."""
    from scipy.special import log_softmax as scipy_log_softmax

    return scipy_log_softmax(np.asarray(logits, dtype=np.float64), axis=-1)


def forced(
    gen, spec: str, prompt: list[int], ref: list[int]
) -> tuple[list[np.ndarray], list[float]]:
    """Each step's next-token logits when ``spec`` decodes ``ref`` teacher-forced after
    ``prompt``, and the budgets it picked."""
    from flarc.export.runtime import KVCache
    from flarc.export.schedule import entropy, parse_schedule

    schedule = parse_schedule(spec, gen.budgets)
    cache = KVCache(gen.layout)
    history: list[tuple[float, float]] = []
    out = []
    for t in range(len(ref)):
        ids = np.asarray(prompt if t == 0 else [ref[t - 1]], dtype=np.int64)
        budget = schedule.budget(t, history[-1][1] if history else None, history)
        logits = gen.step(budget, ids, cache)[-1]
        history.append((budget, entropy(logits)))
        out.append(logits)
    return out, [b for b, _ in history]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts per domain (8)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=48)
    args = ap.parse_args()
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from flarc.core.files import write_text_atomic
    from flarc.export.runtime import Generator, KVCache

    folder = pd.CACHE / "lm.buckets"
    if not (folder / "manifest.json").is_file():
        raise SystemExit(f"{folder}: no buckets; run bench/progressive_decoding.py first")
    tok = AutoTokenizer.from_pretrained(str(pd.CACHE / "hf"), local_files_only=True)
    _, heldout = pd.texts()
    prompts = pd.prompt_ids(tok, heldout, args.prompts, args.prompt_words)
    n = args.new_tokens
    q = n // 4
    schedules = [
        "static:0.9", "static:0.8", "steps:0.9@0,0.8@1", f"steps:0.9@0,0.8@{q},0.7@{3 * q}",
        f"steps:0.9@0,0.7@{2 * q}", "entropy:0.8", "static:0.7", "steps:0.9@0,0.7@1",
        f"steps:0.9@0,0.7@{q},0.6@{2 * q}", "entropy:0.7",
    ]  # fmt: skip
    ort.set_global_thread_pool_sizes(0, 1)
    original = Generator.from_onnx(pd.CACHE / "model.onnx", global_threads=True)
    refs, dense = {}, {}
    for d, ps in prompts.items():
        for i, p in enumerate(ps):
            ref = original.generate(p, n).tokens
            cache = KVCache(original.layout)
            full = original.step(1.0, np.asarray(p + ref[:-1], dtype=np.int64), cache)
            refs[d, i] = ref
            dense[d, i] = log_softmax(full[len(p) - 1 :])  # row t predicts ref[t]
    del original
    gen = Generator.from_buckets(folder, verify=False, global_threads=True)
    rows = {}
    steps_kl: dict[str, dict[str, np.ndarray]] = {}
    for spec in schedules:
        row = {}
        used = []
        for d, ps in prompts.items():
            agree, kl = [], []
            for i, p in enumerate(ps):
                logits, budgets = forced(gen, spec, p, refs[d, i])
                used += budgets
                mine = log_softmax(np.stack(logits))
                want = dense[d, i]
                agree += list(mine.argmax(axis=-1) == np.asarray(refs[d, i]))
                kl += list((np.exp(want) * (want - mine)).sum(axis=-1))
            row[f"top1_{d}"] = float(np.mean(agree))
            row[f"top1_{d}_se"] = pd.standard_error(agree)
            row[f"kl_{d}"] = float(np.mean(kl))
            row[f"kl_{d}_se"] = pd.standard_error(kl)
            steps_kl.setdefault(spec, {})[d] = np.asarray(kl)
            # Paired with static 0.8 on the same steps: the spread between prompts cancels.
            base = steps_kl.get("static:0.8", {}).get(d)
            if base is not None:
                row[f"kl_{d}_vs_static08"] = float(np.mean(kl - base))
                row[f"kl_{d}_vs_static08_se"] = pd.standard_error(kl - base)
        row["mean_budget"] = float(np.mean(used))
        rows[spec] = row
        print(spec, json.dumps(row), flush=True)
    result = {
        "model": "Qwen2.5-Coder-0.5B-Instruct (GGUF, dequantized)",
        "prompts_per_domain": args.prompts,
        "new_tokens": n,
        "schedules": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    write_text_atomic(RESULTS / "schedule_agreement.json", json.dumps(result, indent=1) + "\n")
    lines = [
        "# Schedules teacher-forced on the dense continuation, Qwen2.5-Coder-0.5B",
        "",
        f"`python bench/schedule_agreement.py`: {args.prompts} held-out prompts per domain (those "
        f"of bench/progressive_decoding.py), {n} steps each; every step reads the original's "
        "greedy token and is scored against the original's next-token distribution. Cells: "
        "mean over all steps +- its standard error (steps of one prompt are not independent, "
        "so the error is optimistic); '- static 0.8': the mean per-step difference from static "
        "0.8 on the same steps. A steps schedule's mean budget is over steps, the prefill "
        "(step 0, the whole prompt) counting as one.",
        "",
        "| schedule | mean budget | top-1 agreement in | KL in (nats) | top-1 agreement out "
        "| KL out (nats) | KL in - static 0.8 | KL out - static 0.8 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for spec, r in rows.items():
        lines.append(
            f"| {spec} | {r['mean_budget']:.3f} | {pd._pm(r, 'top1_in')} | {pd._pm(r, 'kl_in')} | "
            f"{pd._pm(r, 'top1_out')} | {pd._pm(r, 'kl_out')} | {pd._pm(r, 'kl_in_vs_static08')} | "
            f"{pd._pm(r, 'kl_out_vs_static08')} |"
        )
    write_text_atomic(RESULTS / "schedule_agreement.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
