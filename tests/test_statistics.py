"""In-graph statistics against a numpy float64 reference; shrinkage against scikit-learn."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from sklearn.covariance import ledoit_wolf, oas

from flarc.calib.moments import Moments
from flarc.calib.shrinkage import ledoit_wolf_lambda, shrink
from flarc.calib.statistics import collect_statistics
from flarc.core.targets import find_targets

from _models import SmallCnn, TinyEncoder, export, im2col_rows, token_batch
from test_factorize import run, with_outputs


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_conv_statistics_are_im2col_moments(tmp_path, precision):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((4, 3, 11, 11)).astype(np.float32)} for _ in range(2)]
    model = onnx.load(
        str(export(SmallCnn(), (torch.from_numpy(feeds[0]["x"]),), tmp_path / "c.onnx", ["x"]))
    )
    targets = [t for t in find_targets(model).targets if t.conv is not None]
    stats = collect_statistics(model, targets, feeds, precision=precision)
    acts = [
        run(with_outputs(model, [t.input for t in targets]), f, [t.input for t in targets])
        for f in feeds
    ]
    for i, t in enumerate(targets):
        rows = np.concatenate([im2col_rows(a[i], t.conv) for a in acts])
        ref = Moments.from_rows(rows)
        got = stats[t.stat_key]
        tol = 1e-12 if precision == "float64" else 1e-5
        assert got.count == ref.count
        np.testing.assert_allclose(got.gram, ref.gram, rtol=tol, atol=tol * np.abs(ref.gram).max())
        assert got.sum4 == pytest.approx(ref.sum4, rel=tol)
        np.testing.assert_allclose(got.sum1, ref.sum1, rtol=tol, atol=tol * np.abs(ref.sum1).max())
        np.testing.assert_allclose(
            got.sum2x, ref.sum2x, rtol=tol, atol=tol * np.abs(ref.sum2x).max()
        )


def test_masked_rows_never_count(tmp_path):
    """Padding under a zero mask, filled with garbage tokens, leaves every statistic unchanged."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    feed = token_batch(rng, 3, 8)
    args = tuple(torch.from_numpy(feed[k]) for k in ("input_ids", "attention_mask"))
    dyn = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}}
    model = onnx.load(
        str(export(TinyEncoder(), args, tmp_path / "e.onnx", ["input_ids", "attention_mask"], dyn))
    )
    targets = find_targets(model).targets
    short = token_batch(rng, 3, 8)
    padded = {k: np.concatenate([v, np.zeros((3, 5), np.int64)], axis=1) for k, v in short.items()}
    padded["input_ids"][:, 8:] = rng.integers(1, 64, size=(3, 5))
    a = collect_statistics(model, targets, [short])
    b = collect_statistics(model, targets, [padded])
    for key in a:
        assert a[key].count == b[key].count == 24
        # Masked keys must agree to rounding; attention is causal-free so real rows see no padding.
        np.testing.assert_allclose(
            a[key].gram, b[key].gram, rtol=1e-9, atol=1e-9 * np.abs(a[key].gram).max()
        )
        assert a[key].sum4 == pytest.approx(b[key].sum4, rel=1e-9)


def test_moments_add_up_over_batches():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 7))
    total = Moments.zeros(7)
    total.add(Moments.from_rows(x[:20]))
    total.add(Moments.from_rows(x[20:]))
    ref = Moments.from_rows(x)
    np.testing.assert_allclose(total.gram, ref.gram)
    assert total.sum4 == pytest.approx(ref.sum4)
    assert total.count == 50


@pytest.mark.parametrize("shape", [(60, 12), (10, 30), (500, 4), (31, 31)])
@pytest.mark.parametrize("centered", [False, True])
def test_shrinkage_matches_scikit_learn(shape, centered):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape) @ rng.standard_normal(
        (shape[1], shape[1])
    ) + 3 * rng.standard_normal(shape[1])
    moments = Moments.from_rows(x)
    cov, lam = ledoit_wolf(x, assume_centered=not centered)
    got = shrink(moments, "ledoit-wolf", centered)
    assert got.lam == pytest.approx(lam, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(got.covariance, cov, rtol=1e-9, atol=1e-12 * np.abs(cov).max())
    cov, lam = oas(x, assume_centered=not centered)
    got = shrink(moments, "oas", centered)
    assert got.lam == pytest.approx(lam, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(got.covariance, cov, rtol=1e-9, atol=1e-12 * np.abs(cov).max())


def test_quoted_shrinkage_formula_would_be_zero_but_ledoit_wolf_is_not():
    """DESIGN.md's trap: (tr S - tr T)/||S - T||^2 with T = mean(diag S) I is identically 0."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 20))
    s = x.T @ x / 8
    t = np.eye(20) * np.trace(s) / 20
    assert abs(np.trace(s) - np.trace(t)) < 1e-12
    assert ledoit_wolf_lambda(Moments.from_rows(x)) > 0.1


def test_fixed_and_no_shrinkage():
    x = np.random.default_rng(1).standard_normal((40, 6))
    m = Moments.from_rows(x)
    np.testing.assert_allclose(shrink(m, "none").covariance, x.T @ x / 40)
    fixed = shrink(m, "ledoit-wolf", lam=0.05)
    s = x.T @ x / 40
    np.testing.assert_allclose(fixed.covariance, 0.95 * s + 0.05 * np.trace(s) / 6 * np.eye(6))
    with pytest.raises(ValueError):
        shrink(m, lam=1.5)
