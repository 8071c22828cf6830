"""Fisher importance from ONNX-graph gradients against torch autograd on the original modules."""

from __future__ import annotations

import argparse
import copy
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.nn import functional as F

from flarc.calib.fisher import (
    LABEL_ROWS,
    LOSSES,
    _sampled_rows,
    fisher_importance,
    resolve_loss,
    weight_gradients,
)
from flarc.calib.onnx_torch import TorchGraph
from flarc.cli import build_parser
from flarc.core.errors import DataError, ModelError
from flarc.core.targets import Weights, find_targets

from _models import KIND_OUTPUTS, example_batch, match_initializers, torch_inputs

EXPORTERS = ["legacy", "dynamo"]


def _batches(kind: str) -> list[dict]:
    """Three batches of different shapes, padded where the model takes a mask."""
    return [
        example_batch(kind, seed=10, batch=2, seq=6),
        example_batch(kind, seed=11, batch=3, seq=5),
        example_batch(kind, seed=12, batch=2, seq=7),
    ]


# ---------------------------------------------------------------------------------------------
# torch references, written from the definitions in flarc.calib.fisher's docstring


def _ref_labels(logits: torch.Tensor, seed: int, batch_index: int) -> torch.Tensor:
    probs = torch.softmax(logits.detach(), -1).reshape(-1, logits.shape[-1]).numpy()
    u = np.random.default_rng([seed, batch_index]).random(probs.shape[0])
    labels = [np.searchsorted(np.cumsum(p), ui * p.sum()) for p, ui in zip(probs, u, strict=True)]
    return torch.tensor(labels, dtype=torch.int64).reshape(logits.shape[:-1])


def test_sampled_labels_are_the_inverse_cdf_draws_of_the_softmax():
    """Block by block, unnormalised and bisected: the same labels as counting the float64
    softmax's cumulative probabilities below each row's draw (rows across several blocks, the
    draws consumed in row order; a peaked row and a flat one included)."""
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((2 * LABEL_ROWS + 5, 1000)) * 4).astype(np.float32)
    logits[0] = -50.0
    logits[0, 7] = 50.0  # all the mass on class 7
    logits[1] = 0.0  # uniform
    probs = torch.softmax(torch.from_numpy(logits).double(), -1).numpy()
    u = np.random.default_rng([5, 2]).random(len(logits))
    cdf = np.cumsum(probs, axis=-1)
    expected = np.minimum((cdf < u[:, None] * cdf[:, -1:]).sum(-1), logits.shape[1] - 1)
    got = _sampled_rows(torch.from_numpy(logits), 5, 2)
    np.testing.assert_array_equal(got, expected)
    assert got[0] == 7 and len(set(got[1:].tolist())) > 1
    np.testing.assert_array_equal(_sampled_rows(torch.from_numpy(logits[3:]), 0, 0, u[3:]), got[3:])


def _ref_loss(
    loss: str, outputs: dict[str, torch.Tensor], batch: dict, seed: int, b: int
) -> torch.Tensor:
    mask = torch.from_numpy(batch["attention_mask"]).bool() if "attention_mask" in batch else None
    if loss == "lm":
        logits, ids = outputs["logits"], torch.from_numpy(batch["input_ids"])
        keep = mask[:, :-1] & mask[:, 1:]
        return F.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep])
    if loss == "sampled":
        logits = outputs["logits"]
        labels = _ref_labels(logits, seed, b)
        if logits.dim() == 3:
            return F.cross_entropy(logits[mask], labels[mask])
        return F.cross_entropy(logits, labels)
    total = torch.zeros((), dtype=torch.float64)
    for j, y in enumerate(outputs.values()):
        d = y.shape[-1]
        cols = min(d, 64)
        r = np.random.default_rng([seed, 1, j]).standard_normal((d, cols)) / math.sqrt(cols)
        per_row = 0.5 * (y @ torch.from_numpy(r)).pow(2).sum(-1)
        total = total + (per_row[mask].mean() if y.dim() == 3 else per_row.mean())
    return total


