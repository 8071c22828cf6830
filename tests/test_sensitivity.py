"""K-FAC output sensitivities (flarc.calib.sensitivity) against torch autograd on the original
modules, the loss-unit identity on a linear layer, and the default rank rule that uses them."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from scipy.stats import spearmanr
from torch import nn
from torch.nn import functional as F

from flarc.calib.data import CalibrationSet
from flarc.calib.sensitivity import output_gradients
from flarc.calib.shrinkage import diagonal_lambda, shrink_diagonal
from flarc.cli import main
from flarc.core.errors import OptionError
from flarc.core.targets import find_targets
from flarc.pipeline import AnalysisOptions, analyze, compress
from flarc.rewrite.analysis_file import load_analysis, save_analysis
from flarc.rewrite.policy import RankOptions, choose_ranks, output_sensitivity

from _models import example_batch, match_initializers, torch_inputs


def _batches(kind: str) -> list[dict]:
    return [example_batch(kind, seed=20 + i, batch=2 + i % 2, seq=6 - i % 2) for i in range(3)]


def _ref_g2(module: nn.Module, kind: str, batches: list[dict], seed: int = 0) -> dict[str, float]:
    """Mean squared loss gradient per output element of every Linear/Conv2d, by torch autograd
    on the original module, from the definitions in flarc.calib.sensitivity's docstring."""
    ref = copy.deepcopy(module).double()
    layers = {n: m for n, m in ref.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    sums, sizes = dict.fromkeys(layers, 0.0), dict.fromkeys(layers, 0)
    for b, batch in enumerate(batches):
        seen: dict[str, torch.Tensor] = {}
        hooks = [
            m.register_forward_hook(lambda _m, _i, out, n=n, seen=seen: seen.__setitem__(n, out))
            for n, m in layers.items()
        ]
        outs = ref(*torch_inputs(kind, batch))
        for h in hooks:
            h.remove()
        outs = outs if isinstance(outs, tuple) else (outs,)
        mask = batch.get("attention_mask")
        if kind in ("gpt", "cnn"):  # logits: labels from the model's own softmax
            logits = outs[0]
            flat = logits.reshape(-1, logits.shape[-1])
            probs = torch.softmax(flat.detach(), -1).numpy()
            u = np.random.default_rng([seed, b]).random(probs.shape[0])
            labels = [
                np.searchsorted(np.cumsum(p), x * p.sum()) for p, x in zip(probs, u, strict=True)
            ]
            per_row = F.cross_entropy(flat, torch.tensor(labels), reduction="none")
            if mask is None:
                loss = per_row.mean()
            else:
                w = torch.from_numpy(mask.reshape(-1)).double()
                loss = (per_row * w).sum() / w.sum()
        else:  # gaussian on every output, each over its own energy
            loss = 0.0
            for index, y in enumerate(outs):
                rows = y.reshape(-1, y.shape[-1])
                noise = np.random.default_rng([seed, 2, b, index]).standard_normal(rows.shape)
                noise = torch.from_numpy(noise)
                energy = rows.detach().pow(2).mean()
                if y.dim() == 3:
                    w = torch.from_numpy(mask.reshape(-1)).double()[:, None]
                    noise = noise * w
                    energy = (rows.detach().pow(2) * w).sum() / (w.sum() * rows.shape[1])
                loss = loss + (noise * rows).sum() / energy.sqrt()
        grads = torch.autograd.grad(loss, list(seen.values()), allow_unused=True)
        for (n, y), g in zip(seen.items(), grads, strict=True):
            sums[n] += 0.0 if g is None else float(g.pow(2).sum())
            sizes[n] += y.numel()
    return {n: sums[n] / sizes[n] for n in layers}


@pytest.mark.parametrize("kind", ["gpt", "bert", "cnn"])
def test_g2_equals_torch_autograd(kind, exported):
    module, model = exported(kind, "legacy")
    targets = find_targets(model).targets
    batches = _batches(kind)
    got = output_gradients(model, targets, batches, dtype="float64")
    assert got.loss.startswith("sampled" if kind != "bert" else "gaussian")
    ref = _ref_g2(module, kind, batches)
    owner = {i: p for p, found in match_initializers(model, module).items() for i, _ in found}
    checked = 0
    for t in targets:
        param = owner.get(t.weight, "")
        layer = param.rsplit(".", 1)[0]
        if layer in ref and len(t.all_uses) == 1:
            np.testing.assert_allclose(got.g2[t.name], ref[layer], rtol=1e-6)
            checked += 1
    assert checked >= 3


def _linear(n: int = 12, m: int = 10, seed: int = 0) -> onnx.ModelProto:
    w = np.random.default_rng(seed).standard_normal((n, m)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", m])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("two_sided", "spread"), [(False, 0.0), (True, 0.0), (True, 0.3)])
def test_sensitivity_times_relative_error_is_the_loss_estimate(two_sided, spread):
    """One layer whose output is the model's: g = e / sqrt(E_y) exactly. One-sided, sensitivity
    x err(k) = mean(e^2) ||X dW||^2 / E_y; two-sided (A^{1/2} W D^{1/2}), it is
    sum_j d_j ||X dW_j||^2 with d_j the mean of g_j^2, shrunk toward its mean by ``spread``:
    K-FAC's estimate, exactly (no input shrinkage: the whitened identity is exact)."""
    model = _linear()
    rng = np.random.default_rng(1)
    mix = rng.standard_normal((12, 12))
    feeds = [{"x": (rng.standard_normal((64, 12)) @ mix).astype(np.float32)} for _ in range(4)]
    options = AnalysisOptions(
        shrinkage="none", sensitivity_batches=4, two_sided=two_sided, output_shrinkage=spread
    )
    analysis = analyze(model, find_targets(model), CalibrationSet(feeds, [], "t"), options)
    (target,) = analysis.targets
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    g = np.concatenate(
        [
            np.random.default_rng([0, 2, b, 0]).standard_normal((64, 10))
            / np.sqrt(np.mean((f["x"].astype(np.float64) @ w) ** 2))
            for b, f in enumerate(feeds)
        ]
    )
    d = np.mean(g**2, axis=0)
    d = (1 - spread) * d + spread * np.mean(d)
    sensitivity = analysis.sensitivities()[target.name]
    for k in (1, 3, 5):
        a, c = analysis.entries[target.name].spectrum.factors(k)
        err = np.sum((x @ (w - a @ c)) ** 2, axis=0)  # per output channel
        want = np.sum(d * err) if two_sided else np.mean(d) * np.sum(err)
        got = sensitivity * analysis.entries[target.name].spectrum.error(k)
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_the_variance_of_d_comes_from_per_sequence_means():
    """On ``y = x W`` with ``x [B, S, n]`` the Gaussian loss's gradient is known row by row
    (module doc): D's variance is the variance over sequences of their per-channel mean of g^2,
    divided by their number, and the default D is shrunk by its Ledoit-Wolf intensity."""
    n, m = 12, 10
    w = np.random.default_rng(0).standard_normal((n, m)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", m])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((3 + b, 7, n)).astype(np.float32)} for b in range(3)]
    (target,) = find_targets(model).targets
    got = output_gradients(model, [target], feeds)
    means = []
    for b, f in enumerate(feeds):
        y = f["x"].astype(np.float64) @ w.astype(np.float64)
        e = np.random.default_rng([0, 2, b, 0]).standard_normal((y.size // m, m))
        g2 = (e**2 / np.mean(y**2)).reshape(y.shape)
        means.append(g2.mean(axis=1))  # [sequences, m]
    means = np.concatenate(means)
    want = means.var(axis=0, ddof=1) / len(means)
    np.testing.assert_allclose(got.diag_variance[target.name], want, rtol=1e-6)
    # Every channel's g is e_j / sqrt(E_y) with e iid: D's spread is all noise, taken flat.
    assert diagonal_lambda(got.diag[target.name], want) == 1.0
    d = got.diag[target.name]
    np.testing.assert_allclose(got.shrunk_diag()[target.name], np.full(m, d.mean()), rtol=1e-12)
    np.testing.assert_allclose(got.shrunk_diag(0.5)[target.name], shrink_diagonal(d, 0.5))
    np.testing.assert_allclose(got.shrunk_diag(0.0)[target.name], got.diag[target.name])


def _two_layers(n: int = 16, h: int = 12, m: int = 6) -> onnx.ModelProto:
    """``y = (x W1) W2`` with W2's rows of very different norms: fc1's D is far from flat."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((n, h)).astype(np.float32)
    w2 = (rng.standard_normal((h, m)) * np.geomspace(0.1, 10, h)[:, None]).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["z"], name="fc1"),
            helper.make_node("MatMul", ["z", "w2"], ["y"], name="fc2"),
        ],
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", m])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fully_shrunk_output_weights_give_the_one_sided_factors_in_loss_units():
    """``output_shrinkage=1`` weighs every output channel by mean(D): two-sided whitening is then
    one-sided whitening with its singular values scaled by sqrt(mean(D)), the same factors; the
    estimated intensity keeps most of a D whose spread is far above its noise."""
    model = _two_layers()
    rng = np.random.default_rng(4)
    feeds = [{"x": rng.standard_normal((48, 16)).astype(np.float32)} for _ in range(3)]
    data = CalibrationSet(feeds, [], "t")
    targets = find_targets(model)
    one = analyze(model, targets, data, AnalysisOptions(two_sided=False))
    full = analyze(model, targets, data, AnalysisOptions(output_shrinkage=1.0))
    raw = analyze(model, targets, data, AnalysisOptions(output_shrinkage=0.0))
    estimated = analyze(model, targets, data, AnalysisOptions())
    t = next(t for t in targets.targets if t.name == "fc1")
    d = raw.output_diag[t.name]
    assert np.ptp(d) > np.mean(d)  # the estimate itself is far from flat
    np.testing.assert_allclose(full.output_diag[t.name], np.full(d.size, d.mean()))
    kept = np.ptp(estimated.output_diag[t.name]) / np.ptp(d)  # 1 - intensity
    assert 0.9 < kept < 1.0
    s1, s2 = one.entries[t.name].spectrum, full.entries[t.name].spectrum
    np.testing.assert_allclose(s2.sigma, s1.sigma * np.sqrt(np.mean(d)), rtol=1e-9)
    for k in (2, 5):
        np.testing.assert_allclose(
            s2.factors(k)[0] @ s2.factors(k)[1], s1.factors(k)[0] @ s1.factors(k)[1], atol=1e-9
        )


@pytest.mark.parametrize("spread", [-0.1, 1.5, float("nan")])
def test_output_shrinkage_outside_the_unit_interval_is_refused(spread, tiny_encoder, capsys):
    with pytest.raises(OptionError, match="output shrinkage"):
        AnalysisOptions(output_shrinkage=spread)
    case = tiny_encoder()
    calib = str(case.path.parent / "calib.npz")
    args = ["compress", str(case.path), "-o", "x.onnx", "--calib", calib]
    with pytest.raises(SystemExit):
        main([*args, "--output-shrinkage", str(spread)])
    assert "--output-shrinkage: expected a number in [0, 1]" in capsys.readouterr().err


def test_an_analysis_saved_before_d_was_shrunk_loads_as_unshrunk(tiny_encoder, tmp_path):
    """A manifest without ``output_shrinkage`` kept D as estimated: it loads with 0, and its
    spectra under the same key as before."""
    case = tiny_encoder()
    model = onnx.load(str(case.path))
    data = CalibrationSet(case.feeds, [], "t")
    analysis = analyze(model, find_targets(model), data, AnalysisOptions(output_shrinkage=0.0))
    save_analysis(analysis, tmp_path / "old.analysis")
    manifest = tmp_path / "old.analysis" / "manifest.json"
    old = json.loads(manifest.read_text())
    del old["options"]["output_shrinkage"]
    manifest.write_text(json.dumps(old))
    loaded = load_analysis(tmp_path / "old.analysis")
    assert loaded.options.output_shrinkage == 0.0
    assert loaded.options.spectra_key() == analysis.options.spectra_key()
    assert AnalysisOptions().spectra_key() != analysis.options.spectra_key()
    for name, d in analysis.output_diag.items():
        np.testing.assert_array_equal(loaded.output_diag[name], d)


def test_sensitivities_rank_like_measured_output_errors(tiny_encoder):
    """The one-pass estimate orders targets like one model evaluation per target does."""
    case = tiny_encoder()
    model = onnx.load(str(case.path))
    data = CalibrationSet(case.feeds, [], "t")
    analysis = analyze(model, find_targets(model), data, AnalysisOptions())
    estimate = analysis.sensitivities()
    measured = output_sensitivity(
        analysis, model, data.calibration, 0.8, RankOptions(output_batches=4)
    )
    names = [t.name for t in analysis.targets]
    rho = spearmanr([estimate[n] for n in names], [measured[n] for n in names]).statistic
    assert rho > 0.6, rho


def test_default_rule_is_the_weighted_global_allocation(tiny_encoder):
    case = tiny_encoder()
    model = onnx.load(str(case.path))
    analysis = analyze(
        model, find_targets(model), CalibrationSet(case.feeds, [], "t"), AnalysisOptions()
    )
    default = choose_ranks(analysis, RankOptions(budget=0.7))
    weighted = choose_ranks(analysis, RankOptions(allocate="global", budget=0.7))
    unweighted = choose_ranks(
        analysis, RankOptions(allocate="global", budget=0.7, kfac_weighted=False)
    )
    assert {k: c.rank for k, c in default.items()} == {k: c.rank for k, c in weighted.items()}
    assert {k: c.rank for k, c in default.items()} != {k: c.rank for k, c in unweighted.items()}
    result = compress(model, analysis, RankOptions())  # no rule at all: budget 0.8
    assert result.params_after <= 0.8 * result.params_before + 1


def test_cli_compress_without_rule_flags_keeps_80_percent(tiny_encoder, tmp_path, capsys):
    case = tiny_encoder()
    out = tmp_path / "c.onnx"
    assert (
        main(
            [
                "compress",
                str(case.path),
                "-o",
                str(out),
                "--calib",
                str(case.path.parent / "calib.npz"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert out.is_file()
    fewer = float(text.split("target parameters:")[1].split("(")[1].split("%")[0])
    assert 20.0 <= fewer <= 25.0  # the budget is met from below


def test_language_model_batches_run_a_few_sequences_at_a_time(exported):
    """The sampled loss in chunks of one sequence gives the batch's own gradients."""
    _, model = exported("gpt", "legacy")
    targets = find_targets(model).targets
    batches = _batches("gpt")
    whole = output_gradients(model, targets, batches, dtype="float64")
    chunked = output_gradients(model, targets, batches, dtype="float64", max_logits=1)
    for t in targets:
        np.testing.assert_allclose(chunked.g2[t.name], whole.g2[t.name], rtol=1e-10)
        np.testing.assert_allclose(chunked.diag[t.name], whole.diag[t.name], rtol=1e-10)
