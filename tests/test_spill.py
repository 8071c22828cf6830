"""Large-model memory paths: arrays kept in a store on disk and statistics gathered in groups
give the same numbers, bit for bit, as the in-memory path (forced here on a small model)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import flarc.calib.carry
import flarc.calib.statistics
import flarc.core.modelio
from flarc.calib.data import CalibrationSet
from flarc.calib.moments import LazyMoments
from flarc.calib.statistics import collect_statistics, plan_statistics, statistic_groups
from flarc.core.store import CURRENT, Store, StoredArray
from flarc.core.targets import find_targets
from flarc.pipeline import AnalysisOptions, analyze, compress
from flarc.rewrite.analysis_file import load_analysis, save_analysis
from flarc.rewrite.policy import RankOptions


@pytest.fixture
def spill_everything(monkeypatch):
    """Every model 'large' (arrays in a store on disk), one statistic per calibration pass."""
    monkeypatch.setattr(flarc.core.modelio, "LARGE_MODEL_BYTES", 0)
    monkeypatch.setattr(flarc.calib.statistics, "STAT_GROUP_MIN_BYTES", 0)


@pytest.mark.parametrize("on_disk", [False, True])
def test_store_prefixes_equal_slices_and_numpy_reads_its_files(on_disk):
    rng = np.random.default_rng(0)
    store = Store.temporary() if on_disk else Store()
    try:
        a = rng.standard_normal((37, 11))
        rows, cols = store.put("x/rows", a), store.put("x/cols", a, fortran=True)
        scalar = store.put("s", np.array(3, dtype=np.int64))
        if on_disk:
            assert isinstance(cols, StoredArray) and cols.fortran and not rows.fortran
            assert scalar.load().shape == ()  # 0-d arrays stay 0-d
            for name, want in (("x/rows", a), ("x/cols", a), ("s", 3)):
                np.testing.assert_array_equal(np.load(store.path(name + ".npy")), want)
            for k in (0, 1, 5, 11):
                np.testing.assert_array_equal(cols.prefix(k), a[:, :k])
            for k in (0, 1, 20, 37):
                np.testing.assert_array_equal(rows.prefix(k), a[:k])
        for v in (rows, cols):
            got = v.load() if isinstance(v, StoredArray) else v
            np.testing.assert_array_equal(got, a)
    finally:
        store.close()


def test_store_groups_are_replaced_whole_and_leftovers_cleaned():
    store = Store.temporary()
    try:
        for i in range(3):
            store.commit("g", {"a": np.full(4, float(i)), "n": np.array(i)}, {"i": i})
        arrays, meta = store.group("g")
        assert meta == {"i": 2} and arrays["n"].load() == 2
        folder = store.path("g")
        assert sorted(p.name for p in folder.iterdir()) == sorted([CURRENT, "v000003"])
        (folder / "v000009").mkdir()  # a version a killed writer never published
        (folder / ".CURRENT.x.tmp").write_text("v000009")
        store.clean("g")
        assert sorted(p.name for p in folder.iterdir()) == sorted([CURRENT, "v000003"])
        assert store.group("missing") is None
    finally:
        store.close()


def test_truncated_stored_array_is_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(1000.0))
    data = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "x.npy").write_bytes(data[:500])  # a header promising 8000 bytes, then 372
    with pytest.raises(ValueError, match="shorter"):
        StoredArray.open(tmp_path / "x.npy")


@pytest.fixture
def spills(monkeypatch):
    """What each call of the statistics' spill_activations returned, in order."""
    found = []
    real = flarc.calib.statistics.spill_activations

    def spy(*args, **kwargs):
        found.append(real(*args, **kwargs))
        return found[-1]

    monkeypatch.setattr(flarc.calib.statistics, "spill_activations", spy)
    return found


@pytest.fixture(scope="module")
def small_lm(tiny_encoder):
    case = tiny_encoder()
    return case.model, CalibrationSet(case.feeds[:3], case.feeds[3:], "t")


