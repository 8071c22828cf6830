"""Compare two models on the same inputs (onnxruntime, CPU) by polygraphy's element-wise rule.

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
from flarc.core.progress import NoProgress, Progress
from flarc.core.sessions import FedSession, fed_session, lean_session_options, open_session
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


def _session(model: onnx.ModelProto | str) -> FedSession:
    """A checking session for ``model``; a proto's large weights (a large rewrite's factors are
    files outside the model's folder) are fed, not serialised into a copy of the model."""
    if isinstance(model, onnx.ModelProto):
        return fed_session(model, lean_session_options(model))
    return FedSession(open_session(model, lean_session_options()), {})


def _save_outputs(
    model: onnx.ModelProto | str, feeds: list[Feed], folder: Path, progress: Progress
) -> dict[str, int]:
    """Run ``model`` on every feed and save its numeric outputs as ``<feed>-<output>.npy``."""
    session = _session(model)
    names = [o.name for o in session.session.get_outputs()]
    described = progress.track(feeds, total=len(feeds), description="comparison: original")
    for i, feed in enumerate(described):
        for j, y in enumerate(session.run(names, feed)):
            if np.issubdtype(y.dtype, np.number):
                with naming_write_errors(folder / f"{i}-{j}.npy"):
                    np.save(folder / f"{i}-{j}.npy", y)
    return {name: j for j, name in enumerate(names)}


def compare_models(
    reference: onnx.ModelProto | str,
    candidate: onnx.ModelProto | str,
    feeds: list[Feed],
    rtol: float = 1e-3,
    atol: float = 1e-3,
    progress: Progress | None = None,
) -> list[OutputComparison]:
    """Run both models on ``feeds`` in onnxruntime (CPU) and compare their common numeric
    outputs: the metrics, and polygraphy's simple element-wise verdict at ``rtol``/``atol``
    (tests hold both to polygraphy's Comparator, whose runners would import torch: a second
    per call). One session at a time; the reference's outputs wait on disk and are read back
    one batch at a time, the metrics summed in blocks (a language model's logits would
    otherwise be held for every batch, twice, and again in float64)."""
    progress = progress or NoProgress()
    with tempfile.TemporaryDirectory(prefix="flarc-compare-") as tmp:
        folder = Path(tmp)
        index = _save_outputs(reference, feeds, folder, progress)
        session = _session(candidate)
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
