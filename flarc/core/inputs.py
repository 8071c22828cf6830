"""A model's inputs and outputs as calibration sees them: the tensors a caller feeds, the attention
mask, the KV-cache inputs of a decoder, and the outputs that hold logits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

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


def is_logits_name(name: str) -> bool:
    """Whether an output's name says it holds logits (``logits``, ``output_logits``, ...)."""
    return "logit" in name.lower()


def is_past(spec: InputSpec) -> bool:
    """A KV-cache input (optimum layout ``past_key_values.{i}.key|value``)."""
    return "past" in spec.name.lower() and len(spec.shape) == 4
