"""Language models in the forms the ecosystem ships them (issue 15), built into a test's folder.

- ``save_tiny_lm``: ``save_tiny_qwen2``, a word-level tokenizer and a text file, so that
  ``flarc compress --text FILE --tokenizer DIR`` has everything it needs locally.
- ``export_with_past``: what ``optimum-cli export onnx --task text-generation-with-past`` writes
  today: one ``model.onnx`` taking ``past_key_values.{i}.key|value`` (past length may be 0).
- ``export_legacy_decoders`` and ``merge_decoders``: the legacy split that optimum wrote by
  default before it switched to one file (``decoder_model.onnx`` without past inputs,
  ``decoder_with_past_model.onnx``) and the ``decoder_model_merged.onnx`` built from them: one
  ``If`` on a ``use_cache_branch`` input whose two branches read the deduplicated weights as
  outer-scope initializers. Many published ONNX repositories still ship that merged file.
- ``quantize_nbits``: onnxruntime's weight-only quantizer (MatMulNBits, 4 bits), the operator of
  onnxruntime-genai's int4 files.

optimum's ONNX exporter lives in ``optimum-onnx`` (0.1.0 is the newest release), which pins
``transformers<4.58`` and fails to import under transformers 5 (``get_parameter_dtype`` is gone
from ``transformers.modeling_utils``; upstream issue huggingface/optimum-onnx#114). Where it
imports, the real exporter writes the files (``OPTIMUM`` says so); elsewhere ``_export_contract``
writes files with optimum's input/output contract, recorded in ``OPTIMUM_CONTRACT`` from
optimum-onnx 0.1.0 + transformers 4.57.6 + torch 2.13: the TorchScript exporter at opset 18,
the same names and the same symbolic dimensions, the model in its default (sdpa) attention.
``merge_decoders`` is written here after optimum's ``optimum.onnx.merge_decoders`` (same
deduplication, branch layout, names and IR version), so that the merged form needs no optimum.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from _models import save_tiny_qwen2


def _optimum_exporter():
    """optimum's ``export_models`` and config lookup, or None where they do not import."""
    try:
        from optimum.exporters.onnx.convert import export_models
        from optimum.exporters.tasks import TasksManager
    except Exception:  # ImportError, or an AttributeError deep in a version mismatch
        return None
    return export_models, TasksManager


OPTIMUM = _optimum_exporter() is not None  # the real exporter writes the files

OPSET = 18  # optimum's default for decoder LMs
IR_VERSION = 8  # what torch's TorchScript exporter writes at opset 18
PAST = "past_sequence_length"
TOTAL = "past_sequence_length + sequence_length"

# What optimum-onnx 0.1.0 writes for save_tiny_qwen2 (2 layers, 2 KV heads of 16, vocab 256):
# input and output names with their symbolic dims, in order, for the file with past inputs.
OPTIMUM_CONTRACT = {
    "inputs": [
        ("input_ids", ["batch_size", "sequence_length"]),
        ("attention_mask", ["batch_size", TOTAL]),
        ("position_ids", ["batch_size", "sequence_length"]),
        *(
            (f"past_key_values.{i}.{kv}", ["batch_size", 2, PAST, 16])
            for i in range(2)
            for kv in ("key", "value")
        ),
    ],
    "outputs": [
        ("logits", ["batch_size", "sequence_length", 256]),
        *(
            (f"present.{i}.{kv}", ["batch_size", 2, TOTAL, 16])
            for i in range(2)
            for kv in ("key", "value")
        ),
    ],
    "opset": OPSET,
    "ir_version": IR_VERSION,
}

WORDS = (
    "the a of to and in is it that for on with as was at by an be this from or are not have "
    "model weight rank layer matrix token cache value key query head vector factor low high "
    "small large fast slow good bad new old first last next each every some many few one two "
    "three four five six seven eight nine ten time day year way man world life hand part child "
    "eye woman place work week case point number group problem fact run go see say get make "
    "know think take come give look use find tell ask seem feel try leave call keep let begin"
).split()


