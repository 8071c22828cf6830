"""Targets inside subgraphs (issue 15): If branches are factorized with statistics gathered inside
the branch that ran; weights the branches share stay one target stored once; Loop bodies and
branches that never ran are skipped with their reason while the rest is compressed."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from flarc.calib.data import CalibrationSet
from flarc.calib.statistics import collect_statistics
from flarc.core.targets import find_targets
from flarc.pipeline import AnalysisOptions, analyze, compress
from flarc.rewrite.pairs import chosen_factors, factorize
from flarc.rewrite.policy import RankOptions
from flarc.rewrite.ranks import RankChoice

RNG = np.random.default_rng(11)


def _w(name: str, n: int, m: int) -> onnx.TensorProto:
    return numpy_helper.from_array(
        (RNG.standard_normal((n, m)) / np.sqrt(n)).astype(np.float32), name
    )


def _branch(
    name: str, act: str, local: bool, inner: onnx.NodeProto | None = None
) -> onnx.GraphProto:
    """``y = (act(x w) [w_local]) w2`` with the outer ``w`` and ``w2``, optionally a weight of
    its own and a nested If."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], [f"{name}_h"], name="mm"),
        helper.make_node(act, [f"{name}_h"], [f"{name}_a"], name="act"),
    ]
    last, inits = f"{name}_a", []
    if local:
        inits.append(_w(f"{name}_local", 12, 12))
        nodes.append(
            helper.make_node("MatMul", [last, f"{name}_local"], [f"{name}_l"], name="mm_local")
        )
        last = f"{name}_l"
    if inner is not None:
        nodes.append(inner)
        last = inner.output[0]
    nodes.append(helper.make_node("MatMul", [last, "w2"], [f"{name}_y"], name="mm2"))
    out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["b", 8])
    return helper.make_graph(nodes, name, [], [out], inits)


def _nested(cond: str) -> onnx.NodeProto:
    """An If inside a branch: both its branches read the outer ``w3`` [12, 12]."""

    def leaf(name: str, act: str) -> onnx.GraphProto:
        nodes = [
            helper.make_node("MatMul", ["then_a", "w3"], [f"{name}_z"], name="deep"),
            helper.make_node(act, [f"{name}_z"], [f"{name}_o"]),
        ]
        return helper.make_graph(
            nodes,
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_o", TensorProto.FLOAT, ["b", 12])],
        )

    return helper.make_node(
        "If", [cond], ["inner_y"], name="inner",
        then_branch=leaf("in_then", "Tanh"), else_branch=leaf("in_else", "Sigmoid"),
    )  # fmt: skip


