"""How much loss one unit of a target's whitened error costs, from one backward pass (K-FAC).

For ``Y = X W`` a truncation ``dW`` changes the model's loss by about (docs/design.md section 5)::

    dL ~ 1/2 tr(dW^T A dW G),   A = sum_r x_r x_r^T,   G = E[g g^T],   g = dL/dy_r

with the labels of ``L`` drawn from the model's own output distribution, so that ``G`` is the
Fisher of the outputs (Gauss-Newton) rather than the gradient of a loss at its minimum. With the
isotropic approximation ``G ~ g2 I`` (``g2`` the mean squared gradient per output element)::

    dL ~ 1/2 g2 ||X dW||^2 = 1/2 g2 rows sum_i s_i^2 * err(k)

where ``s`` are the target's whitened singular values (mean Gram), ``rows`` the rows of its Gram
and ``err(k)`` the relative whitened error (:meth:`Spectrum.error`). The *sensitivity*
``g2 * rows * sum s^2`` therefore turns every target's relative error into one unit, the loss,
and weights the global allocation in place of one model evaluation per target.

The same pass gives ``D``, the mean of ``(dL/dy_j)^2`` per output channel ``j`` (``G``'s
diagonal). By default the analysis truncates ``A^{1/2} W D^{1/2}`` instead of ``A^{1/2} W``
(two-sided whitening, :func:`flarc.rewrite.analysis.analyze_target`): the truncation then
minimises ``1/2 tr(dW^T A dW D)`` itself, and ``rows sum s^2`` of that spectrum is the scale.

Losses (sampled, seeded per batch; rows whose mask is zero do not count):

- ``sampled``: cross-entropy of an output named like ``*logits*`` ``[B, C]`` / ``[B, S, C]``
  against labels drawn from its own softmax (language models: every position);
- ``gaussian`` (any other model): ``sum_y sum_r e_r . y_r / sqrt(E_y)`` over float outputs,
  rows = all axes but the last, ``e ~ N(0, I)`` from ``numpy.random.default_rng([seed, 2,
  batch, output index])`` and ``E_y`` the output's mean square over unmasked rows. Its gradient
  at ``y`` is ``e / sqrt(E_y)``: the Fisher of a Gaussian likelihood whose noise matches each
  output's own energy, so no output drowns another (an embedding next to a logit, boxes next
  to scores).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from torch.nn import functional as F

from flarc.calib.fisher import (
    _AnchorValues,
    _class_candidates,
    _prefer_logits,
    _row_mask,
    _sampled_rows,
    check_gradient_targets,
    resolve_dtype,
)
from flarc.calib.onnx_torch import TorchGraph
from flarc.calib.shrinkage import diagonal_lambda, shrink_diagonal
from flarc.core.errors import DataError, ModelError
from flarc.core.inputs import (
    batch_mask,
    batch_rows,
    batch_size,
    find_mask_input,
    fixed_batch,
    is_logits_name,
    model_inputs,
)
from flarc.core.progress import NoProgress, Progress
from flarc.core.targets import Target

log = logging.getLogger(__name__)

# Separates the Gaussian loss's random stream from the sampled labels'.
_GAUSSIAN_STREAM = 2
# Logits elements per forward pass of the sampled loss: a language model's batch is run a few
# sequences at a time (same gradients: sequences are independent), so that its logits and the
# activations kept for the backward pass stay small (4 x 128 x 151936 would be 0.3 GB each).
MAX_LOGITS = 1 << 24


@dataclass
class OutputGradients:
    """Per target: ``g2``, the mean over its output elements of the squared loss gradient
    (summed over the node's uses), and the loss and batches it came from."""

    g2: dict[str, float]  # target name -> mean (dL/dy)^2 per output element
    loss: str  # "sampled on 'logits'" | "gaussian on 'a', 'b'"
    batches: int
    # target name -> [m] mean over rows of (dL/dy_j)^2 per output channel (G's diagonal)
    diag: dict[str, np.ndarray] = field(default_factory=dict)
    # target name -> [m] the variance of each ``diag`` entry as an estimate, from the spread of
    # its per-sample means (a sample: one item of the batch axis); None with one sample only
    diag_variance: dict[str, np.ndarray | None] = field(default_factory=dict)

    def shrunk_diag(self, lam: float | None = None) -> dict[str, np.ndarray]:
        """``diag`` shrunk toward its mean (:func:`flarc.calib.shrinkage.shrink_diagonal`), by
        ``lam``, or by each target's Ledoit-Wolf intensity when None (0 without a variance)."""
        out, used = {}, []
        for name, d in self.diag.items():
            variance = self.diag_variance.get(name)
            if lam is not None:
                a = lam
            else:
                a = diagonal_lambda(d, variance) if variance is not None else 0.0
            out[name] = shrink_diagonal(d, a)
            used.append(a)
        if used and lam is None:
            log.info(
                "output weights D shrunk toward their mean by Ledoit-Wolf: intensity median "
                "%.3f, range %.3f-%.3f over %d targets",
                float(np.median(used)), min(used), max(used), len(used),
            )  # fmt: skip
        return out


def resolve_outputs(outputs: Mapping[str, torch.Tensor]) -> tuple[str, tuple[str, ...]]:
    """``("sampled", (logits,))`` when an output named like logits has 2 or 3 axes, else
    ``("gaussian", every float output)``; ModelError when there is no float output."""
    named = [n for n in _class_candidates(outputs) if is_logits_name(n)]
    if named:
        return "sampled", (_prefer_logits(named),)
    floats = tuple(n for n, y in outputs.items() if y.is_floating_point())
    if not floats:
        raise ModelError("output sensitivities need a floating-point output; the model has none")
    return "gaussian", floats


def _gaussian_loss(
    outputs: Sequence[tuple[int, torch.Tensor]], mask: np.ndarray | None, seed: int, batch: int
) -> torch.Tensor | None:
    total: torch.Tensor | None = None
    for index, y in outputs:
        rows = y.reshape(-1, y.shape[-1] if y.dim() else 1)
        rng = np.random.default_rng([seed, _GAUSSIAN_STREAM, batch, index])
        noise = torch.from_numpy(rng.standard_normal(tuple(rows.shape))).to(y.dtype)
        weights = _row_mask(y, mask)
        squares = rows.detach().pow(2)
        if weights is None:
            energy = float(squares.mean())
        else:
            if float(weights.sum()) == 0:
                continue
            noise = noise * weights[:, None]
            energy = float((squares * weights[:, None]).sum()) / (
                float(weights.sum()) * rows.shape[1]
            )
        term = (noise * rows).sum() / max(energy, 1e-30) ** 0.5
        total = term if total is None else total + term
    return total


def _sampled_sum(
    logits: torch.Tensor, mask: np.ndarray | None, u: np.ndarray
) -> torch.Tensor | None:
    """Sum over counted rows of the cross-entropy against labels from ``u`` (module doc)."""
    flat = logits.reshape(-1, logits.shape[-1])
    labels = torch.from_numpy(_sampled_rows(flat.detach(), 0, 0, u))
    per_row = F.cross_entropy(flat, labels, reduction="none")
    weights = _row_mask(logits, mask)
    if weights is None:
        return per_row.sum()
    if float(weights.sum()) == 0:
        return None
    return (per_row * weights).sum()


def output_gradients(
    model: onnx.ModelProto,
    targets: Sequence[Target],
    batches: Iterable[Mapping[str, np.ndarray]],
    mask_input: str | None = None,
    seed: int = 0,
    dtype: str = "auto",
    progress: Progress | None = None,
    max_logits: int = MAX_LOGITS,
) -> OutputGradients:
    """``g2`` of every target (module doc) from one forward and backward pass per batch of the
    graph itself (:class:`TorchGraph`; no model code). ModelError for targets inside If
    branches (gradients do not run through subgraphs) or ops the graph runner lacks."""
    check_gradient_targets(targets, "output sensitivities")
    mask_input = find_mask_input(model, mask_input)
    # Anchors are Parameters only so the targets' outputs join the autograd graph; their own
    # gradients are never asked for, so autograd does not compute them.
    anchors = list(dict.fromkeys(t.anchor or t.weight for t in targets))
    graph = TorchGraph(
        model,
        params=anchors,
        dtype=resolve_dtype(dtype, model),
        values=_AnchorValues(model, targets),
    )
    taps = list(dict.fromkeys(u.output for t in targets for u in t.all_uses))
    sums = dict.fromkeys(taps, 0.0)
    sizes = dict.fromkeys(taps, 0)
    # Output channels: axis 1 of a Conv's output, the last axis of a MatMul's or Gemm's.
    channel = {u.output: 1 if u.op_type == "Conv" else -1 for t in targets for u in t.all_uses}
    channel_sums: dict[str, np.ndarray] = {}
    channel_rows = dict.fromkeys(taps, 0)
    # Per-sample channel means: their sum, sum of squares and count give D's variance.
    sample_sums: dict[str, tuple] = {}
    kind: str | None = None
    outs: tuple[str, ...] = ()
    per_sequence = 0  # logits elements per sequence (sampled loss)
    splittable = fixed_batch(model_inputs(model)) is None
    count = 0
    batches = list(batches)

    def accumulate(tapped: list[torch.Tensor], grads) -> None:
        for name, y, g in zip(taps, tapped, grads, strict=True):
            if g is not None:
                sq = g.detach().to(torch.float64).pow(2)
                sums[name] += float(sq.sum())
                axis = channel[name] % sq.dim()
                per = sq.sum(dim=[d for d in range(sq.dim()) if d != axis]).numpy()
                channel_sums[name] = channel_sums.get(name, 0.0) + per
                moved = sq.movedim(axis, -1)
                samples = moved.shape[0] if moved.dim() > 1 else 1
                means = moved.reshape(samples, -1, moved.shape[-1]).mean(dim=1).numpy()
                first, second, n = sample_sums.get(name, (0.0, 0.0, 0))
                sample_sums[name] = (
                    first + means.sum(0),
                    second + np.square(means).sum(0),
                    n + samples,
                )
            sizes[name] += y.numel()
            channel_rows[name] += y.numel() // y.shape[channel[name]]

    for index, batch in enumerate(
        (progress or NoProgress()).track(batches, len(batches), "output sensitivities")
    ):
        size = batch_size(batch)
        if kind is None:
            # The loss is chosen from the outputs of one sequence (or the batch, if fixed).
            first = batch_rows(batch, 0, 1, size) if splittable and size > 1 else batch
            with torch.no_grad():
                values = graph.run(first, graph.outputs)
            kind, outs = resolve_outputs(values)
            per_sequence = values[outs[0]].numel() // max(1, batch_size(first))
            del values
        mask = batch_mask(batch, mask_input)
        step = size
        if kind == "sampled" and splittable and per_sequence:
            step = max(1, min(size, max_logits // per_sequence))
        # The batch's own label draws (drawn chunk by chunk, the same stream) and denominator,
        # so that its chunks' losses add up to the batch's loss.
        draws = np.random.default_rng([seed, index])
        total = None
        counted = False
        for start in range(0, size, step):
            part = batch if step == size else batch_rows(batch, start, start + step, size)
            part_mask = batch_mask(part, mask_input)
            with torch.enable_grad():
                values = graph.run(part, list(dict.fromkeys([*outs, *taps])))
                tapped = [values[n] for n in taps]
                if kind == "sampled":
                    logits = values[outs[0]]
                    part_rows = logits.numel() // logits.shape[-1]
                    if total is None:
                        rows = size * part_rows // batch_size(part)
                        has_mask = mask is not None and mask.size == rows
                        total = float(mask.sum()) if has_mask else float(rows)
                    loss = _sampled_sum(logits, part_mask, draws.random(part_rows))
                    loss = None if loss is None or total == 0 else loss / total
                else:
                    indexed = [(graph.outputs.index(n), values[n]) for n in outs]
                    loss = _gaussian_loss(indexed, part_mask, seed, index)
                if loss is None:
                    continue
                if not torch.isfinite(loss):
                    raise DataError(
                        f"sensitivity loss is {float(loss)} on calibration batch {index}"
                    )
                grads = torch.autograd.grad(loss, tapped, allow_unused=True)
            accumulate(tapped, grads)
            counted = True
            del values, tapped, grads
        if not counted:
            log.warning("calibration batch %d has no unmasked position; skipped", index)
            continue
        count += 1
    if kind is None or not count:
        raise DataError("output sensitivities: no calibration batch with an unmasked position")
    g2, diag, variance = {}, {}, {}
    for t in targets:
        outputs = [u.output for u in t.all_uses]
        g2[t.name] = sum(sums[o] for o in outputs) / max(1, sum(sizes[o] for o in outputs))
        rows = max(1, sum(channel_rows[o] for o in outputs))
        diag[t.name] = sum(channel_sums.get(o, np.zeros(t.m)) for o in outputs) / rows
        variance[t.name] = _mean_variance([sample_sums[o] for o in outputs if o in sample_sums])
    loss = f"{kind} on " + ", ".join(f"'{o}'" for o in outs)
    return OutputGradients(g2, loss, count, diag, variance)


def _mean_variance(parts: list) -> np.ndarray | None:
    """The variance of a mean of ``n`` samples, ``var / n``, from ``(sum, sum of squares, n)``
    parts pooled; None below two samples."""
    if not parts:
        return None
    first = sum(p[0] for p in parts)
    second = sum(p[1] for p in parts)
    n = sum(p[2] for p in parts)
    if n < 2:
        return None
    mean = first / n
    return np.maximum(second - n * mean * mean, 0.0) / ((n - 1) * n)
