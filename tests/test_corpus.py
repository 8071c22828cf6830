"""A corpus of bad and awkward inputs, generated here (no binary blobs in the repository).

For every case flarc either succeeds correctly (the output passes onnx.checker, loads in
onnxruntime and stays close to the original at a rank that holds the weights' information) or
fails with exactly one ``flarc: error:`` line naming the problem and a non-zero exit. Either
way the input is untouched, and a failure leaves no output and no temporary files behind.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from flarc.cli import main
from flarc.core.modelio import load_model
from flarc.core.targets import find_targets

from _outcome import message_lines

N, H, M = 32, 32, 16  # x[b, N] -> MatMul [N, H] -> Relu -> MatMul [H, M] -> y[b, M]
TRUE_RANK = 4  # weights are exactly rank 4, so rank 8 factors reproduce them


def low_rank(rng: np.random.Generator, n: int, m: int, rank: int = TRUE_RANK) -> np.ndarray:
    return (rng.standard_normal((n, rank)) @ rng.standard_normal((rank, m)) / np.sqrt(n)).astype(
        np.float32
    )


def mlp(
    dtype: int = TensorProto.FLOAT,
    opset: int = 17,
    batch: int | str = "b",
    seed: int = 0,
    w1: np.ndarray | None = None,
    custom: bool = False,
    tied: bool = False,
    duplicate: bool = False,
    dead_branch: bool = False,
) -> onnx.ModelProto:
    """The corpus's base model, in the variants the cases need."""
    rng = np.random.default_rng(seed)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    w1 = low_rank(rng, N, H) if w1 is None else w1
    w2 = low_rank(rng, H, M)

    def init(name: str, value: np.ndarray) -> TensorProto:
        if dtype == TensorProto.BFLOAT16:
            t = helper.make_tensor(name, dtype, value.shape, value.flatten().tolist())
            return t
        return numpy_helper.from_array(value.astype(np_dtype), name)

    inits = [init("w1", w1), init("b1", rng.standard_normal(H).astype(np.float32)), init("w2", w2)]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="bias1"),
    ]
    if custom:
        # An op of a custom domain that onnxruntime has no kernel for, between the targets.
        nodes.append(helper.make_node("Swish", ["h1"], ["h2"], name="act", domain="com.example"))
    else:
        nodes.append(helper.make_node("Relu", ["h1"], ["h2"], name="act"))
    nodes.append(helper.make_node("MatMul", ["h2", "w2"], ["y"], name="fc2"))
    outputs = [helper.make_tensor_value_info("y", dtype, [batch, M])]
    if tied:
        # The same initializer feeds a second MatMul: left dense, never duplicated.
        nodes.append(helper.make_node("MatMul", ["h2", "w2"], ["y2"], name="fc2_tied"))
        outputs.append(helper.make_tensor_value_info("y2", dtype, [batch, M]))
    if duplicate:
        # A second initializer with the same values: two independent targets.
        inits.append(init("w2_copy", w2))
        nodes.append(helper.make_node("MatMul", ["h2", "w2_copy"], ["y2"], name="fc2_copy"))
        outputs.append(helper.make_tensor_value_info("y2", dtype, [batch, M]))
    if dead_branch:
        # A target whose result reaches no graph output.
        inits.append(init("w3", low_rank(rng, H, M)))
        nodes.append(helper.make_node("MatMul", ["h2", "w3"], ["dead"], name="fc_dead"))
    graph = helper.make_graph(
        nodes, "corpus", [helper.make_tensor_value_info("x", dtype, [batch, N])], outputs, inits
    )
    imports = [helper.make_opsetid("", opset)]
    if custom:
        imports.append(helper.make_opsetid("com.example", 1))
    return helper.make_model(graph, opset_imports=imports, ir_version=10 if opset >= 13 else 7)


