"""Checkpoints of the calibration statistics, so an interrupted run resumes where it stopped.

A checkpoint is one ``.npz`` (read back without pickle) in the checkpoint folder holding the
running sums of every statistic after a whole number of batches, and a JSON manifest: the
number of batches summed, a fingerprint of the model, the statistics options, the plans and
the calibration feeds in order, and a SHA-256 of the arrays. It is written to a temporary
name, fsynced, then renamed over the previous one (and the folder fsynced), so a kill at any
moment leaves either the old checkpoint or the new one, never half a file under the real name.

Because the sums are added in batch order and a resumed run starts from the saved float64
sums at the next batch, the final statistics are bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flarc.calib.moments import Moments
from flarc.core.errors import DataError

log = logging.getLogger(__name__)

FORMAT = "flarc-stats-checkpoint/1"
FILE_NAME = "statistics.ckpt.npz"
# Test hook: os._exit() inside the N-th checkpoint write, after the temporary file is complete
# and before the rename (what a power cut or kill -9 at the worst moment would leave behind).
CRASH_ENV = "FLARC_TEST_CRASH_IN_CHECKPOINT"


def feeds_digest(feeds: Iterable[dict[str, np.ndarray]]) -> str:
    """SHA-256 over every feed in order: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for i, feed in enumerate(feeds):
        h.update(f"batch {i}\n".encode())
        for name in sorted(feed):
            arr = np.ascontiguousarray(feed[name])
            h.update(f"{name}|{arr.dtype.str}|{arr.shape}\n".encode())
            h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of the checkpoint's arrays (keys in order, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        arr = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{arr.dtype.str}|{arr.shape}\n".encode())
        h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class Checkpointer:
    """Saves and restores the running sums of one statistics pass.

    ``identity`` is everything the sums depend on (model hash, options, plans, feeds digest);
    a checkpoint with another identity is refused rather than silently mixed in.
    """

    folder: Path
    identity: dict[str, Any]
    every: int = 8
    resume: bool = False
    writes: int = 0

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        if self.every < 1:
            raise DataError(f"--checkpoint-every {self.every}: must be at least 1")
        if self.folder.exists() and not self.folder.is_dir():
            raise DataError(f"{self.folder}: checkpoint path exists and is not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)

    def for_part(self, part: str) -> Checkpointer:
        """A checkpointer for one of several passes, in its own subfolder."""
        return Checkpointer(self.folder / part, dict(self.identity), self.every, self.resume)

    @property
    def path(self) -> Path:
        return self.folder / FILE_NAME

    @property
    def fingerprint(self) -> str:
        text = json.dumps(self.identity, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def due(self, done: int, total: int) -> bool:
        """Whether to save after ``done`` batches (every N, and always after the last)."""
        return done == total or done % self.every == 0

    def load(self, keys: dict[str, int]) -> tuple[int, dict[str, Moments]] | None:
        """The saved ``(batches done, sums)``, or None when there is nothing to resume.

        ``keys`` maps every statistic key to its width ``n``. Raises DataError for a
        checkpoint of another model/options/data, or one that fails its checksum.
        """
        if not self.resume:
            if self.path.exists():
                log.warning("%s: not resuming (no --resume); starting over", self.path)
            return None
        if not self.path.is_file():
            log.info("%s: no checkpoint yet; starting from the first batch", self.path)
            return None
        where = f"checkpoint {self.path}"
        try:
            with np.load(self.path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            manifest = json.loads(str(arrays.pop("manifest")))
        except Exception as exc:
            raise DataError(f"{where}: unreadable ({type(exc).__name__}: {exc})") from None
        if manifest.get("format") != FORMAT:
            raise DataError(f"{where}: unsupported format {manifest.get('format')!r}")
        mine = self.identity
        theirs = manifest.get("identity", {})
        if manifest.get("fingerprint") != self.fingerprint:
            differs = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            what = ", ".join(differs) or "identity"
            raise DataError(
                f"{where} was made for another model, options or calibration data "
                f"(differs in: {what}); use another --checkpoint folder or delete it"
            )
        if arrays_digest(arrays) != manifest.get("checksum"):
            raise DataError(f"{where}: checksum mismatch (corrupted file); delete it to start over")
        if list(manifest.get("keys", [])) != list(keys):
            raise DataError(f"{where}: statistics keys differ from this run's")
        try:
            sums = {}
            for j, key in enumerate(manifest["keys"]):
                sums[key] = Moments.from_arrays(arrays, f"s{j}/")
                if f"s{j}/cross" in arrays:
                    sums[key].cross = np.array(arrays[f"s{j}/cross"], dtype=np.float64)
        except KeyError as exc:
            raise DataError(f"{where}: missing array {exc}") from None
        for key, n in keys.items():
            if sums[key].gram.shape != (n, n):
                raise DataError(f"{where}: statistic '{key}' has the wrong shape")
        done = int(manifest["batches_done"])
        log.info("%s: resuming after batch %d", self.path, done)
        return done, sums

    def save(self, done: int, total: int, sums: dict[str, Moments]) -> None:
        """Write the sums after ``done`` of ``total`` batches atomically (temp, fsync, rename)."""
        arrays: dict[str, np.ndarray] = {}
        for j, moments in enumerate(sums.values()):
            arrays.update(moments.to_arrays(f"s{j}/"))
            if moments.cross is not None:  # closed-loop cross-statistic, not in to_arrays
                arrays[f"s{j}/cross"] = moments.cross
        manifest = {
            "format": FORMAT,
            "batches_done": done,
            "batches_total": total,
            "keys": list(sums),
            "fingerprint": self.fingerprint,
            "identity": self.identity,
            "checksum": arrays_digest(arrays),
        }
        self.writes += 1
        fd, tmp = tempfile.mkstemp(prefix=f".{FILE_NAME}.", suffix=".tmp", dir=self.folder)
        tmp_path = Path(tmp)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, manifest=np.array(json.dumps(manifest, default=str)), **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            crash_at = os.environ.get(CRASH_ENV)
            if crash_at and crash_at.isdigit() and int(crash_at) == self.writes:
                os._exit(77)
            os.replace(tmp_path, self.path)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()
        _fsync_dir(self.folder)
        log.debug("%s: %d of %d batches", self.path, done, total)

    def clean_stale(self) -> None:
        """Remove temporary files that a killed writer left behind (never the checkpoint)."""
        for stale in self.folder.glob(f".{FILE_NAME}.*.tmp"):
            try:
                stale.unlink()
            except OSError:
                pass
