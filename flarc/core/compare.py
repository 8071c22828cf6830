"""Compare two models on the same inputs through polygraphy's comparator (onnxruntime, CPU).

Per output: cosine similarity, max and mean absolute error, and max and mean relative error
(relative to the largest magnitude of the reference output, so zeros do not blow it up).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from flarc.core.files import naming_write_errors
from flarc.core.inputs import Feed
from flarc.core.polygraphy import accuracy_results, quiet, simple_compare_func
from flarc.core.progress import NoProgress, Progress
from flarc.core.sessions import fed_session, lean_session_options, open_session
from flarc.core.sums import PairSums, blocks

log = logging.getLogger(__name__)


@dataclass
class OutputComparison:
    """One output of a candidate model against the reference: cosine, max and mean absolute error,
    max and mean relative error (relative to the reference's largest magnitude), and polygraphy's
    verdict."""

    name: str
    cosine: float
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    passed: bool  # polygraphy's verdict at the given tolerances

    def to_dict(self) -> dict:
        """The comparison as plain JSON values."""
        return asdict(self)


def _metrics(ref: list[np.ndarray], out: list[np.ndarray]) -> tuple[float, ...]:
    sums = PairSums()
    for r, o in zip(ref, out, strict=True):
        sums.add(r, o)
    return _summary(sums)


def _summary(sums: PairSums) -> tuple[float, ...]:
    """(cosine, max abs, mean abs, max rel, mean rel), relative to the reference's largest
    magnitude."""
    scale = max(sums.ref_max, 1e-30)
    mean_abs = sums.abs_sum / max(sums.count, 1)
    return (sums.cosine(), sums.abs_max, mean_abs, sums.abs_max / scale, mean_abs / scale)


def _within(ref: np.ndarray, out: np.ndarray, rtol: float, atol: float) -> bool:
    """polygraphy's simple element-wise comparison: every element within ``atol``, or within
    ``rtol`` relative to the candidate's magnitude (zeros get polygraphy's epsilon)."""
    for x, y in blocks(ref, out):
        d = np.abs(x - y)
        rel = d / np.where(y == 0, np.finfo(np.float64).eps, np.abs(y))
        if not np.all((d <= atol) | (rel <= rtol)):
            return False
    return True


def _session_of(model: onnx.ModelProto | str, workdir: Path):
    if not isinstance(model, str):
        workdir.mkdir()
    return open_session(model, lean_session_options(), workdir=workdir)


def _save_outputs(
    model: onnx.ModelProto, feeds: list[Feed], folder: Path, progress: Progress
) -> dict[str, int]:
    """Run ``model`` on every feed and save its numeric outputs as ``<feed>-<output>.npy``."""
    session = _session_of(model, folder / "reference")
    names = [o.name for o in session.get_outputs()]
    described = progress.track(feeds, total=len(feeds), description="comparison: original")
    for i, feed in enumerate(described):
        for j, y in enumerate(session.run(names, feed)):
            if np.issubdtype(y.dtype, np.number):
                with naming_write_errors(folder / f"{i}-{j}.npy"):
                    np.save(folder / f"{i}-{j}.npy", y)
    return {name: j for j, name in enumerate(names)}


def compare_streamed(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: list[Feed],
    rtol: float = 1e-3,
    atol: float = 1e-3,
    progress: Progress | None = None,
) -> list[OutputComparison]:
    """:func:`compare_models` for a large model: one session at a time, the reference's outputs
    kept on disk and read back one batch at a time, metrics summed in blocks (a language
    model's logits would otherwise be held for every batch, twice, and again in float64)."""
    progress = progress or NoProgress()
    with tempfile.TemporaryDirectory(prefix="flarc-compare-") as tmp:
        folder = Path(tmp)
        index = _save_outputs(reference, feeds, folder, progress)
        # Fed, not written: a large rewrite's factors are files outside the model's folder,
        # which a session from a file would need a full copy of the model beside.
        session = fed_session(candidate, lean_session_options(candidate))
        names = [o.name for o in session.session.get_outputs() if o.name in index]
        sums = {n: PairSums() for n in names}
        passed = dict.fromkeys(names, True)
        described = progress.track(feeds, total=len(feeds), description="comparison: compressed")
        for i, feed in enumerate(described):
            for name, y in zip(names, session.run(names, feed), strict=True):
                path = folder / f"{i}-{index[name]}.npy"
                if not path.is_file():  # not numeric
                    sums.pop(name, None)
                    continue
                ref = np.load(path, mmap_mode="r")
                if ref.shape != y.shape:
                    passed[name] = False
                    continue
                sums[name].add(ref, y)
                passed[name] = passed[name] and _within(ref, y, rtol, atol)
                del ref
        del session
    order = [n for n in index if n in sums]
    return [OutputComparison(n, *_summary(sums[n]), passed[n]) for n in order]


def compare_models(
    reference: onnx.ModelProto | str,
    candidate: onnx.ModelProto | str,
    feeds: list[Feed],
    rtol: float = 1e-3,
    atol: float = 1e-3,
) -> list[OutputComparison]:
    """Run both models on ``feeds`` with polygraphy's Comparator; metrics per common output."""
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator

    def session_of(m: onnx.ModelProto | str, workdir: Path):
        # A loader, called when polygraphy activates the runner: one session alive at a time.
        def load() -> ort.InferenceSession:
            return _session_of(m, workdir)

        return load

    with tempfile.TemporaryDirectory(prefix="flarc-compare-") as tmp:
        runners = [
            OnnxrtRunner(session_of(reference, Path(tmp) / "reference"), name="original"),
            OnnxrtRunner(session_of(candidate, Path(tmp) / "candidate"), name="compressed"),
        ]
        with quiet():
            results = Comparator.run(runners, data_loader=feeds)
            verdicts = Comparator.compare_accuracy(
                results, compare_func=simple_compare_func(rtol=rtol, atol=atol, check_shapes=True)
            )
    (_, ref_iters), (_, out_iters) = results[0], results[1]
    passed: dict[str, bool] = {}
    for result in accuracy_results(verdicts):
        for it in (it for iterations in result.values() for it in iterations):
            for name, ok in it.items():
                passed[name] = passed.get(name, True) and bool(ok)
    comparisons = []
    for name in ref_iters[0].keys():
        if name not in out_iters[0]:
            continue
        ref = [it[name] for it in ref_iters]
        out = [it[name] for it in out_iters]
        if not np.issubdtype(np.asarray(ref[0]).dtype, np.number):
            continue
        comparisons.append(OutputComparison(name, *_metrics(ref, out), passed.get(name, False)))
    return comparisons