def raw(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def edit(model: onnx.ModelProto, fn: Callable[[onnx.ModelProto], None]) -> bytes:
    """Bytes of ``model`` after ``fn`` changed it (no checks: the point is a broken model)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    fn(m)
    return m.SerializeToString()


def calib(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"x": x.astype(np.float32)}


@dataclass
class Case:
    name: str
    model: bytes
    expect: str  # ok | error | either (bit flips only: some leave a valid model)
    words: tuple[str, ...] = ()  # what the error line must mention
    data: dict[str, np.ndarray] | None = None  # a .npz; otherwise --synthetic 4
    args: tuple[str, ...] = ()
    files: dict[str, bytes] = field(default_factory=dict)  # written beside the model
    tolerance: float = 1e-3
    # "ok" cases that leave a target dense: node -> words its skip reason must contain; the
    # initializers named in ``kept`` are in the output byte for byte.
    skips: dict[str, tuple[str, ...]] = field(default_factory=dict)
    kept: tuple[str, ...] = ()


def truncated(cut: float) -> Case:
    data = raw(mlp())
    return Case(f"truncated-{cut}", data[: int(len(data) * cut)], "error", ("model.onnx",))


def bit_flipped(seed: int, structure_only: bool = False) -> Case:
    data = bytearray(raw(mlp()))
    rng = np.random.default_rng(seed)
    # The nodes are serialised first: flips in the first 160 bytes hit names, op types, tags.
    span = 160 if structure_only else len(data)
    for pos in rng.choice(span, size=8 if not structure_only else 3, replace=False):
        data[pos] ^= 1 << int(rng.integers(8))
    # Flips inside float payloads can leave a valid (slightly different) model.
    kind = "bitflip-structure" if structure_only else "bitflip"
    return Case(f"{kind}-{seed}", bytes(data), "either")


def _set_raw(name: str, size: int) -> Callable[[onnx.ModelProto], None]:
    def fn(m: onnx.ModelProto) -> None:
        t = next(t for t in m.graph.initializer if t.name == name)
        t.raw_data = t.raw_data[:size] if size >= 0 else t.raw_data + b"\0" * -size

    return fn


def _poison(name: str, value: float) -> Callable[[onnx.ModelProto], None]:
    def fn(m: onnx.ModelProto) -> None:
        t = next(t for t in m.graph.initializer if t.name == name)
        a = numpy_helper.to_array(t).copy()
        a[1, 2] = value
        t.CopyFrom(numpy_helper.from_array(a, name))

    return fn


def _typed_data(m: onnx.ModelProto) -> None:
    t = next(t for t in m.graph.initializer if t.name == "w1")
    values = numpy_helper.to_array(t).flatten()
    t.ClearField("raw_data")
    t.float_data.extend(values[:-3].tolist())  # three elements short of the shape


def _dims(name: str, dims: list[int]) -> Callable[[onnx.ModelProto], None]:
    def fn(m: onnx.ModelProto) -> None:
        t = next(t for t in m.graph.initializer if t.name == name)
        del t.dims[:]
        t.dims.extend(dims)

    return fn


def _input_dims(dims: list[int]) -> Callable[[onnx.ModelProto], None]:
    def fn(m: onnx.ModelProto) -> None:
        shape = m.graph.input[0].type.tensor_type.shape
        for d, v in zip(shape.dim, dims, strict=True):
            d.Clear()
            d.dim_value = v

    return fn


def _cycle(m: onnx.ModelProto) -> None:
    # act consumes the output of fc2 and fc2 the output of act: a loop.
    m.graph.node[2].input[0] = "y"
    m.graph.node[3].input[0] = "h2"


def _dangling(m: onnx.ModelProto) -> None:
    m.graph.node[1].input[0] = "nowhere"


def _duplicate_output(m: onnx.ModelProto) -> None:
    m.graph.node[1].output[0] = "h0"


def _unsorted(m: onnx.ModelProto) -> None:
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(reversed(nodes))


def _external(location: str, length: int | None) -> Callable[[onnx.ModelProto], None]:
    def fn(m: onnx.ModelProto) -> None:
        t = next(t for t in m.graph.initializer if t.name == "w1")
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        entries = {"location": location, "offset": "0"}
        if length is not None:
            entries["length"] = str(length)
        for k, v in entries.items():
            t.external_data.add(key=k, value=v)

    return fn


def _insert(m: onnx.ModelProto, at: int, *nodes: onnx.NodeProto) -> None:
    for i, node in enumerate(nodes):
        m.graph.node.insert(at + i, node)


def _dequantized_w1(zero: str) -> onnx.ModelProto:
    """w1 stored as int8 behind DequantizeLinear with a zero scale: the whole tensor's
    (``zero="tensor"``, so the weight is all zero) or one output channel's (``"channel"``)."""
    m = mlp()
    w1 = numpy_helper.to_array(m.graph.initializer[0])
    scale = (np.abs(w1).max(0) / 127).astype(np.float32)
    if zero == "tensor":
        scale = np.float32(0.0)
    else:
        scale[3] = 0.0
    q = np.clip(np.round(w1 / np.where(scale == 0, 1, scale)), -127, 127).astype(np.int8)
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(q, "w1_q"))
    m.graph.initializer.append(numpy_helper.from_array(np.asarray(scale), "w1_scale"))
    axis = {} if zero == "tensor" else {"axis": 1}
    _insert(
        m, 0, helper.make_node("DequantizeLinear", ["w1_q", "w1_scale"], ["w1"], name="dq", **axis)
    )
    return m