def save_tiny_lm(root: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """``save_tiny_qwen2`` into ``root/hf``, a word-level tokenizer (ids below the model's
    vocabulary of 256) into ``root/tokenizer`` and ``root/text.txt``: 64 paragraphs of 10 to 24
    words. Returns (hf, tokenizer, text).

    The tokenizer has its own folder: one beside a ``config.json`` of model type qwen2 is loaded
    by transformers 5 as ``Qwen2Tokenizer``, which cannot read a word-level vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    hf, tok_dir, text = root / "hf", root / "tokenizer", root / "text.txt"
    save_tiny_qwen2(hf, seed=seed)
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    assert len(vocab) <= 256
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    fast.save_pretrained(tok_dir)
    rng = np.random.default_rng(seed)
    # flarc's --text reads paragraphs (blank-line separated), not lines.
    paragraphs = [" ".join(rng.choice(WORDS, rng.integers(10, 25))) for _ in range(64)]
    text.write_text("\n\n".join(paragraphs) + "\n")
    return hf, tok_dir, text


# ---------------------------------------------------------------------------------------------
# optimum's exports


def export_with_past(hf: Path, out: Path) -> Path:
    """``out/model.onnx`` as ``optimum-cli export onnx --task text-generation-with-past``
    writes it (the real exporter where it imports, its contract elsewhere)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    if OPTIMUM:
        _optimum_export(hf, {"model": (path, True)})
    else:
        _export_contract(hf, path, past_inputs=True)
    return path


def export_legacy_decoders(hf: Path, out: Path) -> tuple[Path, Path]:
    """``out/decoder_model.onnx`` (prompt: no past inputs, presents out) and
    ``out/decoder_with_past_model.onnx``, the split optimum exported before one file."""
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / "decoder_model.onnx", out / "decoder_with_past_model.onnx")
    if OPTIMUM:
        _optimum_export(
            hf, {"decoder_model": (paths[0], False), "decoder_with_past_model": (paths[1], True)}
        )
    else:
        for path, past in zip(paths, (False, True), strict=True):
            _export_contract(hf, path, past_inputs=past)
    return paths


def export_merged(hf: Path, out: Path) -> Path:
    """``out/decoder_model_merged.onnx``: the legacy split merged by ``merge_decoders``."""
    decoder, with_past = export_legacy_decoders(hf, out)
    path = out / "decoder_model_merged.onnx"
    onnx.save(merge_decoders(onnx.load(decoder), onnx.load(with_past)), path)
    return path


def _optimum_export(hf: Path, files: dict[str, tuple[Path, bool]]) -> None:
    """optimum's own ``export_models``, one config per file (``use_past_in_inputs`` = the flag)."""
    import torch
    from transformers import AutoModelForCausalLM

    export_models, tasks = _optimum_exporter()
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    ctor = tasks.get_exporter_config_constructor(
        "onnx", model=model, task="text-generation-with-past", library_name="transformers"
    )
    jobs = {
        key: (
            model,
            ctor(model.config, task="text-generation", use_past=True, use_past_in_inputs=p),
        )
        for key, (_, p) in files.items()
    }
    folder = next(iter(files.values()))[0].parent
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_models(jobs, folder, opset=OPSET, output_names=[p.name for p, _ in files.values()])


