"""Language models as the ecosystem exports them (issue 15): optimum's decoder with past key
values, the legacy merged decoder (an If whose branches share the weights) and onnxruntime-genai
style int4 (MatMulNBits). The files are built by tests/_lm_forms.py (see there for which are
written by optimum itself and which follow its recorded contract)."""

from __future__ import annotations

import json

import _lm_forms as forms  # builds the files; imports transformers only when called
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from flarc.cli import main

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

KV_HEADS, HEAD_DIM, VOCAB = 2, 16, 256  # save_tiny_qwen2's
PROJECTIONS = [
    f"/model/layers.{i}/{part}/MatMul"
    for i in range(2)
    for part in (
        "self_attn/q_proj",
        "self_attn/k_proj",
        "self_attn/v_proj",
        "self_attn/o_proj",
        "mlp/gate_proj",
        "mlp/up_proj",
        "mlp/down_proj",
    )
] + ["/lm_head/MatMul"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """Every form, built once: hf/, tokenizer/, text.txt, opt/model.onnx,
    legacy/decoder_model{,_with_past,_merged}.onnx and int4.onnx."""
    root = tmp_path_factory.mktemp("lm_forms")
    hf, tokenizer, text = forms.save_tiny_lm(root)
    with_past = forms.export_with_past(hf, root / "opt")
    merged = forms.export_merged(hf, root / "legacy")
    int4 = forms.quantize_nbits(with_past, root / "int4.onnx")
    return {
        "root": root,
        "hf": hf,
        "tokenizer": tokenizer,
        "text": text,
        "with_past": with_past,
        "decoder": root / "legacy" / "decoder_model.onnx",
        "decoder_with_past": root / "legacy" / "decoder_with_past_model.onnx",
        "merged": merged,
        "int4": int4,
    }


def _inspect(path, capsys) -> dict:
    capsys.readouterr()
    assert main(["inspect", "--json", str(path)]) == 0
    return json.loads(capsys.readouterr().out)


def _compress(lm, path, out) -> int:
    return main(
        [
            "compress",
            str(path),
            "-o",
            str(out),
            "--text",
            str(lm["text"]),
            "--tokenizer",
            str(lm["tokenizer"]),
            "--seq-len",
            "16",
            "--batch-size",
            "4",
            "--ratio",
            "0.8",
        ]
    )


def _feed(batch: int, seq: int, past: int, seed: int = 0, past_inputs: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    feed = {
        "input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64),
        "attention_mask": np.ones((batch, past + seq), np.int64),
        "position_ids": np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1)),
    }
    if past_inputs:
        for i in range(2):
            for kv in ("key", "value"):
                shape = (batch, KV_HEADS, past, HEAD_DIM)
                feed[f"past_key_values.{i}.{kv}"] = rng.standard_normal(shape).astype(np.float32)
    return feed


def _run(path, feed) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


# ---------------------------------------------------------------------------------------------
# the files themselves


def test_with_past_has_optimums_contract(lm):
    """Names, symbolic dims, opset and IR version as optimum-onnx 0.1.0 writes them (the real
    exporter where it imports: then this checks the recorded contract against it)."""
    assert forms.contract(lm["with_past"]) == forms.OPTIMUM_CONTRACT