def test_spilled_grouped_analysis_equals_in_memory(
    small_lm, spill_everything, monkeypatch, tmp_path
):
    model, data = small_lm
    targets = find_targets(model)
    # One-sided: a large model's sensitivities run in float32, a small one's in float64.
    spilled = analyze(model, targets, data, AnalysisOptions(two_sided=False))
    assert isinstance(spilled.stats, LazyMoments) and spilled.store.on_disk
    groups = statistic_groups(plan_statistics(targets.targets), 0)
    assert len(groups) == len({t.stat_key for t in targets.targets}) > 1
    assert any(isinstance(e.spectrum.vt, StoredArray) for e in spilled.entries.values())
    monkeypatch.setattr(flarc.core.modelio, "LARGE_MODEL_BYTES", 1 << 62)
    plain = analyze(model, targets, data, AnalysisOptions(two_sided=False))
    assert not plain.store.on_disk
    for stats_a, stats_b in (
        (spilled.stats, plain.stats),
        (spilled.heldout_stats, plain.heldout_stats),
    ):
        assert list(stats_a) == list(stats_b)
        for key in stats_b:
            np.testing.assert_array_equal(stats_a[key].gram, stats_b[key].gram)
            assert stats_a[key].count == stats_b[key].count
            assert stats_a[key].sum4 == stats_b[key].sum4
    for name, e in plain.entries.items():
        for k in (1, e.spectrum.max_rank):
            for x, y in zip(
                spilled.entries[name].spectrum.factors(k), e.spectrum.factors(k), strict=True
            ):
                np.testing.assert_array_equal(x, y)
    opts = RankOptions(ratio=0.5, align=4)
    a = compress(model, spilled, opts).model.SerializeToString()
    assert a == compress(model, plain, opts).model.SerializeToString()
    # Through the analysis file (large arrays left in the file and read on use): the same model.
    save_analysis(spilled, tmp_path / "m.analysis")
    loaded = load_analysis(tmp_path / "m.analysis")
    assert compress(model, loaded, opts).model.SerializeToString() == a


def assert_same_sums(one, other) -> None:
    """Two analyses' calibration and held-out sums are the same bits."""
    for a, b in ((one.stats, other.stats), (one.heldout_stats, other.heldout_stats)):
        assert list(a) == list(b)
        for key in b:
            for field in ("gram", "sum1", "sum2x"):
                np.testing.assert_array_equal(getattr(a[key], field), getattr(b[key], field))
            assert (a[key].count, a[key].sum4) == (b[key].count, b[key].sum4)


def test_heldout_moments_are_computed_for_the_statistics_asked_only(small_lm, spill_everything):
    """Held-out sums come when needed, one store group per request holding only the keys asked
    (those of factorized targets, for the held-out errors), and are the bits of a direct pass
    over the held-out batches."""
    model, data = small_lm
    targets = find_targets(model)
    analysis = analyze(model, targets, data, AnalysisOptions(two_sided=False))
    held, store = analysis.heldout_stats, analysis.store
    keys = list(held)
    assert len(keys) > 2 and store.group("heldout/part0") is None  # nothing computed yet
    held.need([keys[1], keys[1]])
    assert store.group("heldout/part0")[1]["keys"] == [keys[1]]
    reference = collect_statistics(model, targets.targets, data.heldout)
    for key in [keys[1], keys[0], *keys]:
        for field in ("gram", "sum1", "sum2x"):
            np.testing.assert_array_equal(getattr(held[key], field), getattr(reference[key], field))
        assert (held[key].count, held[key].sum4) == (reference[key].count, reference[key].sum4)
    assert store.group("heldout/part1")[1]["keys"] == [keys[0]]  # each key computed once
    assert held.get("no such statistic") is None


