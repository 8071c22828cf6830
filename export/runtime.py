"""Progressive low-rank decoding: one session per rank bucket, one KV cache carried across bucket
switches (every bucket has the same cache layout), greedy or nucleus sampling.

Weight sharing (onnxruntime CPU). ``factors.bin`` and ``dense.bin`` are read once into two
buffers; every initializer of every bucket is a view into them (bucket rank r of a target is a
row prefix), handed to onnxruntime as an OrtValue through
``SessionOptions.add_initializer`` (which keeps the caller's buffer;
``add_external_initializers`` would copy it), so no session reads or owns a copy. Prepacking is
then disabled (``session.disable_prepacking``): onnxruntime would otherwise repack each constant
MatMul/Gemm weight into a private buffer per session. Unprepacked, a dense MatMul weight runs
faster transposed (:mod:`flarc.export.ort_form`), so its range of ``dense.bin`` is transposed in
place once and every shared session reads it as ``FusedMatMul(transB=1)``. A single bucket has
nothing to share: its session reads its files and prepacks (measured faster at batch-1 decode), and so does any set of
buckets with ``prepack=True``, at one private copy per bucket. :func:`weight_memory_report`
measures the resident memory either way takes. Every session runs the onnxruntime form of the
bucket graph (:mod:`flarc.export.ort_form`: each pair as FusedMatMul -> MatMul).

TensorRT (``backend="tensorrt"``) builds one engine per bucket through polygraphy's loaders with a
profile covering prefill and decode shapes; engines own their weights (no sharing).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx

from flarc.core.errors import BackendError, DataError, ModelError
from flarc.core.sessions import open_session, session_options
from flarc.export.hf import CacheLayout, empty_cache, layout_from_onnx
from flarc.export.manifest import Manifest, load_manifest
from flarc.export.schedule import Schedule, entropy, parse_schedule

log = logging.getLogger(__name__)

BACKENDS = ("ort-cpu", "tensorrt")


class Runner(Protocol):
    """One bucket's forward pass: :class:`OrtRunner` or :class:`TensorRTRunner`."""

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name: ``logits`` and ``present.*``."""
        ...


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class SharedWeights:
    """The folder's weight files, each read once; views of them as numpy arrays and OrtValues.

    A 2-D tensor of a file in ``exclusive`` (one whose byte ranges each hold one tensor, such as
    ``dense.bin``; not ``factors.bin``, whose row prefixes overlap) may be transposed in place,
    once, for every session: see :func:`flarc.export.ort_form.transpose_matmul_weights`."""

    def __init__(self, folder: Path, names: list[str], exclusive: tuple[str, ...] = ()) -> None:
        self.folder = folder
        self.buffers = {name: np.fromfile(folder / name, dtype=np.uint8) for name in names}
        self.exclusive = set(exclusive)
        self._transposed: set[tuple[str, int]] = set()  # (file, offset) stored as [N, K]
        self._values: list = []  # OrtValues must outlive the sessions that use them

    def _range(self, tensor: onnx.TensorProto) -> tuple[str, np.ndarray, int]:
        """``(file, data as a flat typed view, offset)`` of an external tensor."""
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        buf = self.buffers.get(location)
        if buf is None:
            raise ModelError(
                f"tensor '{tensor.name}': external file '{info.get('location')}' "
                "is not a weights file of the manifest"
            )
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        offset, length = int(info.get("offset", 0)), int(info["length"])
        count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
        if length != count * dtype.itemsize or offset + length > buf.size:
            raise ModelError(f"tensor '{tensor.name}': external range does not fit its shape")
        return location, buf[offset : offset + length].view(dtype), offset

    def view(self, tensor: onnx.TensorProto) -> np.ndarray:
        """``tensor``'s data as a view into its file's buffer (no copy), typed and shaped as the
        tensor (a copy when its range was transposed for another session); ModelError when its
        file is not one of the manifest's weight files or its byte range does not fit."""
        location, flat, offset = self._range(tensor)
        if (location, offset) in self._transposed:
            return np.ascontiguousarray(flat.reshape(tensor.dims[1], tensor.dims[0]).T)
        return flat.reshape(tuple(tensor.dims))

    def can_transpose(self, tensor: onnx.TensorProto) -> bool:
        """Whether ``tensor`` (2-D, as declared in the bucket file) may be stored transposed."""
        info = {e.key: e.value for e in tensor.external_data}
        return len(tensor.dims) == 2 and info.get("location") in self.exclusive

    def transposed(self, tensor: onnx.TensorProto) -> np.ndarray:
        """``tensor`` (``[K, N]`` in its file) as ``[N, K]``: its byte range is transposed in
        place the first time (every later view of it sees the transposed layout)."""
        if not self.can_transpose(tensor):
            raise ModelError(f"tensor '{tensor.name}': its byte range cannot be transposed")
        location, flat, offset = self._range(tensor)
        k, n = tensor.dims
        if (location, offset) not in self._transposed:
            flat[:] = flat.reshape(k, n).T.ravel()  # ravel of a transposed view is a copy
            self._transposed.add((location, offset))
        return flat.reshape(n, k)

    def ort_value(self, tensor: onnx.TensorProto, transposed: bool = False):
        """An OrtValue over :meth:`view` (or :meth:`transposed`), no copy, kept alive as long as
        these weights."""
        import onnxruntime as ort

        array = self.transposed(tensor) if transposed else self.view(tensor)
        value = ort.OrtValue.ortvalue_from_numpy(array)
        self._values.append(value)
        return value

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())