def _w1_from(kind: str) -> onnx.ModelProto:
    """fc1 reads w1 through a branch that is not constant-only: ``add`` adds a tensor computed
    from x, ``mul`` multiplies by a second graph input, ``int-cast`` goes through int32."""
    m = mlp()
    m.graph.node[0].input[1] = "w1_eff"
    if kind == "add":
        _insert(
            m,
            0,
            helper.make_node("ReduceMean", ["x"], ["x_mean"], name="mean", axes=[0, 1]),
            helper.make_node("Add", ["w1", "x_mean"], ["w1_eff"], name="w_add"),
        )
    elif kind == "mul":
        m.graph.input.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, [1, H]))
        _insert(m, 0, helper.make_node("Mul", ["w1", "g"], ["w1_eff"], name="w_mul"))
    else:
        _insert(
            m,
            0,
            helper.make_node("Cast", ["w1"], ["w1_int"], name="to_int", to=TensorProto.INT32),
            helper.make_node("Cast", ["w1_int"], ["w1_eff"], name="to_float", to=TensorProto.FLOAT),
        )
    onnx.checker.check_model(m)
    return m


def _if_outer_weight() -> onnx.ModelProto:
    """fc2 moved into both branches of an If; each branch reads the outer-graph w2."""
    m = mlp()
    m.graph.node.pop()

    def branch(name: str, act: str) -> onnx.GraphProto:
        nodes = [
            helper.make_node("MatMul", ["h2", "w2"], [f"{name}_m"], name="fc2"),
            helper.make_node(act, [f"{name}_m"], [f"{name}_y"], name="act2"),
        ]
        out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["b", M])
        return helper.make_graph(nodes, name, [], [out])

    m.graph.node.append(
        helper.make_node(
            "If",
            ["c"],
            ["y"],
            name="switch",
            then_branch=branch("then", "Tanh"),
            else_branch=branch("else", "Sigmoid"),
        )
    )
    m.graph.input.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    onnx.checker.check_model(m)
    return m


def _custom_consumer() -> onnx.ModelProto:
    """fc2 replaced by an op of a custom domain that reads w2 (no kernel in onnxruntime)."""
    m = mlp()
    m.graph.node[3].CopyFrom(
        helper.make_node("FancyMatMul", ["h2", "w2"], ["y"], name="fc2", domain="com.example")
    )
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    return m


def _opsets(*imports: tuple[str, int]) -> Callable[[onnx.ModelProto], None]:
    def fn(m: onnx.ModelProto) -> None:
        del m.opset_import[:]
        m.opset_import.extend(helper.make_opsetid(d, v) for d, v in imports)

    return fn


