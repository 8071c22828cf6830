"""The analysis file (``flarc analyze -o model.analysis``): statistics, spectra and importances
stored once, so ranks can be chosen again in seconds with no calibration and no SVD.

One uncompressed ``.npz`` (read back without pickle): a JSON manifest under ``manifest`` and
float64 arrays ``t{i}/sigma|basis|vt`` per target and ``s{j}/...`` / ``h{j}/...`` per statistic.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from flarc import __version__
from flarc.analysis import Analysis, AnalysisOptions, TargetAnalysis
from flarc.calib.moments import Moments
from flarc.errors import FlarcError
from flarc.modelio import atomic_path
from flarc.rewrite.spectrum import Spectrum
from flarc.targets import ConvGeometry, Skipped, Target

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
    return [{name: arrays[f"{kind}{i}/{name}"] for name in feed} for i, feed in enumerate(names)]


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
    arrays: dict[str, np.ndarray] = {"manifest": np.array(json.dumps(manifest))}
    for i, t in enumerate(analysis.targets):
        s = analysis.entries[t.name].spectrum
        arrays.update({f"t{i}/sigma": s.sigma, f"t{i}/basis": s.basis, f"t{i}/vt": s.vt})
    for j, key in enumerate(keys):
        arrays.update(analysis.stats[key].to_arrays(f"s{j}/"))
    for j, key in enumerate(analysis.heldout_stats):
        arrays.update(analysis.heldout_stats[key].to_arrays(f"h{j}/"))
    for kind, feeds in (("hf", analysis.heldout_feeds), ("pf", analysis.probe_feeds)):
        for i, feed in enumerate(feeds):
            arrays.update({f"{kind}{i}/{name}": value for name, value in feed.items()})
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def load_analysis(path: str | Path, model_sha256: str | None = None) -> Analysis:
    """Read an analysis file; refuse one made for another model (when ``model_sha256`` is given)."""
    path = Path(path)
    if not path.is_file():
        raise FlarcError(f"{path}: no such analysis file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        manifest = json.loads(str(arrays["manifest"]))
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
        spectrum = Spectrum(arrays[f"t{i}/sigma"], arrays[f"t{i}/basis"], arrays[f"t{i}/vt"])
        entries[t.name] = TargetAnalysis(t, spectrum, meta["lam"], meta["whitening"], meta["rows"])
    stats = {
        key: Moments.from_arrays(arrays, f"s{j}/") for j, key in enumerate(manifest["stat_keys"])
    }
    heldout = {
        key: Moments.from_arrays(arrays, f"h{j}/") for j, key in enumerate(manifest["heldout_keys"])
    }
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
