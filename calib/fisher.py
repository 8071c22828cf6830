"""Fisher importance of each target weight (FLRC), from gradients computed on the ONNX graph.

Definition. For each calibration batch ``b`` let ``L_b`` be the loss below and
``G_b = dL_b / dW`` its gradient w.r.t. the effective float weight ``W`` (the anchor: after any
Cast or DequantizeLinear, before layout nodes; a weight used by several nodes gets the sum over
its uses). The importance of a target is
the empirical Fisher, accumulated per batch::

    alpha_t = sum_b sum_ij (G_b * W)_ij ** 2

Gradients come from :mod:`flarc.calib.onnx_torch`, which runs the graph itself with torch ops
(float64, or float32 for models of 256 MB or more under the default ``dtype="auto"``); the
model's Python code is never needed.

Losses (``L_b`` is a mean over the rows that count, so batches of any size weigh alike):

- ``lm``: next-token cross-entropy. Needs ``input_ids`` ``[B, S]`` in the batch and a logits
  output ``[B, S, V]``; logits at position ``t`` predict ``input_ids[:, t + 1]``; a pair counts
  only where the attention mask (``mask_input``, else a batch entry named ``attention_mask``)
  is non-zero at both ``t`` and ``t + 1``.
- ``sampled``: cross-entropy of logits ``[B, C]`` or ``[B, S, C]`` against labels drawn from
  the model's own softmax: ``u ~ U[0, 1)`` per row from ``numpy.random.default_rng([seed,
  batch_index])``, label = first class whose cumulative probability reaches ``u`` (times the
  row's total, against rounding); rows whose
  mask is zero do not count (``[B, S, C]`` with a ``[B, S]`` mask).
- ``projection``: for embeddings or anything else, ``sum over float outputs y of mean over
  rows r of 0.5 * ||R_y^T y_r||^2``; rows are the last axis (``D`` values), ``R_y`` is a
  ``[D, min(D, 64)]`` Gaussian matrix scaled by ``1/sqrt(cols)`` from
  ``numpy.random.default_rng([seed, 1, output_index])``; its gradient is not zero at the model's
  own weights (unlike a loss at a minimum, or ``||y||`` of normalised embeddings). Rows at
  masked positions do not count for outputs laid out ``[B, S, ..., D]`` (3 or more axes)
  whose ``[B, S]`` matches the mask.
- ``auto``: ``lm`` when the batch has ``input_ids`` and an output named like ``*logits*``
  has shape ``[B, S, V]`` matching them (``V`` above every id); else ``sampled`` when an output
  named like ``*logits*`` has 2 or 3 axes; else ``projection``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx
import torch
from torch.nn import functional as F

from flarc.calib.onnx_torch import TorchGraph
from flarc.core.errors import DataError, ModelError, OptionError
from flarc.core.inputs import batch_mask, find_mask_input, is_logits_name
from flarc.core.modelio import is_large
from flarc.core.progress import NoProgress, Progress
from flarc.core.targets import Target, Weights

log = logging.getLogger(__name__)

LOSSES: Mapping[str, str] = MappingProxyType(
    {
        "auto": (
            "lm if the batch has input_ids and an output named *logits* is [B, S, V] matching "
            "them; else sampled if an output named *logits* has 2 or 3 axes; else projection"
        ),
        "lm": (
            "next-token cross-entropy of language-model logits [B, S, V] on the batch's "
            "input_ids, positions with attention mask 0 excluded"
        ),
        "sampled": (
            "cross-entropy of classifier logits [B, C] or [B, S, C] against labels sampled "
            "(seeded) from the model's own softmax, masked positions excluded"
        ),
        "projection": (
            "0.5 * ||R^T y||^2 per row, averaged over rows and summed over float outputs, with a "
            "seeded Gaussian projection R (for embeddings and other outputs), masked positions "
            "excluded"
        ),
    }
)
MAX_PROJECTION_COLUMNS = 64
# Stream ids for numpy's SeedSequence so that label sampling and projections never share draws.
_PROJECTION_STREAM = 1


@dataclass(frozen=True)
class LossPlan:
    """The loss actually used and the outputs it reads (fixed on the first batch)."""

    kind: str
    outputs: tuple[str, ...]

    @property
    def description(self) -> str:
        outs = ", ".join(f"'{o}'" for o in self.outputs)
        return f"{self.kind} on {outs}: {LOSSES[self.kind]}"


@dataclass
class BatchGradients:
    """One calibration batch's loss and ``dL/dW`` of each named weight, with the weights themselves,
    in the compute dtype."""

    index: int
    plan: LossPlan
    loss: float
    gradients: dict[str, torch.Tensor]  # weight name -> dL/dW in the compute dtype
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> W, compute dtype


@dataclass
class FisherResult:
    """The Fisher importance of each target (``alpha``: target name -> ``sum_b sum (G_b * W)^2``),
    and the loss and batches it came from."""

    alpha: dict[str, float]  # target name -> sum_b sum (G_b * W)^2
    loss: str  # the loss actually used (never "auto")
    description: str  # one line
    batches: int = 0  # batches that contributed
    outputs: tuple[str, ...] = field(default_factory=tuple)


def _lm_candidates(outputs: Mapping[str, torch.Tensor], batch: Mapping) -> list[str]:
    ids = batch.get("input_ids")
    if ids is None:
        return []
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        return []
    top = int(ids.max()) if ids.size else 0
    return [
        name
        for name, y in outputs.items()
        if y.is_floating_point()
        and y.dim() == 3
        and tuple(y.shape[:2]) == ids.shape
        and y.shape[2] > top
    ]


def _class_candidates(outputs: Mapping[str, torch.Tensor]) -> list[str]:
    return [
        name
        for name, y in outputs.items()
        if y.is_floating_point() and y.dim() in (2, 3) and y.shape[-1] >= 2
    ]


def _prefer_logits(names: list[str]) -> str:
    return next((n for n in names if is_logits_name(n)), names[0])


def resolve_loss(
    loss: str, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, np.ndarray]
) -> LossPlan:
    """Which loss and which outputs, from the model's outputs on one batch."""
    if loss not in LOSSES:
        raise OptionError(f"unknown Fisher loss '{loss}'; choose from {', '.join(LOSSES)}")
    lm = _lm_candidates(outputs, batch)
    classes = _class_candidates(outputs)
    floats = [n for n, y in outputs.items() if y.is_floating_point()]
    if loss == "auto":
        named_lm = [n for n in lm if is_logits_name(n)]
        named_cls = [n for n in classes if is_logits_name(n)]
        if named_lm:
            return LossPlan("lm", (named_lm[0],))
        if named_cls:
            return LossPlan("sampled", (named_cls[0],))
        loss = "projection"
    if loss == "lm":
        if "input_ids" not in batch:
            raise DataError("Fisher loss 'lm' needs 'input_ids' in the calibration batch")
        if not lm:
            shapes = {n: tuple(y.shape) for n, y in outputs.items()}
            raise ModelError(
                f"Fisher loss 'lm' needs an output [B, S, V] matching input_ids "
                f"{tuple(np.shape(batch['input_ids']))}; outputs are {shapes}"
            )
        return LossPlan("lm", (_prefer_logits(lm),))
    if loss == "sampled":
        if not classes:
            shapes = {n: tuple(y.shape) for n, y in outputs.items()}
            raise ModelError(
                f"Fisher loss 'sampled' needs a float output [B, C] or [B, S, C]; outputs are {shapes}"
            )
        return LossPlan("sampled", (_prefer_logits(classes),))
    if not floats:
        raise ModelError(
            "Fisher loss 'projection' needs a floating-point output; the model has none"
        )
    return LossPlan("projection", tuple(floats))


