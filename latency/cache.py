"""On-disk cache of layer timings, one small JSON file per (device, backend, version, threads,
dtype, shape, rank). Every entry stores the schema version and its full key; an entry that does
not parse, has another schema, or carries a different key (a hash collision, a file copied from
elsewhere) is rejected with a warning and measured again, never trusted. Writes are atomic.

Location: ``$FLARC_CACHE_DIR/latency`` when the variable is set, else ``~/.cache/flarc/latency``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from flarc.core.files import cache_root, write_text_atomic
from flarc.latency.timing import Stats

log = logging.getLogger(__name__)

SCHEMA = 1


def default_cache_dir() -> Path:
    """``latency`` in flarc's cache folder (``$FLARC_CACHE_DIR`` or ``~/.cache/flarc``)."""
    return cache_root() / "latency"


def _canonical(key: dict) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


class LatencyCache:
    """Cached ``Stats`` by key; ``root=None`` means the default location."""

    def __init__(self, root: str | os.PathLike | None = None, enabled: bool = True) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def path_for(self, key: dict) -> Path:
        """The entry file of ``key``: ``<root>/<backend>/<sha256 of the canonical key, 40 hex
        digits>.json``."""
        digest = hashlib.sha256(_canonical(key).encode()).hexdigest()[:40]
        return self.root / str(key.get("backend", "unknown")) / f"{digest}.json"

    def get(self, key: dict) -> Stats | None:
        """The cached timing of ``key``; None when the cache is off, the entry is missing, or it is
        rejected (with a warning). Counts hits and misses."""
        if not self.enabled:
            return None
        path = self.path_for(key)
        if not path.exists():
            self.misses += 1
            return None
        problem = None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(entry, dict):
                problem = "not a JSON object"
            elif entry.get("schema") != SCHEMA:
                problem = f"schema {entry.get('schema')!r}, expected {SCHEMA}"
            elif _canonical(entry.get("key") or {}) != _canonical(key):
                problem = "foreign entry: its key does not match the measurement asked for"
            else:
                stats = Stats.from_dict(entry["stats"])
                self.hits += 1
                return stats
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problem = f"unreadable ({type(exc).__name__})"
        except (KeyError, TypeError, ValueError) as exc:
            problem = f"malformed timing ({type(exc).__name__}: {exc})"
        log.warning("latency cache: rejected %s (%s); measuring again", path, problem)
        self.misses += 1
        return None

    def put(self, key: dict, stats: Stats) -> None:
        """Store ``stats`` under ``key``, atomically; a failed write is logged, not raised. Nothing
        when the cache is off."""
        if not self.enabled:
            return
        path = self.path_for(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            entry = {"schema": SCHEMA, "key": key, "stats": stats.to_dict()}
            write_text_atomic(path, json.dumps(entry, sort_keys=True, indent=1))
        except OSError as exc:
            log.warning("latency cache: cannot write %s (%s); continuing without it", path, exc)
