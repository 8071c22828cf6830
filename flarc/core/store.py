"""The store: where flarc keeps what is expensive to compute (statistics, spectra, importances),
so that it is computed once.

A store is a folder of ``.npy`` arrays and JSON documents, read back with
``np.load(mmap_mode="r")``; or, for a small model's run that names no folder, a dict in memory
(same interface, no copies). Which of the two a run uses is decided once,
:meth:`Store.for_model`: the folder the user named (``--checkpoint``), else a private temporary
folder for a large model, else memory.

Arrays on disk are handed out as :class:`StoredArray` handles and read when used; a prefix of
rows (C order) or columns (Fortran order) is one contiguous read, which is how a rank's factors
are read. Every read maps the file, copies, and drops the mapping, so nothing read stays
resident. A *group* (:meth:`Store.commit`) is a set of arrays with a JSON meta that is replaced
as a whole: it is written to a new version folder, then a ``CURRENT`` file naming it is renamed
into place, so a kill at any moment leaves the old version or the new one, never a mix.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flarc.core.files import naming_write_errors

CURRENT = "CURRENT"
META = "meta.json"


@dataclass(frozen=True)
class StoredArray:
    """A ``.npy`` file read when used: whole, or a prefix of rows (C) / columns (Fortran)."""

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool = False

    @classmethod
    def open(cls, path: str | os.PathLike) -> StoredArray:
        """The handle of an existing ``.npy`` (its header is read, nothing else)."""
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            offset = fh.tell()
        if dtype.hasobject:
            raise ValueError(f"{path}: object arrays are never read")
        found = cls(Path(path), tuple(shape), dtype, fortran)
        if os.path.getsize(path) < offset + found.nbytes:
            raise ValueError(f"{path}: shorter than its header says")
        return found

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def load(self) -> np.ndarray:
        """The whole array, as a private in-memory copy."""
        return self.prefix(None)

    def prefix(self, k: int | None) -> np.ndarray:
        """A copy of the first ``k`` rows (C order) or columns (Fortran order); all for None."""
        if self.nbytes == 0:
            return np.load(self.path, allow_pickle=False)[self._cut(k)].copy()
        mapped = np.load(self.path, mmap_mode="r", allow_pickle=False)
        try:
            return np.array(mapped[self._cut(k)], order="F" if self.fortran else "C")
        finally:
            del mapped  # the mapping closes with its last reference: nothing stays resident

    def _cut(self, k: int | None) -> tuple[slice, ...]:
        if k is None:
            return ()
        return (slice(None), slice(0, k)) if self.fortran else (slice(0, k),)


Value = np.ndarray | StoredArray


def as_array(value: Value) -> np.ndarray:
    """An in-memory array for a value that may be stored."""
    return value.load() if isinstance(value, StoredArray) else value


def leading(value: Value, k: int, columns: bool) -> np.ndarray:
    """The first ``k`` columns (``columns``) or rows of a 2-D array in memory or stored."""
    if isinstance(value, StoredArray) and value.fortran == columns:
        return value.prefix(k)
    array = as_array(value)
    return array[:, :k] if columns else array[:k]


def _fsync_dir(folder: Path, sync: bool = True) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened)."""
    if not sync:
        return
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


def _write_npy(path: Path, array: np.ndarray, fortran: bool, sync: bool = True) -> None:
    array = np.asarray(array, order="F" if fortran else "C")  # 0-d arrays stay 0-d
    with naming_write_errors(path), open(path, "wb") as fh:
        np.lib.format.write_array(fh, array, allow_pickle=False)
        fh.flush()
        if sync:
            os.fsync(fh.fileno())