class OrtRunner:
    """An onnxruntime CPU session over the onnxruntime form of a graph
    (:func:`~flarc.export.ort_form.fuse_prefix_pairs`); initializers optionally supplied from
    shared buffers. ``prepack`` None: prepack unless the weights are shared. ``global_threads``:
    the session runs on the process's global thread pools (see :meth:`Generator.from_buckets`)."""

    def __init__(
        self,
        path: Path,
        shared: SharedWeights | None = None,
        threads: int | None = None,
        prepack: bool | None = None,
        arena: bool = True,
        global_threads: bool = False,
    ) -> None:
        from flarc.core.external import mark_external_dir
        from flarc.export.ort_form import (
            fuse_prefix_pairs,
            transpose_matmul_weights,
            transposed_weight_candidates,
        )

        prepack = shared is None if prepack is None else prepack
        so = session_options(
            threads, arena=arena, prepacking=prepack, global_threads=global_threads
        )
        graph = onnx.load(str(path), load_external_data=False)
        model, self.fused = fuse_prefix_pairs(graph)
        self.transposed = 0
        if shared is not None:
            external = [
                t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
            ]
            flip = set()
            if not prepack:  # unprepacked MatMuls run faster over B^T (ort_form's doc)
                flip = transposed_weight_candidates(
                    model, {t.name for t in external if shared.can_transpose(t)}
                )
            for t in external:
                # add_initializer keeps the caller's buffer; add_external_initializers copies.
                so.add_initializer(t.name, shared.ort_value(t, transposed=t.name in flip))
            self.transposed = transpose_matmul_weights(model, flip)
        mark_external_dir(model, path.parent)  # the rest of its data: mapped from its files
        try:
            self.session = open_session(model, so, what=str(path))
        except ModelError as exc:
            if global_threads and "GlobalThreadPools" in str(exc):
                raise BackendError(
                    f"{path}: global_threads needs onnxruntime.set_global_thread_pool_sizes(...) "
                    "called first in this process"
                ) from None
            raise
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.prepacked = prepack

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass: every output by name."""
        return dict(zip(self.outputs, self.session.run(self.outputs, feed), strict=True))


class TensorRTRunner:
    """One TensorRT engine for a bucket, built through polygraphy (needs tensorrt and CUDA)."""

    def __init__(self, path: Path, layout: CacheLayout, max_tokens: int = 2048) -> None:
        from flarc.latency.tensorrt import require_tensorrt

        require_tensorrt()
        from polygraphy.backend.trt import (
            CreateConfig,
            EngineFromNetwork,
            NetworkFromOnnxPath,
            Profile,
            TrtRunner,
        )

        profile = Profile()
        for name in ("input_ids", "position_ids"):
            profile.add(name, min=(1, 1), opt=(1, 1), max=(1, max_tokens))
        profile.add("attention_mask", min=(1, 1), opt=(1, max_tokens // 2), max=(1, max_tokens))
        kv = (layout.kv_heads, layout.head_dim)
        for name in layout.past_names():
            profile.add(
                name,
                min=(1, kv[0], 0, kv[1]),
                opt=(1, kv[0], max_tokens // 2, kv[1]),
                max=(1, kv[0], max_tokens, kv[1]),
            )
        engine = EngineFromNetwork(NetworkFromOnnxPath(str(path)), CreateConfig(profiles=[profile]))
        self.runner = TrtRunner(engine)
        self.runner.activate()

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass: every output by name."""
        return {k: np.asarray(v) for k, v in self.runner.infer(feed).items()}