def _lm_loss(logits: torch.Tensor, ids: np.ndarray, mask: np.ndarray | None) -> torch.Tensor | None:
    pred = logits[:, :-1].reshape(-1, logits.shape[-1])
    target = torch.from_numpy(np.asarray(ids[:, 1:], dtype=np.int64)).reshape(-1)
    if mask is not None:
        if mask.shape != ids.shape:
            raise DataError(
                f"attention mask shape {mask.shape} does not match input_ids {ids.shape}"
            )
        keep = torch.from_numpy(np.ascontiguousarray(mask[:, :-1] & mask[:, 1:])).reshape(-1)
        pred, target = pred[keep], target[keep]
    if target.numel() == 0:
        return None
    return F.cross_entropy(pred, target, reduction="mean")


# Rows of float64 exponentials at a time (one Qwen row: 151936 classes, 1.2 MB): one buffer,
# 78 MB, made while a language model's activations for its backward pass are all held.
LABEL_ROWS = 64


def _sampled_rows(
    logits: torch.Tensor, seed: int, batch_index: int, u: np.ndarray | None = None
) -> np.ndarray:
    """Labels drawn from ``softmax(logits)`` (rows x classes): per row, the first class whose
    cumulative probability reaches ``u ~ U(0, 1)``, the row's draw from
    ``numpy.random.default_rng([seed, batch_index])``. In float64, as the first class whose
    cumulative ``exp(logit - max)`` reaches ``u`` times their total (the normalisation
    cancels), found by bisection, ``LABEL_ROWS`` rows at a time in one buffer. ``u`` gives the
    rows' draws instead (a slice of a larger batch's stream)."""
    rows, classes = logits.shape[0], logits.shape[-1]
    if u is None:
        u = np.random.default_rng([seed, batch_index]).random(rows)
    out = np.empty(rows, dtype=np.int64)
    for i in range(0, rows, LABEL_ROWS):
        block = logits[i : i + LABEL_ROWS].to(torch.float64, copy=True)
        block -= block.amax(dim=-1, keepdim=True)
        cdf = block.exp_().numpy()
        np.cumsum(cdf, axis=-1, out=cdf)
        for r, row in enumerate(cdf):
            out[i + r] = np.searchsorted(row, u[i + r] * row[-1], side="left")
    return np.minimum(out, classes - 1)


