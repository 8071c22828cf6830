"""A model's inputs and outputs as calibration sees them: the tensors a caller feeds, the attention
mask, the KV-cache inputs of a decoder, and the outputs that hold logits."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from flarc.core.errors import DataError

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """One input a caller must feed: name, numpy dtype, and declared dims."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]  # ints fixed; str symbolic; None unknown


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (graph inputs that are not initializers)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        )
        specs.append(InputSpec(vi.name, dtype, dims))
    return specs


def batch_size(feed: Mapping[str, np.ndarray]) -> int:
    """The batch of ``feed``: axis 0 of its first input of rank >= 1 (1 when none has one)."""
    return next((int(np.shape(v)[0]) for v in feed.values() if np.ndim(v)), 1)


def batch_rows(feed: Mapping[str, np.ndarray], start: int, stop: int, size: int) -> Feed:
    """Sequences ``start:stop`` of a batch of ``size`` (inputs without that axis 0 unchanged)."""
    return {
        k: v[start:stop] if np.ndim(v) and np.shape(v)[0] == size else v for k, v in feed.items()
    }


def fixed_batch(specs: list[InputSpec]) -> int | None:
    """The batch a model was exported with: axis 0 is a fixed positive int on every input of
    rank >= 1 (the value most of them share when they differ), else None (a dynamic batch)."""
    firsts = [s.shape[0] for s in specs if s.shape]
    if not firsts or not all(isinstance(d, int) and d > 0 for d in firsts):
        return None
    return Counter(firsts).most_common(1)[0][0]


def is_logits_name(name: str) -> bool:
    """Whether an output's name says it holds logits (``logits``, ``output_logits``, ...)."""
    return "logit" in name.lower()


def is_past(spec: InputSpec) -> bool:
    """A KV-cache input: ``past_key_values.{i}.key|value``, 4-D."""
    return past_layer(spec.name) is not None and len(spec.shape) == 4


def is_cache_switch(spec: InputSpec) -> bool:
    """The merged decoder's branch switch (optimum's ``use_cache_branch``, bool)."""
    return spec.name == CACHE_SWITCH and spec.dtype == np.bool_


# optimum's merged decoder: False runs the prompt branch (no cache read), True the decode step.
CACHE_SWITCH = "use_cache_branch"
# Inputs found as the attention mask when the user names none.
MASK_NAMES = ("attention_mask",)
# A KV-cache input in the optimum / onnxruntime-genai layout.
PAST_PATTERN = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


def find_mask_input(model: onnx.ModelProto, named: str | None = None) -> str | None:
    """The model's attention-mask input: ``named`` (which must be an input), else the first
    input called like one of ``MASK_NAMES``, else None."""
    names = [i.name for i in model.graph.input]
    if named is not None:
        if named not in names:
            raise DataError(
                f"--mask-input '{named}' is not an input of the model (inputs: {names})"
            )
        return named
    return next((n for n in names if n in MASK_NAMES), None)


def batch_mask(feed: Feed, mask_input: str | None) -> np.ndarray | None:
    """``feed``'s attention mask as booleans ``[B, S]`` (True = a real token), or None when there
    is no mask input or it is not laid out ``[B, S]``."""
    if mask_input is None:
        return None
    if mask_input not in feed:
        raise DataError(f"mask input '{mask_input}' is not in the calibration batch")
    mask = np.asarray(feed[mask_input])
    return mask != 0 if mask.ndim == 2 else None


def past_layer(name: str) -> tuple[int, str] | None:
    """``(layer, "key"|"value")`` of a KV-cache input name, or None for any other name."""
    match = PAST_PATTERN.match(name)
    return (int(match.group(1)), match.group(2)) if match else None