@dataclass
class GenerationResult:
    """One generation: the prompt and generated ids, each step's bucket and entropy, prefill and
    decode seconds, and each step's logits when kept."""

    prompt: list[int]
    tokens: list[int]  # generated ids
    budgets: list[float]  # bucket of each step (step t produced tokens[t])
    entropies: list[float]  # entropy (nats) of each step's next-token distribution
    prefill_s: float
    decode_s: float
    logits: list[np.ndarray] = field(default_factory=list)  # per step, when keep_logits

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens after the first over decode time (prefill excluded)."""
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")

    @property
    def mean_budget(self) -> float:
        return float(np.mean(self.budgets)) if self.budgets else float("nan")


class KVCache:
    """The past tensors of one sequence, the same layout in every bucket."""

    def __init__(self, layout: CacheLayout) -> None:
        self.layout = layout
        self.past = empty_cache(layout)

    @property
    def length(self) -> int:
        return next(iter(self.past.values())).shape[2]

    def update(self, outputs: dict[str, np.ndarray]) -> None:
        """Take a step's ``present.*`` outputs as the past of the next step."""
        for past, present in zip(
            self.layout.past_names(), self.layout.present_names(), strict=True
        ):
            self.past[past] = outputs[present]

    def copy(self) -> KVCache:
        """A cache holding the same arrays (safe: they are replaced, never written in place)."""
        out = KVCache(self.layout)
        out.past = dict(self.past)  # arrays are replaced, never written in place
        return out


def sample_token(
    logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0, top_p: float = 1.0
) -> int:
    """Nucleus sampling: the smallest set of tokens with probability >= top_p, renormalised."""
    z = np.asarray(logits, dtype=np.float64) / max(temperature, 1e-6)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(p.size, p=p))


