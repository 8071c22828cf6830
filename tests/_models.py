"""Small random torch models, exported to ONNX inside the tests (no binary fixtures)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn


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


class Block(nn.Module):
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
        self.blocks = nn.ModuleList(Block(d, heads, causal) for _ in range(layers))
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


def export(
    module: nn.Module,
    args: tuple,
    path: Path,
    input_names: list[str],
    dynamic: dict[str, dict[int, str]] | None = None,
    dynamo: bool = False,
) -> Path:
    """Export with the legacy (opset 17) or dynamo (opset 18) exporter; IR 10 for onnxruntime."""
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dims = None
            if dynamic:
                dims = {
                    name: {ax: torch.export.Dim.AUTO for ax in axes}
                    for name, axes in dynamic.items()
                }
            prog = torch.onnx.export(
                module,
                args,
                input_names=input_names,
                dynamic_shapes=dims,
                dynamo=True,
                opset_version=18,
            )
            model = prog.model_proto
        else:
            buf = io.BytesIO()
            torch.onnx.export(
                module,
                args,
                buf,
                input_names=input_names,
                output_names=["out"],
                dynamic_axes=dynamic,
                opset_version=17,
                dynamo=False,
            )
            model = onnx.load_from_string(buf.getvalue())
    model.ir_version = min(model.ir_version, 10)
    onnx.save(model, str(path))
    return path


def token_batch(
    rng: np.random.Generator, batch: int, seq: int, vocab: int = 64, pad_from: int | None = None
):
    ids = rng.integers(1, vocab, size=(batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    if pad_from is not None:
        mask[-1, pad_from:] = 0
        ids[-1, pad_from:] = 0
    return {"input_ids": ids, "attention_mask": mask}


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
