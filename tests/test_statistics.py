"""In-graph statistics against a numpy float64 reference; shrinkage against scikit-learn."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from sklearn.covariance import ledoit_wolf, oas

from flarc.calib.moments import Moments, gram_of_rows, panel_product
from flarc.calib.shrinkage import diagonal_lambda, ledoit_wolf_lambda, shrink, shrink_diagonal
from flarc.calib.statistics import collect_statistics
from flarc.core.targets import find_targets

from _models import SmallCnn, export, im2col_rows, token_batch
from test_factorize import run, with_outputs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_panel_products_are_the_reference_with_the_same_bits_on_any_thread_count(
    dtype, monkeypatch
):
    """``rows^T rows`` (upper triangle, strict lower zero) and ``rows^T partner`` by panels
    against float64 numpy, to the rows' own rounding; the bits are the same for 1-3 workers and
    1 or 2 BLAS threads (panels of 50 columns: uneven, the last one narrower), pinned by a
    limiter of their own or by the caller's, made once."""
    import flarc.calib.moments as moments
    from flarc.core.executor import BlasThreads, blas_threads

    monkeypatch.setattr(moments, "PANEL", 50)
    rng = np.random.default_rng(3)
    rows = (rng.standard_normal((1024, 230)) * rng.uniform(0.1, 10, 230)).astype(dtype)
    partner = rng.standard_normal((1024, 120)).astype(dtype)
    x, p = rows.astype(np.float64), partner.astype(np.float64)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    gram, cross = x.T @ x, x.T @ p
    runs = []
    shared = BlasThreads()
    for workers, threads in [(1, 1), (2, 1), (2, 2), (3, 2)]:
        with blas_threads(threads):
            for blas in (None, shared):
                upper = panel_product(rows, workers=workers, blas=blas)
                runs.append((upper, panel_product(rows, partner, workers, blas)))
    for upper, product in runs:
        assert upper.dtype == product.dtype == np.float64
        assert not np.tril(upper, -1).any()
        np.testing.assert_allclose(upper, np.triu(gram), rtol=0, atol=tol * np.abs(gram).max())
        np.testing.assert_allclose(product, cross, rtol=0, atol=tol * np.abs(cross).max())
        assert upper.tobytes() == runs[0][0].tobytes()
        assert product.tobytes() == runs[0][1].tobytes()
    assert not panel_product(rows[:0]).any() and panel_product(rows[:0]).shape == (230, 230)


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


def test_masked_rows_never_count(tiny_encoder):
    """Padding under a zero mask, filled with garbage tokens, leaves every statistic unchanged."""
    model = tiny_encoder().model
    targets = find_targets(model).targets
    rng = np.random.default_rng(0)
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


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (3, 700), (1030, 513), (64, 1025)])
def test_symmetric_gram_equals_the_general_product(dtype, shape):
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    got = gram_of_rows(x)
    ref = x.astype(np.float64).T @ x.astype(np.float64)
    assert got.dtype == np.float64 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, got.T)  # both triangles, diagonal blocks included
    tol = 1e-13 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(got, ref, atol=tol * max(1.0, np.abs(ref).max()))
    # A Fortran-ordered or strided input gives the same numbers.
    np.testing.assert_array_equal(gram_of_rows(np.asfortranarray(x)), got)


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


def _streamed(x: np.ndarray, sizes: list[int]) -> Moments:
    """Moments of ``x`` added up batch by batch (uneven batches, a one-row batch among them)."""
    total = Moments.zeros(x.shape[1])
    for chunk in np.split(x, np.cumsum(sizes)):
        total.add(Moments.from_rows(chunk))
    return total


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("data", ["correlated", "few-rows", "isotropic"])
def test_streamed_ledoit_wolf_intensity_matches_scikit_learn(centered, data):
    """The intensity from batch-streamed sums (Gram, count, sum ||x||^4 and, centred, sum x and
    sum ||x||^2 x) equals scikit-learn's on the concatenated rows: strictly inside (0, 1) for
    correlated and for few rows (8 rows of 20 features, where the often-quoted formula gives 0),
    and clipped to exactly 1 for isotropic rows (b2 > d2)."""
    rng = np.random.default_rng(2)
    if data == "correlated":
        x = rng.standard_normal((120, 10)) @ rng.standard_normal((10, 10)) + rng.standard_normal(10)
    elif data == "few-rows":
        x = np.random.default_rng(0).standard_normal((8, 20))
    else:
        x = rng.standard_normal((300, 12))
    sizes = [1, 3] if len(x) < 20 else [1, 7, 50]
    streamed = _streamed(x, sizes)
    assert streamed.count == len(x)
    cov = np.cov(x, rowvar=False, bias=True) if centered else x.T @ x / len(x)
    np.testing.assert_allclose(streamed.covariance(centered), cov, rtol=1e-10, atol=1e-12)
    _, lam = ledoit_wolf(x, assume_centered=not centered)
    got = ledoit_wolf_lambda(streamed, centered)
    assert got == pytest.approx(lam, rel=1e-9, abs=1e-12)
    if data == "isotropic":
        assert got == 1.0
    else:
        assert 0.05 < got < 0.99


