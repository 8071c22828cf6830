"""Files flarc writes: every output is written atomically (a temporary name beside it, then one
rename), an output never replaces an input, and inputs are identified by their SHA-256."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from flarc.core.errors import FlarcError

log = logging.getLogger(__name__)


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


@contextlib.contextmanager
def naming_write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an OSError of the block that names no file as one naming ``path``: numpy's
    writers report a full disk as ``OSError('... requested and 0 written')`` with neither
    file nor errno, which would read as a bug instead of a disk to free (the CLI's one line)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno or errno.EIO, f"could not write ({exc})", str(path)) from exc


def write_bytes_atomic(final: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``final`` atomically (:func:`atomic_path`), synced to disk before the
    rename."""
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def write_text_atomic(final: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``final`` as UTF-8, atomically."""
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


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success it takes ``final``'s place (what
    was there is moved aside first, then removed), on failure it is removed."""
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists() or final.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
            os.replace(final, old / "x")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_versioned_json(
    path: str | os.PathLike,
    what: str,
    fmt: str,
    version: int,
    version_key: str = "version",
    error: type[FlarcError] = FlarcError,
) -> dict:
    """The JSON object in ``path`` whose ``format`` is ``fmt`` and ``version_key`` is
    ``version``; anything else raises ``error`` on one line naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not a readable {what} (JSON: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise error(f"{path}: not a flarc {what} (no format '{fmt}')")
    if data.get(version_key) != version:
        raise error(f"{path}: {what} {version_key} {data.get(version_key)!r}, expected {version}")
    return data


@contextlib.contextmanager
def removing_meanwhile(removals: Iterable[Callable[[], None]]) -> Iterator[None]:
    """Run ``removals`` (each removes temporary files no one reads any more) in a thread while
    the block runs, and wait for them at its end. Unlinking gigabytes is disk-bound, not CPU
    work (a disk mounted with ``discard`` trims every freed extent: 6 GB took 5.7 s, 0.5 s of
    it CPU), so it overlaps with the block's work. A failed removal is logged, not raised:
    the files are temporaries."""
    removals = list(removals)

    def remove_all() -> None:
        for remove in removals:
            try:
                remove()
            except OSError as exc:
                log.warning("could not remove temporary files: %s", exc)

    thread = threading.Thread(target=remove_all, name="flarc-remove", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
