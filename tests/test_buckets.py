"""Rank buckets: allocation, a valid standalone ONNX model per bucket, weights stored once with
bucket factors as row prefixes, and refusal of tampered folders."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from flarc.calib.data import CalibrationSet
from flarc.cli import build_parser
from flarc.core.errors import FlarcError, ModelError
from flarc.core.modelio import load_model
from flarc.core.targets import constant_tensors, find_targets, weight_matrix
from flarc.export.buckets import allocate_ranks, build_buckets, parse_budgets, read_factor_rows
from flarc.export.hf import example_inputs, export_hf, layout_from_onnx
from flarc.export.manifest import load_manifest
from flarc.export.runtime import Generator

transformers = pytest.importorskip("transformers")
VOCAB = 256
BUDGETS = [1.0, 0.8, 0.6, 0.4]


def token_batches(count: int, batch: int = 4, seq: int = 24, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, seq), np.int64),
            "position_ids": np.tile(np.arange(seq, dtype=np.int64), (batch, 1)),
        }
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny random Qwen2, exported, and its bucket folder (Fisher-allocated)."""
    import torch

    root = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
    )
    transformers.Qwen2ForCausalLM(config).save_pretrained(root / "hf")
    summary = export_hf(root / "hf", root / "lm.onnx")
    model = load_model(root / "lm.onnx")
    targets = find_targets(model)
    result = build_buckets(
        model, targets, CalibrationSet(token_batches(2), [], "test"), BUDGETS, root / "lm.buckets"
    )
    return {
        "root": root,
        "onnx": root / "lm.onnx",
        "model": model,
        "targets": targets,
        "folder": root / "lm.buckets",
        "result": result,
        "summary": summary,
    }


def test_export_hf_layout_and_logits(lm):
    model = lm["model"]
    names = [i.name for i in model.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.1.value" in names
    assert [o.name for o in model.graph.output][:2] == ["logits", "present.0.key"]
    assert lm["summary"]["max_abs_logits_error"] < 1e-4
    layout = layout_from_onnx(model)
    assert (layout.num_layers, layout.kv_heads, layout.head_dim) == (2, 2, 16)


def test_allocation_rule():
    max_ranks = {"a": 64, "b": 64, "c": 32, "d": 128}
    alpha = {"a": 10.0, "b": 1.0, "c": 0.0, "d": 5.0}
    full = allocate_ranks(alpha, max_ranks, 1.0, align=8)
    assert full == max_ranks  # budget 1.0 is full rank everywhere
    previous = full
    for b in (0.8, 0.6, 0.4, 0.2):
        ranks = allocate_ranks(alpha, max_ranks, b, align=8)
        assert all(r % 8 == 0 and 8 <= r <= max_ranks[t] for t, r in ranks.items())
        assert all(ranks[t] <= previous[t] for t in ranks)  # monotone in the budget
        assert abs(sum(ranks.values()) - b * 288) <= 8 * len(ranks)
        previous = ranks
    # Proportional where no clipping applies: a has 2x the importance of d.
    ranks = allocate_ranks({"a": 2.0, "d": 1.0}, {"a": 512, "d": 512}, 0.3, align=1)
    assert ranks["a"] == pytest.approx(2 * ranks["d"], abs=1)
    assert allocate_ranks({}, {"x": 40, "y": 40}, 0.5, align=4) == {"x": 20, "y": 20}
    with pytest.raises(FlarcError):
        parse_budgets("1.0,1.2")
    assert parse_budgets("0.4,1,0.8") == [1.0, 0.8, 0.4]


def test_every_bucket_is_a_valid_standalone_model(lm):
    from polygraphy.backend.onnx import OnnxFromPath
    from polygraphy.backend.onnxrt import SessionFromOnnx

    manifest = lm["result"].manifest
    feed = example_inputs(layout_from_onnx(lm["model"]), 1, 4, 3, VOCAB)
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
    want = ort.InferenceSession(str(lm["onnx"])).run(["logits"], feed)[0]
    got = ort.InferenceSession(str(manifest.path("bucket_1.onnx"))).run(["logits"], feed)[0]
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max())


