"""A local Hugging Face causal LM to ONNX with a KV cache in the optimum / onnxruntime-genai layout.

Inputs:  ``input_ids [batch, seq]``, ``attention_mask [batch, past_seq + seq]``,
         ``position_ids [batch, seq]``, ``past_key_values.{i}.key|value
         [batch, kv_heads, past_seq, head_dim]`` (``past_seq`` may be 0).
Outputs: ``logits [batch, seq, vocab]``, ``present.{i}.key|value
         [batch, kv_heads, past_seq + seq, head_dim]``.

The export runs torch.onnx's TorchScript exporter (``dynamo=False``, opset 17) around a small
module that rebuilds a transformers ``DynamicCache`` from the flat past tensors. No hub access:
the folder must hold ``config.json`` and the weights.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flarc.core.errors import BackendError, ModelError
from flarc.core.files import check_output_path
from flarc.core.inputs import past_layer
from flarc.core.modelio import EXTERNAL_DATA_THRESHOLD, load_model, save_model
from flarc.core.sessions import open_session

log = logging.getLogger(__name__)

OPSET = 17


@dataclass(frozen=True)
class CacheLayout:
    """The KV-cache geometry an exported model expects."""

    num_layers: int
    kv_heads: int
    head_dim: int

    def past_names(self) -> list[str]:
        """The cache inputs ``past_key_values.{i}.key|value``, layer by layer."""
        return [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in KV]

    def present_names(self) -> list[str]:
        """The cache outputs ``present.{i}.key|value``, in the order of :meth:`past_names`."""
        return [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in KV]


KV = ("key", "value")


def cache_layout(config) -> CacheLayout:
    """Layers, KV heads and head size from a transformers config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return CacheLayout(config.num_hidden_layers, kv_heads, head_dim)


def _load_hf(model_dir: Path):
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:
        raise BackendError(f"export-hf needs torch and transformers ({exc})") from None
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            local_files_only=True,
            dtype=torch.float32,
            attn_implementation="eager",
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{model_dir}: cannot load as a causal LM ({exc})") from None
    model.eval()
    model.config.use_cache = True
    return model, config


