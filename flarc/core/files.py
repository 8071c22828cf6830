"""Files flarc writes: every output is written atomically (a temporary name beside it, then one
rename), an output never replaces an input, and inputs are identified by their SHA-256."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from flarc.core.errors import FlarcError


def check_output_path(output: str | os.PathLike, inputs: list[str | os.PathLike]) -> Path:
    """Refuse an output that would overwrite an input or land in a folder we cannot write."""
    out = Path(output)
    for src in inputs:
        if out.resolve() == Path(src).resolve():
            raise FlarcError(f"{out}: output path is the input model; refusing to overwrite it")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise FlarcError(f"{out}: output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FlarcError(f"{out}: output folder '{folder}' is not writable")
    return out


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` only on success."""
    final = Path(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def write_text_atomic(final: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(final, text.encode("utf-8"))


def cache_root() -> Path:
    """flarc's cache folder: ``$FLARC_CACHE_DIR`` or ``~/.cache/flarc`` (not created here)."""
    root = os.environ.get("FLARC_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "flarc"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
