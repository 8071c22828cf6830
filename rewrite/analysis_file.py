"""The analysis file (``flarc analyze -o model.analysis``): a store folder holding statistics,
spectra and importances, so ranks can be chosen again in seconds with no calibration and no SVD.

Layout (:mod:`flarc.core.store`): ``manifest.json`` (format, model, options, targets, entries,
importances, feeds' names), the ``statistics`` and ``heldout`` groups (the calibration sums,
:mod:`flarc.calib.checkpoint`), ``spectra/<key>/t<i>/{sigma,basis,vt}.npy`` (the basis in
Fortran order: a rank's factors are a prefix read) and ``feeds/<kind><i>/<j>.npy``. It is
written in a temporary folder beside its final name and renamed into place.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from flarc.calib.checkpoint import Checkpoint
from flarc.calib.moments import LazyMoments, Moments
from flarc.core.errors import FlarcError
from flarc.core.files import atomic_folder
from flarc.core.store import Store, as_array
from flarc.core.targets import Skipped, Target
from flarc.core.version import __version__
from flarc.rewrite.analysis import Analysis, AnalysisOptions, read_spectra, spectra_meta

FORMAT = "flarc-analysis/2"
MANIFEST = "manifest.json"


def _save_moments(store: Store, group: str, stats) -> None:
    raw: dict[str, Moments] = stats.raw() if isinstance(stats, LazyMoments) else dict(stats)
    n = len(raw)
    Checkpoint(store, group, {}, checksum=False).save(n, n, raw)


def save_analysis(analysis: Analysis, path: str | os.PathLike) -> None:
    """Write ``analysis`` to the folder ``path`` (replacing an older one there), one array at a
    time: stored arrays are copied file to file, never loaded whole."""
    path = Path(path)
    if path.exists() and not (path / MANIFEST).is_file() and not path.is_file():
        if any(path.iterdir()):
            raise FlarcError(f"{path}: exists and is not an analysis; refusing to overwrite it")
    with atomic_folder(path) as tmp:
        store = Store(tmp)
        _save_moments(store, "statistics", analysis.stats)
        _save_moments(store, "heldout", analysis.heldout_stats)
        key = f"spectra/{analysis.options.spectra_key()}"
        for i, t in enumerate(analysis.targets):
            analysis.entries[t.name].spectrum.stored(store, f"{key}/t{i}")
        store.put_json(f"{key}/meta.json", spectra_meta(analysis.entries, analysis.options))
        for i, t in enumerate(analysis.targets):
            if analysis.output_diag is not None:
                store.put(f"output_diag/t{i}", np.asarray(analysis.output_diag[t.name]))
        feeds = {"hf": analysis.heldout_feeds, "pf": analysis.probe_feeds}
        for kind, batch in feeds.items():
            for i, feed in enumerate(batch):
                for j, value in enumerate(feed.values()):
                    store.put(f"feeds/{kind}{i}/{j}", np.asarray(value))
        store.put_json(
            MANIFEST,
            {
                "format": FORMAT,
                "flarc_version": __version__,
                "model_sha256": analysis.model_sha256,
                "options": asdict(analysis.options),
                "spectra": key,
                "targets": [t.to_dict() for t in analysis.targets],
                "skipped": [asdict(s) for s in analysis.skipped],
                "fisher": analysis.fisher,
                "fisher_loss": analysis.fisher_loss,
                "output_g2": analysis.output_g2,
                "sensitivity_loss": analysis.sensitivity_loss,
                "output_diag": analysis.output_diag is not None,
                "mask_input": analysis.mask_input,
                "feeds": {kind: [list(f) for f in batch] for kind, batch in feeds.items()},
                "heldout_is_calibration": analysis.heldout_is_calibration,
                "extra": analysis.extra,
            },
        )


def _moments(store: Store, group: str) -> LazyMoments:
    return LazyMoments(Checkpoint(store, group, {}).saved())


def load_analysis(path: str | os.PathLike, model_sha256: str | None = None) -> Analysis:
    """Read an analysis folder; refuse one made for another model (when ``model_sha256`` is
    given). Large arrays stay in their files and are read when used."""
    path = Path(path)
    if not path.exists():
        raise FlarcError(f"{path}: no such analysis")
    store = Store(path, writable=False)
    try:
        manifest = store.get_json(MANIFEST) if path.is_dir() else None
    except (OSError, ValueError) as exc:
        raise FlarcError(f"{path}: unreadable analysis manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise FlarcError(f"{path}: not a flarc analysis folder (made by 'flarc analyze -o')")
    if manifest.get("format") != FORMAT:
        raise FlarcError(f"{path}: unsupported analysis format {manifest.get('format')!r}")
    if model_sha256 and manifest["model_sha256"] != model_sha256:
        raise FlarcError(
            f"{path}: analysis was made for another model (sha256 {manifest['model_sha256'][:12]}...)"
        )
    try:
        targets = [Target.from_dict(d) for d in manifest["targets"]]
        entries = read_spectra(store, manifest["spectra"], targets)
        if entries is None:
            raise KeyError(f"spectra {manifest['spectra']}")
        feeds = {
            kind: [
                {name: as_array(store.get(f"feeds/{kind}{i}/{j}")) for j, name in enumerate(names)}
                for i, names in enumerate(batches)
            ]
            for kind, batches in manifest["feeds"].items()
        }
        stats, heldout = _moments(store, "statistics"), _moments(store, "heldout")
    except (KeyError, OSError, ValueError, FlarcError) as exc:
        raise FlarcError(f"{path}: incomplete analysis ({type(exc).__name__}: {exc})") from None
    return Analysis(
        model_sha256=manifest["model_sha256"],
        # An analysis written before D was shrunk used it as estimated.
        options=AnalysisOptions(**{"output_shrinkage": 0.0, **manifest["options"]}),
        targets=targets,
        skipped=[Skipped(**s) for s in manifest["skipped"]],
        stats=stats,
        heldout_stats=heldout,
        entries=entries,
        fisher=manifest["fisher"],
        fisher_loss=manifest["fisher_loss"],
        output_g2=manifest.get("output_g2"),
        output_diag={
            t.name: np.asarray(store.get(f"output_diag/t{i}").load()) for i, t in enumerate(targets)
        }
        if manifest.get("output_diag")
        else None,
        sensitivity_loss=manifest.get("sensitivity_loss"),
        mask_input=manifest["mask_input"],
        heldout_feeds=feeds["hf"],
        probe_feeds=feeds["pf"],
        heldout_is_calibration=manifest["heldout_is_calibration"],
        extra=manifest.get("extra", {}),
        store=store,
    )
