"""Inputs as deployed: a model exported with a fixed batch is fed batches of exactly that size
whatever the data's batching, uint8 / integer inputs (NHWC images) pass through unchanged, a
fixed sequence length pads the text, and a declared dim the data disagrees with is one line."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from flarc.calib.data import (
    check_feed,
    iter_rebatch,
    load_calibration,
    rebatch,
    split_holdout,
    synthetic_feeds,
    tokenize,
)
from flarc.cli import main
from flarc.core.errors import DataError
from flarc.core.inputs import InputSpec, fixed_batch, model_inputs
from flarc.core.targets import find_targets
from flarc.pipeline import analyze, compress
from flarc.rewrite.policy import RankOptions

from _models import Mlp2d, export

F32 = np.dtype(np.float32)
I64 = np.dtype(np.int64)


def spec(name: str, *shape, dtype=F32) -> InputSpec:
    return InputSpec(name, np.dtype(dtype), tuple(shape))


def rows(n: int, width: int = 3, start: int = 0) -> np.ndarray:
    """``n`` rows numbered from ``start``: row ``i`` is all ``i`` (order is visible)."""
    return np.repeat(np.arange(start, start + n, dtype=np.float32)[:, None], width, axis=1)


# ---------------------------------------------------------------------------------------------
# fixed_batch and rebatch


def test_fixed_batch_is_axis_0_fixed_on_every_input():
    assert fixed_batch([spec("x", 1, 3)]) == 1
    assert fixed_batch([spec("x", 4, 3), spec("m", 4, dtype=np.int64)]) == 4
    assert fixed_batch([spec("x", "batch", 3)]) is None
    assert fixed_batch([spec("x", None, 3)]) is None
    assert fixed_batch([spec("x", 1, 3), spec("y", "n", 3)]) is None  # one dynamic input
    assert fixed_batch([spec("x", 1, 3), spec("t")]) == 1  # a rank-0 input has no axis 0
    assert fixed_batch([spec("t")]) is None
    # A fixed table beside the batch inputs: the batch is what most inputs share.
    assert fixed_batch([spec("x", 2, 3), spec("y", 2, 5), spec("table", 7, 5)]) == 2


def test_rebatch_splits_into_fixed_batch_in_order():
    specs = [spec("x", 1, 3), spec("ids", 1, 2, dtype=np.int64)]
    feed = {"x": rows(16), "ids": np.arange(32, dtype=np.int64).reshape(16, 2)}
    out = rebatch([feed], specs)
    assert len(out) == 16
    for i, part in enumerate(out):
        assert part["x"].shape == (1, 3) and part["ids"].shape == (1, 2)
        np.testing.assert_array_equal(part["x"], rows(1, start=i))
        np.testing.assert_array_equal(part["ids"], [[2 * i, 2 * i + 1]])


def test_rebatch_leaves_a_dynamic_batch_alone():
    specs = [spec("x", "b", 3)]
    feeds = [{"x": rows(5)}, {"x": rows(3)}]
    out = rebatch(feeds, specs)
    assert len(out) == 2 and all(a is b for a, b in zip(out, feeds, strict=True))


def test_rebatch_carries_short_rows_and_drops_the_remainder(caplog):
    specs = [spec("x", 4, 3)]
    feeds = [{"x": rows(6, start=0)}, {"x": rows(6, start=6)}, {"x": rows(6, start=12)}]
    with caplog.at_level(logging.WARNING, logger="flarc.calib.data"):
        out = list(iter_rebatch(feeds, specs, "data.npz"))
    # 18 rows: four batches of four in order, two rows dropped with one warning.
    assert [i for i, _ in out] == [0, 0, 1, 2]  # the source batch of each part's first row
    got = np.concatenate([f["x"] for _, f in out])
    np.testing.assert_array_equal(got, rows(16))
    assert all(f["x"].shape == (4, 3) for _, f in out)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "data.npz" in warnings[0] and "2 of 18 rows dropped" in warnings[0]


def test_rebatch_small_batches_fill_a_larger_fixed_batch():
    specs = [spec("x", 8, 3)]
    out = rebatch([{"x": rows(2, start=2 * i)} for i in range(8)], specs)
    assert len(out) == 2
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in out]), rows(16))


def test_rebatch_exact_multiple_drops_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="flarc.calib.data"):
        out = rebatch([{"x": rows(12)}], [spec("x", 4, 3)])
    assert len(out) == 3 and not caplog.records


def test_rebatch_too_few_rows_is_one_line_naming_the_input():
    with pytest.raises(
        DataError, match=r"data\.npz: input 'x' has 3 rows in all.*fixed batch of 4"
    ):
        rebatch([{"x": rows(3)}], [spec("x", 4, 3)], "data.npz")


def test_rebatch_passes_non_batch_inputs_unchanged():
    # A rank-0 scale and a fixed one-row table go unchanged into every part; the KV cache (past
    # length 0, axis 0 = batch) is split like the tokens.
    specs = [
        spec("input_ids", 1, 4, dtype=np.int64),
        spec("scale"),
        spec("table", 1, 5),
        spec("past_key_values.0.key", 1, 2, "past", 8),
    ]
    table = np.arange(5, dtype=np.float32)[None]
    feed = {
        "input_ids": np.arange(12, dtype=np.int64).reshape(3, 4),
        "scale": np.float32(0.5),
        "table": table,
        "past_key_values.0.key": np.zeros((3, 2, 0, 8), np.float32),
    }
    out = rebatch([feed], specs)
    assert len(out) == 3
    for i, part in enumerate(out):
        np.testing.assert_array_equal(part["input_ids"], feed["input_ids"][i : i + 1])
        assert part["scale"] == np.float32(0.5) and part["table"] is table
        assert part["past_key_values.0.key"].shape == (1, 2, 0, 8)
        check_feed(part, specs, "test")


def test_rebatch_does_not_join_rows_of_different_shapes(caplog):
    # Token batches padded to different lengths cannot share a batch: the short rows are dropped.
    specs = [spec("input_ids", 2, "s", dtype=np.int64)]
    feeds = [
        {"input_ids": np.zeros((3, 5), np.int64)},
        {"input_ids": np.ones((3, 7), np.int64)},
    ]
    with caplog.at_level(logging.WARNING, logger="flarc.calib.data"):
        out = rebatch(feeds, specs, "text")
    assert [f["input_ids"].shape for f in out] == [(2, 5), (2, 7)]
    assert "2 of 6 rows dropped" in caplog.records[-1].getMessage()


def test_load_calibration_feeds_the_fixed_batch(tmp_path):
    np.savez(tmp_path / "d.npz", x=rows(16, 24))
    specs = [spec("x", 1, 24)]
    data = load_calibration(tmp_path / "d.npz", specs, batch_size=16, holdout=0.25)
    assert len(data.calibration) == 12 and len(data.heldout) == 4
    got = np.concatenate([f["x"] for f in data.calibration + data.heldout])
    np.testing.assert_array_equal(got, rows(16, 24))
    # --max-batches counts the data's own batches (two of eight rows), not the model's.
    data = load_calibration(tmp_path / "d.npz", specs, batch_size=8, holdout=0, max_batches=1)
    assert len(data.calibration) == 8


def test_synthetic_feeds_use_the_fixed_batch():
    specs = [spec("x", 1, 3, 4, 4), spec("ids", 1, 6, dtype=np.int64)]
    feeds = synthetic_feeds(specs, 2, {"x": (8, 3, 4, 4)})
    assert [f["x"].shape for f in feeds] == [(1, 3, 4, 4)] * 2
    assert feeds[0]["ids"].shape == (1, 6) and feeds[0]["ids"].dtype == np.int64


# ---------------------------------------------------------------------------------------------
# check_feed: dtypes and declared dims


def test_check_feed_passes_uint8_and_integers_through():
    specs = [spec("image", "n", 8, 8, 3, dtype=np.uint8), spec("ids", "n", 4, dtype=np.int32)]
    image = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    out = check_feed({"image": image, "ids": np.arange(8).reshape(2, 4)}, specs, "b0")
    assert out["image"] is image  # unchanged: no copy, no cast
    assert out["ids"].dtype == np.int32
    np.testing.assert_array_equal(out["ids"], np.arange(8).reshape(2, 4))


def test_check_feed_refuses_lossy_dtype_changes():
    image = [spec("image", "n", 8, 8, 3, dtype=np.uint8)]
    floats = [spec("image", "n", 8, 8, 3)]
    pixels = np.full((1, 8, 8, 3), 200, np.uint8)
    with pytest.raises(DataError, match="'image' is uint8, the model expects float32"):
        check_feed({"image": pixels}, floats, "b0")
    with pytest.raises(DataError, match="'image' is float32, the model expects uint8"):
        check_feed({"image": pixels.astype(np.float32)}, image, "b0")
    with pytest.raises(DataError, match=r"b0: tensor 'image' has values in \[300, 300\]"):
        check_feed({"image": np.full((1, 8, 8, 3), 300, np.int64)}, image, "b0")


def test_check_feed_fixed_dim_message_names_input_and_batch():
    with pytest.raises(DataError) as err:
        check_feed({"x": np.zeros((1, 23), np.float32)}, [spec("x", 1, 24)], "d.npz batch 3")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("d.npz batch 3: tensor 'x' has shape [1, 23]")
    assert "[1, 24]" in message and "axis 1 must be 24" in message


# ---------------------------------------------------------------------------------------------
# text: a fixed sequence length and batch


def test_tokenize_pads_to_a_fixed_sequence_length():
    pytest.importorskip("transformers")
    from flarc.demo import minilm_folder

    specs = [
        spec(name, 1, 16, dtype=np.int64)
        for name in ("input_ids", "attention_mask", "token_type_ids")
    ]
    texts = [
        "a short sentence here",
        "a much longer sentence that will certainly need more than sixteen tokens to hold "
        "every one of its many and various words",
        "three more words here",
    ]
    feeds = tokenize(texts, minilm_folder(), specs, 128, 8)
    assert len(feeds) == 3
    for feed in feeds:
        assert {k: v.shape for k, v in feed.items()} == {s.name: (1, 16) for s in specs}
        check_feed(feed, specs, "text")
    assert feeds[0]["attention_mask"].sum() < 16 and feeds[1]["attention_mask"].sum() == 16


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.fixture
def batch1_mlp(tmp_path):
    """Mlp2d exported with a fixed batch of 1 (no dynamic axes) and 16 calibration rows."""
    torch.manual_seed(0)
    path = export(Mlp2d(), (torch.randn(1, 24),), tmp_path / "b1.onnx", ["x"])
    assert [s.shape for s in model_inputs(onnx.load(str(path)))] == [(1, 24)]
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 24)).astype(np.float32))
    return path


def test_fixed_batch_model_compresses_through_the_cli(tmp_path, batch1_mlp, capsys):
    out = tmp_path / "small.onnx"
    argv = ["compress", str(batch1_mlp), "-o", str(out), "--calib", str(tmp_path / "calib.npz"),
            "--batch-size", "16", "--ratio", "0.5", "--align", "4"]  # fmt: skip
    code = main(argv)
    assert code == 0, capsys.readouterr().err
    small = onnx.load(str(out))
    onnx.checker.check_model(small)
    assert [s.shape for s in model_inputs(small)] == [(1, 24)]
    x = np.random.default_rng(1).standard_normal((1, 24)).astype(np.float32)
    (y,) = ort.InferenceSession(str(out)).run(None, {"x": x})
    assert y.shape == (1, 16) and np.isfinite(y).all()


def test_fixed_dim_mismatch_is_one_line_and_writes_nothing(tmp_path, batch1_mlp, capsys):
    np.savez(tmp_path / "wide.npz", x=np.zeros((16, 23), np.float32))
    out = tmp_path / "o.onnx"
    code = main(
        ["compress", str(batch1_mlp), "-o", str(out), "--calib", str(tmp_path / "wide.npz")]
    )
    err = capsys.readouterr().err.strip()
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("flarc: error:")]
    assert len(lines) == 1, err
    assert "wide.npz batch 0" in lines[0] and "'x'" in lines[0] and "axis 1 must be 24" in lines[0]
    assert not out.exists()


def uint8_nhwc_model() -> onnx.ModelProto:
    """uint8 NHWC images -> Cast -> Transpose (NCHW) -> Conv -> Relu -> Conv -> pooled Gemm."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:]))
        return numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name
        )

    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["f", "inv255"], ["scaled"]),
        helper.make_node("Transpose", ["scaled"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w3"], ["logits"], transB=1),
    ]
    inits = [
        numpy_helper.from_array(np.array(1 / 255, np.float32), "inv255"),
        weight("w1", 24, 3, 3, 3),
        numpy_helper.from_array(np.zeros(24, np.float32), "b1"),
        weight("w2", 32, 24, 3, 3),
        weight("w3", 10, 32),
    ]
    graph = helper.make_graph(
        nodes,
        "uint8_nhwc",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["n", 8, 8, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def test_uint8_nhwc_image_model_compresses_end_to_end(tmp_path):
    model = uint8_nhwc_model()
    specs = model_inputs(model)
    images = np.random.default_rng(1).integers(0, 256, (32, 8, 8, 3)).astype(np.uint8)
    np.savez(tmp_path / "images.npz", image=images)
    data = load_calibration(tmp_path / "images.npz", specs, batch_size=8)
    assert all(f["image"].dtype == np.uint8 for f in data.calibration + data.heldout)
    np.testing.assert_array_equal(data.calibration[0]["image"], images[:8])
    targets = find_targets(model)
    assert {t.op_type for t in targets.targets} >= {"Conv"}
    analysis = analyze(model, targets, data)
    result = compress(model, analysis, RankOptions(ratio=0.5, align=4))
    onnx.checker.check_model(result.model)
    assert model_inputs(result.model)[0].dtype == np.uint8
    assert any(c.rank is not None for c in result.ranks.values())
    assert result.params_after < result.params_before
    session = ort.InferenceSession(result.model.SerializeToString())
    (y,) = session.run(None, {"image": images[:4]})
    (y_ref,) = ort.InferenceSession(model.SerializeToString()).run(None, {"image": images[:4]})
    assert y.shape == (4, 10) and np.isfinite(y).all()
    cosine = float(np.sum(y * y_ref) / np.linalg.norm(y) / np.linalg.norm(y_ref))
    assert cosine > 0.5
    assert result.comparison and np.isfinite(result.comparison[0].cosine)


def test_tokenize_batches_texts_of_similar_length_on_each_side_of_the_split():
    """Unpacked, texts of similar token count share a batch, separately in the batches that
    calibrate and in those split_holdout holds out: every text is tokenized exactly as alone
    (up to padding) and stays on its side, padding shrinks, and the batches come in no order
    of length (what reads the first batches sees every length)."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from flarc.demo import minilm_folder

    specs = [spec(name, "b", "s", dtype=np.int64) for name in ("input_ids", "attention_mask")]
    rng = np.random.default_rng(0)
    texts = [
        " ".join(["word"] * int(n)) + f" number {i}" for i, n in enumerate(rng.integers(1, 40, 22))
    ]
    tok = AutoTokenizer.from_pretrained(str(minilm_folder()), local_files_only=True)
    alone = {tuple(tok(t)["input_ids"]) for t in texts}

    def rows(feeds):
        return [
            tuple(ids[mask.astype(bool)])
            for f in feeds
            for ids, mask in zip(f["input_ids"], f["attention_mask"], strict=True)
        ]

    feeds = tokenize(texts, minilm_folder(), specs, 128, 4, holdout=0.25)
    calib, held = split_holdout(feeds, 0.25)
    assert (len(calib), len(held)) == (4, 2)  # 6 batches of 4 (the last of 2), 2 held out
    assert set(rows(calib)) == {tuple(tok(t)["input_ids"]) for t in texts[:16]}
    assert set(rows(held)) == {tuple(tok(t)["input_ids"]) for t in texts[16:]}
    assert set(rows(feeds)) == alone
    for side in (calib, held):  # each batch holds a band of lengths that no other one enters
        bands = sorted((min(c), max(c)) for f in side for c in [f["attention_mask"].sum(1)])
        assert all(hi <= lo for (_, hi), (lo, _) in itertools.pairwise(bands))
    first = [int(f["attention_mask"].sum(1).max()) for f in calib]
    assert first != sorted(first)  # but the batches come in no order of length
    batches = [texts[i : i + 4] for i in range(0, len(texts), 4)]
    in_text_order = sum(len(b) * max(len(tok(t)["input_ids"]) for t in b) for b in batches)
    assert sum(f["input_ids"].size for f in feeds) < in_text_order
    whole = tokenize(texts, minilm_folder(), specs, 128, 4)  # nothing held out, a partial batch
    assert set(rows(whole)) == alone and len(rows(whole)) == len(texts)


def test_tokenize_packs_texts_into_full_windows():
    """Packed: the texts' tokens as one stream (each text's own tokenization, then end-of-text
    when the tokenizer has one) cut into windows of exactly ``seq_len`` with no padding, the
    last partial window dropped; ``max_sequences`` keeps the first windows."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from flarc.demo import minilm_folder

    specs = [spec(name, "b", "s", dtype=np.int64) for name in ("input_ids", "attention_mask")]
    texts = [f"sentence number {i} has a few words of its own" for i in range(12)]
    tok = AutoTokenizer.from_pretrained(str(minilm_folder()), local_files_only=True)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    stream = [t for text in texts for t in [*tok(text)["input_ids"], *eos]]
    feeds = tokenize(texts, minilm_folder(), specs, 16, 4, pack=True)
    windows = np.concatenate([f["input_ids"] for f in feeds])
    assert windows.shape == (len(stream) // 16, 16)
    assert windows.reshape(-1).tolist() == stream[: windows.size]
    assert all(f["attention_mask"].all() for f in feeds)
    assert [f["input_ids"].shape[0] for f in feeds][:-1] == [4] * (len(feeds) - 1)
    first = tokenize(texts, minilm_folder(), specs, 16, 4, pack=True, max_sequences=3)
    assert np.concatenate([f["input_ids"] for f in first]).tolist() == windows[:3].tolist()
    one = tokenize(texts[:1], minilm_folder(), specs, 64, 4, pack=True)  # shorter than a window
    assert one[0]["input_ids"].reshape(-1).tolist() == stream[: len(one[0]["input_ids"][0])]


@pytest.mark.parametrize("files", [[], ["__init__.py"]])
def test_a_folder_without_a_tokenizer_is_bad_input(tmp_path, files):
    """A missing or tokenizer-less --tokenizer folder (transformers raises OSError or ValueError)
    is a one-line DataError naming the folder, not an internal error."""
    pytest.importorskip("transformers")
    from flarc.calib.data import tokenize
    from flarc.core.errors import DataError

    folder = tmp_path / "tok"
    if files:
        folder.mkdir()
        for name in files:
            (folder / name).write_text("")
    specs = [InputSpec("input_ids", np.dtype(np.int64), ("batch", "seq"))]
    with pytest.raises(DataError, match=f"--tokenizer {folder}"):
        tokenize(["some text"], folder, specs, 8, 1)
