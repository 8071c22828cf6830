"""Carried activations: one forward pass writes every target's input to disk, and each group of
statistics is then reduced from those files by a graph of the statistics nodes alone.

A large model's statistics are gathered a group at a time so that memory holds one group's Grams
(:func:`flarc.calib.statistics.collect_moments`). Re-running the graph up to each group's layers
costs about half a forward pass per group (24 groups on Qwen2.5-0.5B: twelve forward passes);
carrying the activations costs one forward pass plus writing and reading them once. The
statistics graph is the same nodes on the same values, so the sums are the same bits.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from flarc.core.files import naming_write_errors
from flarc.core.graphs import prune_to_outputs
from flarc.core.inputs import Feed
from flarc.core.progress import NoProgress, Progress
from flarc.core.sessions import fed_session, session_options

log = logging.getLogger(__name__)

# Free space kept on the spill's disk beyond the activations themselves.
SPARE_BYTES = 1 << 30


class ActivationSpill:
    """Per-batch arrays of named tensors in a temporary folder (removed by :meth:`close`)."""

    def __init__(self, folder: str | Path | None, names: list[str]) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="flarc-carry-", dir=folder)
        self.root = Path(self._tmp.name)
        self.names = list(names)
        self._index = {n: i for i, n in enumerate(self.names)}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, np.dtype] = {}

    def holds(self, name: str) -> bool:
        """Whether tensor ``name`` is spilled."""
        return name in self._index

    def _path(self, batch: int, name: str) -> Path:
        return self.root / str(batch) / f"{self._index[name]}.npy"

    def write(self, batch: int, arrays: Mapping[str, np.ndarray]) -> None:
        (self.root / str(batch)).mkdir(exist_ok=True)
        for name, value in arrays.items():
            path = self._path(batch, name)
            with naming_write_errors(path):
                np.save(path, np.ascontiguousarray(value), allow_pickle=False)
            self.shapes.setdefault(name, tuple(value.shape))
            self.dtypes.setdefault(name, value.dtype)

    def read(self, batch: int, name: str) -> np.ndarray:
        return np.load(self._path(batch, name), allow_pickle=False)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` removed the arrays."""
        return not self.root.exists()

    def close(self) -> None:
        self._tmp.cleanup()


class CarriedFeed(Mapping[str, np.ndarray]):
    """Batch ``batch`` as a statistics graph reads it: the tensors ``names``, spilled ones read
    from disk when asked for, graph inputs from the original feed."""

    def __init__(
        self, spill: ActivationSpill, batch: int, original: Feed, names: tuple[str, ...]
    ) -> None:
        self.spill = spill
        self.batch = batch
        self.original = original
        self.names = tuple(n for n in names if spill.holds(n) or n in original)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(name)
        if self.spill.holds(name):
            return self.spill.read(self.batch, name)
        return self.original[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def activations_model(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` (stubs welcome) whose outputs are the tensors ``names``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    prune_to_outputs(probe.graph)
    return probe


def inputs_model(
    model: onnx.ModelProto, dtypes: Mapping[str, np.dtype], graph_inputs: list[str]
) -> onnx.ModelProto:
    """A model with no nodes, in ``model``'s opsets, whose graph inputs are the tensors of
    ``dtypes`` (shapes left open) and ``graph_inputs`` of ``model``: the base on which
    :func:`flarc.calib.statistics.build_statistics_model` builds a graph of the statistics
    nodes alone."""
    kept = {i.name: i for i in model.graph.input}
    inputs = [kept[n] for n in graph_inputs if n in kept]
    inputs += [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.dtype(d)), None)
        for n, d in dtypes.items()
        if n not in kept
    ]
    graph = helper.make_graph([], f"{model.graph.name or 'model'}_carried", inputs, [])
    base = helper.make_model(graph, opset_imports=list(model.opset_import))
    base.ir_version = model.ir_version
    return base


def spill_activations(
    model: onnx.ModelProto,
    names: list[str],
    feeds: list[Feed],
    folder: str | Path | None,
    originals: dict[str, onnx.TensorProto] | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
    description: str = "forward pass",
) -> ActivationSpill | None:
    """Run ``model`` once on each feed and write the tensors ``names`` (not graph inputs) to a
    spill under ``folder``; None, with the reason logged, when the disk has no room for them."""
    progress = progress or NoProgress()
    graph_inputs = {i.name for i in model.graph.input}
    wanted = [n for n in names if n not in graph_inputs]
    spill = ActivationSpill(folder, wanted)
    # One batch is written while the next one runs: the disk's time hides behind the forward
    # pass (at most two batches' activations in memory).
    writer = ThreadPoolExecutor(1, thread_name_prefix="flarc-spill")
    pending = None
    try:
        sess = fed_session(
            activations_model(model, wanted),
            session_options(threads, arena=False, prepacking=False, spinning=False),
            originals,
        )
        for i, feed in enumerate(progress.track(feeds, total=len(feeds), description=description)):
            values = dict(zip(wanted, sess.run(wanted, feed), strict=True))
            if pending is not None:
                pending.result()
                pending = None
            if i == 0:
                need = sum(v.nbytes for v in values.values()) * len(feeds)
                free = shutil.disk_usage(spill.root).free
                if free < need + SPARE_BYTES:
                    log.info(
                        "carried activations need %.1f GB in %s, %.1f GB free: the graph is "
                        "re-run for each statistics group instead",
                        need / 1e9,
                        spill.root.parent,
                        free / 1e9,
                    )
                    spill.close()
                    return None
            pending = writer.submit(spill.write, i, values)
            del values
        if pending is not None:
            pending.result()
        return spill
    except BaseException:
        if pending is not None:
            pending.exception()  # the write in flight ends before its folder goes
        spill.close()
        raise
    finally:
        writer.shutdown()