def cases() -> list[Case]:
    rng = np.random.default_rng(0)
    base = mlp()
    w1_bytes = numpy_helper.to_array(base.graph.initializer[0]).tobytes()
    dead = rng.standard_normal((64, N)).astype(np.float32)
    dead[:, :6] = 0.0  # dead input channels: the Gram is singular
    dead[:, 6:9] = 1.5  # constant channels: rank-1 directions
    dead_w1 = low_rank(rng, N, H)
    dead_w1[:6] = 0.0  # dead channels carry no weight either, so the output error stays tiny
    other = np.random.default_rng(1)  # the later cases' data (the earlier ones' stays as it was)
    out = [
        truncated(0.0),
        truncated(0.1),
        truncated(0.5),
        truncated(0.99),
        *(bit_flipped(s) for s in range(4)),
        *(bit_flipped(s, structure_only=True) for s in range(8)),
        Case("opset-6", raw(mlp(opset=6)), "error", ("opset 6", "7+")),
        Case("opset-9", raw(mlp(opset=9)), "ok"),
        Case("opset-13", raw(mlp(opset=13)), "ok"),
        Case("opset-21", raw(mlp(opset=21)), "ok"),
        Case("opset-1", edit(base, _opsets(("", 1))), "error", ("opset 1", "7+")),
        Case("opset-6-ai.onnx", edit(base, _opsets(("ai.onnx", 6))), "error", ("opset 6", "7+")),
        Case(
            "no-default-opset",
            edit(base, _opsets(("com.example", 1))),
            "error",
            ("model.onnx", "no ai.onnx opset"),
        ),
        # A custom-domain op onnxruntime has no kernel for cannot be calibrated through: between
        # the targets, and as the only reader of a weight (not a target itself).
        Case(
            "custom-domain-op", raw(mlp(custom=True)), "error", ("model.onnx", "com.example:Swish")
        ),
        Case(
            "custom-domain-weight-consumer",
            raw(_custom_consumer()),
            "error",
            ("model.onnx", "com.example:FancyMatMul"),
        ),
        # A zero DequantizeLinear scale is legal and means zero weights: the model computes
        # exactly that, and so does its compression (the factors get scales of their own).
        Case("qdq-zero-scale", raw(_dequantized_w1("tensor")), "ok"),
        # int8 factors round twice (the original weight once): measured 6.2e-3, the same as
        # with no zero scale.
        Case("qdq-zero-scale-channel", raw(_dequantized_w1("channel")), "ok", tolerance=2e-2),
        # Weights that are not constant-only: that target is skipped with its reason, its
        # weight kept as it was, and the rest compressed.
        Case(
            "weight-plus-activation",
            raw(_w1_from("add")),
            "ok",
            skips={"fc1": ("Add node 'w_add'", "not a constant-only weight path")},
            kept=("w1",),
        ),
        Case(
            "weight-times-graph-input",
            raw(_w1_from("mul")),
            "ok",
            skips={"fc1": ("Mul node 'w_mul'", "not a constant-only weight path")},
            kept=("w1",),
        ),
        # float -> int32 -> float truncates the weight: a computation, not a storage form.
        Case(
            "weight-through-int-cast",
            raw(_w1_from("int-cast")),
            "ok",
            skips={"fc1": ("Cast node 'to_int'", "not from stored constants")},
            kept=("w1",),
        ),
        # An If whose branches both read the outer graph's w2: one target, compressed; the
        # output runs (and matches) whichever branch is taken.
        Case(
            "if-branch-outer-weight",
            raw(_if_outer_weight()),
            "ok",
            data={**calib(other.standard_normal((16, N))), "c": np.array(True)},
        ),
        # fp16 end to end: factors stored in fp16; measured relative output error 3.6e-4.
        Case("fp16", raw(mlp(TensorProto.FLOAT16)), "ok", tolerance=2e-3),
        # bf16 activations: onnxruntime's CPU provider has no bf16 kernels (MatMul, Relu), so
        # the model cannot be run to calibrate, nor by its user on this runtime.
        Case(
            "bf16",
            raw(mlp(TensorProto.BFLOAT16)),
            "error",
            ("model.onnx: onnxruntime:", "NOT_IMPLEMENTED", "Could not find an implementation"),
        ),
        Case("symbolic-batch", raw(mlp(batch="batch_size")), "ok"),
        Case("fixed-batch", raw(mlp(batch=4)), "ok", data=calib(rng.standard_normal((16, N)))),
        Case(
            "fixed-batch-too-few-rows",
            raw(mlp(batch=4)),
            "error",
            ("calib.npz", "'x'", "3 rows", "fixed batch of 4"),
            data=calib(other.standard_normal((3, N))),
        ),
        Case("nan-batch", raw(base), "error", ("NaN",), data=calib(np.full((16, N), np.nan))),
        Case("inf-batch", raw(base), "error", ("Inf",), data=calib(np.full((16, N), np.inf))),
        Case(
            "zero-size-batch", raw(base), "error", ("zero samples",), data=calib(np.zeros((0, N)))
        ),
        Case("zero-width", raw(base), "error", ("'x'",), data=calib(np.zeros((16, 0)))),
        Case("dead-channels", raw(mlp(w1=dead_w1)), "ok", data=calib(dead)),
        Case(
            "dead-channels-no-shrinkage",
            raw(mlp(w1=dead_w1)),
            "ok",
            data=calib(dead),
            args=("--shrinkage", "none"),
        ),
        Case(
            "dead-channels-eig",
            raw(mlp(w1=dead_w1)),
            "ok",
            data=calib(dead),
            args=("--shrinkage", "none", "--whiten", "eig"),
        ),
        Case("all-zero-input", raw(base), "ok", data=calib(np.zeros((16, N)))),
        Case("tied-weights", raw(mlp(tied=True)), "ok"),
        Case("duplicated-weights", raw(mlp(duplicate=True)), "ok"),
        Case("target-not-reaching-output", raw(mlp(dead_branch=True)), "ok"),
        Case("raw-data-short", edit(base, _set_raw("w1", 100)), "error", ("'w1'", "bytes")),
        Case("raw-data-long", edit(base, _set_raw("w1", -8)), "error", ("'w1'", "bytes")),
        Case("typed-data-short", edit(base, _typed_data), "error", ("w1", "too small")),
        Case("absurd-initializer", edit(base, _dims("w1", [1 << 40, 1 << 30])), "error", ("'w1'",)),
        Case("negative-dim", edit(base, _dims("w1", [-32, -32])), "error", ("'w1'",)),
        Case(
            "absurd-input-shape",
            edit(base, _input_dims([1 << 20, 1 << 20])),
            "error",
            ("'x'",),
            args=("--synthetic", "2"),
        ),
        Case("cycle", edit(base, _cycle), "error", ("model.onnx",)),
        Case("dangling-input", edit(base, _dangling), "error", ("nowhere",)),
        Case("duplicate-output-name", edit(base, _duplicate_output), "error", ("h0",)),
        Case("unsorted-nodes", edit(base, _unsorted), "error", ("model.onnx",)),
        Case("external-ok", edit(base, _external("w.bin", None)), "ok", files={"w.bin": w1_bytes}),
        Case(
            "external-short-file",
            edit(base, _external("w.bin", None)),
            "error",
            ("'w1'",),
            files={"w.bin": w1_bytes[:64]},
        ),
        Case(
            "external-length-lies",
            edit(base, _external("w.bin", len(w1_bytes) + 4)),
            "error",
            ("'w1'",),
            files={"w.bin": w1_bytes + b"\0" * 4},
        ),
        Case("external-missing", edit(base, _external("gone.bin", None)), "error", ("gone.bin",)),
        Case("external-escape", edit(base, _external("../w.bin", None)), "error", ("refused",)),
        Case("empty-file", b"", "error", ("model.onnx",)),
        Case("nan-weight", edit(base, _poison("w1", np.nan)), "error", ("'w1'",)),
        Case("inf-weight", edit(base, _poison("w2", np.inf)), "error", ("'w2'",)),
        Case("no-nodes", edit(base, lambda m: m.graph.ClearField("node")), "error", ("no nodes",)),
    ]
    return out