def _reference_alpha(module, model, kind, targets, batches, loss, seed=0):
    """alpha_t = sum_b sum (dL_b/dW * W)^2 on the double torch module; targets whose weight is a
    folded copy of a parameter stored more than once (a tied lm head) are left out."""
    ref = copy.deepcopy(module).double()
    matches = match_initializers(model, ref)
    owner = {i: p for p, found in matches.items() for i, _ in found if len(found) == 1}
    params = dict(ref.named_parameters())
    alpha = {t.name: 0.0 for t in targets if t.weight in owner}
    for b, batch in enumerate(batches):
        ref.zero_grad()
        outs = ref(*torch_inputs(kind, batch))
        outs = outs if isinstance(outs, tuple) else (outs,)
        named = dict(zip(KIND_OUTPUTS[kind], outs, strict=True))
        _ref_loss(loss, named, batch, seed, b).backward()
        for t in targets:
            if t.weight in owner:
                p = params[owner[t.weight]]
                alpha[t.name] += float(((p.grad * p.detach()) ** 2).sum())
    return alpha


def _assert_alpha(result, reference, targets):
    assert len(reference) >= len(targets) - 1 and len(reference) >= 3
    for name, ref in reference.items():
        assert ref > 0
        assert result.alpha[name] == pytest.approx(ref, rel=1e-5), name


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_lm_fisher_matches_torch(exported, exporter):
    module, model = exported("gpt", exporter)
    targets = find_targets(model).targets
    batches = _batches("gpt")
    result = fisher_importance(model, targets, batches)
    assert result.loss == "lm" and result.outputs == ("logits",) and result.batches == 3
    assert "\n" not in result.description and "lm" in result.description
    assert set(result.alpha) == {t.name for t in targets}
    _assert_alpha(result, _reference_alpha(module, model, "gpt", targets, batches, "lm"), targets)


