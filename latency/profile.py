"""Profile a model's targets on a backend: one dense timing and one pair timing per aligned rank
for every distinct layer shape, through the cache; and the latency.json format that holds them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from flarc.core.errors import DataError
from flarc.core.files import read_versioned_json, write_text_atomic
from flarc.core.progress import NoProgress, Progress
from flarc.core.targets import Target
from flarc.latency.backend import Backend
from flarc.latency.cache import LatencyCache
from flarc.latency.shapes import input_shapes, target_input_shapes
from flarc.latency.spec import LayerSpec, spec_for_target
from flarc.latency.timing import Stats

FORMAT = "flarc-latency"
VERSION = 1


@dataclass
class ShapeProfile:
    """The timings of one layer shape: dense, and the pair at each measured rank; ``targets`` are
    the targets of that shape."""

    spec: LayerSpec
    dense: Stats
    pair: dict[int, Stats]  # rank -> timing, ascending
    targets: list[str] = field(default_factory=list)

    def lat_recov(self) -> dict[int, float]:
        """``t_pair(k) / t_dense`` (medians) at each measured rank."""
        return {k: s.median / self.dense.median for k, s in self.pair.items()}

    def to_dict(self) -> dict:
        """The shape's entry of latency.json (with ``k_equiv``, for readers)."""
        return {
            "spec": self.spec.to_dict(),
            "k_equiv": self.spec.k_equiv,
            "targets": self.targets,
            "dense": self.dense.to_dict(),
            "pair": {str(k): s.to_dict() for k, s in sorted(self.pair.items())},
        }

    @classmethod
    def from_dict(cls, d: dict) -> ShapeProfile:
        """Inverse of :meth:`to_dict` (``k_equiv`` is not read)."""
        return cls(
            spec=LayerSpec.from_dict(d["spec"]),
            dense=Stats.from_dict(d["dense"]),
            pair={
                int(k): Stats.from_dict(v)
                for k, v in sorted(d["pair"].items(), key=lambda kv: int(kv[0]))
            },
            targets=[str(t) for t in d.get("targets", [])],
        )


@dataclass
class LatencyProfile:
    """The content of a latency.json: how it was measured (backend, device, threads, dtype, rank
    step, input shapes), the timings of each shape, and each target's shape."""

    backend: str
    backend_version: str
    device: str
    threads: int | None
    dtype: str
    align: int
    input_shapes: dict[str, list[int]]
    shapes: dict[str, ShapeProfile]  # spec key -> profile
    targets: dict[str, str]  # target name -> spec key

    def to_dict(self) -> dict:
        """The latency.json document (``format``, ``version`` and every field)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "backend": self.backend,
            "backend_version": self.backend_version,
            "device": self.device,
            "threads": self.threads,
            "dtype": self.dtype,
            "align": self.align,
            "input_shapes": self.input_shapes,
            "targets": self.targets,
            "shapes": {key: sp.to_dict() for key, sp in self.shapes.items()},
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the profile to ``path`` as latency.json, atomically."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyProfile:
        """Read a latency.json; DataError for a missing or unreadable file, another format or
        version, or malformed or inconsistent content."""
        path = Path(path)
        d = read_versioned_json(path, "latency JSON file", FORMAT, VERSION, error=DataError)
        try:
            shapes = {key: ShapeProfile.from_dict(v) for key, v in d["shapes"].items()}
            for key, sp in shapes.items():
                if sp.spec.key != key:
                    raise ValueError(f"shape '{key}' holds a spec for '{sp.spec.key}'")
            targets = {str(k): str(v) for k, v in d["targets"].items()}
            unknown = [k for k in targets.values() if k not in shapes]
            if unknown:
                raise ValueError(f"targets refer to unmeasured shape '{unknown[0]}'")
            return cls(
                backend=str(d["backend"]),
                backend_version=str(d["backend_version"]),
                device=str(d["device"]),
                threads=None if d.get("threads") is None else int(d["threads"]),
                dtype=str(d["dtype"]),
                align=int(d["align"]),
                input_shapes={k: [int(x) for x in v] for k, v in d.get("input_shapes", {}).items()},
                shapes=shapes,
                targets=targets,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(
                f"{path}: malformed latency file ({type(exc).__name__}: {exc})"
            ) from None


def _timed(backend: Backend, cache: LatencyCache, spec: LayerSpec, k: int | None) -> Stats:
    key = {**backend.cache_identity(), "shape": spec.key, "rank": "dense" if k is None else k}
    stats = cache.get(key)
    if stats is None:
        stats = backend.time_dense(spec) if k is None else backend.time_pair(spec, k)
        if not (math.isfinite(stats.median) and stats.median > 0):
            raise DataError(
                f"{backend.name}: non-positive timing for {spec.key} rank {key['rank']}"
            )
        cache.put(key, stats)
    return stats


def profile_specs(
    specs: list[LayerSpec],
    backend: Backend,
    align: int = 8,
    cache: LatencyCache | None = None,
    progress: Progress | None = None,
) -> dict[str, ShapeProfile]:
    """Dense and per-rank pair timings for each distinct spec (cached)."""
    cache = cache if cache is not None else LatencyCache()
    progress = progress or NoProgress()
    unique = {s.key: s for s in specs}
    jobs = [(s, k) for s in unique.values() for k in [None, *s.grid(align)]]
    results: dict[str, dict] = {key: {} for key in unique}
    for spec, k in progress.track(jobs, total=len(jobs), description=f"latency ({backend.name})"):
        results[spec.key][k] = _timed(backend, cache, spec, k)
    return {
        key: ShapeProfile(
            spec=unique[key],
            dense=r[None],
            pair={k: v for k, v in sorted(r.items(), key=lambda kv: kv[0] or 0) if k is not None},
        )
        for key, r in results.items()
    }


def profile_model(
    model: onnx.ModelProto,
    targets: list[Target],
    backend: Backend,
    shapes: dict[str, list[int]] | None = None,
    align: int = 8,
    cache: LatencyCache | None = None,
    progress: Progress | None = None,
) -> LatencyProfile:
    """Time every distinct target shape of ``model`` at its real input shape."""
    if align < 1:
        raise DataError(f"--align must be positive, got {align}")
    fixed = input_shapes(model, shapes)
    real = target_input_shapes(model, targets, fixed)
    specs = {t.name: spec_for_target(t, real[t.name]) for t in targets}
    measured = profile_specs(list(specs.values()), backend, align, cache, progress)
    for name, spec in specs.items():
        measured[spec.key].targets.append(name)
    return LatencyProfile(
        backend=backend.name,
        backend_version=backend.version(),
        device=backend.fingerprint(),
        threads=backend.threads,
        dtype=backend.dtype,
        align=align,
        input_shapes=fixed,
        shapes=measured,
        targets={name: spec.key for name, spec in specs.items()},
    )