CASES = cases()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_case(case: Case, folder: Path, capsys) -> str:
    """Run ``flarc compress`` on the case; check the invariants; return 'ok' or 'error'."""
    model = folder / "model.onnx"
    model.write_bytes(case.model)
    for name, data in case.files.items():
        (folder / name).write_bytes(data)
    argv = ["compress", str(model), "-o", str(folder / "out.onnx")]
    if case.data is not None:
        np.savez(folder / "calib.npz", **case.data)
        argv += ["--calib", str(folder / "calib.npz"), "--batch-size", "4"]
    elif "--synthetic" not in case.args:
        argv += ["--synthetic", "4"]
    # Rank 8 holds the rank-4 weights exactly: outputs must match closely.
    argv += ["--ratio", "0.5", "--align", "8", *case.args]
    before = {p.name: sha(p) for p in folder.iterdir()}
    code = main(argv)
    captured = capsys.readouterr()
    after = {p.name: sha(p) for p in folder.iterdir() if p.name in before}
    assert after == before, "an input file was modified"
    new = sorted(p.name for p in folder.iterdir() if p.name not in before)
    if code == 0:
        assert new == ["out.onnx"], new
        check_output(model, folder / "out.onnx", case.tolerance)
        check_skips(case, model, folder / "out.onnx")
        return "ok"
    assert "Traceback" not in captured.err, captured.err
    lines = message_lines(captured.err)
    assert len(lines) == 1 and lines[0].startswith("flarc: error:"), captured.err
    for word in case.words:
        assert word in lines[0], lines[0]
    assert new == [], f"partial output left behind: {new}"
    return "error"


def check_skips(case: Case, model: Path, output: Path) -> None:
    """Every target is factorized (its stored weight gone from the output) but the case's
    skipped ones, each with its reason; their weights are in the output unchanged."""
    found = find_targets(load_model(model))
    reasons = {s.node: s.reason for s in found.skipped}
    assert set(reasons) == set(case.skips), reasons
    for node, words in case.skips.items():
        for word in words:
            assert word in reasons[node], reasons[node]
    before = {t.name: t for t in onnx.load(str(model)).graph.initializer}
    after = {t.name: t for t in onnx.load(str(output)).graph.initializer}
    assert not {t.weight for t in found.targets} & set(after), sorted(after)
    for name in case.kept:
        assert after[name].SerializeToString() == before[name].SerializeToString(), name


