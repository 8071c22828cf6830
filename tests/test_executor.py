"""Executors (issue 18): the same statistics, spectra, ranks and model bytes in this process and on
a local Ray cluster (2 CPU workers), a killed worker survived with the same result, a one-line
error without ray, and the torch math of --device against the numpy/LAPACK path."""

from __future__ import annotations

import functools
import sys

import numpy as np
import pytest
import torch

from flarc.calib.data import CalibrationSet, split_holdout
from flarc.calib.moments import Moments
from flarc.calib.shrinkage import shrink
from flarc.cli import main
from flarc.core.errors import BackendError, OptionError
from flarc.core.executor import (
    Compute,
    JobHints,
    LocalExecutor,
    RayExecutor,
    make_executor,
    resolve_device,
)
from flarc.core.targets import find_targets
from flarc.pipeline import analyze, compress
from flarc.rewrite.device import whitened_spectrum_torch
from flarc.rewrite.policy import RankOptions
from flarc.rewrite.spectrum import whitened_svd
from flarc.rewrite.whiten import whitener

import _crash

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster of 2 CPUs for the module (executors join it, never shut it down)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    # Workers import the crash helper by value: tests/ is not on their path.
    ray.cloudpickle.register_pickle_by_value(_crash)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from _models import export_tiny_encoder

    return export_tiny_encoder(tmp_path_factory.mktemp("enc"), batches=8)


def run(case, executor, device: str = "cpu"):
    """Analysis and a compressed model of ``case`` with ``executor``."""
    calib, held = split_holdout(case.feeds, 0.25)
    data = CalibrationSet(calib, held, "test")
    analysis = analyze(
        case.model, find_targets(case.model), data, compute=Compute(executor, device)
    )
    result = compress(case.model, analysis, RankOptions(budget=0.7))
    return analysis, result


def assert_same_moments(a: Moments, b: Moments) -> None:
    assert (a.count, a.sum4) == (b.count, b.sum4)
    for field in ("gram", "sum1", "sum2x"):
        assert getattr(a, field).tobytes() == getattr(b, field).tobytes(), field


@pytest.fixture(scope="module")
def local(case):
    return run(case, LocalExecutor())


def assert_same_run(mine, reference) -> None:
    """Statistics, spectra and output model bit for bit; ranks equal."""
    (a, ra), (b, rb) = mine, reference
    assert list(a.stats) == list(b.stats)
    for key in a.stats:
        assert_same_moments(a.stats[key], b.stats[key])
        assert_same_moments(a.heldout_stats[key], b.heldout_stats[key])
    for name, ea in a.entries.items():
        eb = b.entries[name]
        for field in ("sigma", "basis", "vt"):
            x, y = np.asarray(getattr(ea.spectrum, field)), np.asarray(getattr(eb.spectrum, field))
            assert x.tobytes() == y.tobytes(), (name, field)
    assert {k: c.rank for k, c in ra.ranks.items()} == {k: c.rank for k, c in rb.ranks.items()}
    assert ra.model.SerializeToString() == rb.model.SerializeToString()


def test_ray_gives_the_local_bits(ray_cluster, case, local):
    with RayExecutor() as executor:
        assert executor.workers == 2 and not executor.started
        mine = run(case, executor)
    assert ray_cluster.is_initialized()  # joined, not shut down
    assert_same_run(mine, local)


class Crashing(RayExecutor):
    """Kills the worker of the first calibration shard and of the first factorization."""

    def __init__(self, folder) -> None:
        super().__init__()
        self.folder = folder

    def map(self, fn, jobs, hints=None, gpus=0.0):
        crash = functools.partial(_crash.crash_once, str(self.folder / "map"), fn)
        return super().map(crash, jobs, hints, gpus)

    def stream(self, setup, fn, jobs):
        crash = functools.partial(_crash.crash_once, str(self.folder / "stream"), fn)
        return super().stream(setup, crash, jobs)


def test_killed_workers_are_retried_with_the_same_result(ray_cluster, case, local, tmp_path):
    with Crashing(tmp_path) as executor:
        mine = run(case, executor)
    assert (tmp_path / "map").exists() and (tmp_path / "stream").exists()  # both did die
    assert_same_run(mine, local)


def test_cli_analyze_on_ray_matches_local(ray_cluster, case, tmp_path):
    from flarc.rewrite.analysis_file import load_analysis

    calib = case.path.parent / "calib.npz"
    outs = {}
    for name in ("local", "ray"):
        outs[name] = tmp_path / f"{name}.analysis"
        argv = ["analyze", str(case.path), "-o", str(outs[name]), "--calib", str(calib),
                "--batch-size", "4", "--executor", name, "--workers", "2"]  # fmt: skip
        assert main(argv) == 0
    a, b = load_analysis(outs["local"]), load_analysis(outs["ray"])
    for key in a.stats:
        assert_same_moments(a.stats[key], b.stats[key])
    for name, e in a.entries.items():
        assert e.spectrum.sigma.tobytes() == b.entries[name].spectrum.sigma.tobytes()


def test_missing_ray_is_a_one_line_error(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if not installed
    calib = case.path.parent / "calib.npz"
    argv = ["analyze", str(case.path), "-o", str(tmp_path / "a"), "--calib", str(calib),
            "--executor", "ray"]  # fmt: skip
    assert main(argv) != 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("flarc: error:")]
    assert len(lines) == 1 and "pip install ray" in lines[0], lines


