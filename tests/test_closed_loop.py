"""Closed loop: equal to open loop without truncation, plain whitening when the activations
agree, and compensation minimising what it claims to minimise."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from flarc.calib.data import CalibrationSet
from flarc.calib.moments import Moments
from flarc.calib.twin import target_levels, twin_model, twin_name, weight_input
from flarc.core.targets import constant_tensors, find_targets, stored_weight, weight_matrix
from flarc.pipeline import AnalysisOptions, analyze
from flarc.rewrite.closed_loop import closed_loop_entries
from flarc.rewrite.ranks import RankChoice
from flarc.rewrite.spectrum import compensated_svd, whitened_svd
from flarc.rewrite.whiten import whitener


@pytest.fixture(scope="module")
def setup(tiny_encoder):
    case = tiny_encoder(seed=1, batches=4, batch=8, pad_from=11)
    options = AnalysisOptions(shrinkage="none", full_rank=True, two_sided=False)
    data = CalibrationSet(case.feeds, [], "t")
    return case.model, case.feeds, analyze(case.model, find_targets(case.model), data, options)


def test_levels_follow_the_blocks(setup):
    model, _, analysis = setup
    levels = target_levels(model, analysis.targets)
    names = [[t.name.split("/")[-2] for t in level] for level in levels]
    assert names[:4] == [["q", "k", "v"], ["o"], ["up"], ["down"]]
    assert len(levels) == 8


def test_without_truncation_closed_loop_equals_open_loop(setup):
    model, feeds, analysis = setup
    full = {t.name: RankChoice(min(t.n, t.m), "full") for t in analysis.targets}
    entries = closed_loop_entries(model, analysis, full, feeds)
    for t in analysis.targets:
        np.testing.assert_allclose(
            entries[t.name].spectrum.sigma, analysis.entries[t.name].spectrum.sigma, rtol=1e-5
        )
        assert entries[t.name].rows == analysis.entries[t.name].rows


def test_compensation_with_identical_activations_is_plain_whitening():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12))
    b = rng.standard_normal((12, 7))
    h = x.T @ x
    w, _ = whitener(h)
    plain, comp = whitened_svd(b, w), compensated_svd(b, w, h)
    np.testing.assert_allclose(comp.sigma, plain.sigma, rtol=1e-10)
    for k in (1, 3, 7):
        (a1, c1), (a2, c2) = plain.factors(k), comp.factors(k)
        np.testing.assert_allclose(a2 @ c2, a1 @ c1, rtol=1e-8, atol=1e-10)


def test_first_level_compensated_equals_open_loop(setup):
    model, feeds, analysis = setup
    ranks = {t.name: RankChoice(8, "test") for t in analysis.targets}
    entries = closed_loop_entries(model, analysis, ranks, feeds, compensate=True)
    for t in target_levels(model, analysis.targets)[0]:  # nothing upstream is compressed yet
        a1, c1 = analysis.entries[t.name].spectrum.factors(8)
        a2, c2 = entries[t.name].spectrum.factors(8)
        # Compared in the H-metric: a near-null direction of H (LayerNorm) is free in weight space.
        g = analysis.stats[t.stat_key].gram
        d, b1 = a2 @ c2 - a1 @ c1, a1 @ c1
        assert np.trace(d.T @ g @ d) / np.trace(b1.T @ g @ b1) < 1e-10, t.name


def test_compensated_factor_beats_plain_on_its_objective(setup):
    """For every target, on the compressed activations X_c it actually sees:
    ||X_o B - X_c B_comp|| <= ||X_o B - X_c B_plain|| (both at the same rank)."""
    model, feeds, analysis = setup
    k = 8
    ranks = {t.name: RankChoice(k, "test") for t in analysis.targets}
    entries = closed_loop_entries(model, analysis, ranks, feeds, compensate=True)
    consts = constant_tensors(model)
    twin = twin_model(model, analysis.targets)
    weights = {
        weight_input(t.weight): stored_weight(t, np.asarray(weight_matrix(t, consts[t.weight])))
        for t in analysis.targets
    }
    for t in analysis.targets:
        a, c = entries[t.name].spectrum.factors(k)
        weights[weight_input(t.weight)] = stored_weight(t, a @ c)
    twin.ir_version = 10
    outputs = sorted({n for t in analysis.targets for n in (twin_name(model, t.input), t.input)})
    probe = onnx.ModelProto()
    probe.CopyFrom(twin)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in outputs)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    acts = [dict(zip(outputs, sess.run(outputs, {**f, **weights}), strict=True)) for f in feeds]
    wins = 0
    for t in analysis.targets:
        keep = [f["attention_mask"].reshape(-1) > 0 for f in feeds]
        xc = np.concatenate(
            [
                a[twin_name(model, t.input)].reshape(-1, t.n)[m]
                for a, m in zip(acts, keep, strict=True)
            ]
        ).astype(np.float64)
        xo = np.concatenate(
            [a[t.input].reshape(-1, t.n)[m] for a, m in zip(acts, keep, strict=True)]
        ).astype(np.float64)
        b = weight_matrix(t, consts[t.weight])
        a_c, c_c = entries[t.name].spectrum.factors(k)
        a_p, c_p = whitened_svd(b, whitener(Moments.from_rows(xc).gram)[0]).factors(k)
        comp = np.linalg.norm(xo @ b - xc @ (a_c @ c_c))
        plain = np.linalg.norm(xo @ b - xc @ (a_p @ c_p))
        assert comp <= plain * (1 + 1e-6), t.name
        wins += comp < plain * (1 - 1e-4)
    assert wins >= len(analysis.targets) // 2  # downstream targets see different activations


def test_compensation_warns_when_rows_do_not_determine_the_fit(setup, caplog):
    """Fewer unmasked calibration rows than a target's inputs: the compensated fit is
    underdetermined and the user is told; with enough rows nothing is said."""
    model, feeds, analysis = setup
    ranks = {t.name: RankChoice(8, "test") for t in analysis.targets}
    widest = max(t.n for t in analysis.targets)
    few = [{k: v[:1] for k, v in feeds[0].items()}]  # one sequence: at most 16 rows
    assert int(few[0]["attention_mask"].sum()) < widest
    with caplog.at_level("WARNING", logger="flarc.rewrite.closed_loop"):
        closed_loop_entries(model, analysis, ranks, feeds, compensate=True)
    assert "fewer calibration rows than inputs" not in caplog.text
    with caplog.at_level("WARNING", logger="flarc.rewrite.closed_loop"):
        closed_loop_entries(model, analysis, ranks, few, compensate=True)
    assert "fewer calibration rows than inputs" in caplog.text


def test_shrinkage_regularises_an_underdetermined_compensation(setup, caplog):
    """The same few rows with a real shrinkage intensity: the fit is regularised, no warning."""
    model, feeds, _ = setup
    options = AnalysisOptions(shrinkage_lambda=0.05, full_rank=True, two_sided=False)
    shrunk = analyze(model, find_targets(model), CalibrationSet(feeds, [], "t"), options)
    ranks = {t.name: RankChoice(8, "test") for t in shrunk.targets}
    few = [{k: v[:1] for k, v in feeds[0].items()}]
    with caplog.at_level("WARNING", logger="flarc.rewrite.closed_loop"):
        entries = closed_loop_entries(model, shrunk, ranks, few, compensate=True)
    assert any(e.rows < e.target.n for e in entries.values())
    assert "fewer calibration rows than inputs" not in caplog.text
