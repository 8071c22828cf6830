"""The ``manifest.json`` of a rank-bucket folder: what every bucket is, where its bytes live, and a
sha256 of every file, so a missing, truncated or edited file is refused before anything runs.

Format (``format_version`` 1)::

    {
      "format": "flarc-buckets", "format_version": 1, "flarc_version": "...",
      "source": {"model": "<path as given>", "sha256": "<of the source .onnx>"},
      "options": {...how the folder was made: budgets, align, calibration, fisher loss...},
      "budget_definition": "<one sentence>",
      "cache": {"num_layers": L, "kv_heads": H, "head_dim": D, "past": [...], "present": [...]},
      "weights": {"factors": "factors.bin", "dense": "dense.bin", "dtype": "float32"},
      "targets": [{"name", "op_type", "n", "m", "max_rank", "stored_rank", "importance",
                   "at_offset", "c_offset"}],         # A^T rows at at_offset, C rows at c_offset
      "buckets": [{"budget", "file", "total_rank", "ranks": {target: rank},
                   "params", "weight_bytes"}],        # largest budget first
      "schedule_defaults": {"static": "...", "steps": "...", "entropy": "..."},
      "files": {"<name>": {"bytes": N, "sha256": "..."}},
      "manifest_sha256": "<sha256 of this JSON without this key, sorted keys, compact>"
    }

The self-hash catches an edited manifest (a hand edit, a partial write); it is an integrity
check, not a signature: whoever can rewrite every file can rewrite the hashes too.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from flarc.core.errors import ModelError
from flarc.core.files import file_sha256, read_versioned_json, write_text_atomic

MANIFEST = "manifest.json"
FORMAT = "flarc-buckets"
FORMAT_VERSION = 1


def _canonical(data: dict) -> bytes:
    body = {k: v for k, v in data.items() if k != "manifest_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def self_hash(data: dict) -> str:
    """sha256 (hex) of ``data`` without its ``manifest_sha256`` key, as compact JSON with sorted
    keys."""
    return hashlib.sha256(_canonical(data)).hexdigest()


def file_entries(folder: Path, names: list[str]) -> dict[str, dict]:
    """``{name: {bytes, sha256}}`` for files inside ``folder``."""
    return {
        name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
        for name in names
    }


def write_manifest(folder: Path, data: dict) -> Path:
    """Seal ``data`` with its self-hash and write it atomically as ``folder/manifest.json``."""
    data = dict(data)
    data["manifest_sha256"] = self_hash(data)
    path = folder / MANIFEST
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


@dataclass(frozen=True)
class Manifest:
    """A bucket folder and its manifest's JSON, as :func:`load_manifest` checked them."""

    folder: Path
    data: dict

    @property
    def budgets(self) -> list[float]:
        return [float(b["budget"]) for b in self.data["buckets"]]

    def bucket(self, budget: float) -> dict:
        """The entry of the bucket with budget ``budget``; KeyError when there is none."""
        for b in self.data["buckets"]:
            if abs(float(b["budget"]) - budget) < 1e-9:
                return b
        raise KeyError(budget)

    def path(self, name: str) -> Path:
        """The path of file ``name`` in the bucket folder (not checked)."""
        return self.folder / name


def _safe_name(folder: Path, name: str) -> Path:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or len(rel.parts) != 1:
        raise ModelError(f"{folder / MANIFEST}: file name '{name}' is not a plain name; refused")
    return folder / name


def load_manifest(folder: str | os.PathLike, verify: bool = True) -> Manifest:
    """Read and check a bucket folder's manifest; with ``verify``, hash every file it lists.

    Raises ModelError (one line, naming the file) on a missing or edited manifest, a missing,
    resized or modified file, or a bucket whose graph file the manifest does not cover.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ModelError(f"{folder}: not a folder")
    if not path.is_file():
        raise ModelError(f"{path}: missing; {folder} is not a flarc bucket folder")
    data = read_versioned_json(
        path, "bucket manifest", FORMAT, FORMAT_VERSION, "format_version", ModelError
    )
    if data.get("manifest_sha256") != self_hash(data):
        raise ModelError(f"{path}: self-hash mismatch: the manifest was modified; refused")
    files = data.get("files") or {}
    for bucket in data.get("buckets", []):
        if bucket.get("file") not in files:
            raise ModelError(f"{path}: bucket {bucket.get('budget')} file is not hashed; refused")
    for key in ("factors", "dense"):
        if data["weights"].get(key) not in files:
            raise ModelError(f"{path}: weights file '{key}' is not hashed; refused")
    for name, entry in files.items():
        file = _safe_name(folder, name)
        if not file.is_file():
            raise ModelError(f"{file}: missing (listed in {MANIFEST}); refused")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise ModelError(
                f"{file}: {size} bytes, the manifest says {entry['bytes']}; tampered or truncated"
            )
        if verify and file_sha256(file) != entry["sha256"]:
            raise ModelError(f"{file}: sha256 does not match {MANIFEST}; tampered or corrupt")
    return Manifest(folder, data)