def _wrapper(model, layout: CacheLayout):
    import torch
    from transformers import DynamicCache

    class KVWrapper(torch.nn.Module):
        """Flat tensors in, flat tensors out: the signature torch.onnx can name."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(layout.num_layers)]
            cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            flat = []
            for layer in out.past_key_values.layers:
                flat.extend((layer.keys, layer.values))
            return (out.logits, *flat)

    return KVWrapper().eval()


def example_inputs(layout: CacheLayout, batch: int, seq: int, past: int, vocab: int, seed: int = 0):
    """Feed dict (numpy) in the exported layout: random ids, all-ones mask, positions after past."""
    rng = np.random.default_rng(seed)
    feed = {
        "input_ids": rng.integers(0, vocab, size=(batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, past + seq), dtype=np.int64),
        "position_ids": np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1)),
    }
    for name in layout.past_names():
        shape = (batch, layout.kv_heads, past, layout.head_dim)
        feed[name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def export_hf(
    model_dir: str | os.PathLike,
    output: str | os.PathLike,
    check: bool = True,
    external_data: bool | None = None,
) -> dict:
    """Export ``model_dir`` to ``output``; return a summary (layout, files, max logits error).

    ``check`` runs the ONNX model in onnxruntime on a prompt with and without a past and compares
    logits and presents with torch (raises ModelError above 1e-3 relative to the logits scale).
    """
    import torch

    model_dir = Path(model_dir)
    out = check_output_path(output, [])
    model, config = _load_hf(model_dir)
    layout = cache_layout(config)
    wrapper = _wrapper(model, layout)
    vocab = config.vocab_size
    # Trace with a non-empty past so the concat with the cache is recorded; axes are dynamic.
    feed = example_inputs(layout, batch=2, seq=3, past=2, vocab=vocab)
    args = tuple(torch.from_numpy(v) for v in feed.values())
    in_names = list(feed)
    out_names = ["logits", *layout.present_names()]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    for name in layout.past_names():
        axes[name] = {0: "batch", 2: "past_sequence"}
    for name in layout.present_names():
        axes[name] = {0: "batch", 2: "total_sequence"}
    with tempfile.TemporaryDirectory(prefix=".flarc-export-", dir=out.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        export_torch(wrapper, args, raw, in_names, out_names, axes)
        onnx_model = load_model(raw)  # a large one lazily: its data stay in ``tmp`` until saved
        n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if external_data is None:
            external_data = n_bytes > EXTERNAL_DATA_THRESHOLD // 4
        written = save_model(onnx_model, out, external_data=external_data)
    summary = {
        "model_dir": str(model_dir),
        "output": str(out),
        "files": [str(p) for p in written],
        "num_layers": layout.num_layers,
        "kv_heads": layout.kv_heads,
        "head_dim": layout.head_dim,
        "vocab_size": vocab,
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }
    if check:
        summary["max_abs_logits_error"] = verify_export(wrapper, out, layout, vocab)
    return summary


def export_torch(
    module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict
) -> None:
    """``torch.onnx.export`` as flarc uses it: the TorchScript exporter (``dynamo=False``) at
    ``OPSET`` with the named dynamic axes, constants folded, no gradients."""
    import torch

    options = {
        "input_names": inputs,
        "output_names": outputs,
        "dynamic_axes": axes,
        "opset_version": OPSET,
        "do_constant_folding": True,
        "dynamo": False,
    }
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), **options)


def verify_export(wrapper, path: Path, layout: CacheLayout, vocab: int) -> float:
    """Largest |logits_onnx - logits_torch| over a prefill (past 0) and a decode step (past 5)."""
    import torch

    sess = open_session(path)
    worst = 0.0
    for seq, past in ((5, 0), (1, 5)):
        feed = example_inputs(layout, batch=1, seq=seq, past=past, vocab=vocab, seed=seq)
        got = sess.run(None, feed)
        with torch.no_grad():
            want = wrapper(*(torch.from_numpy(v) for v in feed.values()))
        for g, w in zip(got, want, strict=True):
            if g.shape != tuple(w.shape):
                raise ModelError(f"{path}: output shape {g.shape} != torch {tuple(w.shape)}")
        err = float(np.abs(got[0] - want[0].numpy()).max())
        scale = float(np.abs(want[0].numpy()).max()) or 1.0
        if err > 1e-3 * max(scale, 1.0):
            raise ModelError(f"{path}: logits differ from torch by {err:.3g} (past={past})")
        worst = max(worst, err)
    return worst


def layout_from_onnx(model) -> CacheLayout:
    """The cache layout an exported model declares through its ``past_key_values.*`` inputs."""
    found: dict[int, tuple[int, int]] = {}
    for vi in model.graph.input:
        layer = past_layer(vi.name)
        if layer is None:
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != 4 or not dims[1].HasField("dim_value") or not dims[3].HasField("dim_value"):
            raise ModelError(
                f"input '{vi.name}' is not [batch, kv_heads, past_seq, head_dim] with fixed "
                "kv_heads and head_dim"
            )
        found[layer[0]] = (dims[1].dim_value, dims[3].dim_value)
    if not found:
        raise ModelError(
            "the model has no past_key_values.{i}.key|value inputs (not a KV-cache LM)"
        )
    layers = max(found) + 1
    if sorted(found) != list(range(layers)) or len(set(found.values())) != 1:
        raise ModelError("past_key_values.* inputs are not one uniform layer per index")
    heads, dim = next(iter(found.values()))
    return CacheLayout(layers, heads, dim)


def empty_cache(layout: CacheLayout, batch: int = 1, dtype=np.float32) -> dict[str, np.ndarray]:
    """Past tensors with ``past_seq = 0``: the first step of every sequence."""
    shape = (batch, layout.kv_heads, 0, layout.head_dim)
    return {name: np.zeros(shape, dtype=dtype) for name in layout.past_names()}