class Generator:
    """Token generation over rank buckets (or one plain model) with a carried KV cache."""

    def __init__(
        self,
        runners: dict[float, Runner],
        layout: CacheLayout,
        manifest: Manifest | None = None,
        shared: SharedWeights | None = None,
    ) -> None:
        if not runners:
            raise ModelError("no bucket to generate with")
        self.runners = runners
        self.layout = layout
        self.manifest = manifest
        self.shared = shared

    @property
    def budgets(self) -> list[float]:
        return sorted(self.runners, reverse=True)

    @classmethod
    def from_buckets(
        cls,
        folder: str | os.PathLike,
        backend: str = "ort-cpu",
        budgets: list[float] | None = None,
        threads: int | None = None,
        verify: bool = True,
        share_weights: bool = True,
        prepack: bool | None = None,
        global_threads: bool = False,
    ) -> Generator:
        """Sessions for the buckets of ``folder`` (all, or those in ``budgets``).

        ``verify`` hashes every file against the manifest first; ``share_weights=False`` lets
        each onnxruntime session read its own copy (the baseline for memory measurements).
        ``prepack`` (None: when one bucket is loaded) gives each session its own prepacked
        weights instead of the shared buffers: faster decode, one copy per bucket.
        ``global_threads``: every session runs on the process's global onnxruntime thread pools
        instead of its own, so that a schedule switching buckets does not run against the
        spinning threads of the session it just left (measured on Qwen2.5-0.5B, 2 cores: an
        entropy schedule 1.2x faster). The pools are process-wide: the caller creates them
        first with ``onnxruntime.set_global_thread_pool_sizes(threads, 1)`` (``flarc generate``
        does: it owns its process), after which every session in the process must use them.
        """
        if backend not in BACKENDS:
            raise BackendError(f"backend '{backend}' is not one of {', '.join(BACKENDS)}")
        manifest = load_manifest(folder, verify=verify)
        layout = _layout(manifest)
        wanted = manifest.budgets if budgets is None else budgets
        rows = []
        for b in wanted:
            try:
                rows.append(manifest.bucket(b))
            except KeyError:
                raise DataError(f"{folder}: no bucket with budget {b:g}") from None
        if backend == "tensorrt":
            from flarc.latency.tensorrt import require_tensorrt

            try:
                require_tensorrt()
            except BackendError as exc:
                raise BackendError(f"--backend tensorrt for {folder}: {exc}") from None
            runners = {r["budget"]: TensorRTRunner(manifest.path(r["file"]), layout) for r in rows}
            return cls(runners, layout, manifest)
        prepack = len(rows) == 1 if prepack is None else prepack
        shared = None
        if share_weights and not prepack:
            w = manifest.data["weights"]
            shared = SharedWeights(
                manifest.folder, [w["factors"], w["dense"]], exclusive=(w["dense"],)
            )
        runners = {
            r["budget"]: OrtRunner(
                manifest.path(r["file"]), shared, threads, prepack, global_threads=global_threads
            )
            for r in rows
        }
        return cls(runners, layout, manifest, shared)

    @classmethod
    def from_onnx(
        cls, path: str | os.PathLike, threads: int | None = None, global_threads: bool = False
    ) -> Generator:
        """A single plain model (e.g. the uncompressed export) as the only bucket, budget 1.0
        (``global_threads``: as :meth:`from_buckets`)."""
        from flarc.core.modelio import load_model

        layout = layout_from_onnx(load_model(path, load_external_data=False))
        runner = OrtRunner(Path(path), None, threads, global_threads=global_threads)
        return cls({1.0: runner}, layout)

    def step(self, budget: float, ids: np.ndarray, cache: KVCache) -> np.ndarray:
        """Run ``ids [1, s]`` after ``cache`` in bucket ``budget``; update the cache in place.

        Returns the logits ``[s, vocab]`` of the new positions.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        past = cache.length
        seq = ids.shape[1]
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((1, past + seq), dtype=np.int64),
            "position_ids": np.arange(past, past + seq, dtype=np.int64)[None, :],
            **cache.past,
        }
        outputs = self.runners[budget].run(feed)
        cache.update(outputs)
        return outputs["logits"][0]

    def generate(
        self,
        prompt: list[int] | np.ndarray,
        max_new_tokens: int,
        schedule: str | Schedule | None = None,
        sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        eos_token_id: int | list[int] | None = None,
        on_token: Callable[[int], None] | None = None,
        keep_logits: bool = False,
    ) -> GenerationResult:
        """Generate up to ``max_new_tokens`` ids after ``prompt``; the schedule picks the bucket.

        ``schedule`` defaults to the largest bucket. ``on_token`` is called with each new id as
        soon as it exists (streaming).
        """
        prompt = [int(x) for x in np.asarray(prompt).reshape(-1)]
        if not prompt:
            raise DataError("empty prompt")
        if max_new_tokens < 1:
            raise DataError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not 0 < top_p <= 1:
            raise DataError(f"top_p must be in (0, 1], got {top_p}")
        if sample and temperature <= 0:
            raise DataError(f"temperature must be positive when sampling, got {temperature}")
        if schedule is None:
            schedule = f"static:{self.budgets[0]:g}"
        if isinstance(schedule, str):
            schedule = parse_schedule(schedule, self.budgets)
        stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
        rng = np.random.default_rng(seed)
        cache = KVCache(self.layout)
        result = GenerationResult(prompt, [], [], [], 0.0, 0.0)
        ids = np.asarray(prompt, dtype=np.int64)
        previous: float | None = None
        history: list[tuple[float, float]] = []  # (budget, entropy) of each step so far
        for t in range(max_new_tokens):
            start = time.perf_counter()
            budget = schedule.budget(t, previous, history)
            logits = self.step(budget, ids, cache)[-1]
            h = entropy(logits) if schedule.needs_entropy or keep_logits else float("nan")
            token = (
                sample_token(logits, rng, temperature, top_p) if sample else int(np.argmax(logits))
            )
            elapsed = time.perf_counter() - start
            if t == 0:
                result.prefill_s = elapsed
            else:
                result.decode_s += elapsed
            result.tokens.append(token)
            result.budgets.append(budget)
            result.entropies.append(h)
            if keep_logits:
                result.logits.append(np.array(logits))
            previous = h
            history.append((budget, h))
            if on_token is not None:
                on_token(token)
            if token in stops:
                break
            ids = np.asarray([token], dtype=np.int64)
        return result


def generate(
    folder: str | os.PathLike,
    prompt: list[int],
    max_new_tokens: int,
    schedule: str | None = None,
    backend: str = "ort-cpu",
    **options,
) -> GenerationResult:
    """One-shot :meth:`Generator.generate` over a bucket folder."""
    return Generator.from_buckets(folder, backend).generate(
        prompt, max_new_tokens, schedule, **options
    )


def weight_memory_report(
    folder: str | os.PathLike,
    share_weights: bool = True,
    budgets: list[float] | None = None,
    prepack: bool | None = None,
) -> dict:
    """RSS growth from loading the buckets' sessions and running one step in each.

    Run it in a fresh process. onnxruntime's one-time start-up (libraries, kernel registries,
    thread pools: tens of MB, whatever the weights) is paid first by a throw-away session of the
    smallest bucket, loaded from its files (external data is memory-mapped, so its weights are
    unmapped again when it is deleted and cannot be recycled by the heap later); that cost is
    reported as ``startup_bytes`` and left out of ``rss_delta_bytes``.
    ``largest_bucket_weight_bytes`` is what the largest bucket's initializers take (manifest).
    """
    import gc

    manifest = load_manifest(folder, verify=False)
    rows = manifest.data["buckets"]
    smallest = min(rows, key=lambda r: r["budget"])
    start = rss_bytes()
    warm = OrtRunner(manifest.path(smallest["file"]), None, None)
    cache = KVCache(_layout(manifest))
    warm.run(_probe_feed(cache))
    del warm
    gc.collect()
    before = rss_bytes()
    gen = Generator.from_buckets(
        folder, budgets=budgets, verify=False, share_weights=share_weights, prepack=prepack
    )
    for b in gen.budgets:
        gen.step(b, np.array([[1, 2, 3]]), KVCache(gen.layout))
    after = rss_bytes()
    largest = max(r["weight_bytes"] for r in rows if r["budget"] in gen.runners)
    return {
        "buckets": gen.budgets,
        "share_weights": gen.shared is not None,
        "prepacked": all(getattr(r, "prepacked", False) for r in gen.runners.values()),
        "rss_delta_bytes": after - before,
        "startup_bytes": before - start,
        "largest_bucket_weight_bytes": largest,
        "shared_buffer_bytes": gen.shared.nbytes if gen.shared else 0,
        "ratio": (after - before) / largest,
    }


def _layout(manifest: Manifest) -> CacheLayout:
    cache = manifest.data["cache"]
    return CacheLayout(cache["num_layers"], cache["kv_heads"], cache["head_dim"])


def _probe_feed(cache: KVCache) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.array([[1, 2, 3]], dtype=np.int64),
        "attention_mask": np.ones((1, 3), dtype=np.int64),
        "position_ids": np.arange(3, dtype=np.int64)[None, :],
        **cache.past,
    }
