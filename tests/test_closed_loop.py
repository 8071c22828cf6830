"""Closed loop: equal to open loop without truncation, plain whitening when the activations
agree, and compensation minimising what it claims to minimise."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from flarc.calib.data import CalibrationSet
from flarc.calib.moments import Moments
from flarc.calib.segments import SegmentedModel, cut_segments, target_levels
from flarc.core.targets import constant_tensors, find_targets, stored_weight, weight_matrix
from flarc.pipeline import AnalysisOptions, analyze
from flarc.rewrite.closed_loop import closed_loop_entries
from flarc.rewrite.ranks import RankChoice
from flarc.rewrite.spectrum import (
    compensated_svd,
    compensated_wide_svd,
    gram_route_pays,
    whitened_svd,
)
from flarc.rewrite.whiten import whitener

TWIN = "twin/"


def twin_model(model: onnx.ModelProto, targets) -> onnx.ModelProto:
    """A reference independent of the segments: ``model`` plus a renamed copy of every node
    (``TWIN`` + name) whose targets read their weights from graph inputs ``TWIN + weight``, so
    one whole-graph run gives the original's and the compressed model's tensors side by side."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    reads = {t.weight: t for t in targets}
    keep = {i.name for i in model.graph.input} | (set(constant_tensors(model)) - set(reads))
    twins = []
    for node in model.graph.node:
        if all(o in keep for o in node.output):
            continue  # a shared constant
        twin = onnx.NodeProto()
        twin.CopyFrom(node)
        twin.name = TWIN + node.name
        twin.input[:] = [i if not i or i in keep else TWIN + i for i in node.input]
        twin.output[:] = [TWIN + o for o in node.output]
        twins.append(twin)
    out.graph.node.extend(twins)
    for w, t in sorted(reads.items()):
        out.graph.input.append(
            onnx.helper.make_tensor_value_info(TWIN + w, t.elem_type, list(t.weight_shape))
        )
    out.ir_version = 10
    return out