def _row_mask(y: torch.Tensor, mask: np.ndarray | None) -> torch.Tensor | None:
    """Weights of the rows of ``y`` (all axes but the last) when it is laid out [B, S, ..., D]."""
    if mask is None or y.dim() < 3 or tuple(y.shape[:2]) != mask.shape:
        return None
    m = torch.from_numpy(np.ascontiguousarray(mask)).to(y.dtype)
    m = m.reshape(*mask.shape, *([1] * (y.dim() - 3)))
    return m.expand(*y.shape[:-1]).reshape(-1)


def _sampled_loss(
    logits: torch.Tensor, mask: np.ndarray | None, seed: int, batch_index: int
) -> torch.Tensor | None:
    flat = logits.reshape(-1, logits.shape[-1])
    labels = torch.from_numpy(_sampled_rows(flat.detach(), seed, batch_index))
    per_row = F.cross_entropy(flat, labels, reduction="none")
    weights = _row_mask(logits, mask)
    if weights is None:
        return per_row.mean()
    if float(weights.sum()) == 0:
        return None
    return (per_row * weights).sum() / weights.sum()


def projection_matrix(dim: int, seed: int, output_index: int) -> np.ndarray:
    """The ``[D, min(D, 64)]`` Gaussian projection of ``projection`` for one output."""
    cols = min(dim, MAX_PROJECTION_COLUMNS)
    rng = np.random.default_rng([seed, _PROJECTION_STREAM, output_index])
    return rng.standard_normal((dim, cols)) / math.sqrt(cols)