def test_merged_decoder_layout_and_branches(lm):
    """One If on use_cache_branch; the weights live once, in the outer graph, and both branches
    read them; each branch computes what its decoder computes."""
    model = onnx.load(str(lm["merged"]))
    assert [n.op_type for n in model.graph.node] == ["If"]
    assert model.graph.input[-1].name == "use_cache_branch"
    branches = {a.name: a.g for a in model.graph.node[0].attribute}
    assert set(branches) == {"then_branch", "else_branch"}
    outer = {t.name for t in model.graph.initializer}
    for g in branches.values():
        assert not [t for t in g.initializer if len(t.dims) >= 2]
        weights = {n.input[1] for n in g.node if n.op_type == "MatMul"} & outer
        assert len(weights) == len(PROJECTIONS)

    prompt = _feed(2, 5, 0, seed=1)
    want = _run(lm["decoder"], {k: v for k, v in prompt.items() if "past" not in k})
    got = _run(lm["merged"], {**prompt, "use_cache_branch": np.array([False])})
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    step = _feed(2, 1, 5, seed=2)
    want = _run(lm["decoder_with_past"], step)
    got = _run(lm["merged"], {**step, "use_cache_branch": np.array([True])})
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def _canonical(model: onnx.ModelProto):
    """The merged model with every outer initializer named by its data, for comparing merges
    whose shared names were picked differently."""
    key = {
        t.name: (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
        for t in model.graph.initializer
    }
    branches = {}
    for a in model.graph.node[0].attribute:
        branches[a.name] = [
            (n.op_type, tuple(key.get(i, i) for i in n.input), tuple(n.output)) for n in a.g.node
        ]
    inputs = [vi.SerializeToString() for vi in model.graph.input]
    outputs = [vi.SerializeToString() for vi in model.graph.output]
    return sorted(key.values()), branches, inputs, outputs, model.ir_version


def test_merge_is_optimums(lm, tmp_path):
    """The helper's merge equals optimum's own merge_decoders up to the shared names."""
    optimum_onnx = pytest.importorskip("optimum.onnx", reason="optimum-onnx not installed")
    ours = forms.merge_decoders(
        onnx.load(str(lm["decoder"])), onnx.load(str(lm["decoder_with_past"]))
    )
    # optimum's changes the models it is given, and (optimum-onnx 0.1.0) needs a save_path
    theirs = optimum_onnx.merge_decoders(
        str(lm["decoder"]), str(lm["decoder_with_past"]), save_path=tmp_path / "m.onnx"
    )
    assert _canonical(ours) == _canonical(theirs)


# ---------------------------------------------------------------------------------------------
# what flarc does with them


def test_inspect_with_past_finds_the_projections(lm, capsys):
    data = _inspect(lm["with_past"], capsys)
    assert [t["name"] for t in data["targets"]] == PROJECTIONS
    # attention's own MatMuls (q k^T, p v) have no constant weight: skipped with a reason
    assert all(s["op_type"] == "MatMul" and s["reason"] for s in data["skipped"])


def test_compress_with_past(lm, tmp_path):
    out = tmp_path / "c.onnx"
    assert _compress(lm, lm["with_past"], out) == 0
    assert forms.contract(out) == forms.OPTIMUM_CONTRACT
    # fewer stored parameters, and a decode step with a non-empty past still runs
    before = sum(t.ByteSize() for t in onnx.load(str(lm["with_past"])).graph.initializer)
    after = sum(t.ByteSize() for t in onnx.load(str(out)).graph.initializer)
    assert after < before
    step = _feed(2, 1, 4, seed=3)
    got, want = _run(out, step), _run(lm["with_past"], step)
    assert got[0].shape == want[0].shape == (2, 1, VOCAB)
    assert np.isfinite(got[0]).all()


def test_inspect_merged_finds_each_weight_once_with_both_branches(lm, capsys):
    data = _inspect(lm["merged"], capsys)
    targets = data["targets"]
    assert len(targets) == len(PROJECTIONS)
    for t in targets:
        assert sorted(u["graph"][-1] for u in t["uses"]) == ["else_branch", "then_branch"]


# --text feeds the merged decoder its prompt branch (use_cache_branch False, empty past);
# both branches read the same factors afterwards.
def test_compress_merged(lm, tmp_path):
    out = tmp_path / "m.onnx"
    assert _compress(lm, lm["merged"], out) == 0
    model = onnx.load(str(out))
    assert [n.op_type for n in model.graph.node] == ["If"]
    prompt = _feed(2, 5, 0, seed=4)
    for branch, feed in ((False, prompt), (True, _feed(2, 1, 4, seed=5))):
        got = _run(out, {**feed, "use_cache_branch": np.array([branch])})
        want = _run(lm["merged"], {**feed, "use_cache_branch": np.array([branch])})
        assert got[0].shape == want[0].shape
        assert np.isfinite(got[0]).all()


def test_int4_matmulnbits_skipped_with_reason(lm, capsys):
    data = _inspect(lm["int4"], capsys)
    assert data["targets"] == []
    nbits = [s for s in data["skipped"] if s["op_type"] == "MatMulNBits"]
    assert len(nbits) == len(PROJECTIONS)
    assert all("4-bit" in s["reason"] and "quantize" in s["reason"] for s in nbits)
    assert main(["inspect", str(lm["int4"])]) == 0
    assert "MatMulNBits" in capsys.readouterr().out


def test_int4_compress_is_a_one_line_error(lm, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    capsys.readouterr()
    assert _compress(lm, lm["int4"], out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flarc: error:")
    assert "4-bit" in err[0]
    assert not out.exists()


def test_text_calibration_is_packed_for_kv_decoders(lm):
    """--text on a KV-cache decoder is one token stream in full --seq-len windows (no padding);
    --no-pack gives one padded sequence per line."""
    from flarc.cli import build_parser
    from flarc.cli.args import CalibrationArgs
    from flarc.core.modelio import load_model

    model = load_model(lm["with_past"])
    base = ["compress", str(lm["with_past"]), "-o", "x.onnx", "--text", str(lm["text"]),
            "--tokenizer", str(lm["tokenizer"]), "--seq-len", "16", "--batch-size", "4"]  # fmt: skip
    packed = CalibrationArgs().parse(build_parser().parse_args(base), model, tokens_only=True)
    feeds = packed.calibration + packed.heldout
    assert all(f["input_ids"].shape[1] == 16 and f["attention_mask"].all() for f in feeds)
    # The file is one document, line breaks kept: the windows are its own tokens in order.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(lm["tokenizer"]), local_files_only=True)
    stream = tok(lm["text"].read_text(encoding="utf-8"))["input_ids"]
    windows = np.concatenate([f["input_ids"] for f in feeds]).reshape(-1).tolist()
    assert windows == list(stream[: len(windows)])
    lines = CalibrationArgs().parse(
        build_parser().parse_args([*base, "--no-pack"]), model, tokens_only=True
    )
    assert any(not f["attention_mask"].all() for f in lines.calibration + lines.heldout)


def test_missing_tokenizer_is_a_one_line_error(lm, tmp_path, capsys):
    """--tokenizer naming a folder that is not there (transformers would try the hub): one
    line naming it, exit 2, nothing written."""
    out = tmp_path / "x.onnx"
    missing = tmp_path / "no-such-tokenizer"
    capsys.readouterr()
    code = main(["compress", str(lm["with_past"]), "-o", str(out), "--text", str(lm["text"]),
                 "--tokenizer", str(missing)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("flarc: error:")
    assert str(missing) in err[0]
    assert not out.exists()
