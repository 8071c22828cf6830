"""Tiny torch models for the gradient tests, exported to ONNX with both torch exporters.

A GPT-like decoder (tied lm head, causal mask plus padding mask), a BERT-like encoder
(additive attention mask, two outputs) and a CNN (strides, pads, dilation, batch norm,
pooling, grouped conv, linear head). Shared by tests/test_onnx_torch.py and tests/test_fisher.py.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 23
SEQ = 6
BATCH = 2


class Attention(nn.Module):
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


class Block(nn.Module):
    def __init__(self, d: int, heads: int, act: nn.Module) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), act, nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), keep)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Decoder: token + position embeddings, causal attention, tied lm head -> logits [B, S, V]."""

    def __init__(self, vocab: int = VOCAB, d: int = 16, heads: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(32, d)
        self.blocks = nn.ModuleList(
            Block(d, heads, nn.GELU(approximate="tanh")) for _ in range(layers)
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

    def __init__(self, vocab: int = VOCAB, d: int = 16, heads: int = 4, layers: int = 1) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, 32, d) * 0.1)
        self.ln = nn.LayerNorm(d, eps=1e-12)
        self.blocks = nn.ModuleList(Block(d, heads, nn.GELU()) for _ in range(layers))
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


def build(kind: str, seed: int = 0) -> nn.Module:
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


INPUT_NAMES = {
    "gpt": ["input_ids", "attention_mask"],
    "bert": ["input_ids", "attention_mask"],
    "cnn": ["pixel_values"],
}
OUTPUT_NAMES = {
    "gpt": ["logits"],
    "bert": ["last_hidden_state", "pooler_output"],
    "cnn": ["logits"],
}


def example_batch(kind: str, seed: int = 0, batch: int = BATCH, seq: int = SEQ) -> dict:
    """Inputs as numpy arrays; the second sequence is right-padded (mask zeros at the end)."""
    rng = np.random.default_rng(seed)
    if kind == "cnn":
        return {"pixel_values": rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)}
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[1:, seq - 2 :] = 0
    return {
        "input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64),
        "attention_mask": mask,
    }


def export(module: nn.Module, kind: str, exporter: str, path: Path) -> onnx.ModelProto:
    """Export with the legacy (opset 17) or the dynamo (opset 18) exporter; dynamic batch and seq."""
    feeds = example_batch(kind)
    args = tuple(torch.from_numpy(feeds[n]) for n in INPUT_NAMES[kind])
    names_in, names_out = INPUT_NAMES[kind], OUTPUT_NAMES[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            axes = {n: {0: "batch"} if kind == "cnn" else {0: "batch", 1: "seq"} for n in names_in}
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=names_in,
                output_names=names_out,
                dynamic_axes=axes,
            )
        else:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=32)
            shapes = tuple({0: batch} if kind == "cnn" else {0: batch, 1: seq} for _ in names_in)
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=18,
                input_names=names_in,
                output_names=names_out,
                dynamic_shapes=shapes,
                verbose=False,
            )
            program.save(str(path))
    model = onnx.load(str(path))
    # onnxruntime 1.2x rejects the IR version that onnx 1.23 writes.
    model.ir_version = min(model.ir_version, 10)
    return model


def run_ort(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(
        zip(names, session.run(None, {k: v for k, v in feeds.items() if k in wanted}), strict=False)
    )


def torch_inputs(kind: str, feeds: dict) -> tuple[torch.Tensor, ...]:
    out = []
    for name in INPUT_NAMES[kind]:
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