def _export_contract(hf: Path, path: Path, past_inputs: bool) -> None:
    """torch.onnx's TorchScript exporter at opset 18 with optimum's names and dims: with
    ``past_inputs`` the ``text-generation-with-past`` file, without it the legacy
    ``decoder_model.onnx`` (prompt in, logits and presents out)."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    cfg = model.config
    layers = cfg.num_hidden_layers
    kv_heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def forward(input_ids, attention_mask, position_ids, *past):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        cache = DynamicCache(ddp_cache_data=pairs or None, config=cfg)
        out = type(model).forward(
            model,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        flat = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *flat)

    # Flat tensors in and out on the model itself (not a wrapper module), so that node names
    # are the ones optimum's patched export gives: /model/layers.0/self_attn/q_proj/MatMul.
    model.forward = forward

    batch, seq, past = 2, 16, 16 if past_inputs else 0
    g = torch.Generator().manual_seed(0)
    args = [
        torch.randint(0, cfg.vocab_size, (batch, seq), generator=g),
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.arange(past, past + seq).repeat(batch, 1),
    ]
    seq_axes = {0: "batch_size", 1: "sequence_length"}
    axes = {
        "input_ids": seq_axes,
        "attention_mask": {0: "batch_size", 1: TOTAL if past_inputs else "sequence_length"},
        "position_ids": seq_axes,
        "logits": seq_axes,
    }
    names = ["input_ids", "attention_mask", "position_ids"]
    presents = []
    for i in range(layers):
        for kv in ("key", "value"):
            if past_inputs:
                args.append(torch.randn(batch, kv_heads, past, head_dim, generator=g))
                names.append(f"past_key_values.{i}.{kv}")
                axes[names[-1]] = {0: "batch_size", 2: PAST}
            presents.append(f"present.{i}.{kv}")
            axes[presents[-1]] = {0: "batch_size", 2: TOTAL}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            tuple(args),
            str(path),
            input_names=names,
            output_names=["logits", *presents],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def contract(path: Path) -> dict:
    """A file's inputs and outputs (name, dims) in order, opset and IR version, as in
    ``OPTIMUM_CONTRACT``."""
    model = onnx.load(str(path), load_external_data=False)

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    return {
        "inputs": [(vi.name, dims(vi)) for vi in model.graph.input],
        "outputs": [(vi.name, dims(vi)) for vi in model.graph.output],
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "ir_version": model.ir_version,
    }


# ---------------------------------------------------------------------------------------------
# the legacy merged decoder


def merge_decoders(
    decoder: onnx.ModelProto, decoder_with_past: onnx.ModelProto, graph_name: str = "merged"
) -> onnx.ModelProto:
    """One model with an ``If`` on ``use_cache_branch`` (bool [1]): ``then`` runs
    ``decoder_with_past``, ``else`` runs ``decoder``; as optimum's ``merge_decoders`` (strict).

    Initializers of rank >= 2, and of rank 1 unless int32/int64, are deduplicated by
    (dtype, sha512 of the data, dims) across the two models and move to the outer graph named
    ``{name}_{graph_name}_{n}`` (``name`` the smallest of the equal ones' names: optimum takes an
    arbitrary one; ``n`` counts reuses of a name); scalars and int32/int64 vectors stay in
    their branch. The inputs are the union (the decoder's first, then the others with past,
    then ``use_cache_branch``); the outputs are the decoder's value infos. The inputs are copied,
    not changed."""
    models = [onnx.ModelProto(), onnx.ModelProto()]
    models[0].CopyFrom(decoder)
    models[1].CopyFrom(decoder_with_past)
    opsets = [next(o.version for o in m.opset_import) for m in models]
    if opsets[0] != opsets[1]:
        raise ValueError(f"opsets differ: {opsets[0]} and {opsets[1]}")
    outs = [[(o.name, o.type.tensor_type.elem_type) for o in m.graph.output] for m in models]
    if outs[0] != outs[1]:
        raise ValueError(f"the decoders' outputs differ: {outs[0]} and {outs[1]}")
    del models[1].graph.output[:]
    models[1].graph.output.extend(models[0].graph.output)

    def shared(t: TensorProto) -> bool:
        return len(t.dims) > 1 or (len(t.dims) == 1 and t.data_type not in (6, 7))

    groups: dict[tuple, list[tuple[str, int]]] = {}
    for i, m in enumerate(models):
        for t in m.graph.initializer:
            if shared(t):
                digest = hashlib.sha512(numpy_helper.to_array(t).tobytes()).hexdigest()
                groups.setdefault((t.data_type, digest, tuple(t.dims)), []).append((t.name, i))
    rename: dict[tuple[str, int], str] = {}
    used: dict[str, int] = {}
    for members in groups.values():
        common = min(name for name, _ in members)
        used[common] = used.get(common, -1) + 1
        for key in members:
            rename[key] = f"{common}_{graph_name}_{used[common]}"
    outer, seen = [], set()
    for i, m in enumerate(models):
        for node in m.graph.node:
            for j, name in enumerate(node.input):
                node.input[j] = rename.get((name, i), name)
        for t in m.graph.initializer:
            new = rename.get((t.name, i))
            if new is not None and new not in seen:
                seen.add(new)
                t.name = new
                outer.append(t)

    def branch(m: onnx.ModelProto, name: str) -> onnx.GraphProto:
        kept = [t for t in m.graph.initializer if not shared(t)]
        return helper.make_graph(list(m.graph.node), name, [], list(m.graph.output), kept)

    inputs, names = [], set()
    for m in models:
        for vi in m.graph.input:
            if vi.name not in names:
                names.add(vi.name)
                inputs.append(vi)
    use_cache = helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])
    no_past, with_past = branch(models[0], "no_past"), branch(models[1], "with_past")
    node = helper.make_node(
        "If",
        ["use_cache_branch"],
        [o.name for o in no_past.output],
        name="optimum::if",
        then_branch=with_past,
        else_branch=no_past,
    )
    graph = helper.make_graph([node], graph_name, [*inputs, use_cache], list(no_past.output), outer)
    opset_imports, domains = [], set()
    for o in [*models[0].opset_import, *models[1].opset_import]:
        if o.domain not in domains:
            domains.add(o.domain)
            opset_imports.append(o)
    merged = helper.make_model_gen_version(
        graph, producer_name="optimum-onnx", opset_imports=opset_imports, ir_version=9
    )
    onnx.checker.check_model(merged)
    return merged


# ---------------------------------------------------------------------------------------------
# onnxruntime-genai style int4


def quantize_nbits(src: Path, dst: Path, bits: int = 4, block_size: int = 32) -> Path:
    """Every MatMul with a constant weight as ``com.microsoft::MatMulNBits`` (onnxruntime's
    weight-only quantizer, symmetric, blocks of ``block_size`` along the input axis)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    config = mnq.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=bits)
    quant = mnq.MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=config)
    quant.process()
    quant.model.save_model_to_file(str(dst), False)
    return dst