def _projection_loss(
    outputs: Sequence[tuple[int, torch.Tensor]], mask: np.ndarray | None, seed: int
) -> torch.Tensor | None:
    total: torch.Tensor | None = None
    for index, y in outputs:
        rows = y.reshape(-1, y.shape[-1] if y.dim() else 1)
        r = torch.from_numpy(projection_matrix(rows.shape[-1], seed, index)).to(y.dtype)
        per_row = 0.5 * (rows @ r).pow(2).sum(-1)
        weights = _row_mask(y, mask)
        if weights is None:
            term = per_row.mean()
        elif float(weights.sum()) == 0:
            continue
        else:
            term = (per_row * weights).sum() / weights.sum()
        total = term if total is None else total + term
    return total


def _compute_loss(
    plan: LossPlan,
    outputs: Mapping[str, torch.Tensor],
    batch: Mapping[str, np.ndarray],
    mask: np.ndarray | None,
    seed: int,
    batch_index: int,
    output_order: Sequence[str],
) -> torch.Tensor | None:
    if plan.kind == "lm":
        if "input_ids" not in batch:
            raise DataError(f"batch {batch_index} has no 'input_ids' (needed by Fisher loss 'lm')")
        return _lm_loss(outputs[plan.outputs[0]], np.asarray(batch["input_ids"]), mask)
    if plan.kind == "sampled":
        return _sampled_loss(outputs[plan.outputs[0]], mask, seed, batch_index)
    indexed = [(output_order.index(n), outputs[n]) for n in plan.outputs]
    return _projection_loss(indexed, mask, seed)


def iter_weight_gradients(
    model: onnx.ModelProto,
    weights: Sequence[str],
    batches: Iterable[Mapping[str, np.ndarray]],
    loss: str = "auto",
    mask_input: str | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    dtype: str = "float64",
    values: Mapping[str, np.ndarray] | None = None,
) -> Iterator[BatchGradients]:
    """Per batch, ``dL_b/dW`` for each named weight (streamed: nothing is kept between batches).
    A weight may be a node output (an anchor) whose value ``values`` gives (see TorchGraph).

    A batch without any position that counts (fully masked) yields nothing and is logged.
    """
    if loss not in LOSSES:
        raise OptionError(f"unknown Fisher loss '{loss}'; choose from {', '.join(LOSSES)}")
    mask_input = mask_input or find_mask_input(model)  # a named mask may be any batch entry
    graph = TorchGraph(model, params=list(weights), dtype=dtype, values=values)
    params = [graph.params[w] for w in dict.fromkeys(weights)]
    names = list(graph.params)
    plan: LossPlan | None = None
    progress = progress or NoProgress()
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    for index, batch in enumerate(progress.track(batches, total, "Fisher gradients")):
        mask = batch_mask(batch, mask_input)
        outputs = graph.run(batch, None if plan is None else plan.outputs)
        if plan is None:
            plan = resolve_loss(loss, outputs, batch)
            log.info("Fisher loss: %s", plan.description)
        value = _compute_loss(plan, outputs, batch, mask, seed, index, graph.outputs)
        if value is None:
            log.warning("calibration batch %d has no unmasked position; skipped", index)
            continue
        if not torch.isfinite(value):
            raise DataError(f"Fisher loss is {float(value)} on calibration batch {index}")
        grads = torch.autograd.grad(value, params, allow_unused=True)
        result = {}
        for name, p, g in zip(names, params, grads, strict=True):
            if g is None:
                # The loss does not depend on this weight: its gradient is exactly zero.
                g = torch.zeros_like(p)
            result[name] = g.detach()
        values = {name: p.detach() for name, p in zip(names, params, strict=True)}
        yield BatchGradients(index, plan, float(value.detach()), result, values)


