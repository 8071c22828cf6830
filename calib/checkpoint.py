"""The calibration sums in the store, saved as they grow, so an interrupted run resumes where it
stopped; the last save is the statistics themselves (what the analysis reads).

A save is one group of the store (:meth:`flarc.core.store.Store.commit`): the running sums of
every statistic after a whole number of batches, and a meta with the number of batches summed,
the identity of the run (model fingerprint, statistics options, plans, a digest of the
calibration feeds in order) and a SHA-256 of the arrays. Groups are replaced atomically, so a
kill at any moment leaves the previous save or the new one.

Because the sums are added in batch order and a resumed run starts from the saved float64 sums
at the next batch, the final statistics are bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flarc.calib.moments import Moments, moments_arrays, moments_from_arrays
from flarc.core.errors import DataError
from flarc.core.store import Store, as_array

log = logging.getLogger(__name__)

FORMAT = "flarc-statistics/1"


def _update(h, label: str, value) -> None:
    """Hash one array: its label, dtype and shape, then its bytes (none for an empty array)."""
    arr = np.ascontiguousarray(value)
    h.update(f"{label}|{arr.dtype.str}|{arr.shape}\n".encode())
    if arr.size:
        h.update(memoryview(arr).cast("B"))


def feeds_digest(feeds: Iterable[dict[str, np.ndarray]]) -> str:
    """SHA-256 over every feed in order: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for i, feed in enumerate(feeds):
        h.update(f"batch {i}\n".encode())
        for name in sorted(feed):
            _update(h, name, feed[name])
    return h.hexdigest()


def arrays_digest(arrays: dict) -> str:
    """SHA-256 of a save's arrays (names in order, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        _update(h, key, as_array(arrays[key]))
    return h.hexdigest()


@dataclass
class Checkpoint:
    """Saves the running sums of one statistics pass into ``store``'s group ``group``.

    ``every`` batches (None: only after the last one); ``resume`` starts from a save of the
    same identity, and a save of another identity is refused rather than silently mixed in.
    """

    store: Store
    group: str
    identity: dict[str, Any]
    every: int | None = None
    resume: bool = False
    checksum: bool = True  # a save to resume from is checked; a finished analysis need not be
    # Where the last save is written while the caller goes on (:meth:`save`); None: in place.
    writer: Executor | None = field(default=None, repr=False, compare=False)
    _pending: Future | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.every is not None and self.every < 1:
            raise DataError(f"--checkpoint-every {self.every}: must be at least 1")

    def part(self, name: str, writer: Executor | None = None) -> Checkpoint:
        """The checkpoint of one of several passes (a group of its own), its last save written
        by ``writer`` if given."""
        return Checkpoint(
            self.store,
            f"{self.group}/{name}",
            dict(self.identity),
            self.every,
            self.resume,
            self.checksum,
            writer,
        )

    @property
    def resumable(self) -> bool:
        """Whether a later run may resume from these saves (a folder the user named)."""
        return bool(self.identity) and self.store.on_disk

    @property
    def where(self) -> str:
        return f"checkpoint {self.store.path(self.group) if self.store.on_disk else self.group}"

    @property
    def fingerprint(self) -> str:
        text = json.dumps(self.identity, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def due(self, done: int, total: int) -> bool:
        """Whether to save after ``done`` batches (every N, and always after the last)."""
        return done == total or (self.every is not None and done % self.every == 0)

    def load(self, keys: dict[str, int]) -> tuple[int, dict[str, Moments]] | None:
        """The saved ``(batches done, sums)``, or None when there is nothing to resume.

        ``keys`` maps every statistic key to its width ``n``. Raises DataError for a save of
        another model/options/data, or one that fails its checksum.
        """
        self.store.clean(self.group)
        saved = self.store.group(self.group)
        if not self.resume:
            if saved is not None and self.store.on_disk:
                log.warning("%s: not resuming (no --resume); starting over", self.where)
            return None
        if saved is None:
            log.info("%s: nothing saved yet; starting from the first batch", self.where)
            return None
        arrays, meta = saved
        if meta.get("format") != FORMAT:
            raise DataError(f"{self.where}: unsupported format {meta.get('format')!r}")
        mine, theirs = self.identity, meta.get("identity", {})
        if meta.get("fingerprint") != self.fingerprint:
            differs = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            what = ", ".join(differs) or "identity"
            raise DataError(
                f"{self.where} was made for another model, options or calibration data "
                f"(differs in: {what}); use another --checkpoint folder or delete it"
            )
        if arrays_digest(arrays) != meta.get("checksum"):
            raise DataError(
                f"{self.where}: checksum mismatch (corrupted file); delete it to start over"
            )
        if list(meta.get("keys", [])) != list(keys):
            raise DataError(f"{self.where}: statistics keys differ from this run's")
        try:
            sums = moments_from_arrays(arrays, meta["keys"], lazy=False)
        except KeyError as exc:
            raise DataError(f"{self.where}: missing array {exc}") from None
        for key, n in keys.items():
            if sums[key].gram.shape != (n, n):
                raise DataError(f"{self.where}: statistic '{key}' has the wrong shape")
        done = int(meta["batches_done"])
        log.info("%s: resuming after batch %d", self.where, done)
        return done, sums

    def save(self, done: int, total: int, sums: dict[str, Moments]) -> None:
        """Commit the sums after ``done`` of ``total`` batches (atomically, as one group). With a
        ``writer`` the last save is committed there while the caller goes on, its sums left
        unchanged (:meth:`saved` waits for it); earlier ones, whose sums still grow, in place."""
        self.wait()
        arrays = moments_arrays(sums)
        meta = {
            "format": FORMAT,
            "batches_done": done,
            "batches_total": total,
            "keys": list(sums),
            "fingerprint": self.fingerprint,
            "identity": self.identity,
            "checksum": arrays_digest(arrays) if self.resumable and self.checksum else None,
        }
        if self.writer is not None and done == total:
            self._pending = self.writer.submit(self.store.commit, self.group, arrays, meta)
        else:
            self.store.commit(self.group, arrays, meta)
        log.debug("%s: %d of %d batches", self.where, done, total)

    def wait(self) -> None:
        """Wait for a save in flight (its error, if any, raised here)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def saved(self) -> dict[str, Moments]:
        """The statistics of the last save, their Grams read when used (a store on disk)."""
        self.wait()
        found = self.store.group(self.group)
        if found is None:
            raise DataError(f"{self.where}: no statistics saved")
        arrays, meta = found
        return moments_from_arrays(arrays, meta["keys"], lazy=True)


def statistics_source(store: Store, group: str = "statistics") -> str | None:
    """A fingerprint of the statistics saved in ``store`` (all parts of ``group``): what spectra
    derived from them record, so that spectra of other statistics are never reused. None for
    an in-memory store (nothing there outlives the run)."""
    if not store.on_disk:
        return None
    found = []
    for name in [group, *store.groups(group)]:
        saved = store.group(name)
        if saved is not None:
            meta = saved[1]
            found.append(
                [name, meta.get("fingerprint"), meta.get("batches_done"), meta.get("keys")]
            )
    if not found:
        return None
    return hashlib.sha256(json.dumps(found, sort_keys=True).encode()).hexdigest()
