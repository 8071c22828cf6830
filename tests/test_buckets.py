"""Rank buckets: allocation, a valid standalone ONNX model per bucket, weights stored once with
bucket factors as row prefixes, and refusal of tampered folders."""

from __future__ import annotations

import argparse
import itertools
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from flarc.cli import build_parser
from flarc.core.errors import FlarcError, ModelError
from flarc.core.targets import Target, constant_tensors, weight_matrix
from flarc.export.buckets import parse_budgets, plan_buckets, read_factor_rows
from flarc.export.hf import example_inputs, layout_from_onnx
from flarc.export.manifest import load_manifest
from flarc.export.runtime import Generator
from flarc.rewrite.allocate import fisher_ranks, global_ranks
from flarc.rewrite.spectrum import Spectrum

from _models import lm_token_batches

transformers = pytest.importorskip("transformers")
VOCAB = 256  # save_tiny_qwen2's


def test_export_hf_layout_and_logits(tiny_lm):
    model = tiny_lm["model"]
    names = [i.name for i in model.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.1.value" in names
    assert [o.name for o in model.graph.output][:2] == ["logits", "present.0.key"]
    assert tiny_lm["summary"]["max_abs_logits_error"] < 1e-4
    layout = layout_from_onnx(model)
    assert (layout.num_layers, layout.kv_heads, layout.head_dim) == (2, 2, 16)


def _target(name: str, n: int, m: int) -> Target:
    return Target(name, "MatMul", "x", "y", f"{name}.w", (n, m), n, m, False, "float32")


def _plan_targets() -> list[Target]:
    return [
        _target("a", 64, 64),
        _target("b", 64, 96),
        _target("c", 32, 128),
        _target("d", 128, 128),
    ]


def _spent(targets: list[Target], plan) -> int:
    return sum(t.params if (r := plan.ranks[t.name]) is None else t.rank_params(r) for t in targets)


def _check_spent(targets: list[Target], plan) -> None:
    dense = sum(t.params for t in targets)
    ranks = [(t, plan.ranks[t.name]) for t in targets]
    assert all(r % 8 == 0 and 8 <= r < t.k_equiv for t, r in ranks if r is not None)
    spent = _spent(targets, plan)
    assert plan.budget * dense - 8 * sum(t.n + t.m for t in targets) <= spent <= plan.budget * dense


def test_fisher_bucket_plans_follow_the_one_allocator():
    targets = _plan_targets()
    alpha = {"a": 10.0, "b": 1.0, "c": 0.0, "d": 5.0}
    plans = plan_buckets(targets, [0.4, 1.0, 0.8, 0.6], align=8, alpha=alpha)
    assert [p.budget for p in plans] == [1.0, 0.8, 0.6, 0.4]
    assert all(r is None for r in plans[0].ranks.values())  # 1.0 keeps the dense targets
    for plan in plans[1:]:
        assert plan.ranks == {
            k: c.rank for k, c in fisher_ranks(targets, alpha, plan.budget, 8).items()
        }
        _check_spent(targets, plan)
    with pytest.raises(FlarcError):
        parse_budgets("1.0,1.2")
    assert parse_budgets("0.4,1,0.8") == [1.0, 0.8, 0.4]


def _plan_spectra(targets: list[Target]) -> dict[str, Spectrum]:
    rng = np.random.default_rng(0)
    return {
        t.name: Spectrum(
            np.sort(rng.random(min(t.n, t.m)) ** p)[::-1], np.zeros((t.n, 1)), np.zeros((1, t.m))
        )
        for t, p in zip(targets, (1, 3, 6, 2), strict=True)
    }


def _stored_twice(targets: list[Target], plans) -> int:
    """Parameters of targets dense in one bucket and factorized in another (their largest rank)."""
    out = 0
    for t in targets:
        ranks = [p.ranks[t.name] for p in plans]
        if None in ranks and any(r is not None for r in ranks):
            out += t.rank_params(max(r for r in ranks if r is not None))
    return out


@pytest.mark.parametrize("spare", [0.0, 0.05, 0.3, 10.0])
def test_global_bucket_plans_are_nested_and_spend_their_budget(spare):
    """The default: the weighted global allocation per bucket; a target's rank never grows from
    a bucket to the next smaller one (dense counts as the largest rank, and a factorized target
    never turns dense again), so factors are row prefixes; the budget met from below; weights
    stored twice within ``spare``; the smallest bucket is compress's allocation at its budget."""
    targets = _plan_targets()
    spectra = _plan_spectra(targets)
    weights = {"a": 1.0, "b": 5.0, "c": 0.2, "d": 2.0}
    budgets = [0.75, 0.6, 0.45, 0.3]
    plans = plan_buckets(targets, budgets, 8, spectra, weights, spare=spare)
    assert [p.budget for p in plans] == budgets
    for big, small in itertools.pairwise(plans):
        for t in targets:
            b, s = big.ranks[t.name], small.ranks[t.name]
            assert b is None or (s is not None and s <= b)
    for plan in plans:
        _check_spent(targets, plan)
    dense = sum(t.params for t in targets)
    assert _stored_twice(targets, plans) <= spare * 0.75 * dense
    want = global_ranks(targets, spectra, 0.3, 8, weights=weights)
    assert plans[-1].ranks == {name: c.rank for name, c in want.items()}
    # a larger bucket never has a larger weighted error
    errors = [
        sum(weights[t.name] * spectra[t.name].error(r) for t in targets if (r := p.ranks[t.name]))
        for p in plans
    ]
    assert errors == sorted(errors)


def test_spare_trades_memory_for_dense_targets():
    """Without spare nothing is stored twice (a target dense in the largest bucket is dense in
    every bucket). With unlimited spare, larger buckets turn factorized targets dense, and no
    bucket has a larger weighted error, one a smaller."""
    targets = _plan_targets()
    spectra = _plan_spectra(targets)
    weights = {"a": 1.0, "b": 5.0, "c": 0.2, "d": 2.0}
    budgets = [0.75, 0.6, 0.45, 0.3]
    tight = plan_buckets(targets, budgets, 8, spectra, weights, spare=0.0)
    assert _stored_twice(targets, tight) == 0
    loose = plan_buckets(targets, budgets, 8, spectra, weights, spare=10.0)
    assert _stored_twice(targets, loose) > 0

    def error(plan) -> float:
        return sum(
            weights[t.name] * spectra[t.name].error(r) for t in targets if (r := plan.ranks[t.name])
        )

    assert all(error(a) <= error(b) + 1e-12 for a, b in zip(loose, tight, strict=True))
    assert any(error(a) < error(b) for a, b in zip(loose, tight, strict=True))


def test_every_bucket_is_a_valid_standalone_model(tiny_lm):
    from polygraphy.backend.onnx import OnnxFromPath
    from polygraphy.backend.onnxrt import SessionFromOnnx

    manifest = tiny_lm["result"].manifest
    feed = example_inputs(layout_from_onnx(tiny_lm["model"]), 1, 4, 3, VOCAB)
    for row in manifest.data["buckets"]:
        path = manifest.path(row["file"])
        onnx.checker.check_model(str(path))
        graph = onnx.load(str(path), load_external_data=False)
        inline = [t.name for t in graph.graph.initializer if len(t.raw_data) >= 1024]
        assert not inline  # the graph only; weights live in the shared .bin files
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logits = sess.run(["logits"], feed)[0]
        assert logits.shape == (1, 4, VOCAB) and np.isfinite(logits).all()
        assert OnnxFromPath(str(path))().graph.node
        assert SessionFromOnnx(str(path))().get_inputs()[0].name == "input_ids"
    # The budget-1.0 bucket is the dense model up to float rounding.
    want = ort.InferenceSession(str(tiny_lm["onnx"])).run(["logits"], feed)[0]
    got = ort.InferenceSession(str(manifest.path("bucket_1.onnx"))).run(["logits"], feed)[0]
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max())