def run_tensors(model: onnx.ModelProto, names: list[str], feeds) -> list[dict[str, np.ndarray]]:
    """``names`` on every feed, by one onnxruntime session of the whole graph."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return [dict(zip(names, sess.run(names, f), strict=True)) for f in feeds]


@pytest.fixture(scope="module")
def setup(tiny_encoder):
    case = tiny_encoder(seed=1, batches=4, batch=8, pad_from=11)
    # float64 rows: these tests check identities to rounding well below float32's (default)
    options = AnalysisOptions(
        shrinkage="none", full_rank=True, two_sided=False, precision="float64"
    )
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
        # The same statistics summed in another order (a level stacks its batches' rows): s^2
        # agrees to rounding, eps-level relative to s_0^2 (a singular value near the noise floor
        # is known only that well).
        s, s_open = entries[t.name].spectrum.sigma, analysis.entries[t.name].spectrum.sigma
        np.testing.assert_allclose(s**2, s_open**2, rtol=1e-5, atol=1e-12 * s_open[0] ** 2)
        assert entries[t.name].rows == analysis.entries[t.name].rows


def test_level_statistics_do_not_depend_on_how_batches_are_stacked(setup, monkeypatch):
    """A level's products over one shard of every batch's rows or over each batch alone (the
    shard budget below one batch): the first level's spectra (nothing upstream compressed, so
    the same rows) agree to rounding, and every target's row count is the same."""
    import flarc.calib.statistics as st

    model, feeds, analysis = setup
    ranks = {t.name: RankChoice(max(1, min(t.n, t.m) // 2), "half") for t in analysis.targets}
    stacked = closed_loop_entries(model, analysis, ranks, feeds, compensate=True)
    monkeypatch.setattr(st, "SHARD_BYTES", 1)
    alone = closed_loop_entries(model, analysis, ranks, feeds, compensate=True)
    for t in target_levels(model, analysis.targets)[0]:
        s, s_alone = stacked[t.name].spectrum.sigma, alone[t.name].spectrum.sigma
        np.testing.assert_allclose(s**2, s_alone**2, rtol=1e-9, atol=1e-12 * s_alone[0] ** 2)
        assert stacked[t.name].lam == pytest.approx(alone[t.name].lam, rel=1e-12)
    assert all(stacked[t.name].rows == alone[t.name].rows for t in analysis.targets)


def test_a_tall_targets_cross_statistic_with_the_output_equals_the_one_with_the_input(
    tiny_encoder, monkeypatch
):
    """Compensated closed loop: a tall target's cross-statistic taken with the original's output
    ``X_c^T (X_o B)`` gives the spectra and factors of ``(X_c^T X_o) B``, with Ledoit-Wolf
    shrinkage (its ``mu I`` term) and two-sided whitening (its column weights)."""
    import flarc.rewrite.closed_loop as cl

    case = tiny_encoder(seed=2, batches=3, batch=8, pad_from=11)
    data = CalibrationSet(case.feeds, [], "t")
    options = AnalysisOptions(full_rank=True, precision="float64")
    analysis = analyze(case.model, find_targets(case.model), data, options)
    assert analysis.output_diag is not None and analysis.options.two_sided
    ranks = {t.name: RankChoice(max(1, min(t.n, t.m) // 2), "half") for t in analysis.targets}
    partners, chosen = cl._output_partners, []

    def spy(level, stored):
        got = partners(level, stored)
        chosen.extend(got)
        return got

    monkeypatch.setattr(cl, "_output_partners", spy)
    by_output = closed_loop_entries(case.model, analysis, ranks, case.feeds, compensate=True)
    tall = [t for t in analysis.targets if 2 * t.m <= t.n]  # the down projections
    assert tall and sorted(chosen) == sorted(t.stat_key for t in tall)
    monkeypatch.setattr(cl, "_output_partners", lambda level, stored: {})
    by_input = closed_loop_entries(case.model, analysis, ranks, case.feeds, compensate=True)
    for t in analysis.targets:
        a, b = by_output[t.name], by_input[t.name]
        assert a.lam == pytest.approx(b.lam, rel=1e-12) and a.lam > 0
        s, s_in = a.spectrum.sigma, b.spectrum.sigma
        np.testing.assert_allclose(s**2, s_in**2, rtol=1e-8, atol=1e-12 * s_in[0] ** 2)
        (a1, c1), (a2, c2) = (
            a.spectrum.factors(ranks[t.name].rank),
            b.spectrum.factors(ranks[t.name].rank),
        )
        np.testing.assert_allclose(a1 @ c1, a2 @ c2, rtol=1e-6, atol=1e-9 * np.abs(a2 @ c2).max())


def test_compensation_with_identical_activations_is_plain_whitening():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12))
    b = rng.standard_normal((12, 7))
    h = x.T @ x
    w, _ = whitener(h)
    plain, comp = whitened_svd(b, w), compensated_svd(h @ b, w)
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


@pytest.fixture(scope="module")
def compensated(setup):
    """``(k, entries, rows)``: compensated closed-loop entries at rank k and, per target, its
    unmasked rows ``(X_c, X_o)`` from one run of the whole-graph twin with every factor fed."""
    model, feeds, analysis = setup
    k = 8
    ranks = {t.name: RankChoice(k, "test") for t in analysis.targets}
    entries = closed_loop_entries(model, analysis, ranks, feeds, compensate=True)
    weights = {}
    for t in analysis.targets:
        a, c = entries[t.name].spectrum.factors(k)
        weights[TWIN + t.weight] = stored_weight(t, a @ c)
    outputs = sorted({n for t in analysis.targets for n in (TWIN + t.input, t.input)})
    twin = twin_model(model, analysis.targets)
    acts = run_tensors(twin, outputs, [{**f, **weights} for f in feeds])
    keep = [f["attention_mask"].reshape(-1) > 0 for f in feeds]
    rows = {
        t.name: tuple(
            np.concatenate(
                [a[p + t.input].reshape(-1, t.n)[m] for a, m in zip(acts, keep, strict=True)]
            ).astype(np.float64)
            for p in (TWIN, "")
        )
        for t in analysis.targets
    }
    return k, entries, rows


def test_compensated_factor_beats_plain_on_its_objective(setup, compensated):
    """For every target, on the compressed activations X_c it actually sees:
    ||X_o B - X_c B_comp|| <= ||X_o B - X_c B_plain|| (both at the same rank)."""
    model, _, analysis = setup
    k, entries, rows = compensated
    consts = constant_tensors(model)
    wins = 0
    for t in analysis.targets:
        xc, xo = rows[t.name]
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


def test_segments_give_the_whole_graphs_tensors(setup):
    """Run a segment at a time, each level's inputs are what one run of the whole graph gives;
    nothing stays carried after the last segment."""
    model, feeds, analysis = setup
    levels = target_levels(model, analysis.targets)
    wanted = [list(dict.fromkeys(t.input for t in level)) for level in levels]
    run = SegmentedModel(model, wanted, {}, feeds)
    segments = run.segments
    ran = [id(n) for s in segments for n in s.nodes]
    assert len(ran) == len(set(ran))  # every node runs at most once
    expected = run_tensors(model, [x for names in wanted for x in names], feeds)
    for i in range(len(levels)):
        for b, got in run.run(i, {"original": {}}):
            for x in wanted[i]:
                np.testing.assert_array_equal(got["original"][x], expected[b][x], err_msg=x)
    assert all(not carried for carried in run.carried["original"])


def test_segment_cut_feeds_what_later_segments_read():
    """A tensor read two segments later is carried over the segment between; a fed tensor's
    producer never runs."""
    g = onnx.helper
    nodes = [
        g.make_node("Relu", ["x"], ["a"], name="n0"),
        g.make_node("Relu", ["a"], ["b"], name="n1"),
        g.make_node("Cast", ["w0"], ["w"], name="path", to=1),
        g.make_node("MatMul", ["b", "w"], ["c"], name="n2"),
        g.make_node("Add", ["c", "a"], ["d"], name="n3"),
    ]
    graph = g.make_graph(nodes, "g", [], [])
    seg = cut_segments(graph, [["b"], ["c"], ["d"]], fed={"w"})
    assert [[n.name for n in s.nodes] for s in seg] == [["n0", "n1"], ["n2"], ["n3"]]
    assert seg[0].carried_out == ["a", "b"] and seg[0].outputs == ["a", "b"]
    assert seg[1].carried_in == ["b"] and seg[1].released == ["b"]
    assert seg[2].carried_in == ["c", "a"] and sorted(seg[2].released) == ["a", "c"]


def test_closed_loop_statistics_are_the_compressed_models(setup, compensated):
    """Every compensated spectrum equals the one computed from the whole-graph twin's rows:
    the compressed model's inputs X_c (all upstream targets at their rank) and the original's
    X_o, padding left out."""
    model, _, analysis = setup
    _, entries, rows = compensated
    consts = constant_tensors(model)
    for t in analysis.targets:
        xc, xo = rows[t.name]
        b = weight_matrix(t, consts[t.weight])
        w, _ = whitener(xc.T @ xc / len(xc))
        expected = compensated_svd(xc.T @ xo @ b / len(xc), w)
        np.testing.assert_allclose(
            entries[t.name].spectrum.sigma,
            expected.sigma,
            rtol=1e-4,  # float32 activations: a segment's fusions can differ from the graph's
            atol=1e-6 * expected.sigma[0],
            err_msg=t.name,
        )
        assert entries[t.name].rows == len(xc)


def test_an_analysis_of_singular_values_only_gives_the_same_closed_loop_model(tiny_encoder):
    """``directions=False`` keeps every singular value (those of the full spectra, to rounding)
    and no direction; the compensated closed loop refits the factorized targets from scratch, so
    ranks and the written model are those of the analysis with directions. Without the closed
    loop, or with a rule that reads factors, compress refuses it."""
    from flarc.core.errors import OptionError
    from flarc.pipeline import compress
    from flarc.rewrite.policy import RankOptions

    case = tiny_encoder(seed=2, batches=4, batch=8, pad_from=11)
    data = CalibrationSet(case.feeds[:3], case.feeds[3:], "t")
    targets = find_targets(case.model)
    full = analyze(case.model, targets, data, AnalysisOptions(), keep_inputs=True)
    bare = analyze(case.model, targets, data, AnalysisOptions(directions=False), keep_inputs=True)
    assert full.options.spectra_key() != bare.options.spectra_key()
    for name, e in bare.entries.items():
        s = full.entries[name].spectrum.sigma
        np.testing.assert_allclose(e.spectrum.sigma, s, rtol=0, atol=1e-12 * s[0])
        assert e.spectrum.max_rank == 0 and e.spectrum.vt.shape == (0, e.target.m)
    opts = RankOptions(budget=0.7)
    loop = data.calibration
    a = compress(case.model, full, opts, closed_loop=loop, compensate=True)
    b = compress(case.model, bare, opts, closed_loop=loop, compensate=True)
    assert {n: c.rank for n, c in a.ranks.items()} == {n: c.rank for n, c in b.ranks.items()}
    assert any(c.rank for c in b.ranks.values())
    assert a.model.SerializeToString() == b.model.SerializeToString()
    with pytest.raises(OptionError, match="singular values only"):
        compress(case.model, bare, opts)
    with pytest.raises(OptionError, match="singular values only"):
        compress(case.model, bare, RankOptions(output_weighted=True), closed_loop=loop)


@pytest.mark.parametrize(
    "options, reads",
    [
        ({}, False),
        ({"output_weighted": True}, True),
        ({"allocate": "global", "output_weighted": True}, True),
        ({"ratio": 0.5, "output_weighted": True}, False),
        ({"energy": 0.9}, False),
        ({"allocate": "fisher"}, False),
        ({"search": "bisect"}, False),
        ({"search": "bisect", "criterion": "cosine"}, True),
        ({"search": "bisect", "criterion": "output", "threshold": "auto", "budget": 0.8}, True),
    ],
)
def test_rank_options_say_whether_they_read_factors(options, reads):
    from flarc.rewrite.policy import RankOptions

    assert RankOptions(**options).reads_factors is reads


@pytest.mark.parametrize("method", ["cholesky", "eig"])
def test_wide_compensated_svd_from_the_smaller_gram(method):
    """The Gram route of a wide target (P (B B^T) P^T, P = L^{-1} C) gives compensated_svd's
    singular values and rank-k products; a rank-deficient B (a kept singular value at zero)
    falls back to compensated_svd itself."""
    rng = np.random.default_rng(3)
    n, m = 10, 40
    xo = rng.standard_normal((300, n)) @ rng.standard_normal((n, n))
    xc = xo + 0.3 * rng.standard_normal((300, n))
    h, cross = xc.T @ xc, xc.T @ xo
    w, _ = whitener(h, method)
    b = rng.standard_normal((n, m))
    deficient = rng.standard_normal((n, 3)) @ rng.standard_normal((3, m))
    for weight, ranks in ((b, (1, 4, 8)), (deficient, (6,))):
        assert gram_route_pays(n, m, max(ranks))
        for k in ranks:
            expected, got = (
                compensated_svd(cross @ weight, w, k),
                compensated_wide_svd(cross, weight, w, k),
            )
            s = expected.sigma
            np.testing.assert_allclose(got.sigma**2, s**2, rtol=1e-9, atol=1e-12 * s[0] ** 2)
            (a1, c1), (a2, c2) = expected.factors(k), got.factors(k)
            np.testing.assert_allclose(
                a2 @ c2, a1 @ c1, rtol=1e-7, atol=1e-9 * np.abs(a1 @ c1).max()
            )
    assert not gram_route_pays(n, 2 * n + 8, 8)


def test_a_compensated_fit_shrinks_at_least_compensation_shrinkage():
    """Where Ledoit-Wolf estimates less than COMPENSATION_SHRINKAGE (many rows, few inputs), a
    compensated fit uses that intensity, and with identical activations it is plain whitening
    at that intensity; the open loop keeps the estimate."""
    from flarc.calib.moments import Moments
    from flarc.calib.shrinkage import shrink
    from flarc.core.targets import Target
    from flarc.rewrite.analysis import COMPENSATION_SHRINKAGE, AnalysisOptions, analyze_target

    rng = np.random.default_rng(5)
    n, m, k = 8, 6, 3
    x = rng.standard_normal((2000, n)) @ rng.standard_normal((n, n))
    moments = Moments.from_rows(x)
    moments.cross = moments.gram.copy()  # the compressed rows are the original's
    b = rng.standard_normal((n, m))
    t = Target("t", "MatMul", "x", "y", "w", (n, m), n, m, False, "float32")
    options = AnalysisOptions(full_rank=True)
    open_loop = analyze_target(t, b, moments, options)
    compensated = analyze_target(t, b, moments, options, compensate=True, max_rank=k)
    assert open_loop.lam < COMPENSATION_SHRINKAGE / 4
    assert compensated.lam == COMPENSATION_SHRINKAGE
    w, _ = whitener(shrink(moments, lam=COMPENSATION_SHRINKAGE).covariance)
    expected = whitened_svd(b, w)
    np.testing.assert_allclose(compensated.spectrum.sigma, expected.sigma, rtol=1e-10)
    (a1, c1), (a2, c2) = compensated.spectrum.factors(k), expected.factors(k)
    np.testing.assert_allclose(a1 @ c1, a2 @ c2, rtol=1e-8, atol=1e-10)
    # Another floor (--compensation-floor): that intensity, the same identity.
    raised = analyze_target(t, b, moments, options, compensate=True, max_rank=k, floor=0.4)
    assert raised.lam == 0.4
    w, _ = whitener(shrink(moments, lam=0.4).covariance)
    (a1, c1), (a2, c2) = raised.spectrum.factors(k), whitened_svd(b, w).factors(k)
    np.testing.assert_allclose(a1 @ c1, a2 @ c2, rtol=1e-8, atol=1e-10)
    assert analyze_target(t, b, moments, options, floor=0.4).lam == open_loop.lam


def test_the_compensation_floor_reaches_every_compensated_fit(setup):
    """``closed_loop_entries(floor=...)`` is the least intensity of every compensated fit; the
    default is COMPENSATION_SHRINKAGE (with Ledoit-Wolf: a fixed or no shrinkage has no floor)."""
    import dataclasses

    from flarc.rewrite.analysis import COMPENSATION_SHRINKAGE

    model, feeds, analysis = setup
    options = dataclasses.replace(analysis.options, shrinkage="ledoit-wolf")
    analysis = dataclasses.replace(analysis, options=options)
    ranks = {t.name: RankChoice(8, "test") for t in analysis.targets}
    default = closed_loop_entries(model, analysis, ranks, feeds, compensate=True)
    raised = closed_loop_entries(model, analysis, ranks, feeds, compensate=True, floor=0.6)
    assert all(default[t.name].lam >= COMPENSATION_SHRINKAGE for t in analysis.targets)
    assert any(default[t.name].lam < 0.6 for t in analysis.targets)
    assert all(raised[t.name].lam >= 0.6 for t in analysis.targets)


def test_held_out_batches_choose_between_the_compensated_and_the_plain_fit(
    tiny_encoder, monkeypatch
):
    """With ``validate`` and held-out batches, each target keeps whichever of its two closed-loop
    fits (the compensated and the plain one, from the same statistics) has the lower error
    ``||(X_c A C - X_o B) diag(r)||`` on them, recomputed here from the whole-graph twin's
    held-out rows (every final factor fed, padding left out, two-sided weights ``r``); without
    held-out batches, or without ``validate`` (the default), every target keeps the compensated
    fit."""
    import flarc.rewrite.closed_loop as cl
    from flarc.rewrite.analysis import output_root

    case = tiny_encoder(seed=3, batches=7, batch=8, pad_from=11)
    data = CalibrationSet(case.feeds[:4], case.feeds[4:], "t")
    options = AnalysisOptions(full_rank=True, precision="float64")
    analysis = analyze(case.model, find_targets(case.model), data, options)
    assert analysis.output_diag is not None and analysis.options.two_sided
    ranks = {t.name: RankChoice(max(1, min(t.n, t.m) // 4), "quarter") for t in analysis.targets}
    fits, real = {}, cl.analyze_target

    def spy(t, weight, moments, options, compensate=False, *args, **kwargs):
        fit = real(t, weight, moments, options, compensate, *args, **kwargs)
        fits.setdefault(t.name, []).append(fit)
        return fit

    monkeypatch.setattr(cl, "analyze_target", spy)
    entries = closed_loop_entries(
        case.model, analysis, ranks, data.calibration, compensate=True, validate=True
    )
    assert set(fits) == {t.name for t in analysis.targets}

    weights = {}
    for t in analysis.targets:
        a, c = entries[t.name].spectrum.factors(ranks[t.name].rank)
        weights[TWIN + t.weight] = stored_weight(t, a @ c)
    outputs = sorted({n for t in analysis.targets for n in (TWIN + t.input, t.input)})
    twin = twin_model(case.model, analysis.targets)
    acts = run_tensors(twin, outputs, [{**f, **weights} for f in data.heldout])
    keep = [f["attention_mask"].reshape(-1) > 0 for f in data.heldout]
    consts = constant_tensors(case.model)
    chose = []
    for t in analysis.targets:
        xc, xo = (
            np.concatenate(
                [a[p + t.input].reshape(-1, t.n)[m] for a, m in zip(acts, keep, strict=True)]
            )
            for p in (TWIN, "")
        )
        b, root = weight_matrix(t, consts[t.weight]), output_root(analysis.output_diag[t.name])
        errors = []
        for fit in fits[t.name]:
            a, c = fit.spectrum.factors(ranks[t.name].rank)
            errors.append(np.sum(((xc @ a @ c - xo @ b) * root) ** 2))
        if abs(errors[0] - errors[1]) > 1e-6 * max(errors):  # a tie may go either way
            assert entries[t.name] is fits[t.name][int(np.argmin(errors))], t.name
        chose.append(entries[t.name] is fits[t.name][1])
    assert 0 < sum(chose) < len(chose)  # both fits win somewhere: the choice was exercised

    for off in (
        dict(analysis=analysis, validate=False),
        dict(analysis=dataclasses.replace(analysis, heldout_is_calibration=True), validate=True),
    ):
        fits.clear()
        closed_loop_entries(case.model, ranks=ranks, feeds=data.calibration, compensate=True, **off)
        assert all(len(f) == 1 for f in fits.values())  # the compensated fit alone