def test_tied_weight_gradients_per_batch(exported):
    """The dynamo export keeps embedding and lm head as one initializer: its per-batch gradient is
    torch's gradient of the tied parameter (the sum over both uses)."""
    module, model = exported("gpt", "dynamo")
    (tied,) = [i for i, _ in match_initializers(model, module)["wte.weight"]]
    batches = _batches("gpt")
    grads = weight_gradients(model, [tied], batches, loss="lm")
    assert len(grads[tied]) == len(batches)
    ref = copy.deepcopy(module).double()
    for b, batch in enumerate(batches):
        ref.zero_grad()
        logits = ref(*torch_inputs("gpt", batch))
        _ref_loss("lm", {"logits": logits}, batch, 0, b).backward()
        expected = ref.wte.weight.grad.numpy()
        np.testing.assert_allclose(grads[tied][b], expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_projection_fisher_matches_torch(exported, exporter):
    module, model = exported("bert", exporter)
    targets = find_targets(model).targets
    batches = _batches("bert")
    result = fisher_importance(model, targets, batches, seed=3)
    assert result.loss == "projection"
    assert result.outputs == ("last_hidden_state", "pooler_output")
    reference = _reference_alpha(module, model, "bert", targets, batches, "projection", seed=3)
    _assert_alpha(result, reference, targets)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_sampled_fisher_matches_torch(exported, exporter):
    module, model = exported("cnn", exporter)
    targets = find_targets(model).targets
    batches = _batches("cnn")
    result = fisher_importance(model, targets, batches, seed=5)
    assert result.loss == "sampled" and result.outputs == ("logits",)
    reference = _reference_alpha(module, model, "cnn", targets, batches, "sampled", seed=5)
    _assert_alpha(result, reference, targets)


@pytest.mark.parametrize("loss", ["sampled", "projection"])
def test_explicit_losses_on_a_decoder(exported, loss):
    """[B, S, V] logits under the sampled and projection losses, padded positions excluded."""
    module, model = exported("gpt", "legacy")
    targets = find_targets(model).targets
    batches = _batches("gpt")
    result = fisher_importance(model, targets, batches, loss=loss, seed=1)
    assert result.loss == loss
    reference = _reference_alpha(module, model, "gpt", targets, batches, loss, seed=1)
    _assert_alpha(result, reference, targets)


def test_float32_interpreter_is_close(exported):
    _, model = exported("cnn", "legacy")
    targets = find_targets(model).targets
    r64 = fisher_importance(model, targets, _batches("cnn"))
    r32 = fisher_importance(model, targets, _batches("cnn"), dtype="float32")
    for name, value in r64.alpha.items():
        assert r32.alpha[name] == pytest.approx(value, rel=1e-3)


def test_auto_dtype_is_float32_only_for_large_models(exported, monkeypatch):
    import flarc.calib.fisher as fisher
    import flarc.core.modelio

    _, model = exported("cnn", "legacy")
    assert fisher.resolve_dtype("auto", model) == "float64"
    assert fisher.resolve_dtype("float32", model) == "float32"
    targets = find_targets(model).targets
    r32 = fisher_importance(model, targets, _batches("cnn"), dtype="float32")
    monkeypatch.setattr(flarc.core.modelio, "LARGE_MODEL_BYTES", 0)
    assert fisher.resolve_dtype("auto", model) == "float32"
    assert fisher_importance(model, targets, _batches("cnn")).alpha == r32.alpha


def test_deterministic_given_seed(exported):
    _, model = exported("cnn", "legacy")
    targets = find_targets(model).targets
    first = fisher_importance(model, targets, _batches("cnn"), seed=7)
    again = fisher_importance(model, targets, _batches("cnn"), seed=7)
    other = fisher_importance(model, targets, _batches("cnn"), seed=8)
    assert first.alpha == again.alpha
    assert first.alpha != other.alpha


def test_masks_fully_padded_batch_and_explicit_mask_input(exported):
    _, model = exported("gpt", "legacy")
    targets = find_targets(model).targets
    batches = _batches("gpt")
    padded = example_batch("gpt", seed=13)
    padded["attention_mask"][:] = 0
    base = fisher_importance(model, targets, batches)
    with_padding = fisher_importance(model, targets, [*batches[:1], padded, *batches[1:]])
    assert with_padding.batches == 3
    for name, value in base.alpha.items():
        assert with_padding.alpha[name] == pytest.approx(value, rel=1e-12)
    # The mask may be any batch entry named by mask_input; here one the model does not take.
    renamed = [{**b, "keep": b["attention_mask"]} for b in batches]
    for b in renamed:
        b["attention_mask"] = np.ones_like(b["attention_mask"])
    named = fisher_importance(model, targets, renamed, mask_input="keep")
    unmasked = fisher_importance(model, targets, [dict(b) for b in renamed])
    first = targets[0].name
    assert named.alpha[first] != pytest.approx(unmasked.alpha[first], rel=1e-6)
    with pytest.raises(DataError, match="mask input 'nope'"):
        fisher_importance(model, targets, batches, mask_input="nope")


def test_auto_loss_rules():
    ids = {"input_ids": np.array([[1, 2, 3]], dtype=np.int64)}
    t = torch.zeros
    assert resolve_loss("auto", {"logits": t(1, 3, 8)}, ids).kind == "lm"
    # Hidden states with a last axis that could index the ids are still not logits.
    assert resolve_loss("auto", {"last_hidden_state": t(1, 3, 8)}, ids).kind == "projection"
    assert resolve_loss("auto", {"logits": t(1, 3, 8)}, {"x": np.zeros(3)}).kind == "sampled"
    assert resolve_loss("auto", {"emb": t(1, 8), "logits": t(1, 5)}, {}).outputs == ("logits",)
    plan = resolve_loss("auto", {"a": t(2, 4), "n": torch.zeros(2, dtype=torch.int64)}, {})
    assert plan.kind == "projection" and plan.outputs == ("a",)
    assert resolve_loss("lm", {"out": t(1, 3, 8)}, ids).outputs == ("out",)
    with pytest.raises(DataError, match="input_ids"):
        resolve_loss("lm", {"logits": t(1, 3, 8)}, {})
    with pytest.raises(ModelError, match="Fisher loss 'lm' needs an output"):
        resolve_loss("lm", {"logits": t(1, 3, 2)}, ids)
    with pytest.raises(ModelError, match="'sampled'"):
        resolve_loss("sampled", {"y": t(4)}, {})
    with pytest.raises(ValueError, match="unknown Fisher loss"):
        resolve_loss("mse", {"y": t(4)}, {})


def _fisher_loss_options(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """``(command path, --fisher-loss action)`` for every (sub)command that offers it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _fisher_loss_options(sub, (*path, name))
        elif "--fisher-loss" in action.option_strings:
            yield path, action


def test_cli_offers_exactly_the_library_losses():
    """The CLI's ``--fisher-loss`` choices are written apart from ``LOSSES``: every command that
    offers the option offers exactly the losses the library resolves (no name the library would
    refuse, none it knows left out), its default among them, and its help explains each one."""
    found = dict(_fisher_loss_options(build_parser()))
    assert {("analyze",), ("compress",)} <= set(found)
    for path, action in found.items():
        assert sorted(action.choices) == sorted(LOSSES), path
        assert action.default in LOSSES, path
        assert all(f"{name} " in action.help for name in LOSSES), path


def test_errors(exported):
    _, model = exported("cnn", "legacy")
    targets = find_targets(model).targets
    with pytest.raises(DataError, match="no calibration batch"):
        fisher_importance(model, targets, [])
    with pytest.raises(ModelError, match="no targets"):
        fisher_importance(model, [], _batches("cnn"))
    with pytest.raises(DataError, match="input_ids"):
        fisher_importance(model, targets, _batches("cnn"), loss="lm")
    with pytest.raises(DataError, match="model input 'pixel_values' is missing"):
        fisher_importance(model, targets, [{"x": np.zeros(3, np.float32)}])


# ---------------------------------------------------------------------------------------------
# weights stored as fp16 behind a Cast, or int8 behind DequantizeLinear (design.md section 2)


def _mlp(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``y = tanh(x w1 + b1) w2t^T``: w2t is read through a Transpose (a layout node)."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["h2"]),
        helper.make_node("Tanh", ["h2"], ["h3"]),
        helper.make_node("Transpose", ["w2t"], ["w2"], perm=[1, 0]),
        helper.make_node("MatMul", ["h3", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 6])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _mlp_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    return {
        "w1": rng.standard_normal((8, 12)).astype(np.float32),
        "b1": rng.standard_normal(12).astype(np.float32),
        "w2t": rng.standard_normal((6, 12)).astype(np.float32),
    }


# The quantization axis of each weight: its output channels.
_AXES = {"w1": 1, "w2t": 0}


def _stored(form: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The MLP with w1 and w2t stored as ``form`` (fp16 | qdq) behind storage nodes that output
    the old names, and the effective float weights (what those nodes compute)."""
    weights = _mlp_weights()
    model = _mlp(weights)
    effective = dict(weights)
    inits, nodes = [numpy_helper.from_array(weights["b1"], "b1")], []
    for name, axis in _AXES.items():
        w = weights[name]
        if form == "fp16":
            inits.append(numpy_helper.from_array(w.astype(np.float16), f"{name}_fp16"))
            nodes.append(helper.make_node("Cast", [f"{name}_fp16"], [name], to=TensorProto.FLOAT))
            effective[name] = w.astype(np.float16).astype(np.float32)
            continue
        other = tuple(i for i in range(w.ndim) if i != axis)
        scale = (np.abs(w).max(axis=other) / 100).astype(np.float32)
        shape = [-1 if i == axis else 1 for i in range(w.ndim)]
        # w2t gets a zero point too.
        zp = np.arange(scale.size, dtype=np.int8) - 2 if name == "w2t" else np.zeros(0, np.int8)
        zp_b = zp.reshape(shape).astype(np.float32) if zp.size else np.float32(0)
        q = np.clip(np.round(w / scale.reshape(shape)) + zp_b, -128, 127).astype(np.int8)
        inits += [
            numpy_helper.from_array(q, f"{name}_q"),
            numpy_helper.from_array(scale, f"{name}_scale"),
        ]
        inputs = [f"{name}_q", f"{name}_scale"]
        if zp.size:
            inits.append(numpy_helper.from_array(zp, f"{name}_zp"))
            inputs.append(f"{name}_zp")
        nodes.append(helper.make_node("DequantizeLinear", inputs, [name], axis=axis))
        effective[name] = ((q.astype(np.float32) - zp_b) * scale.reshape(shape)).astype(np.float32)
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    old = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([*nodes, *old])
    onnx.checker.check_model(model)
    return model, effective


def _mlp_batches() -> list[dict]:
    rng = np.random.default_rng(9)
    return [{"x": rng.standard_normal((b, 8)).astype(np.float32)} for b in (3, 5, 2)]


def _torch_mlp(effective: dict[str, np.ndarray], batches: list[dict], seed: int):
    """Per batch, torch autograd's gradients of the projection loss w.r.t. w1 and w2t (float64),
    and alpha per weight."""
    w = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in effective.items()}
    grads, alpha = [], {"w1": 0.0, "w2t": 0.0}
    for b, batch in enumerate(batches):
        x = torch.from_numpy(batch["x"]).double()
        y = torch.tanh(x @ w["w1"] + w["b1"]) @ w["w2t"].T
        loss = _ref_loss("projection", {"y": y}, batch, seed, b)
        g1, g2 = torch.autograd.grad(loss, [w["w1"], w["w2t"]])
        grads.append({"w1": g1.numpy(), "w2t": g2.numpy()})
        alpha["w1"] += float(((g1 * w["w1"].detach()) ** 2).sum())
        alpha["w2t"] += float(((g2 * w["w2t"].detach()) ** 2).sum())
    return grads, alpha


@pytest.mark.parametrize("form", ["fp16", "qdq"])
def test_fisher_on_stored_weights_reads_the_anchor(form):
    """Fisher of a model whose weights sit behind Cast or DequantizeLinear equals that of the float
    model holding the effective weights, and torch autograd on the effective weights."""
    model, effective = _stored(form)
    targets = find_targets(model).targets
    assert [(t.name, t.anchor) for t in targets] == [("fc1", "w1"), ("fc2", "w2t")]
    assert {t.storage.kind for t in targets} == {"cast" if form == "fp16" else "qdq"}
    store = Weights(model)
    for t in targets:
        np.testing.assert_array_equal(store.anchor(t), effective[t.anchor])
    batches = _mlp_batches()
    result = fisher_importance(model, targets, batches, seed=2)
    dense = _mlp(effective)
    expected = fisher_importance(dense, find_targets(dense).targets, batches, seed=2)
    assert result.loss == expected.loss == "projection"
    assert set(result.alpha) == {"fc1", "fc2"}
    ref_grads, ref_alpha = _torch_mlp(effective, batches, seed=2)
    for t in targets:
        assert result.alpha[t.name] > 0
        assert result.alpha[t.name] == pytest.approx(expected.alpha[t.name], rel=1e-9)
        assert result.alpha[t.name] == pytest.approx(ref_alpha[t.anchor], rel=1e-9)
    values = {t.anchor: store.anchor(t) for t in targets}
    grads = weight_gradients(model, list(values), batches, seed=2, values=values)
    for b, ref in enumerate(ref_grads):
        for name, g in ref.items():
            np.testing.assert_allclose(grads[name][b], g, rtol=1e-9, atol=1e-12)


def test_anchor_param_needs_a_value():
    """A param that is a node output is a Parameter only with a value; the storage nodes
    upstream of it are then never run (and, DequantizeLinear being an op of the interpreter,
    running them instead gives the same outputs)."""
    model, effective = _stored("qdq")
    with pytest.raises(ModelError, match=r"^weight 'w1' is not a constant tensor") as info:
        TorchGraph(model, params=["w1"])
    assert "\n" not in str(info.value)
    with pytest.raises(ModelError, match="weight 'nope' is not a constant tensor"):
        TorchGraph(model, params=["nope"], values={"w1": effective["w1"]})
    batch = _mlp_batches()[0]
    with torch.no_grad():
        run = TorchGraph(model).run(batch)
        given = TorchGraph(model, params=["w1"], values={"w1": effective["w1"]}).run(batch)
    for name in run:
        torch.testing.assert_close(run[name], given[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelError, match="weight 'w2t'"):
        weight_gradients(model, ["w1", "w2t"], _mlp_batches(), values={"w1": effective["w1"]})
    graph = TorchGraph(model, params=["w1", "w2t"], values=effective)
    assert torch.equal(graph.params["w1"], torch.from_numpy(effective["w1"]).double())
    assert "w1_q" not in graph.constants  # read only by the storage nodes, never converted