def test_carried_activations_equal_rerunning_the_graph_per_group(
    small_lm, spill_everything, spills, monkeypatch
):
    model, data = small_lm
    targets = find_targets(model)
    options = AnalysisOptions(two_sided=False)
    carried = analyze(model, targets, data, options, keep_inputs=True)
    assert len(spills) == 1 and spills[0] is not None
    # The activations outlive the sums only as the analysis' carried inputs, removed with them.
    assert carried.carried is not None and carried.carried.spill is spills[0]
    carried.carried.close()
    assert not spills[0].root.exists()
    monkeypatch.setattr(flarc.calib.carry, "SPARE_BYTES", 1 << 62)  # no room on disk
    spills.clear()
    rerun = analyze(model, targets, data, options)
    assert spills == [None]  # so each group re-ran the graph
    assert_same_sums(carried, rerun)


def test_compensated_closed_loop_reads_the_carried_inputs(small_lm, spill_everything, monkeypatch):
    """Where the statistics carried the original's inputs to disk, the compensated closed loop
    runs only the compressed model and reads the original's side from them: the same factors as
    when it runs the original beside the compressed model (other feeds: it does that again)."""
    from flarc.calib.segments import SegmentedModel
    from flarc.rewrite.closed_loop import closed_loop_entries
    from flarc.rewrite.ranks import RankChoice

    model, data = small_lm
    options = AnalysisOptions(two_sided=False)
    analysis = analyze(model, find_targets(model), data, options, keep_inputs=True)
    assert analysis.carried is not None
    states = []
    real = SegmentedModel.run

    def spy(self, i, given):
        states.append(tuple(given))
        return real(self, i, given)

    monkeypatch.setattr(SegmentedModel, "run", spy)
    ranks = {t.name: RankChoice(max(1, min(t.n, t.m) // 3), "test") for t in analysis.targets}
    read = closed_loop_entries(model, analysis, ranks, data.calibration, compensate=True)
    assert states and set(states) == {("compressed",)}
    states.clear()
    copies = [dict(f) for f in data.calibration]  # equal batches, but not the carried ones
    ran = closed_loop_entries(model, analysis, ranks, copies, compensate=True)
    assert set(states) == {("compressed", "original")}
    for t in analysis.targets:
        k = ranks[t.name].rank
        a1, c1 = ran[t.name].spectrum.factors(k)
        a2, c2 = read[t.name].spectrum.factors(k)
        g = analysis.stats[t.stat_key].gram
        d, b = a2 @ c2 - a1 @ c1, a1 @ c1
        assert np.trace(d.T @ g @ d) / np.trace(b.T @ g @ b) < 1e-9, t.name


def test_a_small_model_carries_its_inputs_only_when_asked(small_lm, spills):
    """One statistics group: the graph computes the sums itself and no input is spilled, unless
    the caller keeps the inputs (a compensated closed loop reads the original's side from them
    instead of running the original again): each carried tensor, of every calibration and
    held-out batch, is what onnxruntime computes for it, and the sums are the same bits."""
    import onnxruntime as ort

    from flarc.calib.carry import activations_model

    model, data = small_lm
    targets = find_targets(model)
    options = AnalysisOptions(two_sided=False)
    plain = analyze(model, targets, data, options)
    assert spills == [] and plain.carried is None and not plain.store.on_disk
    kept = analyze(model, targets, data, options, keep_inputs=True)
    carried = kept.carried
    assert len(spills) == 1 and carried is not None and carried.spill is spills[0]
    assert_same_sums(kept, plain)
    names = carried.spill.names
    assert names and set(names) <= {u.input for t in targets.targets for u in t.all_uses}
    probe = activations_model(model, names).SerializeToString()
    session = ort.InferenceSession(probe, providers=["CPUExecutionProvider"])
    for b, feed in enumerate([*data.calibration, *data.heldout]):
        got = carried.calibration_values(b, names)
        for name, want in zip(names, session.run(names, feed), strict=True):
            np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-6, err_msg=name)
    carried.close()
    assert not spills[0].root.exists()


def test_a_carry_without_room_on_disk_leaves_the_sums_and_carries_nothing(small_lm, monkeypatch):
    """Where the disk has no room for the carried inputs, nothing is carried (the closed loop
    will run the original itself) and the sums are still the in-graph pass's bits."""
    model, data = small_lm
    targets = find_targets(model)
    options = AnalysisOptions(two_sided=False)
    plain = analyze(model, targets, data, options)
    monkeypatch.setattr(flarc.calib.carry, "SPARE_BYTES", 1 << 62)
    kept = analyze(model, targets, data, options, keep_inputs=True)
    assert kept.carried is None
    assert_same_sums(kept, plain)


def test_grouped_statistics_resume_from_checkpoint(small_lm, spill_everything, tmp_path):
    model, data = small_lm
    targets = find_targets(model)
    first = analyze(model, targets, data, checkpoint=tmp_path / "ck", checkpoint_every=1)
    assert len(list((tmp_path / "ck" / "statistics").glob("part*"))) > 1
    again = analyze(model, targets, data, checkpoint=tmp_path / "ck", resume=True)
    for key in first.stats:
        np.testing.assert_array_equal(first.stats[key].gram, again.stats[key].gram)


def test_a_group_written_in_the_background_fails_loudly(small_lm, spill_everything, monkeypatch):
    """Each group's sums are written while the next group computes; a write that fails there (a
    full disk) fails the analysis with its own error."""
    from flarc.core.store import Store

    model, data = small_lm
    targets = find_targets(model)
    real = Store.commit
    calls = []

    def commit(self, group, arrays, meta):
        calls.append(group)
        if group.endswith("part1"):
            raise OSError(28, "No space left on device")
        return real(self, group, arrays, meta)

    monkeypatch.setattr(Store, "commit", commit)
    with pytest.raises(OSError, match="No space left"):
        analyze(model, targets, data, AnalysisOptions(two_sided=False))
    assert any(g.endswith("part1") for g in calls)


def _saved_external(model: onnx.ModelProto, folder) -> str:
    folder.mkdir()
    path = folder / "m.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save turns the tensors it writes out into references
    onnx.save(copy, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    return str(path)


def _loaded_values(path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}


def test_lazy_model_compresses_to_the_same_model_as_in_memory(small_lm, spill_everything, tmp_path):
    """Weights left in their files (read by memory maps, run by onnxruntime from the files,
    factors written to disk as made): the same numbers and the same saved model, bit for bit."""
    from flarc.core.external import external_dir
    from flarc.core.modelio import load_model, save_model

    model, data = small_lm
    src = _saved_external(model, tmp_path / "in")
    before = {p.name: p.read_bytes() for p in (tmp_path / "in").iterdir()}
    eager = load_model(src, lazy=False)
    lazy = load_model(src, lazy=True)
    assert external_dir(eager) is None and external_dir(lazy) == (tmp_path / "in").resolve()
    assert all(not t.HasField("raw_data") for t in lazy.graph.initializer if t.dims)
    opts = RankOptions(ratio=0.5, align=4)
    results = {}
    for name, m in (("eager", eager), ("lazy", lazy)):
        analysis = analyze(m, find_targets(m), data, AnalysisOptions())
        result = compress(m, analysis, opts)
        (tmp_path / name).mkdir()
        save_model(result.model, tmp_path / name / "small.onnx", external_data=True)
        results[name] = result
    a, b = results["eager"], results["lazy"]
    assert b.spill is not None and a.spill is None
    assert [r.to_dict() for r in a.rows] == [r.to_dict() for r in b.rows]
    assert [c.to_dict() for c in a.comparison] == [c.to_dict() for c in b.comparison]
    assert a.guard < 1e-6 and b.guard < 1e-6  # the large-model guard runs on one sequence
    va = _loaded_values(tmp_path / "eager" / "small.onnx")
    vb = _loaded_values(tmp_path / "lazy" / "small.onnx")
    assert va.keys() == vb.keys()
    for k in va:
        np.testing.assert_array_equal(va[k], vb[k])
    # The input model and its data file are untouched; the lazy output loads in onnxruntime.
    assert before == {p.name: p.read_bytes() for p in (tmp_path / "in").iterdir()}
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "lazy" / "small.onnx"))
    feed = data.heldout[0]
    ref = ort.InferenceSession(str(tmp_path / "eager" / "small.onnx")).run(None, feed)
    for x, y in zip(sess.run(None, feed), ref, strict=True):
        np.testing.assert_array_equal(x, y)


def test_lazy_model_closed_loop_equals_in_memory(small_lm, spill_everything, tmp_path):
    """Closed-loop refactorization with compensation reads the weights from their files too."""
    from flarc.core.modelio import load_model

    model, data = small_lm
    src = _saved_external(model, tmp_path / "in")
    factors = []
    for lazy in (False, True):
        m = load_model(src, lazy=lazy)
        analysis = analyze(m, find_targets(m), data, AnalysisOptions())
        result = compress(
            m, analysis, RankOptions(ratio=0.5, align=4), closed_loop=data.calibration,
            compensate=True,
        )  # fmt: skip
        factors.append([r.to_dict() for r in result.rows])
    assert factors[0] == factors[1]


def _polygraphy_comparison(reference, candidate, feeds, rtol, atol) -> dict:
    """Per common numeric output: polygraphy's verdict (its Comparator and simple compare
    function) and the metrics from all batches at once in float64."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator

    from flarc.core.polygraphy import accuracy_results, quiet, simple_compare_func

    runners = [
        OnnxrtRunner(SessionFromOnnx(m.SerializeToString(), providers=["CPUExecutionProvider"]))
        for m in (reference, candidate)
    ]
    with quiet():
        results = Comparator.run(runners, data_loader=feeds)
        verdicts = Comparator.compare_accuracy(
            results, compare_func=simple_compare_func(rtol=rtol, atol=atol, check_shapes=True)
        )
    passed: dict[str, bool] = {}
    for result in accuracy_results(verdicts):
        for it in (it for iterations in result.values() for it in iterations):
            for name, ok in it.items():
                passed[name] = passed.get(name, True) and bool(ok)
    (_, ref_iters), (_, out_iters) = results[0], results[1]
    found = {}
    for name in ref_iters[0].keys():
        a = np.concatenate([np.asarray(it[name], np.float64).ravel() for it in ref_iters])
        b = np.concatenate([np.asarray(it[name], np.float64).ravel() for it in out_iters])
        d, scale = np.abs(a - b), np.abs(a).max()
        cosine = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
        metrics = (cosine, d.max(), d.mean(), d.max() / scale, d.mean() / scale)
        found[name] = (metrics, passed[name])
    return found


def test_comparison_equals_polygraphy_comparison(small_lm):
    """The comparison (one session at a time, outputs on disk, blocked sums) gives polygraphy's
    verdicts and the metrics computed from whole arrays (a lazy model's comparison equals the
    in-memory one's: test_lazy_model_compresses_to_the_same_model_as_in_memory)."""
    import flarc.core.sums
    from flarc.core.compare import compare_models

    model, data = small_lm
    analysis = analyze(model, find_targets(model), data, AnalysisOptions())
    small = compress(model, analysis, RankOptions(ratio=0.5, align=4)).model
    verdicts = []
    for rtol, atol in ((1e-3, 1e-3), (1e3, 10.0)):
        want = _polygraphy_comparison(model, small, data.heldout, rtol, atol)
        verdicts.append([p for _, p in want.values()])
        flarc.core.sums.BLOCK, old = 7, flarc.core.sums.BLOCK  # many blocks per output
        try:
            ours = compare_models(model, small, data.heldout, rtol=rtol, atol=atol)
        finally:
            flarc.core.sums.BLOCK = old
        assert [c.name for c in ours] == list(want)
        for c in ours:
            metrics, passed = want[c.name]
            assert c.passed == passed
            got = (c.cosine, c.max_abs, c.mean_abs, c.max_rel, c.mean_rel)
            assert got == pytest.approx(metrics, rel=1e-9, abs=1e-12)
    assert verdicts[0] != verdicts[1]  # both verdicts were exercised


def test_blocked_metrics_equal_direct_numpy():
    from flarc.core.compare import _summary
    from flarc.core.sums import PairSums

    rng = np.random.default_rng(3)
    ref = [
        rng.standard_normal((3, 50)).astype(np.float32),
        rng.standard_normal(7).astype(np.float32),
    ]
    out = [r + 0.01 * rng.standard_normal(r.shape).astype(np.float32) for r in ref]
    a = np.concatenate([r.ravel() for r in ref]).astype(np.float64)
    b = np.concatenate([o.ravel() for o in out]).astype(np.float64)
    d = np.abs(a - b)
    scale = np.abs(a).max()
    want = (a @ b / np.linalg.norm(a) / np.linalg.norm(b), d.max(), d.mean(), d.max() / scale,
            d.mean() / scale)  # fmt: skip
    sums = PairSums()
    for r, o in zip(ref, out, strict=True):
        sums.add(r, o)
    assert _summary(sums) == pytest.approx(want, rel=1e-12)


def test_timing_sessions_run_lazy_models_as_in_memory(small_lm, spill_everything, tmp_path):
    """The timing session runs a lazily loaded model and its rewrite (factors in a spill file)
    from their files, and computes what the in-memory models compute."""
    from flarc.core.modelio import load_model
    from flarc.latency.backend import get_backend

    model, data = small_lm
    src = _saved_external(model, tmp_path / "in")
    lazy, eager = load_model(src, lazy=True), load_model(src, lazy=False)
    opts = RankOptions(ratio=0.5, align=4)
    small = compress(lazy, analyze(lazy, find_targets(lazy), data), opts)
    small_eager = compress(eager, analyze(eager, find_targets(eager), data), opts)
    assert small.spill is not None and small_eager.spill is None
    backend = get_backend("ort-cpu", threads=1)
    feed = data.heldout[0]
    for m, ref in ((lazy, eager), (small.model, small_eager.model)):
        got = backend._session(m, "lazy", tmp_path).run(None, feed)
        want = backend._session(ref, "eager").run(None, feed)
        for x, y in zip(got, want, strict=True):
            np.testing.assert_array_equal(x, y)


def test_large_model_guard_checks_the_first_sequence_and_catches_a_wrong_pair(small_lm):
    """A large model's guard runs the first sequence of the first held-out batch (a dynamic
    batch): the same number as the guard of that sequence alone, and a pair that is not its
    dense product is still caught by it."""
    from flarc.core.inputs import batch_rows, batch_size
    from flarc.rewrite.guard import output_guard
    from flarc.rewrite.pairs import factorize

    model, data = small_lm
    targets = find_targets(model).targets
    rng = np.random.default_rng(0)
    factors = {t.name: (rng.standard_normal((t.n, 4)), rng.standard_normal((4, t.m)))
               for t in targets[-2:]}  # fmt: skip
    feeds = data.heldout
    assert batch_size(feeds[0]) > 1
    first = [batch_rows(feeds[0], 0, 1, batch_size(feeds[0]))]
    good = factorize(model, targets, factors)
    large = output_guard(model, good, targets, factors, feeds, large=True)
    assert large == output_guard(model, good, targets, factors, first, large=False)
    assert large < 1e-5
    wrong = {
        **factors,
        targets[-1].name: (factors[targets[-1].name][0] * 1.1, factors[targets[-1].name][1]),
    }
    bad = factorize(model, targets, wrong)
    assert output_guard(model, bad, targets, factors, feeds, large=True) > 1e-3
