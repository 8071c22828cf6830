"""Rank selection: bisection against an exhaustive scan, allocations against their budgets,
global against uniform ratios, and the analysis file reproducing a run bit for bit."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from flarc.calib.data import CalibrationSet
from flarc.cli import main
from flarc.core.store import as_array
from flarc.core.targets import constant_tensors, find_targets, weight_matrix
from flarc.pipeline import AnalysisOptions, analyze
from flarc.rewrite.allocate import fisher_ranks, global_ranks
from flarc.rewrite.analysis_file import load_analysis, save_analysis
from flarc.rewrite.output_error import OutputErrorProbe
from flarc.rewrite.policy import (
    RankOptions,
    _criterion,
    allowed_grid,
    choose_ranks,
    evaluations_bound,
)
from flarc.rewrite.ranks import ratio_rank
from flarc.rewrite.search import Criterion, bisect_rank, scan_rank

from _models import kept_params


@pytest.fixture(scope="module")
def encoder(tiny_encoder):
    case = tiny_encoder(d=48, batches=6)
    data = CalibrationSet(case.feeds[:4], case.feeds[4:], "t")
    analysis = analyze(
        case.model, find_targets(case.model), data, AnalysisOptions(fisher="projection")
    )
    return case.path, case.model, analysis


@pytest.mark.parametrize("criterion", ["whitened", "cosine", "output"])
def test_bisection_equals_exhaustive_scan(encoder, criterion):
    _, model, analysis = encoder
    probe = (
        OutputErrorProbe(model, analysis.targets, analysis.probe_feeds[:1])
        if criterion == "output"
        else None
    )
    consts = constant_tensors(model)
    opts = RankOptions(align=4)
    try:
        for t in analysis.targets:
            b = weight_matrix(t, consts[t.weight])
            grid = allowed_grid(t, opts)
            # Thresholds that land inside the grid, at its ends and outside it.
            base = _criterion(criterion, t, analysis, b, 0.0, probe)
            values = [base.value(k) for k in grid]
            picks = [
                values[0],
                values[len(values) // 2],
                values[-1],
                values[-1] * (0.5 if criterion != "cosine" else 1.0001),
            ]
            for thr in picks:
                crit = _criterion(criterion, t, analysis, b, thr, probe)
                counted = {"n": 0}

                def value(k, crit=crit, counted=counted):
                    counted["n"] += 1
                    return crit.value(k)

                k_bis, _, evals = bisect_rank(grid, Criterion(crit.name, value, crit.passes))
                k_scan, _ = scan_rank(grid, crit)
                assert k_bis == k_scan, (t.name, criterion, thr)
                assert counted["n"] == evals <= evaluations_bound(t, opts.align)
    finally:
        if probe is not None:
            probe.close()


def test_fisher_allocation_meets_budget_and_bounds(encoder):
    _, _, analysis = encoder
    targets = analysis.targets
    assert all(a > 0 for a in analysis.fisher.values())
    total = sum(t.params for t in targets)
    for budget in (0.3, 0.5, 0.7):
        ranks = fisher_ranks(targets, analysis.fisher, budget, 4)
        spent = sum(t.rank_params(ranks[t.name].rank) for t in targets)
        assert spent <= budget * total
        # Met to alignment: no single aligned step could still be added anywhere.
        assert budget * total - spent < max(4 * (t.n + t.m) for t in targets)
        for t in targets:
            k = ranks[t.name].rank
            assert k % 4 == 0 and 4 <= k < t.k_equiv


def test_fisher_ranks_follow_importance():
    from flarc.core.targets import Target

    ts = [
        Target(f"t{i}", "MatMul", "x", "y", f"w{i}", (256, 256), 256, 256, False, "float32")
        for i in range(3)
    ]
    ranks = fisher_ranks(ts, {"t0": 1.0, "t1": 2.0, "t2": 4.0}, 0.4, 8)
    k = [ranks[f"t{i}"].rank for i in range(3)]
    assert k[0] < k[1] < k[2]
    assert k[2] <= max(r for r in range(8, 128, 8))


def test_global_never_worse_than_uniform_ratio(encoder):
    _, _, analysis = encoder
    targets = analysis.targets
    spectra = {t.name: analysis.entries[t.name].spectrum for t in targets}
    for ratio in (0.3, 0.5, 0.7):
        uniform = {t.name: ratio_rank(t, ratio, 4) for t in targets}
        params = sum(
            t.params if c.rank is None else t.rank_params(c.rank)
            for t, c in ((t, uniform[t.name]) for t in targets)
        )
        err_uniform = sum(
            spectra[t.name].error(uniform[t.name].rank) if uniform[t.name].rank else 0.0
            for t in targets
        )
        budget = params / sum(t.params for t in targets)
        chosen = global_ranks(targets, spectra, budget, 4)
        spent = sum(
            t.params if chosen[t.name].rank is None else t.rank_params(chosen[t.name].rank)
            for t in targets
        )
        err_global = sum(
            spectra[t.name].error(chosen[t.name].rank) if chosen[t.name].rank else 0.0
            for t in targets
        )
        assert spent <= params
        assert err_global <= err_uniform + 1e-12, (ratio, err_global, err_uniform)


def test_latency_filter_rejects_slow_ranks(encoder):
    _, _, analysis = encoder

    class HalfwayFaster:
        """Pairs are faster than the dense layer only below half of k_equiv."""

        def lat_recov(self, t, k):
            return 2 * k / t.k_equiv

    for opts in (
        RankOptions(ratio=0.9, align=4, latency=HalfwayFaster()),
        RankOptions(
            search="bisect", criterion="whitened", threshold=1e-4, align=4, latency=HalfwayFaster()
        ),
        RankOptions(allocate="global", budget=0.9, align=4, latency=HalfwayFaster()),
    ):
        for t in analysis.targets:
            choice = choose_ranks(analysis, opts)[t.name]
            assert choice.rank is None or HalfwayFaster().lat_recov(t, choice.rank) <= 1.0


def test_latency_budget_is_met(encoder):
    _, _, analysis = encoder

    class Flops:
        def t_dense(self, t):
            return float(t.n * t.m)

        def t_pair(self, t, k):
            return float(k * (t.n + t.m)) + 100.0

        def lat_recov(self, t, k):
            return self.t_pair(t, k) / self.t_dense(t)

    lat = Flops()
    opts = RankOptions(allocate="global", latency=lat, latency_budget=0.6, align=4)
    ranks = choose_ranks(analysis, opts)
    total = sum(
        lat.t_dense(t) if ranks[t.name].rank is None else lat.t_pair(t, ranks[t.name].rank)
        for t in analysis.targets
    )
    assert total <= 0.6 * sum(lat.t_dense(t) for t in analysis.targets)


def test_analysis_file_reproduces_compress_bit_for_bit(encoder, tmp_path):
    path, _, _ = encoder
    calib = str(path.parent / "calib.npz")
    common = [
        "--allocate",
        "fisher",
        "--budget",
        "0.6",
        "--align",
        "4",
        "--fisher-loss",
        "projection",
    ]
    assert (
        main(
            [
                "analyze",
                str(path),
                "--calib",
                calib,
                "--batch-size",
                "4",
                "--fisher",
                "--fisher-loss",
                "projection",
                # one-sided spectra, as compress --allocate fisher makes them
                "--sensitivity-batches",
                "0",
                "-o",
                str(tmp_path / "m.analysis"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "compress",
                str(path),
                "--calib",
                calib,
                "--batch-size",
                "4",
                "-o",
                str(tmp_path / "a.onnx"),
                *common,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "compress",
                str(path),
                "--analysis",
                str(tmp_path / "m.analysis"),
                "-o",
                str(tmp_path / "b.onnx"),
                *common,
            ]
        )
        == 0
    )
    a, b = (hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.onnx", "b.onnx"))
    assert a == b
    # A stored analysis survives a round trip unchanged.
    loaded = load_analysis(tmp_path / "m.analysis")
    save_analysis(loaded, tmp_path / "again.analysis")
    again = load_analysis(tmp_path / "again.analysis")
    for name, e in loaded.entries.items():
        other = again.entries[name].spectrum
        for field in ("sigma", "basis", "vt"):
            want = as_array(getattr(e.spectrum, field))
            assert as_array(getattr(other, field)).tobytes() == want.tobytes()
    assert again.fisher == loaded.fisher and list(again.stats) == list(loaded.stats)


def test_analysis_for_another_model_is_refused(encoder, tmp_path, capsys):
    path, _, analysis = encoder
    save_analysis(dataclasses.replace(analysis, model_sha256="0" * 64), tmp_path / "x.analysis")
    code = main(
        [
            "compress",
            str(path),
            "--analysis",
            str(tmp_path / "x.analysis"),
            "-o",
            str(tmp_path / "o.onnx"),
        ]
    )
    assert code != 0 and "another model" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_output_criterion_auto_threshold_lands_on_budget(encoder, tmp_path):
    _, model, analysis = encoder
    opts = RankOptions(
        search="bisect", criterion="output", threshold="auto", budget=0.6, align=4, output_batches=1
    )
    ranks = choose_ranks(analysis, opts, model, analysis.probe_feeds)
    total = sum(t.params for t in analysis.targets)
    spent = kept_params(analysis.targets, ranks)
    assert spent <= 0.6 * total
    assert spent > 0.45 * total


def test_output_weighted_global_meets_budget_and_follows_sensitivity(encoder):
    _, model, analysis = encoder
    from flarc.rewrite.policy import output_sensitivity

    opts = RankOptions(
        allocate="global", budget=0.6, align=4, output_weighted=True, output_batches=1
    )
    ranks = choose_ranks(analysis, opts, model, analysis.probe_feeds)
    total = sum(t.params for t in analysis.targets)
    spent = kept_params(analysis.targets, ranks)
    assert spent <= 0.6 * total
    sens = output_sensitivity(analysis, model, analysis.probe_feeds, 0.6, opts)
    assert all(v > 0 and np.isfinite(v) for v in sens.values())
    # The weights are what global minimises: the weighted error is no worse than unweighted global's.
    spectra = {t.name: analysis.entries[t.name].spectrum for t in analysis.targets}
    plain = global_ranks(analysis.targets, spectra, 0.6, 4)

    def weighted(choice):
        return sum(
            sens[t.name]
            * (spectra[t.name].error(choice[t.name].rank) if choice[t.name].rank else 0.0)
            for t in analysis.targets
        )

    assert weighted(ranks) <= weighted(plain) + 1e-12


def _matmul_target(w: np.ndarray):
    """The one target of a MatMul model with weight ``w``."""
    import onnx
    from onnx import helper, numpy_helper

    elem = helper.np_dtype_to_tensor_dtype(w.dtype)
    n, m = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", elem, [None, n])],
        [helper.make_tensor_value_info("y", elem, [None, m])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    (target,) = find_targets(model).targets
    return target


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n, m", [(12, 40), (40, 12), (16, 16)])
def test_heldout_errors_equal_the_error_on_explicit_rows(n, m, dtype, monkeypatch):
    """Exact for a float64 weight; a float32 one's products are float32 (rounding only)."""
    import flarc.rewrite.rows
    from flarc.calib.moments import Moments
    from flarc.rewrite.rows import output_errors

    monkeypatch.setattr(flarc.rewrite.rows, "HELDOUT_BLOCK", 7)  # several column blocks
    rng = np.random.default_rng(3)
    w = rng.standard_normal((n, m)).astype(dtype)
    target = _matmul_target(w)
    k = min(n, m) // 2
    a, c = rng.standard_normal((n, k)), rng.standard_normal((k, m))
    xs = [rng.standard_normal((30, n)) * rng.exponential(size=n), rng.standard_normal((5, n))]
    got = output_errors([Moments.from_rows(xs[0]), None, Moments.from_rows(xs[1])], target, a, c, w)
    b = w.astype(np.float64)
    for value, x in zip((got[0], got[2]), xs, strict=True):
        ref = np.linalg.norm(x @ (b - a @ c)) ** 2 / np.linalg.norm(x @ b) ** 2
        assert value == pytest.approx(ref, rel=1e-10 if dtype == np.float64 else 1e-5)
    assert got[1] is None