def weight_gradients(
    model: onnx.ModelProto,
    weights: list[str],
    batches: Iterable[Mapping[str, np.ndarray]],
    **options: Any,
) -> dict[str, list[np.ndarray]]:
    """``{weight: [dL_b/dW for each counted batch b]}``, shaped as stored; ``options`` are those
    of :func:`iter_weight_gradients`."""
    out: dict[str, list[np.ndarray]] = {w: [] for w in dict.fromkeys(weights)}
    for item in iter_weight_gradients(model, weights, batches, **options):
        for name, g in item.gradients.items():
            out[name].append(g.numpy())
    return out


def resolve_dtype(dtype: str, model: onnx.ModelProto) -> str:
    """``dtype``, with "auto" meaning float64 for small models and float32 for large ones."""
    if dtype != "auto":
        return dtype
    # A float64 copy of a large model, its gradients and activations would be several times its size.
    return "float32" if is_large(model) else "float64"


class _AnchorValues(Mapping):
    """The targets' anchors that are node outputs, each evaluated through its weight path when
    looked up (TorchGraph reads each once, so no array outlives its Parameter)."""

    def __init__(self, model: onnx.ModelProto, targets: Sequence[Target]) -> None:
        self.weights = Weights(model)
        self.targets = {
            t.anchor: t for t in targets if t.anchor and t.anchor not in self.weights.tensors
        }

    def __getitem__(self, name: str) -> np.ndarray:
        return self.weights.anchor(self.targets[name])

    def __contains__(self, name: object) -> bool:
        return name in self.targets  # Mapping's default would evaluate the anchor

    def __iter__(self) -> Iterator[str]:
        return iter(self.targets)

    def __len__(self) -> int:
        return len(self.targets)


def check_gradient_targets(targets: Sequence[Target], what: str, hint: str = "") -> None:
    """ModelError (``what`` in front) when there are no targets or one is inside an If branch:
    gradients do not run through subgraphs."""
    if not targets:
        raise ModelError(f"{what}: no targets")
    inside = next((t for t in targets if any(u.graph for u in t.all_uses)), None)
    if inside is not None:
        raise ModelError(
            f"{what}: target '{inside.name}' is inside an If branch; gradients through "
            f"subgraphs are not supported{hint}"
        )


def fisher_importance(
    model: onnx.ModelProto,
    targets: list[Target],
    batches: Iterable[Mapping[str, np.ndarray]],
    dtype: str = "auto",
    **options: Any,
) -> FisherResult:
    """FLRC importance ``alpha_t = sum_b sum (G_b * W)^2`` for every target (see module doc);
    ``options`` (loss, mask_input, seed, progress) are those of :func:`iter_weight_gradients`."""
    check_gradient_targets(targets, "Fisher importance", " (use --allocate global)")
    weights = list(dict.fromkeys(t.anchor or t.weight for t in targets))
    per_weight = dict.fromkeys(weights, 0.0)
    plan: LossPlan | None = None
    count = 0
    values = _AnchorValues(model, targets)
    for item in iter_weight_gradients(
        model, weights, batches, dtype=resolve_dtype(dtype, model), values=values, **options
    ):
        plan, count = item.plan, count + 1
        for name, g in item.gradients.items():
            # W the anchor (the compute dtype holds float32/16 weights exactly), one at a time.
            w = item.weights[name].to(torch.float64)
            per_weight[name] += float(((g.to(torch.float64) * w) ** 2).sum())
            del w
    if plan is None:
        raise DataError("Fisher importance: no calibration batch with an unmasked position")
    alpha = {t.name: per_weight[t.anchor or t.weight] for t in targets}
    if not any(alpha.values()):
        log.warning(
            "every Fisher importance is zero: the %s loss does not reach the targets", plan.kind
        )
    description = (
        f"FLRC empirical Fisher sum_b sum (G_b*W)^2 over {count} batches, loss {plan.description}"
    )
    return FisherResult(alpha, plan.kind, description, count, plan.outputs)