def publish(folder: Path, version: str, sync: bool = True) -> None:
    """Point ``folder``'s ``CURRENT`` at ``version``: a temporary file renamed into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{CURRENT}.", suffix=".tmp", dir=folder)
    with os.fdopen(fd, "w") as fh:
        fh.write(version)
        fh.flush()
        if sync:
            os.fsync(fh.fileno())
    os.replace(tmp, folder / CURRENT)
    _fsync_dir(folder, sync)


class Store:
    """Named arrays, JSON documents and atomically replaced groups, in a folder or in memory."""

    def __init__(self, root: str | os.PathLike | None = None, writable: bool = True) -> None:
        self.root = None if root is None else Path(root)
        self.writable = writable
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._arrays: dict[str, np.ndarray] = {}
        self._json: dict[str, Any] = {}
        self._groups: dict[str, tuple[dict[str, np.ndarray], dict]] = {}
        # A temporary store dies with the run, so its writes need not survive a crash.
        self.durable = True
        if self.root is not None and writable:
            self.root.mkdir(parents=True, exist_ok=True)

    @classmethod
    def temporary(cls, prefix: str = "flarc-store-") -> Store:
        """A private folder, removed with the store (or at exit)."""
        tmp = tempfile.TemporaryDirectory(prefix=prefix)
        store = cls(tmp.name)
        store._tmp = tmp
        store.durable = False
        return store

    @classmethod
    def for_model(cls, large: bool, folder: str | os.PathLike | None = None) -> Store:
        """Where a run keeps its arrays: ``folder`` when named, a temporary folder for a large
        model (its statistics and spectra would not fit beside it in memory), else memory."""
        if folder is not None:
            return cls(folder)
        return cls.temporary() if large else cls()

    @property
    def on_disk(self) -> bool:
        return self.root is not None

    def close(self) -> None:
        """Remove a temporary store's folder."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def path(self, name: str) -> Path:
        """The file of array or document ``name`` (``a/b`` is ``<root>/a/b``)."""
        if self.root is None:
            raise ValueError("an in-memory store has no files")
        return self.root / name

    # -- single arrays and documents ---------------------------------------------------------

    def put(self, name: str, array: np.ndarray, fortran: bool = False) -> Value:
        """Keep ``array`` under ``name``; on disk, the handle of the written file."""
        if self.root is None:
            self._arrays[name] = array
            return array
        path = self.path(name + ".npy")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        _write_npy(tmp, array, fortran, self.durable)
        os.replace(tmp, path)
        return StoredArray.open(path)

    def copy(self, name: str, value: StoredArray) -> Value:
        """Keep a stored array under ``name``: its file copied byte for byte (in memory: read)."""
        if self.root is None:
            return self.put(name, value.load())
        path = self.path(name + ".npy")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.copyfile(value.path, tmp)
        os.replace(tmp, path)
        return StoredArray.open(path)

    def get(self, name: str) -> Value:
        """The array ``name`` (KeyError if absent)."""
        if self.root is None:
            return self._arrays[name]
        path = self.path(name + ".npy")
        if not path.is_file():
            raise KeyError(name)
        return StoredArray.open(path)

    def put_json(self, name: str, data: Any) -> None:
        """Keep a JSON document (written atomically on disk)."""
        if self.root is None:
            self._json[name] = json.loads(json.dumps(data, default=str))
            return
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)

    def get_json(self, name: str, default: Any = None) -> Any:
        """A JSON document, or ``default`` when there is none."""
        if self.root is None:
            return self._json.get(name, default)
        path = self.path(name)
        return json.loads(path.read_text()) if path.is_file() else default

    # -- groups ------------------------------------------------------------------------------

    def commit(self, group: str, arrays: Mapping[str, Value], meta: dict) -> None:
        """Replace group ``group`` by ``arrays`` and ``meta`` as a whole (see module doc);
        stored arrays are copied file to file, one at a time."""
        if self.root is None:
            self._groups[group] = (dict(arrays), json.loads(json.dumps(meta, default=str)))
            return
        folder = self.path(group)
        folder.mkdir(parents=True, exist_ok=True)
        old = self._version(folder)
        version = f"v{int(old[1:]) + 1 if old else 1:06d}"
        target = folder / version
        shutil.rmtree(target, ignore_errors=True)  # a version a killed writer left unpublished
        target.mkdir()
        for name, array in arrays.items():
            if isinstance(array, StoredArray):
                shutil.copyfile(array.path, target / f"{name}.npy")
            else:
                _write_npy(target / f"{name}.npy", np.asarray(array), False, self.durable)
        (target / META).write_text(json.dumps(meta, indent=1, default=str))
        _fsync_dir(target, self.durable)
        publish(folder, version, self.durable)
        if old and old != version:
            shutil.rmtree(folder / old, ignore_errors=True)

    def group(self, group: str) -> tuple[dict[str, Value], dict] | None:
        """``(arrays, meta)`` of the published version of ``group``, or None."""
        if self.root is None:
            return self._groups.get(group)
        folder = self.path(group)
        for _ in range(3):  # a writer may publish a newer version (and drop this one) meanwhile
            version = self._version(folder)
            if version is None:
                return None
            try:
                meta = json.loads((folder / version / META).read_text())
                files = sorted((folder / version).glob("*.npy"))
                arrays = {p.name[: -len(".npy")]: StoredArray.open(p) for p in files}
            except FileNotFoundError:
                continue
            return arrays, meta
        return None

    def clean(self, group: str) -> None:
        """Remove what killed writers left in ``group``: unpublished versions, temporary files."""
        if self.root is None:
            return
        folder = self.path(group)
        if not folder.is_dir():
            return
        live = self._version(folder)
        for item in folder.iterdir():
            if item.is_dir() and item.name != live:
                shutil.rmtree(item, ignore_errors=True)
            elif item.name.startswith(".") and item.name.endswith(".tmp"):
                item.unlink(missing_ok=True)

    @staticmethod
    def _version(folder: Path) -> str | None:
        current = folder / CURRENT
        return current.read_text().strip() if current.is_file() else None

    def groups(self, prefix: str) -> Iterator[str]:
        """Names of the published groups directly under ``prefix`` (sorted)."""
        if self.root is None:
            yield from sorted(g for g in self._groups if g.rpartition("/")[0] == prefix)
            return
        folder = self.path(prefix)
        if folder.is_dir():
            for item in sorted(folder.iterdir()):
                if (item / CURRENT).is_file():
                    yield f"{prefix}/{item.name}" if prefix else item.name