def test_fixed_and_no_shrinkage():
    x = np.random.default_rng(1).standard_normal((40, 6))
    m = Moments.from_rows(x)
    np.testing.assert_allclose(shrink(m, "none").covariance, x.T @ x / 40)
    fixed = shrink(m, "ledoit-wolf", lam=0.05)
    s = x.T @ x / 40
    np.testing.assert_allclose(fixed.covariance, 0.95 * s + 0.05 * np.trace(s) / 6 * np.eye(6))
    with pytest.raises(ValueError):
        shrink(m, lam=1.5)


def test_a_floor_raises_an_estimated_intensity_only():
    """``floor`` raises Ledoit-Wolf's and OAS's estimates (scikit-learn's) below it and keeps
    those above it; a fixed intensity and 'none' stay as asked."""
    x = np.random.default_rng(1).standard_normal((400, 6)) @ np.diag([3, 2, 1, 1, 0.5, 0.1])
    m = Moments.from_rows(x)
    for method, reference in (("ledoit-wolf", ledoit_wolf), ("oas", oas)):
        _, lam = reference(x, assume_centered=True)
        assert 0 < lam < 0.2
        assert shrink(m, method, floor=0.2).lam == 0.2
        assert shrink(m, method, floor=lam / 2).lam == pytest.approx(lam, rel=1e-9)
    s = x.T @ x / 400
    np.testing.assert_allclose(
        shrink(m, floor=0.2).covariance, 0.8 * s + 0.2 * np.trace(s) / 6 * np.eye(6)
    )
    assert shrink(m, lam=0.01, floor=0.2).lam == 0.01
    assert shrink(m, "none", floor=0.2).lam == 0.0


@pytest.mark.parametrize(("spread", "samples"), [(0.0, 16), (0.3, 16), (1.0, 16), (2.0, 200)])
def test_diagonal_intensity_recovers_most_of_an_exhaustive_scans_gain(spread, samples):
    """Means of squared Gaussians (D's form) around true values of a given log-spread: over 200
    draws, the Ledoit-Wolf intensity's squared error to the truth closes at least 75% of the gap
    between the raw estimate and the best fixed intensity of a scan over [0, 1] (an oracle)."""
    rng = np.random.default_rng(0)
    grid = np.linspace(0, 1, 51)
    scan, chosen = np.zeros(grid.size), 0.0
    for _ in range(200):
        truth = np.exp(spread * rng.standard_normal(64))
        x = truth * rng.standard_normal((samples, 64)) ** 2
        d, variance = x.mean(0), x.var(0, ddof=1) / samples
        chosen += np.sum((shrink_diagonal(d, diagonal_lambda(d, variance)) - truth) ** 2)
        scan += [np.sum(((1 - a) * d + a * d.mean() - truth) ** 2) for a in grid]
    raw, best = scan[0], scan.min()
    assert chosen - best <= 0.25 * (raw - best), (chosen, best, raw, grid[scan.argmin()])


def test_diagonal_intensity_edges():
    d = np.array([1.0, 2.0, 3.0])
    assert diagonal_lambda(np.ones(3), np.ones(3)) == 0.0  # flat: nothing to shrink
    assert diagonal_lambda(d, np.zeros(3)) == 0.0  # exact estimates
    assert diagonal_lambda(d, np.full(3, 10.0)) == 1.0  # all noise
    assert diagonal_lambda(d, np.full(3, 0.5)) == pytest.approx(1.5 / 2.0)
    np.testing.assert_allclose(shrink_diagonal(d, 0.5), [1.5, 2.0, 2.5])
    with pytest.raises(ValueError):
        diagonal_lambda(d, np.ones(2))


def test_shards_cover_the_batches_in_order_within_the_byte_budget(monkeypatch):
    """Shards are consecutive batches, every batch in exactly one, each within the budget of
    stacked float64 rows (a masked statistic counts unmasked positions) and the batch cap,
    and a shard ends only where the next batch would break one of the two."""
    import flarc.calib.statistics as st

    monkeypatch.setattr(st, "SHARD_BYTES", 8 * 100 * 1000)
    plans = [st.StatPlan("a", "x", 100, masked=True), st.StatPlan("b", "y", 100, partner="z")]
    rng = np.random.default_rng(0)
    feeds, sizes = [], []
    for _ in range(40):
        length = int(rng.integers(1, 40))
        mask = (rng.random((2, length)) < 0.7).astype(np.int64)
        feeds.append({"input_ids": np.zeros((2, length), np.int64), "attention_mask": mask})
        # a: 100 wide on the unmasked positions; b: 100 wide with its partner, every position.
        sizes.append(8 * (100 * int(mask.sum()) + 200 * 2 * length))
    ends = st.shard_ends(plans, feeds, "attention_mask")
    assert ends[-1] == len(feeds) and ends == sorted(set(ends))
    for a, b in zip([0, *ends[:-1]], ends, strict=True):
        held = sum(sizes[a:b])
        assert b - a <= st.MAX_SHARD_BATCHES
        assert b - a == 1 or held <= st.SHARD_BYTES
        if b < len(feeds):  # the next batch did not fit
            assert b - a == st.MAX_SHARD_BATCHES or held + sizes[b] > st.SHARD_BYTES
    assert len(ends) < len(feeds)  # some shards stack several batches