def _feeds(spec: onnx.GraphProto) -> list[dict[str, np.ndarray]]:
    """Random float inputs from the declared shapes (3 for a symbolic axis); a boolean input
    (an If condition) takes each value in turn."""
    rng = np.random.default_rng(5)
    feed, flags = {}, []
    for i in spec.input:
        tt = i.type.tensor_type
        if tt.elem_type == TensorProto.BOOL:
            flags.append(i.name)
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 3 for d in tt.shape.dim]
        feed[i.name] = rng.standard_normal(dims).astype(
            helper.tensor_dtype_to_np_dtype(tt.elem_type)
        )
    if not flags:
        return [feed]
    return [{**feed, **{f: np.array(v) for f in flags}} for v in (True, False)]


def check_output(original: Path, output: Path, tolerance: float) -> None:
    """A valid model, smaller than the original (every "ok" case factorizes a target at rank
    8), whose weights keep the original's element types, with outputs close to the original's."""
    onnx.checker.check_model(onnx.load(str(output)))
    before = onnx.load(str(original), load_external_data=False).graph.initializer
    after = onnx.load(str(output)).graph.initializer
    assert sum(np.prod(t.dims) for t in after) < sum(np.prod(t.dims) for t in before)
    assert {t.data_type for t in after} == {t.data_type for t in before}
    ref = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    names = [o.name for o in ref.get_outputs()]
    for feed in _feeds(onnx.load(str(original), load_external_data=False).graph):
        for a, b in zip(ref.run(names, feed), new.run(names, feed), strict=True):
            a, b = a.astype(np.float64), b.astype(np.float64)
            if not np.isfinite(a).all():
                # A bit flip made a weight so large that the original overflows: nothing to match.
                continue
            err = np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12)
            assert err < tolerance, f"relative output error {err:.2e}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_case(case: Case, tmp_path: Path, capsys) -> None:
    outcome = run_case(case, tmp_path, capsys)
    if case.expect != "either":
        assert outcome == case.expect


def test_corpus_inspect_never_crashes(tmp_path: Path, capsys) -> None:
    """``flarc inspect`` on every model of the corpus: exit 0 or one clean error line."""
    for case in CASES:
        model = tmp_path / "model.onnx"
        model.write_bytes(case.model)
        for name, data in case.files.items():
            (tmp_path / name).write_bytes(data)
        code = main(["inspect", str(model), "--json"])
        err = capsys.readouterr().err
        if code:
            lines = message_lines(err)
            assert len(lines) == 1 and lines[0].startswith("flarc: error:"), (case.name, err)
        for name in case.files:
            (tmp_path / name).unlink()


@pytest.mark.parametrize("zero", ["tensor", "channel"])
def test_zero_scale_weights_stay_zero_and_factors_get_nonzero_scales(tmp_path, zero, capsys):
    """What the compressed fc1 computes is zero wherever the original's zero scale made it zero
    (the whole weight, or output channel 3, to round-off), and no factor is written with a zero
    scale."""
    model = tmp_path / "model.onnx"
    model.write_bytes(raw(_dequantized_w1(zero)))
    out = tmp_path / "out.onnx"
    assert main(["compress", str(model), "-o", str(out), "--synthetic", "4", "--ratio", "0.5"]) == 0
    capsys.readouterr()

    def fc1_weight(path: Path) -> np.ndarray:
        # x = I: fc1's output is the weight it applies.
        m = onnx.load(str(path))
        m.graph.output.append(helper.make_empty_tensor_value_info("h0"))
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(["h0"], {"x": np.eye(N, dtype=np.float32)})[0]

    before, after = fc1_weight(model), fc1_weight(out)
    if zero == "tensor":
        assert not before.any() and not after.any()
    else:
        # The factors' column 3 is SVD round-off (~1e-17) on a grid of its own: not exactly 0.
        assert not before[:, 3].any() and np.abs(after[:, 3]).max() < 1e-12
        assert np.abs(after).max() > 0.1  # the other channels survive
    small = onnx.load(str(out))
    assert "w1_q" not in {t.name for t in small.graph.initializer}
    inits = {t.name: numpy_helper.to_array(t) for t in small.graph.initializer}
    scales = [inits[n.input[1]] for n in small.graph.node if n.op_type == "DequantizeLinear"]
    assert len(scales) == 2 and all(np.all(s > 0) for s in scales)
