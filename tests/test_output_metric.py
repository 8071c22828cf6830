"""The KL end-output metric: against torch's kl_div, against onnxruntime on a model whose
weight was really replaced, padding rows excluded, and its use by the rank policies."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from torch.nn import functional as F

from flarc.calib.data import CalibrationSet
from flarc.core.targets import constant_tensors, find_targets, stored_weight, weight_matrix
from flarc.pipeline import AnalysisOptions, analyze
from flarc.rewrite.output_error import KL_ROWS, OutputErrorProbe, kl_rows
from flarc.rewrite.policy import RankOptions, choose_ranks, output_sensitivity

from _models import example_batch, kept_params, run_ort


def _torch_kl(y_ref: np.ndarray, y: np.ndarray) -> float:
    p = F.log_softmax(torch.from_numpy(y_ref).double().reshape(-1, y_ref.shape[-1]), -1)
    q = F.log_softmax(torch.from_numpy(y).double().reshape(-1, y.shape[-1]), -1)
    return float(F.kl_div(q, p, log_target=True, reduction="sum"))


def test_kl_rows_matches_torch_and_ignores_row_shifts():
    rng = np.random.default_rng(0)
    # More rows than one float64 block, and logits large enough to overflow a naive softmax.
    y_ref = (rng.standard_normal((3, KL_ROWS, 50)) * 40).astype(np.float32)
    y = y_ref + rng.standard_normal(y_ref.shape).astype(np.float32)
    total, rows = kl_rows(y_ref, y)
    assert rows == 3 * KL_ROWS
    assert total == pytest.approx(_torch_kl(y_ref, y), rel=1e-9)
    shifted = y_ref + rng.standard_normal((3, KL_ROWS, 1)).astype(np.float32) * 100
    assert kl_rows(y_ref, shifted)[0] == pytest.approx(0.0, abs=1e-6 * rows)
    keep = rng.random((3, KL_ROWS)) < 0.5
    part, n = kl_rows(y_ref, y, keep)
    assert n == keep.sum()
    assert part == pytest.approx(_torch_kl(y_ref[keep], y[keep]), rel=1e-9)


@pytest.fixture(scope="module")
def gpt(exported):
    _, model = exported("gpt", "legacy")
    feeds = [example_batch("gpt", seed=s, batch=3, seq=6) for s in range(4)]
    analysis = analyze(
        model, find_targets(model), CalibrationSet(feeds[:3], feeds[3:], "t"), AnalysisOptions()
    )
    return model, analysis


def _replaced_outputs(model: onnx.ModelProto, target, b: np.ndarray, feed: dict) -> np.ndarray:
    """The logits of a copy of ``model`` whose target weight really holds ``b``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name == target.weight:
            init.CopyFrom(onnx.numpy_helper.from_array(stored_weight(target, b), init.name))
    return run_ort(out, feed)["logits"]


def test_kl_probe_equals_onnxruntime_on_the_replaced_model(gpt):
    model, analysis = gpt
    feeds = analysis.probe_feeds[:2]
    probe = OutputErrorProbe(model, analysis.targets, feeds, "kl", "attention_mask")
    assert probe.outputs_names == ["logits"]
    consts = constant_tensors(model)
    t = analysis.targets[0]
    original = weight_matrix(t, consts[t.weight])
    # Swapping in the weight the model already holds (read as B [n, m], stored back) is no change.
    assert probe.error({t.name: original}) == pytest.approx(0, abs=1e-12)
    rng = np.random.default_rng(1)
    b = original + 0.3 * rng.standard_normal(original.shape) * np.abs(original).mean()
    total, rows = 0.0, 0
    for feed, (probed,) in zip(feeds, probe.reference, strict=True):
        ref = run_ort(model, feed)["logits"]
        # The probe's graph (target weights turned into inputs) computes the original model.
        np.testing.assert_allclose(probed, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        new = _replaced_outputs(model, t, b, feed)
        keep = feed["attention_mask"] != 0
        total += _torch_kl(ref[keep], new[keep])
        rows += int(keep.sum())
    assert rows < sum(f["attention_mask"].size for f in feeds)  # padding was really left out
    assert probe.error({t.name: b}) == pytest.approx(total / rows, rel=1e-6)


def test_kl_needs_logits(gpt, tmp_path):
    model, analysis = gpt
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    for node in renamed.graph.node:
        node.output[:] = ["hidden" if o == "logits" else o for o in node.output]
    renamed.graph.output[0].name = "hidden"
    with pytest.raises(ValueError, match=r"needs a float output named like \*logits\*.*hidden"):
        OutputErrorProbe(renamed, analysis.targets, analysis.probe_feeds[:1], "kl")
    with pytest.raises(ValueError, match="unknown output metric"):
        OutputErrorProbe(model, analysis.targets, analysis.probe_feeds[:1], "l1")


def test_kl_output_weighted_global_meets_budget(gpt):
    model, analysis = gpt
    opts = RankOptions(allocate="global", budget=0.6, align=2, output_weighted=True)
    kl = dataclasses.replace(opts, output_metric="kl")
    ranks = choose_ranks(analysis, kl, model, analysis.probe_feeds)
    total = sum(t.params for t in analysis.targets)
    spent = kept_params(analysis.targets, ranks)
    assert spent <= 0.6 * total
    sens_kl = output_sensitivity(analysis, model, analysis.probe_feeds, 0.6, kl)
    sens_mse = output_sensitivity(analysis, model, analysis.probe_feeds, 0.6, opts)
    assert all(v > 0 and np.isfinite(v) for v in sens_kl.values())
    assert sens_kl != sens_mse  # the metric is really used