def test_weights_stored_once(tiny_lm):
    manifest = tiny_lm["result"].manifest
    data = manifest.data
    buckets = data["buckets"]
    for t in data["targets"]:  # the largest factors of a target, stored once
        assert t["stored_rank"] == max(b["ranks"][t["name"]] or 0 for b in buckets)
    factor_bytes = sum(t["stored_rank"] * (t["n"] + t["m"]) * 4 for t in data["targets"])
    factors_size = manifest.path("factors.bin").stat().st_size
    assert factor_bytes <= factors_size < factor_bytes + 128 * len(data["targets"])
    # The dense bucket's weights are dense.bin (all but tiny inline ones, plus padding); every
    # bucket refers to these two files only, so together they hold less than the buckets' sum.
    dense_bucket = next(b for b in buckets if b["budget"] == 1.0)
    assert all(r is None for r in dense_bucket["ranks"].values())
    dense_size = data["files"]["dense.bin"]["bytes"]
    assert (
        0.99 * dense_bucket["weight_bytes"] <= dense_size <= dense_bucket["weight_bytes"] + 64 * 64
    )
    on_disk = dense_size + factors_size
    assert all(b["weight_bytes"] <= on_disk for b in buckets)
    assert sum(b["weight_bytes"] for b in buckets) > 1.5 * on_disk
    assert data["source"] == {} or "sha256" in data["source"]
    assert set(data["files"]) == {"factors.bin", "dense.bin", *(r["file"] for r in buckets)}


