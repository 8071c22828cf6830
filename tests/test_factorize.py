"""Factor pairs in the graph: full rank reproduces the model; the whitened-error identity holds."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from flarc.calib.data import CalibrationSet
from flarc.core.targets import constant_tensors, find_targets, weight_matrix
from flarc.pipeline import AnalysisOptions, analyze

from _models import (
    TOKEN_AXES,
    TOKEN_INPUTS,
    Mlp2d,
    Mlp3d,
    SmallCnn,
    TinyDecoder,
    TinyEncoder,
    export,
    full_rank_model,
    im2col_rows,
    token_batch,
)


def run(model: onnx.ModelProto, feed: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
    model.ir_version = min(model.ir_version, 10)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs, feed)


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return probe


CASES = {
    "gemm_transB": (
        lambda: Mlp2d(),
        lambda r: {"x": r.standard_normal((16, 24)).astype(np.float32)},
    ),
    "matmul": (lambda: Mlp3d(), lambda r: {"x": r.standard_normal((4, 6, 24)).astype(np.float32)}),
    "conv": (
        lambda: SmallCnn(),
        lambda r: {"x": r.standard_normal((16, 3, 12, 12)).astype(np.float32)},
    ),
}


def _export_case(tmp_path, name: str):
    make, feed_fn = CASES[name]
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    feed = feed_fn(rng)
    path = export(make(), (torch.from_numpy(feed["x"]),), tmp_path / f"{name}.onnx", ["x"])
    return onnx.load(str(path)), feed_fn, rng


def gemm_model(trans_b: int) -> onnx.ModelProto:
    """A Gemm with transB=0 and alpha/beta, which torch never writes."""
    rng = np.random.default_rng(1)
    b = rng.standard_normal((12, 10) if not trans_b else (10, 12)).astype(np.float32)
    c = rng.standard_normal(10).astype(np.float32)
    node = onnx.helper.make_node(
        "Gemm", ["x", "B", "C"], ["y"], name="gemm", alpha=0.5, beta=2.0, transB=trans_b
    )
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 12])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 10])],
        [onnx.numpy_helper.from_array(b, "B"), onnx.numpy_helper.from_array(c, "C")],
    )
    return onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=10
    )


def full_rank_compare(model: onnx.ModelProto, feeds: list[dict]) -> float:
    targets = find_targets(model)
    _, new = full_rank_model(model, CalibrationSet(feeds, [], "test"))
    assert sum(n.op_type in ("MatMul", "Gemm", "Conv") for n in new.graph.node) == sum(
        n.op_type in ("MatMul", "Gemm", "Conv") for n in model.graph.node
    ) + len(targets.targets)
    worst = 0.0
    for feed in feeds:
        for a, b in zip(run(model, feed), run(new, feed), strict=True):
            worst = max(worst, float(np.abs(a - b).max() / np.abs(a).max()))
    return worst


@pytest.mark.parametrize("case", sorted(CASES))
def test_full_rank_reproduces_exported_models(tmp_path, case):
    model, feed_fn, rng = _export_case(tmp_path, case)
    assert find_targets(model).targets
    assert full_rank_compare(model, [feed_fn(rng) for _ in range(3)]) < 2e-5


@pytest.mark.parametrize("trans_b", [0, 1])
def test_full_rank_reproduces_gemm_with_alpha_beta(trans_b):
    model = gemm_model(trans_b)
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((20, 12)).astype(np.float32)} for _ in range(2)]
    (t,) = find_targets(model).targets
    assert (t.n, t.m, t.transposed) == (12, 10, bool(trans_b))
    assert full_rank_compare(model, feeds) < 2e-5


def test_depthwise_conv_is_skipped(tmp_path):
    model, _, _ = _export_case(tmp_path, "conv")
    skipped = find_targets(model).skipped
    assert any("depthwise" in s.reason for s in skipped)


@pytest.mark.parametrize("case", ["matmul", "conv"])
def test_whitened_error_identity_against_forward_pass(tmp_path, case):
    """Predicted sum_{i>k} s_i^2 / sum s_i^2 equals ||X(B - B_k)||^2 / ||X B||^2 on the calibration data."""
    model, feed_fn, rng = _export_case(tmp_path, case)
    feeds = [feed_fn(rng) for _ in range(3)]
    targets = find_targets(model)
    analysis = analyze(
        model,
        targets,
        CalibrationSet(feeds, [], "t"),
        AnalysisOptions(shrinkage="none", full_rank=True, two_sided=False, precision="float64"),
    )
    consts = constant_tensors(model)
    # The activations each target sees, from a real forward pass of the original model.
    probe = with_outputs(model, [t.input for t in targets.targets])
    acts = [run(probe, f, [t.input for t in targets.targets]) for f in feeds]
    checked = 0
    for i, t in enumerate(targets.targets):
        if t.conv is not None:
            x = np.concatenate([im2col_rows(a[i], t.conv) for a in acts])
        else:
            x = np.concatenate([a[i].reshape(-1, t.n) for a in acts]).astype(np.float64)
        b = weight_matrix(t, consts[t.weight])
        spectrum = analysis.entries[t.name].spectrum
        for k in sorted({1, 2, min(t.n, t.m) // 2, min(t.n, t.m) - 1}):
            a_k, c_k = spectrum.factors(k)
            measured = np.linalg.norm(x @ (b - a_k @ c_k)) ** 2 / np.linalg.norm(x @ b) ** 2
            assert spectrum.error(k) == pytest.approx(measured, rel=1e-6), (t.name, k)
            checked += 1
    assert checked >= 4


def test_full_rank_of_transformers_both_exporters(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    for dynamo in (False, True):
        for cls in (TinyEncoder, TinyDecoder):
            feed = token_batch(rng, 2, 10, pad_from=6)
            args = tuple(torch.from_numpy(feed[k]) for k in TOKEN_INPUTS)
            path = tmp_path / f"{cls.__name__}{dynamo}.onnx"
            export(cls(), args, path, TOKEN_INPUTS, TOKEN_AXES, dynamo)
            model = onnx.load(str(path))
            targets = find_targets(model)
            # q, k, v, o, up, down per block; a tied head is skipped unless the exporter
            # folded its transpose into a separate initializer (then it is a weight of its own).
            assert len(targets.targets) in (12, 13), (cls.__name__, dynamo)
            weights = [t.weight for t in targets.targets]
            assert len(set(weights)) == len(weights)
            if cls is TinyDecoder and len(targets.targets) == 12:
                assert any("shared" in s.reason for s in targets.skipped)
            feeds = [token_batch(rng, 3, 9, pad_from=5) for _ in range(2)]
            assert full_rank_compare(model, feeds) < 5e-5, (cls.__name__, dynamo)


def test_baseline_whitenings_are_their_definitions():
    """diag scales rows by the channel RMS; none is the plain SVD of the weight."""
    from flarc.rewrite.spectrum import whitened_svd
    from flarc.rewrite.whiten import whitener

    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 9)) * np.arange(1, 10)
    b = rng.standard_normal((9, 6))
    h = x.T @ x
    plain = whitened_svd(b, whitener(h, "none")[0])
    np.testing.assert_allclose(plain.sigma, np.linalg.svd(b, compute_uv=False))
    diag = whitened_svd(b, whitener(h, "diag")[0])
    d = np.sqrt(np.diag(h))
    np.testing.assert_allclose(diag.sigma, np.linalg.svd(d[:, None] * b, compute_uv=False))
    for s in (plain, diag):
        a, c = s.factors(6)
        np.testing.assert_allclose(a @ c, b, atol=1e-10)


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (30, 30)])
@pytest.mark.parametrize("kind", ["cholesky", "eig"])
def test_whitened_svd_factors_are_the_whitened_truncation(shape, kind):
    """Every rank's ``A C`` is ``L^{-T} trunc_k(L^T B)`` by numpy's SVD and explicit inverses,
    on tall, wide and square weights (a tall one's basis is formed as ``B V / s``) with an
    ill-conditioned statistic; ``basis`` keeps ``H``-orthonormal columns."""
    from flarc.rewrite.spectrum import whitened_svd
    from flarc.rewrite.whiten import whitener

    n, m = shape
    rng = np.random.default_rng(n * m)
    x = rng.standard_normal((3 * n, n)) * np.logspace(0, -2.5, n)
    h = x.T @ x
    b = rng.standard_normal((n, m))
    w = whitener(h, kind)[0]
    spec = whitened_svd(b, w, max_rank=min(n, m) - 2)
    lt = np.linalg.cholesky(h).T if kind == "cholesky" else w.scale[:, None] * w.factor.T
    u0, s0, vt0 = np.linalg.svd(lt @ b, full_matrices=False)
    np.testing.assert_allclose(spec.sigma, s0, rtol=1e-9, atol=1e-12 * s0[0])
    for k in (1, 3, spec.max_rank):
        a, c = spec.factors(k)
        expected = np.linalg.solve(lt, (u0[:, :k] * s0[:k]) @ vt0[:k])
        np.testing.assert_allclose(a @ c, expected, atol=1e-8 * np.abs(b).max())
    basis = np.asarray(spec.basis)
    np.testing.assert_allclose(basis.T @ h @ basis, np.eye(spec.max_rank), atol=1e-8)


@pytest.mark.parametrize("centered", [False, True])
def test_a_tall_targets_spectrum_needs_no_factor_of_h(centered, monkeypatch):
    """A tall target's whitened SVD comes from the eigendecomposition of B^T H B, its basis
    B V / s: LAPACK's SVD of L^T B for the Cholesky factor of the shrunk H (singular values to
    eps s_0^2, the rank-k truncations), with and without directions, H never factored. Where a
    kept singular value is almost zero, H is factored and LAPACK's SVD taken, as before."""
    import flarc.rewrite.analysis
    from flarc.calib.moments import Moments
    from flarc.calib.shrinkage import shrink
    from flarc.core.targets import Target
    from flarc.rewrite.analysis import AnalysisOptions, analyze_target
    from flarc.rewrite.whiten import whitener

    rng = np.random.default_rng(7)
    n, m = 48, 10
    x = rng.standard_normal((30, n)) * np.logspace(0, -3, n) + 0.3  # fewer rows than inputs
    moments = Moments.from_rows(x)
    h = shrink(moments, centered=centered).covariance
    b = rng.standard_normal((n, m))
    lt = np.linalg.cholesky(h).T
    u0, s0, vt0 = np.linalg.svd(lt @ b, full_matrices=False)
    t = Target("t", "MatMul", "x", "y", "w", (n, m), n, m, False, "float32")
    factored = []

    def spy(*args, **kwargs):
        factored.append(args[0].shape)
        return whitener(*args, **kwargs)

    monkeypatch.setattr(flarc.rewrite.analysis, "whitener", spy)
    bare = analyze_target(t, b, moments, AnalysisOptions(directions=False, centered=centered))
    full = analyze_target(t, b, moments, AnalysisOptions(centered=centered, full_rank=True))
    assert not factored
    assert bare.spectrum.max_rank == 0 and full.spectrum.max_rank == m
    assert bare.whitening == full.whitening == "cholesky"
    for e in (bare, full):
        np.testing.assert_allclose(e.spectrum.sigma**2, s0**2, rtol=1e-12, atol=1e-13 * s0[0] ** 2)
    for k in (1, 4, m):
        a, c = full.spectrum.factors(k)
        expected = np.linalg.solve(lt, (u0[:, :k] * s0[:k]) @ vt0[:k])
        np.testing.assert_allclose(a @ c, expected, atol=1e-9 * np.abs(b).max())
    # A near-null output direction: its singular value is below the Gram route's reach.
    b[:, -1] = b[:, 0] * (1 + 1e-13)
    deficient = analyze_target(t, b, moments, AnalysisOptions(centered=centered, full_rank=True))
    assert factored == [(n, n)]
    s_ref = np.linalg.svd(lt @ b, compute_uv=False)
    np.testing.assert_allclose(deficient.spectrum.sigma, s_ref, rtol=1e-9, atol=1e-12 * s_ref[0])


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (30, 30)])
@pytest.mark.parametrize("deficient", [False, True])
def test_leading_svd_matches_lapack(shape, deficient):
    """The Gram route (and its fallback for rank-deficient matrices) against numpy's SVD:
    singular values, and the rank-r truncation it reconstructs."""
    from flarc.rewrite.spectrum import leading_svd

    rng = np.random.default_rng(sum(shape) + deficient)
    a = rng.standard_normal(shape) * np.logspace(0, -3, shape[1])
    if deficient:
        a = a[:, :4] @ rng.standard_normal((4, shape[1]))  # rank 4: later s are ~0
    r = 8
    u, s, vt = leading_svd(a.copy(), r)
    u0, s0, vt0 = np.linalg.svd(a, full_matrices=False)
    np.testing.assert_allclose(s**2, s0**2, atol=1e-12 * s0[0] ** 2)
    np.testing.assert_allclose((u * s[:r]) @ vt, (u0[:, :r] * s0[:r]) @ vt0[:r], atol=1e-9 * s0[0])
    np.testing.assert_allclose(u.T @ u, np.eye(r), atol=1e-9)
