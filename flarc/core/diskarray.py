"""Arrays that live in a file until read: how a large model's statistics and spectra stay out of
memory between the stages that use them.

A :class:`DiskArray` names a C- or Fortran-ordered array at a byte offset in a file (a ``.npy``
or a member stored uncompressed in an ``.npz``). :meth:`DiskArray.load` reads it whole; a prefix
of rows (C order) or columns (Fortran order) is a contiguous byte range, so
:meth:`DiskArray.prefix` reads only what a rank needs. Reads go through a mapping that is closed
at once, so nothing stays resident after the copy is dropped.
"""

from __future__ import annotations

import math
import struct
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

# Arrays smaller than this stay in memory: spilling them would save nothing worth a file read.
MIN_SPILL_BYTES = 1 << 20


@dataclass(frozen=True)
class DiskArray:
    path: Path
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def _map(self) -> np.memmap:
        order = "F" if self.fortran else "C"
        return np.memmap(self.path, self.dtype, "r", self.offset, self.shape, order)

    def load(self) -> np.ndarray:
        """The whole array, as a private in-memory copy."""
        if self.nbytes == 0:
            return np.zeros(self.shape, self.dtype, order="F" if self.fortran else "C")
        mapped = self._map()
        try:
            return np.array(mapped)
        finally:
            mapped._mmap.close()

    def prefix(self, k: int) -> np.ndarray:
        """The first ``k`` rows (C order) or columns (Fortran order) of a 2-D array, read alone."""
        if self.nbytes == 0 or k == 0:
            shape = (self.shape[0], 0) if self.fortran else (0, *self.shape[1:])
            return np.zeros(shape, self.dtype)
        mapped = self._map()
        try:
            return np.array(mapped[:, :k] if self.fortran else mapped[:k])
        finally:
            mapped._mmap.close()


def as_array(value: np.ndarray | DiskArray) -> np.ndarray:
    return value.load() if isinstance(value, DiskArray) else value


def leading(value: np.ndarray | DiskArray, k: int, columns: bool) -> np.ndarray:
    """The first ``k`` columns (``columns``) or rows of a 2-D array in memory or on disk."""
    if isinstance(value, DiskArray) and value.fortran == columns:
        return value.prefix(k)
    array = as_array(value)
    return array[:, :k] if columns else array[:k]


class SpillFolder:
    """A private temporary folder of ``.npy`` files, removed with the object (or at exit)."""

    def __init__(self, prefix: str = "flarc-spill-") -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=prefix)
        self._count = 0

    @property
    def path(self) -> Path:
        return Path(self._tmp.name)

    def put(self, array: np.ndarray, fortran: bool = False) -> np.ndarray | DiskArray:
        """``array`` written to the folder (Fortran order when ``fortran``), or itself when small."""
        if array.nbytes < MIN_SPILL_BYTES:
            return array
        self._count += 1
        path = Path(self._tmp.name) / f"{self._count}.npy"
        array = np.asfortranarray(array) if fortran else np.ascontiguousarray(array)
        with open(path, "wb") as fh:
            np.lib.format.write_array(fh, array, allow_pickle=False)
        return npy_array(path)

    def close(self) -> None:
        self._tmp.cleanup()


def _header(fh: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran, dtype, data offset)`` of the ``.npy`` stream at ``fh``'s position."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    return tuple(shape), fortran, dtype, fh.tell()


def npy_array(path: str | Path, base: int = 0) -> DiskArray:
    path = Path(path)
    with open(path, "rb") as fh:
        fh.seek(base)
        shape, fortran, dtype, offset = _header(fh)
    if dtype.hasobject:
        raise ValueError(f"{path}: object arrays are never read")
    return DiskArray(path, offset, shape, dtype, fortran)


def npz_members(path: str | Path) -> dict[str, DiskArray]:
    """Every member of an uncompressed ``.npz`` (as :func:`numpy.savez` writes) as a DiskArray."""
    path = Path(path)
    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                raise ValueError(f"{path}: member {info.filename} is compressed or not an array")
            fh.seek(info.header_offset)
            local = fh.read(30)
            if local[:4] != b"PK\x03\x04":
                raise ValueError(f"{path}: member {info.filename} has a bad local header")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            member = npy_array(path, start)
            end = member.offset + member.nbytes
            if end > start + info.file_size:
                raise ValueError(f"{path}: member {info.filename} is shorter than its header says")
            out[info.filename[: -len(".npy")]] = member
    return out


def write_npz(fh: BinaryIO, items: Iterable[tuple[str, np.ndarray | DiskArray]]) -> None:
    """An uncompressed ``.npz`` written one array at a time (only one is ever in memory)."""
    with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in items:
            array = as_array(value)
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
            del array