def _if_model(local: bool = True, nested: bool = False) -> onnx.ModelProto:
    pre = helper.make_node("MatMul", ["x0", "w0"], ["x"], name="pre")
    node = helper.make_node(
        "If", ["c"], ["y"], name="branch",
        then_branch=_branch("then", "Tanh", local, _nested("c2") if nested else None),
        else_branch=_branch("else", "Relu", local),
    )  # fmt: skip
    inputs = [
        helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["b", 10]),
        helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        *([helper.make_tensor_value_info("c2", TensorProto.BOOL, [])] if nested else []),
    ]
    inits = [
        _w("w0", 10, 16),
        _w("w", 16, 12),
        _w("w2", 12, 8),
        *([_w("w3", 12, 12)] if nested else []),
    ]
    graph = helper.make_graph(
        [pre, node],
        "g",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _feeds(conds, nested=False, rows=6, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i, c in enumerate(conds):
        feed = {"x0": rng.standard_normal((rows, 10)).astype(np.float32), "c": np.array(c)}
        if nested:
            feed["c2"] = np.array(i % 2 == 0)
        out.append(feed)
    return out


def _run(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feed
    )[0]


def test_if_branches_are_found_and_shared_weights_are_one_target():
    found = find_targets(_if_model())
    by_weight = {t.weight: t for t in found.targets}
    assert set(by_weight) == {"w0", "w", "w2", "then_local", "else_local"}
    assert {u.graph for u in by_weight["w"].all_uses} == {
        ("branch", "then_branch"), ("branch", "else_branch"),
    }  # fmt: skip
    assert by_weight["then_local"].graph == ("branch", "then_branch")
    assert not found.skipped


def test_statistics_inside_branches_equal_a_forward_pass():
    model = _if_model(nested=True)
    targets = find_targets(model).targets
    feeds = _feeds([True, False, True, True], nested=True)
    stats = collect_statistics(model, targets, feeds)
    w0 = numpy_helper.to_array(model.graph.initializer[0])
    w = numpy_helper.to_array(model.graph.initializer[1])
    by_weight = {t.weight: t for t in targets}
    x = np.concatenate([f["x0"] @ w0 for f in feeds]).astype(np.float64)
    np.testing.assert_allclose(stats[by_weight["w"].stat_key].gram, x.T @ x, rtol=1e-5, atol=1e-5)
    # Both branches of the nested If read w3 from tanh(x w): rows of every then-branch batch,
    # lifted through two levels of If.
    deep = np.concatenate([np.tanh(f["x0"] @ w0 @ w) for f in feeds if f["c"]])
    deep = deep.astype(np.float64)
    assert len(by_weight["w3"].all_uses) == 2
    m = stats[by_weight["w3"].stat_key]
    assert m.count == len(deep)
    np.testing.assert_allclose(m.gram, deep.T @ deep, rtol=1e-5, atol=1e-5 * np.abs(m.gram).max())
    # then_local: the rows of the three then-branch batches; else_local: the one else batch.
    assert stats[by_weight["then_local"].stat_key].count == 18
    assert stats[by_weight["else_local"].stat_key].count == 6


def test_statistics_of_a_model_with_branches_stay_float64():
    """A branch's Gram is onnxruntime's MatMul, whose float32 bits could follow its thread
    count: with a statistic inside a branch the whole graph works in float64, whatever the
    precision asked; statistics with no use in a branch get the type asked for."""
    from flarc.calib.statistics import PRECISION, build_statistics_model, plan_statistics

    assert PRECISION == "float32"
    model = _if_model(nested=True)
    plans = plan_statistics(find_targets(model).targets)
    assert any(p.graphs for p in plans)
    for precision in ("float32", "float64"):
        stats = build_statistics_model(model, plans, None, precision)
        types = {o.type.tensor_type.elem_type for o in stats.graph.output}
        assert types == {TensorProto.DOUBLE, TensorProto.INT64}, precision
    flat = [p for p in plans if not p.graphs]
    assert flat  # the main graph's own statistics, alone
    stats = build_statistics_model(model, flat, None, "float32")
    assert {o.type.tensor_type.elem_type for o in stats.graph.output} == {
        TensorProto.FLOAT,
        TensorProto.INT64,
    }


def test_full_rank_reproduces_both_branches_and_weights_stay_stored_once():
    model = _if_model(nested=True)
    found = find_targets(model)
    feeds = _feeds([True, False, True, False], nested=True)
    data = CalibrationSet(feeds[:3], feeds[3:], "t")
    analysis = analyze(model, found, data, AnalysisOptions(shrinkage="none", full_rank=True))
    ranks = {t.name: RankChoice(min(t.n, t.m), "full") for t in analysis.targets}
    full = factorize(model, analysis.targets, chosen_factors(analysis, ranks))
    onnx.checker.check_model(full)
    for feed in _feeds([True, False, True, False], nested=True, seed=5):
        np.testing.assert_allclose(_run(full, feed), _run(model, feed), rtol=1e-4, atol=1e-5)
    # The branches' shared factors live once, in the main graph; branch nodes keep their names.
    main = {t.name for t in full.graph.initializer}
    shared = next(t for t in analysis.targets if t.weight == "w")
    assert {f"{shared.name}/lowrank_A", f"{shared.name}/lowrank_C"} <= main
    branch = next(n for n in full.graph.node if n.op_type == "If")
    for attr in branch.attribute:
        assert not {t.name for t in attr.g.initializer} & main
        assert "act" in {n.name for n in attr.g.node}


def test_an_unused_branch_is_skipped_and_the_rest_compressed():
    model = _if_model()
    feeds = _feeds([True] * 6)
    found = find_targets(model)
    analysis = analyze(model, found, CalibrationSet(feeds[:4], feeds[4:], "t"))
    reasons = {s.node: s.reason for s in analysis.skipped}
    assert "never ran" in reasons["branch/else_branch/mm_local"]
    result = compress(model, analysis, RankOptions(ratio=0.5, align=1))
    assert any(c.rank is not None for c in result.ranks.values())
    for feed in _feeds([True, False], seed=3):  # the dense else branch still runs
        assert np.isfinite(_run(result.model, feed)).all()


def test_a_weight_outside_any_target_is_not_duplicated_into_branches():
    """The graph round trip must not copy outer weights into every branch that reads them."""
    model = _if_model(local=False)
    found = find_targets(model)
    pre = next(t for t in found.targets if t.weight == "w0")
    analysis = analyze(model, found, CalibrationSet(_feeds([True, False]), [], "t"))
    out = factorize(model, found.targets, chosen_factors(analysis, {pre.name: RankChoice(4, "r")}))
    branch = next(n for n in out.graph.node if n.op_type == "If")
    assert all(not a.g.initializer for a in branch.attribute)
    assert {"w", "w2"} <= {t.name for t in out.graph.initializer}


def test_a_loop_body_is_skipped_with_its_reason():
    body_nodes = [
        helper.make_node("MatMul", ["h_in", "wl"], ["h_mm"], name="loop_mm"),
        helper.make_node("Tanh", ["h_mm"], ["h_out"]),
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
    ]
    body = helper.make_graph(
        body_nodes, "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["b", 16])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["b", 16])],
    )  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x0", "w0"], ["h0"], name="pre"),
        helper.make_node("Loop", ["trip", "", "h0"], ["h"], name="loop", body=body),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["b", 10])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", 16])],
        [_w("w0", 10, 16), _w("wl", 16, 16), numpy_helper.from_array(np.array(3, np.int64), "trip")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    found = find_targets(model)
    assert [t.name for t in found.targets] == ["pre"]
    (skip,) = found.skipped
    assert skip.node == "loop/body/loop_mm" and "Loop body" in skip.reason


@pytest.mark.parametrize("conds", [[True, False, True, False]])
def test_compress_through_the_pipeline_keeps_both_branches_working(conds):
    model = _if_model()
    feeds = _feeds(conds * 2)
    analysis = analyze(model, find_targets(model), CalibrationSet(feeds[:6], feeds[6:], "t"))
    result = compress(model, analysis, RankOptions(ratio=0.7, align=1))
    assert result.guard < 1e-3
    kept = {r.name: r for r in result.rows}
    assert all(r.kept_bytes <= r.stored_bytes for r in kept.values())
    for feed in _feeds([True, False], seed=9):
        y, y0 = _run(result.model, feed), _run(model, feed)
        cos = float((y * y0).sum() / np.linalg.norm(y) / np.linalg.norm(y0))
        assert cos > 0.5


def test_preset_best_falls_back_to_open_loop_on_subgraphs(caplog):
    """The default preset (best) takes an If model open loop and says why; explicit
    --compensate stays closed loop (which then refuses the subgraph by name)."""
    from flarc.cli import build_parser
    from flarc.cli.args import ClosedLoopArgs

    model = _if_model()
    argv = ["compress", "if.onnx", "-o", "s.onnx", "--calib", "c.npz", "--budget", "0.7"]
    args = build_parser().parse_args(argv)
    with caplog.at_level("INFO", logger="flarc.cli.args"):
        assert ClosedLoopArgs().parse(args, model, has_data=True) == (False, False)
    assert "--preset best: open loop" in caplog.text and "branch/else_branch" in caplog.text
    explicit = build_parser().parse_args([*argv, "--compensate"])
    assert ClosedLoopArgs().parse(explicit, model, has_data=True) == (True, True)