def test_weights_stored_once(lm):
    manifest = lm["result"].manifest
    data = manifest.data
    factor_bytes = sum(t["stored_rank"] * (t["n"] + t["m"]) * 4 for t in data["targets"])
    factors_size = manifest.path("factors.bin").stat().st_size
    assert factor_bytes <= factors_size < factor_bytes + 128 * len(data["targets"])
    # All buckets together store the largest bucket's weights (less tiny inline ones, plus padding).
    weights_on_disk = data["files"]["factors.bin"]["bytes"] + data["files"]["dense.bin"]["bytes"]
    largest = max(r["weight_bytes"] for r in data["buckets"])
    assert 0.99 * largest <= weights_on_disk < largest + 64 * (2 * len(data["targets"]) + 32)
    assert sum(r["weight_bytes"] for r in data["buckets"]) > 2.5 * weights_on_disk
    ranks = [r["ranks"] for r in data["buckets"]]
    assert all(r == t["max_rank"] for t in data["targets"] for r in [ranks[0][t["name"]]])
    assert data["source"] == {} or "sha256" in data["source"]
    assert set(data["files"]) == {"factors.bin", "dense.bin", *(r["file"] for r in data["buckets"])}


def test_bucket_factors_are_row_prefixes_of_the_full_factors(lm):
    manifest = lm["result"].manifest
    consts = constant_tensors(lm["model"])
    by_name = lm["targets"].by_name()
    full = {}
    for row in manifest.data["buckets"]:
        graph = onnx.load(str(manifest.path(row["file"])))  # reads the external byte ranges
        inits = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
        for t in manifest.data["targets"]:
            name, r = t["name"], row["ranks"][t["name"]]
            at, c = inits[f"{name}/lowrank_At"], inits[f"{name}/lowrank_C"]
            assert at.shape == (r, t["n"]) and c.shape == (r, t["m"])
            if name not in full:  # the first (largest) bucket holds every stored row
                full[name] = read_factor_rows(manifest, name, t["stored_rank"])
                b = weight_matrix(by_name[name], consts[by_name[name].weight])
                rebuilt = full[name][0].T.astype(np.float64) @ full[name][1]
                np.testing.assert_allclose(rebuilt, b, atol=1e-4 * np.abs(b).max())
            np.testing.assert_array_equal(at, full[name][0][:r])
            np.testing.assert_array_equal(c, full[name][1][:r])


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_tampered_or_missing_files_are_refused(lm, tmp_path):
    folder = _copy(lm["folder"], tmp_path / "a")
    load_manifest(folder)  # intact
    with open(folder / "factors.bin", "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelError, match=r"factors\.bin.*sha256"):
        Generator.from_buckets(folder)

    folder = _copy(lm["folder"], tmp_path / "b")
    data = json.loads((folder / "manifest.json").read_text())
    first = data["targets"][0]["name"]
    data["buckets"][1]["ranks"][first] += 8
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="manifest was modified"):
        load_manifest(folder)

    folder = _copy(lm["folder"], tmp_path / "c")
    (folder / "manifest.json").unlink()
    with pytest.raises(ModelError, match="missing"):
        load_manifest(folder)

    folder = _copy(lm["folder"], tmp_path / "d")
    with open(folder / "dense.bin", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelError, match=r"dense\.bin.*bytes"):
        load_manifest(folder, verify=False)

    folder = _copy(lm["folder"], tmp_path / "e")
    (folder / "bucket_0.6.onnx").unlink()
    with pytest.raises(ModelError, match=r"bucket_0\.6\.onnx.*missing"):
        load_manifest(folder)


def _parser() -> argparse.ArgumentParser:
    return build_parser()


def test_cli_export_buckets(lm, tmp_path):
    batches = token_batches(1, batch=6, seq=16, seed=3)[0]
    np.savez(tmp_path / "calib.npz", **batches)
    out = tmp_path / "cli.buckets"
    args = _parser().parse_args(
        [
            "export", "buckets", str(lm["onnx"]), "--calib", str(tmp_path / "calib.npz"),
            "--budgets", "1.0,0.5", "--align", "16", "-o", str(out),
        ]
    )  # fmt: skip
    assert args.func(args) == 0
    manifest = load_manifest(out)
    assert manifest.budgets == [1.0, 0.5]
    assert manifest.data["source"]["sha256"]
    assert manifest.data["options"]["align"] == 16
    assert all(
        r % 16 == 0 or r == t["max_rank"]
        for t in manifest.data["targets"]
        for r in [manifest.data["buckets"][1]["ranks"][t["name"]]]
    )
    bad = _parser().parse_args(
        ["export", "buckets", str(lm["onnx"]), "--calib", str(tmp_path / "calib.npz"),
         "--budgets", "1.0,0", "-o", str(tmp_path / "x")]
    )  # fmt: skip
    with pytest.raises(FlarcError, match="outside"):
        bad.func(bad)
    assert not (tmp_path / "x").exists()