def test_heldout_errors_of_a_float32_weight_near_lossless_truncations():
    """SVD truncations of a float32 weight with a decaying spectrum, down to an error of 1e-9:
    the float32 products' error stays within ``1e-6 ||B|| / ||D||`` relative (the docstring's
    ``1e-7`` scale, ten times over)."""
    from flarc.calib.moments import Moments
    from flarc.rewrite.rows import output_errors

    rng = np.random.default_rng(0)
    n, m = 96, 300
    u = np.linalg.qr(rng.standard_normal((n, n)))[0]
    v = np.linalg.qr(rng.standard_normal((m, n)))[0]
    w = ((u * np.exp(-np.arange(n) / 9.0)) @ v.T).astype(np.float32)
    target = _matmul_target(w)
    b = w.astype(np.float64)
    left, s, vt = np.linalg.svd(b, full_matrices=False)
    x = rng.standard_normal((500, n))
    for k in (8, 24, 48, 72, 90):
        a, c = left[:, :k] * s[:k], vt[:k]
        (got,) = output_errors([Moments.from_rows(x)], target, a, c, w)
        ref = np.linalg.norm(x @ (b - a @ c)) ** 2 / np.linalg.norm(x @ b) ** 2
        assert abs(got / ref - 1) <= 1e-6 / np.sqrt(ref), (k, ref, got)
