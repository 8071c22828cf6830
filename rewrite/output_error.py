"""End-output error of the whole model with some target weights replaced (FLAR-SVD's criterion).

Target weights become graph inputs, so one onnxruntime session evaluates every candidate: a
candidate is a feed, never a new session. The error is normalised so one threshold means
the same across layers and models:

    err = sum_batches sum_outputs ||y - y_ref||^2  /  sum_batches sum_outputs ||y_ref||^2

or, with ``metric="kl"`` (language models and classifiers, whose quality is a loss over the
softmax of their logits rather than the logits themselves), the mean over rows of the
outputs named like ``*logits*`` (padding rows excluded where the attention mask spans them)
of the divergence of the candidate's distribution from the reference's, in nats:

    err = mean_rows KL(softmax(y_ref) || softmax(y))

KL ignores what the softmax ignores (a constant added to a row of logits) and weighs each
class by its reference probability, which is what perplexity and accuracy see.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper

from flarc.core.errors import OptionError
from flarc.core.external import split_large_initializers
from flarc.core.graphs import prune_to_outputs, scopes
from flarc.core.inputs import Feed, batch_mask, is_logits_name
from flarc.core.sessions import fed_session, lean_session_options
from flarc.core.targets import Target, Weights, stored_weight


def weights_as_inputs(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` in which the tensors ``values`` names are graph inputs (typed like
    their arrays): constants, or outputs of weight-path nodes, whose now unused paths go."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    names = set(values)
    # A subgraph's own weight is fed from the main graph too; inner graphs first, as rebuilding
    # a graph's node list copies the subgraphs in it.
    for scope in reversed(scopes(out)):
        g = scope.graph
        keep = [t for t in g.initializer if t.name not in names]
        del g.initializer[:]
        g.initializer.extend(keep)
        nodes = [n for n in g.node if not (n.output and all(o in names for o in n.output if o))]
        del g.node[:]
        g.node.extend(nodes)
    declared = {i.name for i in graph.input}  # before IR 4, initializers are inputs already
    for name in sorted(names - declared):
        v = values[name]
        graph.input.append(
            helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)
            )
        )
    prune_to_outputs(graph)
    return out


METRICS = ("mse", "kl")
KL_ROWS = 64  # logits rows per float64 block (one Qwen row: 151936 classes)


def _log_softmax(y: np.ndarray) -> np.ndarray:
    y = y.astype(np.float64)
    y -= y.max(axis=-1, keepdims=True)
    y -= np.log(np.exp(y).sum(axis=-1, keepdims=True))
    return y


def kl_rows(y_ref: np.ndarray, y: np.ndarray, keep: np.ndarray | None = None) -> tuple[float, int]:
    """Sum over rows of ``KL(softmax(y_ref) || softmax(y))`` along the last axis, and the row
    count; ``keep`` (the leading axes' shape) selects rows. Float64, ``KL_ROWS`` rows at a
    time: a language model's logits are large."""
    ref = y_ref.reshape(-1, y_ref.shape[-1])
    cand = y.reshape(-1, y.shape[-1])
    if keep is not None:
        rows = np.flatnonzero(np.asarray(keep).reshape(-1))
        ref, cand = ref[rows], cand[rows]
    total = 0.0
    for i in range(0, ref.shape[0], KL_ROWS):
        log_p = _log_softmax(ref[i : i + KL_ROWS])
        log_q = _log_softmax(cand[i : i + KL_ROWS])
        total += float(np.sum(np.exp(log_p) * (log_p - log_q)))
    return total, ref.shape[0]


class OutputErrorProbe:
    """Evaluates the model's outputs with any set of target weights swapped for candidates."""

    def __init__(
        self,
        model: onnx.ModelProto,
        targets: list[Target],
        feeds: list[Feed],
        metric: str = "mse",
        mask_input: str | None = None,
    ) -> None:
        if metric not in METRICS:
            raise OptionError(f"unknown output metric '{metric}' ({', '.join(METRICS)})")
        self.targets = {t.name: t for t in targets}
        reader = Weights(model)
        # Every use's weight input is fed: the consumed tensor, after its path (if any).
        self.weights: dict[str, np.ndarray] = {}
        for t in targets:
            value = reader.consumed(t)
            self.weights.update((u.consumed, value) for u in t.all_uses)
        # Built on a copy whose large weights are stubs: the model's tensors are never copied.
        light, originals = split_large_initializers(model)
        probe = weights_as_inputs(light, self.weights)
        del light
        self.session = fed_session(probe, lean_session_options(model), originals)
        del probe
        self.outputs_names = [
            o.name
            for o in model.graph.output
            if np.issubdtype(
                helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type), np.floating
            )
        ]
        if metric == "kl":
            self.outputs_names = [
                o.name
                for o in model.graph.output
                if o.name in self.outputs_names
                and is_logits_name(o.name)
                and len(o.type.tensor_type.shape.dim) >= 2
            ]
            if not self.outputs_names:
                names = ", ".join(o.name for o in model.graph.output)
                raise OptionError(
                    f"output metric 'kl' needs a float output named like *logits* with a class "
                    f"axis; the model's outputs are: {names}"
                )
        self.metric = metric
        self.mask_input = mask_input
        self.feeds = feeds
        self._reference: list[list[np.ndarray]] | None = None
        self.evaluations = 0

    @property
    def reference(self) -> list[list[np.ndarray]]:
        """The original model's outputs (made on first use: a guard that only swaps weights
        never reads the original targets, which for a large model stay in their files)."""
        if self._reference is None:
            self._reference = self.outputs({})
            self.reference_energy = sum(
                float(np.sum(y.astype(np.float64) ** 2)) for ys in self._reference for y in ys
            )
        return self._reference

    def outputs(self, replaced: dict[str, np.ndarray]) -> list[list[np.ndarray]]:
        """Model outputs on every feed with target ``name -> B [n, m]`` replacements (a
        mapping that makes each on lookup keeps one float64 ``B`` alive at a time)."""
        weights = dict(self.weights)
        for name in replaced:
            t = self.targets[name]
            value = stored_weight(t, replaced[name])
            weights.update((u.consumed, value) for u in t.all_uses)
        return [self.session.run(self.outputs_names, {**feed, **weights}) for feed in self.feeds]

    def error(self, replaced: dict[str, np.ndarray]) -> float:
        """Normalised output error with target ``name -> B [n, m]`` replacements."""
        self.evaluations += 1
        reference = self.reference
        if self.metric == "kl":
            total, rows = 0.0, 0
            for feed, ys, refs in zip(self.feeds, self.outputs(replaced), reference, strict=True):
                for y, y0 in zip(ys, refs, strict=True):
                    kl, n = kl_rows(y0, y, self._kept_rows(feed, y))
                    total, rows = total + kl, rows + n
            return total / max(rows, 1)
        num = 0.0
        for ys, refs in zip(self.outputs(replaced), reference, strict=True):
            for y, y0 in zip(ys, refs, strict=True):
                num += float(np.sum((y.astype(np.float64) - y0) ** 2))
        return num / max(self.reference_energy, 1e-300)

    def _kept_rows(self, feed: Feed, y: np.ndarray) -> np.ndarray | None:
        """The attention mask as a row selector, where it spans the output's leading axes."""
        mask = batch_mask(feed, self.mask_input)
        return mask if mask is not None and mask.shape == y.shape[:-1] else None

    def close(self) -> None:
        """Release the session and the weight arrays (the outputs' names stay readable)."""
        self.session = None
        self.weights = {}
