"""The test model zoo: small random torch models, exported to ONNX inside the tests (no binary
fixtures), and the helpers that feed and check them.

- Layers: ``Mlp2d`` (Gemm), ``Mlp3d`` (MatMul + Add), ``SmallCnn`` (strides, pads, dilation, a
  depthwise conv, a linear head).
- Transformers with one Linear per projection (``QkvBlock``): ``TinyEncoder`` (BERT-like) and
  ``TinyDecoder`` (GPT-like, tied head), fed by ``token_batch``; ``export_tiny_encoder`` exports
  one with its calibration batches (the ``tiny_encoder`` fixture in conftest.py caches them).
- The gradient-test kinds "gpt", "bert" and "cnn" (``TinyGPT``, ``TinyBert``, ``TinyCNN``, with a
  fused qkv projection in ``FusedQkvBlock``): ``build_kind``, ``export_kind`` (the ``exported``
  fixture in conftest.py caches them), ``example_batch``, ``torch_inputs``, ``match_initializers``.
- A Hugging Face Qwen2 language model: ``save_tiny_qwen2`` and ``lm_token_batches`` (the
  ``tiny_lm`` fixture in conftest.py exports one with its rank buckets).
- ``export`` (both torch exporters), ``run_ort``, ``im2col_rows``, ``kept_params``.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.nn import functional as F

# ---------------------------------------------------------------------------------------------
# layers


class Mlp2d(nn.Module):
    """Linear on 2-D inputs: the legacy exporter writes Gemm (transB=1)."""

    def __init__(self, n: int = 24, h: int = 32, m: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n, h)
        self.fc2 = nn.Linear(h, m)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class Mlp3d(nn.Module):
    """Linear on 3-D inputs: exported as MatMul + Add."""

    def __init__(self, n: int = 24, h: int = 40, m: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n, h)
        self.fc2 = nn.Linear(h, m, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class SmallCnn(nn.Module):
    """Convs with stride, padding and dilation, a depthwise conv (skipped) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, stride=1, padding=1)
        self.c2 = nn.Conv2d(16, 24, 3, stride=2, padding=2, dilation=2)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.c3 = nn.Conv2d(24, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(self.dw(x)))
        return self.head(x.mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------------------
# transformers with one Linear per projection, fed by token_batch

TOKEN_INPUTS = ["input_ids", "attention_mask"]
TOKEN_AXES = {name: {0: "b", 1: "s"} for name in TOKEN_INPUTS}


class QkvBlock(nn.Module):
    """Pre-norm block: separate q, k, v, o projections, an additive mask, a GELU MLP."""

    def __init__(self, d: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.ln1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x, mask):
        b, s, d = x.shape
        h = self.ln1(x)

        def split(t):
            return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        scores = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -1e4
        if self.causal:
            bias = bias + torch.triu(torch.full((s, s), -1e4), diagonal=1)
        att = torch.softmax(scores + bias, dim=-1) @ v
        x = x + self.o(att.transpose(1, 2).reshape(b, s, d))
        return x + self.down(torch.nn.functional.gelu(self.up(self.ln2(x))))


class TinyEncoder(nn.Module):
    """BERT-like: token + position embeddings, bidirectional blocks, an attention mask input."""

    def __init__(
        self, vocab: int = 64, d: int = 32, layers: int = 2, heads: int = 4, causal: bool = False
    ):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(64, d)
        self.blocks = nn.ModuleList(QkvBlock(d, heads, causal) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def hidden(self, input_ids, attention_mask):
        pos = torch.arange(input_ids.shape[1])[None, :]
        x = self.tok(input_ids) + self.pos(pos)
        for blk in self.blocks:
            x = blk(x, attention_mask)
        return self.ln(x)

    def forward(self, input_ids, attention_mask):
        return self.hidden(input_ids, attention_mask)


class TinyDecoder(TinyEncoder):
    """GPT-like: causal blocks and a language-model head tied to the token embedding."""

    def __init__(self, vocab: int = 64, d: int = 32, layers: int = 2, heads: int = 4):
        super().__init__(vocab, d, layers, heads, causal=True)

    def forward(self, input_ids, attention_mask):
        return self.hidden(input_ids, attention_mask) @ self.tok.weight.T


def token_batch(
    rng: np.random.Generator, batch: int, seq: int, vocab: int = 64, pad_from: int | None = None
):
    """Token ids in [1, vocab) and a mask of ones; the last row padded (zeros) from ``pad_from``."""
    ids = rng.integers(1, vocab, size=(batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    if pad_from is not None:
        mask[-1, pad_from:] = 0
        ids[-1, pad_from:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@dataclass(frozen=True)
class EncoderCase:
    """An exported ``TinyEncoder`` (dynamic batch and sequence) and its calibration batches."""

    path: Path  # the ONNX file; calib.npz beside it holds ``feeds`` concatenated
    model: onnx.ModelProto
    feeds: list[dict[str, np.ndarray]]


def export_tiny_encoder(
    folder: Path,
    d: int = 32,
    seed: int = 0,
    batches: int = 5,
    batch: int = 4,
    pad_from: int = 10,
) -> EncoderCase:
    """A two-block ``TinyEncoder`` of width ``d`` (torch seed ``seed``) exported to ``folder``,
    and ``batches`` calibration batches of ``batch`` x 16 tokens whose last row is padded from
    ``pad_from`` (numpy seed ``seed``)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    feed = token_batch(rng, 2, 12)
    args = tuple(torch.from_numpy(feed[k]) for k in TOKEN_INPUTS)
    path = export(TinyEncoder(d=d, layers=2), args, folder / "enc.onnx", TOKEN_INPUTS, TOKEN_AXES)
    feeds = [token_batch(rng, batch, 16, pad_from=pad_from) for _ in range(batches)]
    np.savez(folder / "calib.npz", **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
    return EncoderCase(path, onnx.load(str(path)), feeds)


# ---------------------------------------------------------------------------------------------
# the gradient-test kinds: "gpt", "bert", "cnn"

KIND_VOCAB = 23
KIND_SEQ = 6
KIND_BATCH = 2
KIND_INPUTS = {
    "gpt": ["input_ids", "attention_mask"],
    "bert": ["input_ids", "attention_mask"],
    "cnn": ["pixel_values"],
}
KIND_OUTPUTS = {
    "gpt": ["logits"],
    "bert": ["last_hidden_state", "pooler_output"],
    "cnn": ["logits"],
}


class FusedQkvAttention(nn.Module):
    """One qkv projection, split into heads; a boolean mask of the positions to keep."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        hd = d // self.heads
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.reshape(b, s, self.heads, hd).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        out = scores.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


class FusedQkvBlock(nn.Module):
    """Pre-norm block: ``FusedQkvAttention`` and a 4x MLP with the given activation."""

    def __init__(self, d: int, heads: int, act: nn.Module) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = FusedQkvAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), act, nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), keep)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Decoder: token + position embeddings, causal attention, tied lm head -> logits [B, S, V]."""

    def __init__(self, vocab: int = KIND_VOCAB, d: int = 16, heads: int = 2, layers: int = 2):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(32, d)
        self.blocks = nn.ModuleList(
            FusedQkvBlock(d, heads, nn.GELU(approximate="tanh")) for _ in range(layers)
        )
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.d, self.vocab = d, vocab

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        pos = torch.arange(s, device=input_ids.device).unsqueeze(0)
        x = self.wte(input_ids) + self.wpe(pos)
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        keep = causal[None, None] & attention_mask[:, None, None, :].bool()
        for block in self.blocks:
            x = block(x, keep)
        # A 2-D head exports as Gemm on the embedding matrix itself: one initializer, two uses.
        b = input_ids.shape[0]
        return self.lm_head(self.ln_f(x).reshape(-1, self.d)).reshape(b, s, self.vocab)


class TinyBert(nn.Module):
    """Encoder: bidirectional attention with an attention mask -> (last_hidden_state, pooler)."""

    def __init__(self, vocab: int = KIND_VOCAB, d: int = 16, heads: int = 4, layers: int = 1):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, 32, d) * 0.1)
        self.ln = nn.LayerNorm(d, eps=1e-12)
        self.blocks = nn.ModuleList(FusedQkvBlock(d, heads, nn.GELU()) for _ in range(layers))
        self.pool = nn.Linear(d, d)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = input_ids.shape[1]
        x = self.ln(self.emb(input_ids) + self.pos[:, :s])
        keep = attention_mask[:, None, None, :] > 0
        for block in self.blocks:
            x = block(x, keep)
        return x, torch.tanh(self.pool(x[:, 0]))


class TinyCNN(nn.Module):
    """Conv (pads, strides, dilation, groups), batch norm, max/avg pooling, linear head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.bn3 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # BatchNorm after the activation so that neither exporter folds it into the conv weight.
        x = F.max_pool2d(self.bn1(F.relu(self.conv1(pixel_values))), 2)
        x = F.avg_pool2d(F.relu(self.conv2(x)), 2, stride=1, padding=1, count_include_pad=False)
        x = self.bn3(torch.sigmoid(self.conv3(x)) * x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build_kind(kind: str, seed: int = 0) -> nn.Module:
    """The float32 module of ``kind`` in eval mode, norms and batch-norm statistics randomised."""
    torch.manual_seed(seed)
    model = {"gpt": TinyGPT, "bert": TinyBert, "cnn": TinyCNN}[kind]()
    for sub in model.modules():
        if isinstance(sub, nn.LayerNorm):
            # Distinct values, or the exporters merge the identical ones into one initializer.
            sub.weight.data.uniform_(0.5, 1.5)
            sub.bias.data.uniform_(-0.2, 0.2)
    if kind == "cnn":
        # Non-trivial running statistics so that inference batch norm is really exercised.
        for bn in (model.bn1, model.bn3):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def example_batch(kind: str, seed: int = 0, batch: int = KIND_BATCH, seq: int = KIND_SEQ) -> dict:
    """Inputs as numpy arrays; the second sequence is right-padded (mask zeros at the end)."""
    rng = np.random.default_rng(seed)
    if kind == "cnn":
        return {"pixel_values": rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)}
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[1:, seq - 2 :] = 0
    return {
        "input_ids": rng.integers(0, KIND_VOCAB, (batch, seq)).astype(np.int64),
        "attention_mask": mask,
    }


def export_kind(module: nn.Module, kind: str, exporter: str, path: Path) -> onnx.ModelProto:
    """``export`` of a kind with exporter "legacy" or "dynamo"; dynamic batch and sequence."""
    feeds = example_batch(kind)
    names = KIND_INPUTS[kind]
    args = tuple(torch.from_numpy(feeds[n]) for n in names)
    axes = {0: "batch"} if kind == "cnn" else {0: "batch", 1: "seq"}
    dims = None
    if exporter == "dynamo":
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=32)
        dims = tuple({0: batch} if kind == "cnn" else {0: batch, 1: seq} for _ in names)
    dynamic = {n: axes for n in names}
    export(module, args, path, names, dynamic, exporter == "dynamo", KIND_OUTPUTS[kind], dims)
    return onnx.load(str(path))


def torch_inputs(kind: str, feeds: dict) -> tuple[torch.Tensor, ...]:
    """The module's positional inputs from numpy feeds, float ones in float64."""
    out = []
    for name in KIND_INPUTS[kind]:
        t = torch.from_numpy(feeds[name])
        out.append(t.double() if t.is_floating_point() else t)
    return tuple(out)


def match_initializers(
    model: onnx.ModelProto, module: nn.Module
) -> dict[str, list[tuple[str, bool]]]:
    """Torch parameter name -> the ONNX initializers holding it: (name, stored transposed).

    Exporters rename weights and fold transposes into new initializers, so match by value.
    """
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    inits[node.output[0]] = onnx.numpy_helper.to_array(a.t)
    found: dict[str, list[tuple[str, bool]]] = {}
    for pname, p in module.named_parameters(remove_duplicate=True):
        ref = p.detach().float().numpy()
        for iname, arr in inits.items():
            if arr.dtype != np.float32 or arr.size != ref.size or ref.size < 4:
                continue
            if arr.shape == ref.shape and np.array_equal(arr, ref):
                found.setdefault(pname, []).append((iname, False))
            elif ref.ndim == 2 and arr.shape == ref.T.shape and np.array_equal(arr, ref.T):
                found.setdefault(pname, []).append((iname, True))
            elif arr.shape != ref.shape and np.array_equal(arr.reshape(ref.shape), ref):
                found.setdefault(pname, []).append((iname, False))
    return found


# ---------------------------------------------------------------------------------------------
# a Hugging Face language model


def save_tiny_qwen2(
    path: Path, hidden: int = 64, inter: int = 128, vocab: int = 256, seed: int = 0
) -> None:
    """A random two-layer Qwen2ForCausalLM (4 heads, 2 key-value heads) saved to ``path``."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
    )
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)


def lm_token_batches(
    count: int, vocab: int = 256, batch: int = 4, seq: int = 24, seed: int = 0
) -> list[dict]:
    """Unpadded batches with the inputs of an exported Hugging Face decoder (position ids too)."""
    rng = np.random.default_rng(seed)
    return [
        {
            "input_ids": rng.integers(0, vocab, (batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, seq), np.int64),
            "position_ids": np.tile(np.arange(seq, dtype=np.int64), (batch, 1)),
        }
        for _ in range(count)
    ]


# ---------------------------------------------------------------------------------------------
# export, run, measure


def export(
    module: nn.Module,
    args: tuple,
    path: Path,
    input_names: list[str],
    dynamic: dict[str, dict[int, str]] | None = None,
    dynamo: bool = False,
    output_names: list[str] | None = None,
    dims: tuple | dict | None = None,
    opset: int = 17,
) -> Path:
    """Export with the legacy (``opset``, 17 by default) or dynamo (opset 18) exporter; IR 10 at
    most for onnxruntime (old opsets keep the exporter's older IR).

    The legacy exporter names the outputs ``output_names`` (default ["out"]) and makes the axes
    of ``dynamic`` dynamic; the dynamo exporter takes ``dims`` as its dynamic shapes, by default
    ``Dim.AUTO`` on every axis of ``dynamic``.
    """
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            if dims is None and dynamic:
                dims = {
                    name: {ax: torch.export.Dim.AUTO for ax in axes}
                    for name, axes in dynamic.items()
                }
            prog = torch.onnx.export(
                module,
                args,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dims,
                dynamo=True,
                opset_version=18,
                verbose=False,
            )
            model = prog.model_proto
        else:
            buf = io.BytesIO()
            torch.onnx.export(
                module,
                args,
                buf,
                input_names=input_names,
                output_names=output_names or ["out"],
                dynamic_axes=dynamic,
                opset_version=opset,
                dynamo=False,
            )
            model = onnx.load_from_string(buf.getvalue())
    # onnxruntime 1.2x rejects the IR version that onnx 1.23 writes.
    model.ir_version = min(model.ir_version, 10)
    onnx.save(model, str(path))
    return path


def run_ort(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    """Every output by name (onnxruntime, CPU); feeds the model does not take are left out."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(
        zip(names, session.run(None, {k: v for k, v in feeds.items() if k in wanted}), strict=False)
    )


def im2col_rows(x: np.ndarray, conv) -> np.ndarray:
    """Rows of im2col patches in the weight's (c, kh, kw) order, float64 (torch's unfold)."""
    cols = torch.nn.functional.unfold(
        torch.from_numpy(x).double(), conv.kernel_shape, conv.dilations, conv.pads[:2], conv.strides
    )
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]).numpy()


def kept_params(targets, ranks) -> int:
    """Parameters of the targets after factorizing at ``ranks`` (dense where rank is None)."""
    return sum(
        t.params if ranks[t.name].rank is None else t.rank_params(ranks[t.name].rank)
        for t in targets
    )


def full_rank_model(model: onnx.ModelProto, data):
    """``(analysis, rewritten)``: the analysis without shrinkage keeping every singular value
    (one-sided, so the whitened identity holds as stated), and ``model`` with every target at
    full rank, checked by onnx. ``data`` is a CalibrationSet."""
    from flarc.core.targets import find_targets
    from flarc.pipeline import AnalysisOptions, analyze
    from flarc.rewrite.pairs import chosen_factors, factorize
    from flarc.rewrite.ranks import RankChoice

    found = find_targets(model)
    options = AnalysisOptions(shrinkage="none", full_rank=True, two_sided=False)
    analysis = analyze(model, found, data, options)
    ranks = {t.name: RankChoice(min(t.n, t.m), "full") for t in found.targets}
    full = factorize(model, found.targets, chosen_factors(analysis, ranks))
    onnx.checker.check_model(full)
    return analysis, full
