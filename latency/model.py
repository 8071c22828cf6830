"""The seam to the rank stage: ``LatencyModel`` answers dense time, pair time, ``lat_recov`` and the
break-even rank per target, from a latency.json file or from profiling on the fly.

Measured shapes use their own monotone curve (exact at measured ranks); any other shape uses the
regressor fitted on all measurements (see ``predictor.py``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import onnx

from flarc.core.errors import DataError, ModelError
from flarc.core.progress import Progress
from flarc.core.targets import Target
from flarc.latency.backend import BACKENDS, get_backend
from flarc.latency.cache import LatencyCache
from flarc.latency.predictor import LatencyRegressor, MonotoneCurve
from flarc.latency.profile import LatencyProfile, profile_model
from flarc.latency.shapes import target_input_shapes
from flarc.latency.spec import LayerSpec, spec_for_target
from flarc.latency.timing import TimingConfig

log = logging.getLogger(__name__)


class LatencyModel:
    """Latency predictions for a profile; targets are looked up by name in ``specs``."""

    def __init__(self, profile: LatencyProfile, specs: dict[str, LayerSpec] | None = None) -> None:
        self.profile = profile
        self.specs = dict(specs or {})
        self.curves = {
            key: MonotoneCurve(sp.pair.keys(), [s.median for s in sp.pair.values()])
            for key, sp in profile.shapes.items()
            if sp.pair
        }
        samples = []
        for sp in profile.shapes.values():
            samples.append((sp.spec, None, sp.dense.median))
            samples += [(sp.spec, k, s.median) for k, s in sp.pair.items()]
        self.regressor = LatencyRegressor(profile.dtype).fit(samples) if samples else None

    def spec(self, target: Target | LayerSpec) -> LayerSpec:
        """The layer spec of ``target`` (a spec is returned as is); ModelError when the target's
        input shape is unknown."""
        if isinstance(target, LayerSpec):
            return target
        try:
            return self.specs[target.name]
        except KeyError:
            raise ModelError(f"latency: target '{target.name}' has no known input shape") from None

    def _regress(self, spec: LayerSpec, k: int | None) -> float:
        if self.regressor is None:
            raise DataError(f"latency: nothing measured to predict {spec.key} from")
        return self.regressor.predict(spec, k)

    def t_dense(self, target: Target | LayerSpec) -> float:
        """Seconds per call of the dense layer."""
        spec = self.spec(target)
        sp = self.profile.shapes.get(spec.key)
        return sp.dense.median if sp is not None else self._regress(spec, None)

    def t_pair(self, target: Target | LayerSpec, k: int) -> float:
        """Seconds per call of the rank-``k`` pair (non-decreasing in k)."""
        if k < 1:
            raise ValueError(f"rank must be positive, got {k}")
        spec = self.spec(target)
        curve = self.curves.get(spec.key)
        return curve(k) if curve is not None else self._regress(spec, k)

    def lat_recov(self, target: Target | LayerSpec, k: int) -> float:
        """``t_pair(k) / t_dense``: below 1 the pair is faster than the dense layer."""
        return self.t_pair(target, k) / self.t_dense(target)

    def is_measured(self, target: Target | LayerSpec) -> bool:
        """Whether the target's shape has measured pair timings (else its times come from the
        regressor)."""
        return self.spec(target).key in self.curves

    def break_even(self, target: Target | LayerSpec, align: int = 8) -> int | None:
        """The largest aligned rank ``<= k_equiv`` whose pair is still faster; None if none is."""
        spec = self.spec(target)
        best = None
        for k in range(align, math.floor(spec.k_equiv) + 1, align):
            if self.lat_recov(spec, k) >= 1.0:
                break  # lat_recov is non-decreasing in k
            best = k
        return best


def load_latency_model(
    path_or_backend: str,
    model: onnx.ModelProto,
    targets: list[Target],
    shapes: dict[str, list[int]] | None = None,
    threads: int | None = None,
    dtype: str | None = None,
    align: int = 8,
    cache: LatencyCache | None = None,
    timing: TimingConfig | None = None,
    progress: Progress | None = None,
) -> LatencyModel:
    """A LatencyModel from a latency.json path, or by profiling ``targets`` on a named backend.

    ``dtype`` defaults to the targets' weight precision (fp16 weights -> fp16, else fp32).
    """
    if path_or_backend in BACKENDS:
        if dtype is None:
            dtype = "fp16" if targets and all(t.dtype == "float16" for t in targets) else "fp32"
        backend = get_backend(path_or_backend, threads=threads, dtype=dtype, timing=timing)
        profile = profile_model(model, targets, backend, shapes, align, cache, progress)
        return LatencyModel(
            profile, {name: profile.shapes[key].spec for name, key in profile.targets.items()}
        )
    path = Path(path_or_backend)
    if not path.exists():
        raise DataError(
            f"{path}: no such latency file, and not a backend name ({', '.join(BACKENDS)})"
        )
    profile = LatencyProfile.load(path)
    specs: dict[str, LayerSpec] = {}
    unknown = []
    for t in targets:
        key = profile.targets.get(t.name)
        spec = profile.shapes[key].spec if key is not None else None
        if spec is not None and (spec.n, spec.m, spec.kind) == (
            t.n,
            t.m,
            "conv" if t.conv else "linear",
        ):
            specs[t.name] = spec
        else:
            unknown.append(t)
    if unknown:
        # Targets the file does not name (another model, or renamed nodes): find their shapes.
        real = target_input_shapes(model, unknown, shapes or profile.input_shapes or None)
        for t in unknown:
            specs[t.name] = spec_for_target(t, real[t.name])
        missing = sum(specs[t.name].key not in profile.shapes for t in unknown)
        if missing:
            log.info("latency: %d target(s) not in %s; predicted by regression", missing, path)
    return LatencyModel(profile, specs)