def test_bucket_factors_are_row_prefixes_of_the_stored_factors(tiny_lm):
    manifest = tiny_lm["result"].manifest
    consts = constant_tensors(tiny_lm["model"])
    by_name = tiny_lm["targets"].by_name()
    for row in manifest.data["buckets"]:
        graph = onnx.load(str(manifest.path(row["file"])))  # reads the external byte ranges
        inits = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
        for t in manifest.data["targets"]:
            name, r = t["name"], row["ranks"][t["name"]]
            target = by_name[name]
            if r is None:  # a dense target keeps its original weight
                np.testing.assert_array_equal(
                    inits[target.weight], numpy_helper.to_array(consts[target.weight])
                )
                continue
            at, c = inits[f"{name}/lowrank_At"], inits[f"{name}/lowrank_C"]
            assert at.shape == (r, t["n"]) and c.shape == (r, t["m"]) and r < target.k_equiv
            stored_at, stored_c = read_factor_rows(manifest, name, t["stored_rank"])
            np.testing.assert_array_equal(at, stored_at[:r])
            np.testing.assert_array_equal(c, stored_c[:r])
            # The factors approximate the weight: closer with every row kept.
            b = weight_matrix(target, consts[target.weight])
            errors = [
                np.linalg.norm(b - stored_at[:k].T.astype(np.float64) @ stored_c[:k])
                for k in (r // 2, r)
            ]
            assert errors[1] < errors[0] < np.linalg.norm(b)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_tampered_or_missing_files_are_refused(tiny_lm, tmp_path):
    folder = _copy(tiny_lm["folder"], tmp_path / "a")
    load_manifest(folder)  # intact
    with open(folder / "factors.bin", "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelError, match=r"factors\.bin.*sha256"):
        Generator.from_buckets(folder)

    folder = _copy(tiny_lm["folder"], tmp_path / "b")
    data = json.loads((folder / "manifest.json").read_text())
    first = data["targets"][0]["name"]
    data["buckets"][1]["ranks"][first] += 8
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="manifest was modified"):
        load_manifest(folder)

    folder = _copy(tiny_lm["folder"], tmp_path / "c")
    (folder / "manifest.json").unlink()
    with pytest.raises(ModelError, match="missing"):
        load_manifest(folder)

    folder = _copy(tiny_lm["folder"], tmp_path / "d")
    with open(folder / "dense.bin", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelError, match=r"dense\.bin.*bytes"):
        load_manifest(folder, verify=False)

    folder = _copy(tiny_lm["folder"], tmp_path / "e")
    (folder / "bucket_0.6.onnx").unlink()
    with pytest.raises(ModelError, match=r"bucket_0\.6\.onnx.*missing"):
        load_manifest(folder)


def _parser() -> argparse.ArgumentParser:
    return build_parser()


def test_cli_export_buckets(tiny_lm, tmp_path):
    batches = lm_token_batches(1, VOCAB, batch=6, seq=16, seed=3)[0]
    np.savez(tmp_path / "calib.npz", **batches)
    out = tmp_path / "cli.buckets"
    args = _parser().parse_args(
        [
            "export", "buckets", str(tiny_lm["onnx"]), "--calib", str(tmp_path / "calib.npz"),
            "--budgets", "1.0,0.5", "--align", "16", "-o", str(out),
        ]
    )  # fmt: skip
    assert args.func(args) == 0
    manifest = load_manifest(out)
    assert manifest.budgets == [1.0, 0.5]
    assert manifest.data["source"]["sha256"]
    assert manifest.data["options"]["align"] == 16
    assert "closed_loop" not in manifest.data["options"]  # open loop unless asked
    assert manifest.data["options"]["spare"] == 0.05
    comp = _parser().parse_args(
        ["export", "buckets", str(tiny_lm["onnx"]), "--calib", str(tmp_path / "calib.npz"),
         "--budgets", "0.8,0.5", "--spare", "0", "--compensate", "-o", str(tmp_path / "comp")]
    )  # fmt: skip
    assert comp.func(comp) == 0
    compensated = load_manifest(tmp_path / "comp").data
    assert compensated["options"]["closed_loop"] == "compensated"
    assert compensated["options"]["spare"] == 0.0
    # --spare 0: nothing stored twice, so the two files hold the largest bucket (and padding)
    files = compensated["files"]
    largest = compensated["buckets"][0]["weight_bytes"]
    padding = 2 * 64 * (len(compensated["targets"]) + 1)
    assert files["dense.bin"]["bytes"] + files["factors.bin"]["bytes"] <= largest + padding
    with pytest.raises(SystemExit):
        _parser().parse_args(["export", "buckets", "m.onnx", "-o", "x", "--spare", "-1"])
    assert all(
        r % 16 == 0 or r == t["max_rank"]
        for t in manifest.data["targets"]
        for r in [manifest.data["buckets"][1]["ranks"][t["name"]]]
    )
    bad = _parser().parse_args(
        ["export", "buckets", str(tiny_lm["onnx"]), "--calib", str(tmp_path / "calib.npz"),
         "--budgets", "1.0,0", "-o", str(tmp_path / "x")]
    )  # fmt: skip
    with pytest.raises(FlarcError, match="outside"):
        bad.func(bad)
    assert not (tmp_path / "x").exists()


def test_closed_loop_buckets_are_prefixes_of_the_refit_at_the_stored_ranks(tiny_lm, tmp_path):
    from flarc.calib.data import CalibrationSet
    from flarc.export.buckets import calibration_for_lm
    from flarc.pipeline import analyze, build_buckets
    from flarc.rewrite.analysis import AnalysisOptions
    from flarc.rewrite.closed_loop import closed_loop_entries
    from flarc.rewrite.ranks import RankChoice

    model, targets = tiny_lm["model"], tiny_lm["targets"]
    data = CalibrationSet(lm_token_batches(2), [], "test")
    budgets = [0.8, 0.5]
    closed = build_buckets(
        model, targets, data, budgets, tmp_path / "closed", closed_loop=True, compensate=True
    ).manifest
    opened = build_buckets(model, targets, data, budgets, tmp_path / "open").manifest
    # The ranks are the open-loop plan's; only the factors are refitted.
    assert [b["ranks"] for b in closed.data["buckets"]] == [
        b["ranks"] for b in opened.data["buckets"]
    ]
    assert closed.data["options"]["closed_loop"] == "compensated"
    # Independent route: the closed loop of compress at the stored ranks.
    feeds = calibration_for_lm(data, layout_from_onnx(model)).calibration
    analysis = analyze(model, targets, CalibrationSet(feeds, [], "test"), AnalysisOptions())
    # every target at its stored rank (its largest factorized one; dense where never factorized)
    stored = {t["name"]: t["stored_rank"] for t in closed.data["targets"]}
    ranks = {t.name: RankChoice(stored.get(t.name), "test") for t in targets.targets}
    entries = closed_loop_entries(model, analysis, ranks, feeds, compensate=True)
    changed = 0
    for t in closed.data["targets"]:
        at, c = read_factor_rows(closed, t["name"], t["stored_rank"])
        want_a, want_c = entries[t["name"]].spectrum.factors(t["stored_rank"])
        np.testing.assert_allclose(at.T @ c, want_a @ want_c, rtol=1e-4, atol=1e-5)
        open_at, open_c = read_factor_rows(opened, t["name"], t["stored_rank"])
        changed += not np.allclose(at.T @ c, open_at.T @ open_c, rtol=1e-3, atol=1e-4)
    assert changed > len(closed.data["targets"]) // 2
    # Every smaller bucket is still a row prefix of the stored (refitted) factors.
    small = closed.data["buckets"][1]
    graph = onnx.load(str(closed.path(small["file"])))
    inits = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    for t in closed.data["targets"]:
        r = small["ranks"][t["name"]]
        at, _ = read_factor_rows(closed, t["name"], t["stored_rank"])
        np.testing.assert_array_equal(inits[f"{t['name']}/lowrank_At"], at[:r])
