"""The analysis file (``flarc analyze -o model.analysis``): statistics, spectra and importances
stored once, so ranks can be chosen again in seconds with no calibration and no SVD.

One uncompressed ``.npz`` (read back without pickle): a JSON manifest under ``manifest`` and
float64 arrays ``t{i}/sigma|basis|vt`` per target and ``s{j}/...`` / ``h{j}/...`` per statistic.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from flarc.calib.moments import LazyMoments, Moments
from flarc.core.diskarray import MIN_SPILL_BYTES, DiskArray, as_array, npz_members, write_npz
from flarc.core.errors import FlarcError
from flarc.core.files import atomic_path
from flarc.core.targets import ConvGeometry, Skipped, Target
from flarc.core.version import __version__
from flarc.rewrite.analysis import Analysis, AnalysisOptions, TargetAnalysis
from flarc.rewrite.spectrum import Spectrum

FORMAT = "flarc-analysis/1"


def target_from_dict(d: dict) -> Target:
    fields = {k: v for k, v in d.items() if k != "k_equiv"}
    fields["weight_shape"] = tuple(fields["weight_shape"])
    if fields.get("conv"):
        fields["conv"] = ConvGeometry(
            **{k: (tuple(v) if isinstance(v, list) else v) for k, v in fields["conv"].items()}
        )
    return Target(**fields)


def _feeds(arrays: dict[str, np.ndarray], kind: str, names: list[list[str]]) -> list[dict]:
    return [
        {name: as_array(arrays[f"{kind}{i}/{name}"]) for name in feed}
        for i, feed in enumerate(names)
    ]


def save_analysis(analysis: Analysis, path: str | Path) -> None:
    keys = list(analysis.stats)
    manifest = {
        "format": FORMAT,
        "flarc_version": __version__,
        "model_sha256": analysis.model_sha256,
        "options": asdict(analysis.options),
        "targets": [t.to_dict() for t in analysis.targets],
        "skipped": [asdict(s) for s in analysis.skipped],
        "entries": {
            name: {"lam": e.lam, "whitening": e.whitening, "rows": e.rows}
            for name, e in analysis.entries.items()
        },
        "stat_keys": keys,
        "heldout_keys": list(analysis.heldout_stats),
        "fisher": analysis.fisher,
        "fisher_loss": analysis.fisher_loss,
        "mask_input": analysis.mask_input,
        "heldout_feeds": [sorted(f) for f in analysis.heldout_feeds],
        "probe_feeds": [sorted(f) for f in analysis.probe_feeds],
        "heldout_is_calibration": analysis.heldout_is_calibration,
        "extra": analysis.extra,
    }
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            write_npz(fh, _arrays(analysis, manifest))


def _arrays(analysis: Analysis, manifest: dict) -> Iterator[tuple[str, np.ndarray | DiskArray]]:
    """Every array of the file, one at a time (a large model's are read from disk as needed)."""
    yield "manifest", np.array(json.dumps(manifest))
    for i, t in enumerate(analysis.targets):
        s = analysis.entries[t.name].spectrum
        yield f"t{i}/sigma", s.sigma
        # Fortran order: the factors of a rank are a prefix of columns, one read when loaded.
        basis = s.basis if isinstance(s.basis, DiskArray) else np.asfortranarray(s.basis)
        yield f"t{i}/basis", basis
        yield f"t{i}/vt", s.vt
    for prefix, stats in (("s", analysis.stats), ("h", analysis.heldout_stats)):
        for j, key in enumerate(stats):
            yield from stats[key].to_arrays(f"{prefix}{j}/").items()
    for kind, feeds in (("hf", analysis.heldout_feeds), ("pf", analysis.probe_feeds)):
        for i, feed in enumerate(feeds):
            for name, value in feed.items():
                yield f"{kind}{i}/{name}", value


def _moments(arrays: dict, prefix: str, keys: list[str]) -> LazyMoments:
    out = {}
    for j, key in enumerate(keys):
        gram = arrays[f"{prefix}{j}/gram"]
        small = {
            k: as_array(v)
            for k, v in arrays.items()
            if k.startswith(f"{prefix}{j}/") and k != f"{prefix}{j}/gram"
        }
        moments = Moments.from_arrays(
            {**small, f"{prefix}{j}/gram": np.zeros((0, 0))}, f"{prefix}{j}/"
        )
        moments.gram = gram if isinstance(gram, DiskArray) else np.asarray(gram, dtype=np.float64)
        out[key] = moments
    return LazyMoments(out)


def load_analysis(path: str | Path, model_sha256: str | None = None) -> Analysis:
    """Read an analysis file; refuse one made for another model (when ``model_sha256`` is given)."""
    path = Path(path)
    if not path.is_file():
        raise FlarcError(f"{path}: no such analysis file")
    try:
        # Large arrays stay in the file and are read when used (a prefix for a rank's factors).
        members = npz_members(path)
        arrays = {k: v.load() if v.nbytes < MIN_SPILL_BYTES else v for k, v in members.items()}
        manifest = json.loads(str(as_array(arrays["manifest"])))
    except Exception as exc:
        raise FlarcError(
            f"{path}: not a flarc analysis file ({type(exc).__name__}: {exc})"
        ) from None
    if manifest.get("format") != FORMAT:
        raise FlarcError(f"{path}: unsupported analysis format {manifest.get('format')!r}")
    if model_sha256 and manifest["model_sha256"] != model_sha256:
        raise FlarcError(
            f"{path}: analysis was made for another model (sha256 {manifest['model_sha256'][:12]}...)"
        )
    targets = [target_from_dict(d) for d in manifest["targets"]]
    entries = {}
    for i, t in enumerate(targets):
        meta = manifest["entries"][t.name]
        sigma = as_array(arrays[f"t{i}/sigma"])
        spectrum = Spectrum(sigma, arrays[f"t{i}/basis"], arrays[f"t{i}/vt"])
        entries[t.name] = TargetAnalysis(t, spectrum, meta["lam"], meta["whitening"], meta["rows"])
    stats = _moments(arrays, "s", manifest["stat_keys"])
    heldout = _moments(arrays, "h", manifest["heldout_keys"])
    return Analysis(
        model_sha256=manifest["model_sha256"],
        options=AnalysisOptions(**manifest["options"]),
        targets=targets,
        skipped=[Skipped(**s) for s in manifest["skipped"]],
        stats=stats,
        heldout_stats=heldout,
        entries=entries,
        fisher=manifest["fisher"],
        fisher_loss=manifest["fisher_loss"],
        mask_input=manifest["mask_input"],
        heldout_feeds=_feeds(arrays, "hf", manifest["heldout_feeds"]),
        probe_feeds=_feeds(arrays, "pf", manifest["probe_feeds"]),
        heldout_is_calibration=manifest["heldout_is_calibration"],
        extra=manifest.get("extra", {}),
    )