def test_unreachable_ray_address_is_a_one_line_error():
    from flarc.core.executor import _check_reachable

    with pytest.raises(BackendError, match="no Ray cluster there"):
        _check_reachable("127.0.0.1:1")
    _check_reachable("auto")  # left to Ray


def test_option_errors():
    with pytest.raises(OptionError, match="--ray-address"):
        make_executor("local", "auto")
    with pytest.raises(OptionError, match="--executor"):
        make_executor("dask")
    with pytest.raises(OptionError, match="--device"):
        resolve_device("tpu")
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if CUDA else "cpu")
    if not CUDA:
        with pytest.raises(BackendError, match="no CUDA GPU"):
            resolve_device("cuda")


def square(x: int) -> int:
    return x * x


def test_local_map_runs_largest_first_and_stream_in_order():
    jobs = [(i,) for i in range(6)]
    hints = [JobHints(cost=c) for c in (1, 5, 3, 9, 2, 7)]
    got = list(LocalExecutor(1).map(square, jobs, hints))
    assert [i for i, _ in got] == [3, 5, 1, 2, 4, 0]
    assert all(r == i * i for i, r in got)
    assert sorted(LocalExecutor(2).map(square, jobs, hints)) == [(i, i * i) for i in range(6)]
    out = list(LocalExecutor().stream(lambda: 10, lambda s, j: s + j, range(5)))
    assert out == [10, 11, 12, 13, 14]


# -- the torch math of --device ---------------------------------------------------------------

SIGMA_RTOL = 1e-10  # the singular values
WEIGHT_RTOL = 1e-8  # the rank-k weight basis_k diag(s_k) vt_k, relative to the weight's norm


def problem(n: int, m: int, rows: int, seed: int = 0, low_rank: int | None = None):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n)) * rng.uniform(0.1, 3.0, n)
    b = rng.standard_normal((n, m))
    if low_rank is not None:
        b = b[:, :low_rank] @ rng.standard_normal((low_rank, m))
    return b, shrink(Moments.from_rows(x)).covariance


def rank_k(spectrum, k: int) -> np.ndarray:
    basis, vt = np.asarray(spectrum.basis), np.asarray(spectrum.vt)
    return basis[:, :k] * spectrum.sigma[:k] @ vt[:k]


def assert_close(b, h, method: str, max_rank, device: str) -> None:
    w, fell_back = whitener(h, method, "t")
    ref = whitened_svd(b, w, max_rank)
    got, kind, fell = whitened_spectrum_torch(b, h, method, "t", max_rank, device)
    assert (kind, fell) == (w.kind, fell_back)
    np.testing.assert_allclose(got.sigma, ref.sigma, rtol=SIGMA_RTOL, atol=1e-12 * ref.sigma[0])
    assert got.max_rank == ref.max_rank
    for k in (1, ref.max_rank // 2, ref.max_rank):
        diff = np.linalg.norm(rank_k(got, k) - rank_k(ref, k)) / np.linalg.norm(b)
        assert diff < WEIGHT_RTOL, (method, k, diff)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["cholesky", "eig", "diag", "none"])
@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_torch_spectrum_matches_numpy(device, method, shape):
    if device == "cuda" and not CUDA:
        pytest.skip("no CUDA GPU")
    b, h = problem(*shape, rows=400)
    assert_close(b, h, method, 30, device)
    # Every direction, with singular values far below the largest: the SVD route of both.
    b, h = problem(*shape, rows=400, low_rank=5)
    assert_close(b, h, method, None, device)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_cholesky_falls_back_like_numpy(device):
    if device == "cuda" and not CUDA:
        pytest.skip("no CUDA GPU")
    b, h = problem(40, 30, rows=400)
    h[:, 0] = h[0, :] = 0.0  # indefinite after the next line
    h[0, 0] = -1e-3
    assert_close(b, h, "cholesky", 16, device)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_cuda_analysis_matches_cpu(case, local):
    analysis, result = run(case, LocalExecutor(), "cuda")
    for name, e in analysis.entries.items():
        ref = local[0].entries[name].spectrum
        np.testing.assert_allclose(e.spectrum.sigma, ref.sigma, rtol=SIGMA_RTOL, atol=1e-12)
    assert {k: c.rank for k, c in result.ranks.items()} == {
        k: c.rank for k, c in local[1].ranks.items()
    }


@pytest.mark.parametrize("command", [["analyze"], ["compress"], ["export", "buckets"]])
def test_commands_take_the_compute_flags(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--executor", "--ray-address", "--workers", "--device"):
        assert flag in text, (command, flag)


def test_buckets_on_ray_are_the_local_bytes(ray_cluster, tiny_lm, tmp_path):
    from flarc.pipeline import build_buckets

    from _models import lm_token_batches

    data = CalibrationSet(lm_token_batches(2), [], "test")
    budgets = [1.0, 0.8, 0.6, 0.4]  # what the tiny_lm fixture built in process
    with RayExecutor() as executor:
        result = build_buckets(
            tiny_lm["model"],
            tiny_lm["targets"],
            data,
            budgets,
            tmp_path / "ray.buckets",
            compute=Compute(executor),
        )
    assert result.manifest.data["buckets"] == tiny_lm["result"].manifest.data["buckets"]
    mine = {p.name: p.read_bytes() for p in (tmp_path / "ray.buckets").iterdir() if p.is_file()}
    theirs = {p.name: p.read_bytes() for p in tiny_lm["folder"].iterdir() if p.is_file()}
    assert mine.keys() == theirs.keys()
    for name in mine:
        if name != "manifest.json":  # it records where it was written
            assert mine[name] == theirs[name], name
