"""Progressive decoding: exactness at full rank, the KV cache carried across bucket switches,
schedules, sampling, the CLI, the TensorRT error, and measured weight sharing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from flarc.calib.data import CalibrationSet
from flarc.cli import build_parser
from flarc.core.errors import BackendError, FlarcError
from flarc.core.modelio import load_model
from flarc.core.targets import find_targets
from flarc.export.hf import export_hf
from flarc.export.runtime import Generator, KVCache
from flarc.export.schedule import (
    PACE_SLACK,
    entropy,
    entropy_budget,
    pace_pair,
    paced_budget,
    parse_schedule,
)
from flarc.pipeline import build_buckets

from _models import lm_token_batches, save_tiny_qwen2

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
PROMPT = [5, 17, 42, 99, 3, 64, 7]


@pytest.fixture(scope="module")
def gen(tiny_lm):
    """A generator over the tiny Qwen2's buckets (budgets 1.0, 0.8, 0.6, 0.4)."""
    return Generator.from_buckets(tiny_lm["folder"])


def test_full_rank_bucket_generates_exactly_what_the_original_does(tiny_lm, gen):
    original = Generator.from_onnx(tiny_lm["onnx"]).generate(PROMPT, 24)
    full = gen.generate(PROMPT, 24, "static:1.0")
    assert full.tokens == original.tokens
    hf = transformers.Qwen2ForCausalLM.from_pretrained(str(tiny_lm["root"] / "hf")).eval()
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False, pad_token_id=0
        )
    assert out[0, len(PROMPT) :].tolist() == original.tokens
    smaller = gen.generate(PROMPT, 24, "static:0.4")
    assert smaller.tokens != original.tokens  # the small bucket really is a different model


def _prefill(gen, budget, ids):
    """Logits of the last position when ``budget`` runs ``ids`` from an empty cache."""
    cache = KVCache(gen.layout)
    return gen.step(budget, np.asarray(ids), cache)[-1], cache


def test_incremental_decoding_equals_a_prefill_from_scratch(gen):
    run = gen.generate(PROMPT, 10, "static:0.6", keep_logits=True)
    for t in (0, 4, 9):
        want, _ = _prefill(gen, 0.6, PROMPT + run.tokens[:t])
        np.testing.assert_allclose(run.logits[t], want, atol=1e-4)


def test_switching_buckets_carries_the_cache(gen):
    """After a switch at step S, bucket 0.6 continues from the cache bucket 1.0 built: the logits
    equal bucket 1.0 run from scratch over the prefix, then bucket 0.6 over the new tokens."""
    switch = 5
    run = gen.generate(PROMPT, 12, f"steps:1.0@0,0.6@{switch}", keep_logits=True)
    assert run.budgets == [1.0] * switch + [0.6] * (12 - switch)
    _, cache = _prefill(gen, 1.0, PROMPT + run.tokens[: switch - 1])
    for t in range(switch, 12):
        logits = gen.step(0.6, np.asarray([run.tokens[t - 1]]), cache)[-1]
        np.testing.assert_allclose(run.logits[t], logits, atol=1e-4)
    # Before the switch it is bucket 1.0 alone.
    want, _ = _prefill(gen, 1.0, PROMPT + run.tokens[: switch - 1])
    np.testing.assert_allclose(run.logits[switch - 1], want, atol=1e-4)
    # The carried cache is the large bucket's: not the same as the small bucket from scratch.
    scratch, _ = _prefill(gen, 0.6, PROMPT + run.tokens[:switch])
    assert np.abs(run.logits[switch] - scratch).max() > 1e-3


def test_schedule_parsing_and_rules():
    budgets = [1.0, 0.8, 0.6, 0.4]
    steps = parse_schedule("steps:1.0@0,0.8@32,0.6@96", budgets)
    assert [steps.budget(t, None) for t in (0, 31, 32, 95, 96, 500)] == [
        1.0, 1.0, 0.8, 0.8, 0.6, 0.6,
    ]  # fmt: skip
    assert parse_schedule("static:0.8", budgets).budget(7, None) == 0.8
    for bad, why in [
        ("steps:0.6@0,0.8@32", "non-increasing"),
        ("steps:1.0@4,0.8@32", "start at step 0"),
        ("steps:1.0@0,0.8@32,0.6@16", "must increase"),
        ("static:0.7", "no bucket with budget 0.7"),
        ("entropy:3:1", "LOW < HIGH"),
        ("entropy:0.3", "outside the buckets"),
        ("linear:1", "unknown kind"),
        ("steps:1.0", "BUDGET@STEP"),
    ]:
        with pytest.raises(FlarcError, match=why) as info:
            parse_schedule(bad, budgets)
        assert "\n" not in str(info.value)
    rule = parse_schedule("entropy:1:3", budgets)
    assert rule.budget(0, None) == 1.0
    assert [entropy_budget(h, 1, 3, tuple(budgets)) for h in (0.5, 1.5, 2.0, 2.9, 3.5)] == [
        0.4, 0.6, 0.8, 1.0, 1.0,
    ]  # fmt: skip
    z = np.array([2.0, 1.0, 0.0, -1.0])
    p = np.exp(z) / np.exp(z).sum()
    assert entropy(z) == pytest.approx(-(p * np.log(p)).sum())


def test_entropy_schedule_follows_the_rule(gen):
    probe = gen.generate(PROMPT, 12, "static:1.0", keep_logits=True)
    low, high = float(np.min(probe.entropies)), float(np.max(probe.entropies))
    run = gen.generate(PROMPT, 12, f"entropy:{low}:{high}", keep_logits=True)
    assert run.budgets[0] == 1.0
    for t in range(1, 12):
        assert run.budgets[t] == entropy_budget(run.entropies[t - 1], low, high, tuple(gen.budgets))
    assert len(set(run.budgets)) > 1


def test_paced_entropy_schedule_keeps_its_mean_and_spends_on_uncertain_steps():
    """entropy:MEAN mixes the two buckets around MEAN, keeps the running mean within its account
    at every step, and gives the larger bucket to the steps after the most uncertain ones."""
    budgets = (1.0, 0.8, 0.6, 0.4)
    assert pace_pair(0.8, budgets) == (1.0, 0.6, pytest.approx(0.5))
    assert pace_pair(0.75, budgets) == (0.8, 0.6, pytest.approx(0.75))
    assert pace_pair(1.0, budgets)[:2] == (1.0, 1.0)
    assert parse_schedule("entropy:0.75", list(budgets)).used == (0.8, 0.6)
    rng = np.random.default_rng(0)
    for mean in (0.5, 0.7, 0.8, 0.95):
        hi, lo, _ = pace_pair(mean, budgets)
        # Entropies with long calm and long uncertain stretches: the account must step in.
        h = np.abs(rng.standard_normal(400)) * np.repeat(rng.choice([0.2, 3.0], 10), 40)
        history: list[tuple[float, float]] = []
        for t, e in enumerate(h):
            b = paced_budget(mean, budgets, history)
            assert b in (hi, lo)
            history.append((b, float(e)))
            drift = sum(x for x, _ in history) - mean * (t + 1)
            assert abs(drift) <= (PACE_SLACK + 1) * (hi - lo) + 1e-9
        chosen = np.array([b for b, _ in history[1:]])
        before = h[:-1]  # step t's entropy picked step t + 1's bucket
        assert before[chosen == hi].mean() > before[chosen == lo].mean()
    # With i.i.d. entropies the account never needs to step in: the choice is the rank rule.
    h = rng.exponential(size=200)
    history = []
    for e in h:
        history.append((paced_budget(0.8, budgets, history), float(e)))
    for t in range(2, len(h)):
        rank = np.mean(h[: t - 1] < h[t - 1])
        credit = 0.8 * (t + 1) - sum(b for b, _ in history[:t])
        if 0.6 + 0.4 * PACE_SLACK >= credit >= 1.0 - 0.4 * PACE_SLACK:
            assert history[t][0] == (1.0 if rank >= 0.5 else 0.6)


def test_paced_entropy_schedule_drives_generation(gen):
    run = gen.generate(PROMPT, 24, "entropy:0.8", keep_logits=True)
    history = list(zip(run.budgets, run.entropies, strict=True))
    assert run.budgets == [paced_budget(0.8, (1.0, 0.8, 0.6, 0.4), history[:t]) for t in range(24)]
    assert set(run.budgets) == {1.0, 0.6}
    assert abs(run.mean_budget - 0.8) <= (PACE_SLACK + 1) * 0.4 / 24


def test_sampling_is_seeded_and_top_p_narrows(gen):
    a = gen.generate(PROMPT, 8, "static:0.8", sample=True, temperature=0.9, top_p=0.95, seed=3)
    b = gen.generate(PROMPT, 8, "static:0.8", sample=True, temperature=0.9, top_p=0.95, seed=3)
    assert a.tokens == b.tokens
    greedy = gen.generate(PROMPT, 8, "static:0.8")
    narrow = gen.generate(PROMPT, 8, "static:0.8", sample=True, top_p=1e-6, seed=5)
    assert narrow.tokens == greedy.tokens


def _parser():
    return build_parser()


def test_cli_generate(tiny_lm, capsys):
    folder = str(tiny_lm["folder"])
    args = _parser().parse_args(
        ["generate", folder, "--prompt-ids", "5,17,42", "--max-new-tokens", "6", "--json",
         "--schedule", "steps:1.0@0,0.4@3"]
    )  # fmt: skip
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["budgets"] == [1.0, 1.0, 1.0, 0.4, 0.4, 0.4] and len(out["tokens"]) == 6
    args = _parser().parse_args(
        ["generate", folder, "--prompt-ids", "5,17", "--schedule", "steps:0.4@0,1.0@2"]
    )
    with pytest.raises(FlarcError, match="non-increasing"):
        args.func(args)
    args = _parser().parse_args(["generate", folder, "--prompt-ids", "5", "--backend", "tensorrt"])
    with pytest.raises(BackendError, match="tensorrt") as info:
        args.func(args)
    assert "\n" not in str(info.value)


MEMORY_SCRIPT = """
import json, sys
from flarc.export.runtime import weight_memory_report
print(json.dumps(weight_memory_report(sys.argv[1], share_weights=sys.argv[2] == "1")))
"""


def test_bucket_sessions_share_weight_memory(tmp_path):
    """RSS growth of four bucket sessions (each run once) vs the largest bucket's weights; a
    model big enough (about 130 MB of weights) that per-session overhead (about 2 MB) is small."""
    save_tiny_qwen2(tmp_path / "hf", 512, 1024, 24576)
    export_hf(tmp_path / "hf", tmp_path / "m.onnx", check=False)
    model = load_model(tmp_path / "m.onnx")
    targets = find_targets(model)
    build_buckets(
        model,
        targets,
        CalibrationSet(lm_token_batches(1, 24576, batch=2, seq=16, seed=1), [], "test"),
        [0.8, 0.6, 0.4, 0.2],  # a dense 1.0 bucket would hold the dense weights beside the factors
        tmp_path / "m.buckets",
        alpha={t.name: 1.0 for t in targets.targets},  # allocation is not what is measured here
    )
    reports = {}
    for share in ("1", "0"):
        proc = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "m.buckets"), share],
            capture_output=True,
            text=True,
            check=True,
        )
        reports[share] = json.loads(proc.stdout.strip().splitlines()[-1])
    shared, private = reports["1"], reports["0"]
    print("shared", shared, "private", private)
    assert shared["ratio"] <= 1.1
    assert private["rss_delta_bytes"] > 1.2 * shared["rss_delta_bytes"]  # copies would show


def test_cli_generate_compare_dense(tiny_lm, capsys):
    """--compare-dense decodes the same prompt with the 1.0 bucket (or the given ONNX, the
    original export) and reports agreement against an independent dense run."""
    from flarc.cli.generate import agreement

    folder = str(tiny_lm["folder"])
    base = ["generate", folder, "--prompt-ids", "5,17,42", "--max-new-tokens", "8", "--json"]
    for extra in (["--compare-dense"], ["--compare-dense", str(tiny_lm["onnx"])]):
        args = _parser().parse_args([*base, "--schedule", "static:0.4", *extra])
        assert args.func(args) == 0
        out = json.loads(capsys.readouterr().out)
        dense = Generator.from_onnx(tiny_lm["onnx"]).generate([5, 17, 42], 8)
        assert out["dense"]["tokens"] == dense.tokens
        want = agreement(out["tokens"], dense.tokens)
        assert {k: out["dense"][k] for k in want} == want
        assert out["dense"]["tokens_per_s"] > 0
    args = _parser().parse_args([*base, "--schedule", "static:1", "--compare-dense"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dense"]["agreement"] == 1.0 and out["dense"]["first_divergence"] is None
    assert agreement([1, 2, 3], [1, 9, 3]) == {
        "compared": 3,
        "agreement": 2 / 3,
        "first_divergence": 1,
    }
    assert agreement([1, 2], [1, 2, 3])["first_divergence"] == 2


def test_ort_form_fuses_every_pair_and_computes_the_same(tiny_lm):
    """Each flattened row-prefix pair becomes FusedMatMul -> MatMul (and its shape arithmetic
    goes); onnxruntime gives the same outputs as on the portable file as written."""
    import onnx
    import onnxruntime as ort

    from flarc.export.manifest import load_manifest
    from flarc.export.ort_form import fuse_prefix_pairs
    from flarc.export.runtime import OrtRunner

    manifest = load_manifest(tiny_lm["folder"], verify=False)
    entry = manifest.bucket(0.6)
    path = manifest.path(entry["file"])
    graph = onnx.load(str(path), load_external_data=False)
    fused, count = fuse_prefix_pairs(graph)
    flats = [n for n in graph.graph.node if n.name.endswith("/lowrank_flat")]
    assert count == len(flats) > 0
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("FusedMatMul") == count
    assert not any(n.name.endswith(("/lowrank_flat", "/lowrank_unflat")) for n in fused.graph.node)
    assert not any("lowrank_lead" in n.name for n in fused.graph.node)
    assert len(fused.graph.node) < len(graph.graph.node) - 2 * count
    runner = OrtRunner(path, prepack=True)
    assert runner.fused == count
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cache = KVCache(Generator.from_onnx(tiny_lm["onnx"]).layout)
    for ids in ([PROMPT], [[11]]):
        past = cache.length
        feed = {
            "input_ids": np.asarray(ids, np.int64),
            "attention_mask": np.ones((1, past + len(ids[0])), np.int64),
            "position_ids": np.arange(past, past + len(ids[0]), dtype=np.int64)[None],
            **cache.past,
        }
        want = dict(zip(runner.outputs, plain.run(runner.outputs, feed), strict=True))
        got = runner.run(feed)
        for name in runner.outputs:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)
        cache.update(got)


def test_schedule_uses_only_its_buckets_and_one_bucket_prepacks(tiny_lm, gen, monkeypatch):
    """A schedule names the buckets it can pick and flarc generate loads only those; a generator
    over one bucket prepacks its own weights (no shared buffers) and decodes what the shared set
    decodes."""
    budgets = [1.0, 0.8, 0.6, 0.4]
    assert parse_schedule("static:0.6", budgets).used == (0.6,)
    assert parse_schedule("steps:1.0@0,0.6@4,0.4@9", budgets).used == (1.0, 0.6, 0.4)
    assert parse_schedule("entropy:1:4", budgets).used == (1.0, 0.8, 0.6, 0.4)
    one = Generator.from_buckets(tiny_lm["folder"], budgets=[0.6], verify=False)
    assert one.shared is None and one.runners[0.6].prepacked
    assert gen.shared is not None and not any(r.prepacked for r in gen.runners.values())
    args = _parser().parse_args(
        ["generate", str(tiny_lm["folder"]), "--prompt-ids", "5,17", "--max-new-tokens", "3",
         "--json", "--schedule", "steps:0.8@0,0.4@2"]
    )  # fmt: skip
    seen = {}
    real = Generator.from_buckets

    def spy(folder, *a, **k):
        seen.update(k)
        return real(folder, *a, **k)

    monkeypatch.setattr(Generator, "from_buckets", spy)
    assert args.func(args) == 0
    monkeypatch.undo()
    assert seen["budgets"] == [0.8, 0.4] and seen["prepack"] is None
    a = one.generate(PROMPT, 12, "static:0.6", keep_logits=True)
    b = gen.generate(PROMPT, 12, "static:0.6", keep_logits=True)
    assert a.tokens == b.tokens
    np.testing.assert_allclose(np.array(a.logits), np.array(b.logits), rtol=1e-4, atol=1e-4)
    # Shared, unprepacked sessions run dense MatMul weights transposed (FusedMatMul, transB=1;
    # the bytes of dense.bin transposed in place once): the same logits as the prepacked file.
    assert gen.runners[1.0].transposed > 0 and one.runners[0.6].transposed == 0
    dense = Generator.from_buckets(tiny_lm["folder"], budgets=[1.0], verify=False)
    assert dense.runners[1.0].transposed == 0
    a = dense.generate(PROMPT, 12, "static:1.0", keep_logits=True)
    b = gen.generate(PROMPT, 12, "static:1.0", keep_logits=True)
    assert a.tokens == b.tokens
    np.testing.assert_allclose(np.array(a.logits), np.array(b.logits), rtol=1e-4, atol=1e-4)


GLOBAL_THREADS_SCRIPT = """
import json, sys
import onnxruntime as ort
from flarc.core.errors import BackendError
from flarc.export.runtime import Generator
folder, prompt = sys.argv[1], json.loads(sys.argv[2])
try:
    Generator.from_buckets(folder, budgets=[1.0, 0.4], global_threads=True)
    refused = None
except BackendError as exc:
    refused = str(exc)
ort.set_global_thread_pool_sizes(0, 1)
gen = Generator.from_buckets(folder, budgets=[1.0, 0.4], global_threads=True)
tokens = gen.generate(prompt, 10, "steps:1.0@0,0.4@4").tokens
print(json.dumps({"refused": refused, "tokens": tokens}))
"""


def test_global_thread_pools_decode_the_same_tokens(tiny_lm, gen):
    """Bucket sessions on the process's global thread pools (as flarc generate runs several
    buckets) give the tokens of per-session pools; without the pools, a one-line error."""
    proc = subprocess.run(
        [sys.executable, "-c", GLOBAL_THREADS_SCRIPT, str(tiny_lm["folder"]), json.dumps(PROMPT)],
        capture_output=True,
        text=True,
        check=True,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["refused"] is not None and "set_global_thread_pool_sizes" in out["refused"]
    assert "\n" not in out["refused"]
    assert out["tokens"] == gen.generate(PROMPT, 10, "steps:1.0@0,0.4@4").tokens


CLI_PROGRAM_SCRIPT = """
import json, sys
import onnxruntime as ort
from flarc.cli import main
code = main(sys.argv[1:])
try:  # the pools exist when the program made them: they cannot be made again
    ort.set_global_thread_pool_sizes(0, 1)
    pools = False
except Exception as exc:
    pools = "already been created" in str(exc)
print(json.dumps({"code": code, "pools": pools}))
"""


def test_flarc_generate_runs_its_process_on_global_thread_pools(tiny_lm, gen):
    """``flarc generate`` as the program: its sessions (buckets and the dense comparison) share
    the global pools it makes, and decode the tokens per-session pools decode."""
    proc = subprocess.run(
        [sys.executable, "-c", CLI_PROGRAM_SCRIPT, "generate", str(tiny_lm["folder"]),
         "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "10", "--schedule",
         "steps:1.0@0,0.4@4", "--compare-dense", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    *_, line, status = proc.stdout.strip().splitlines()
    assert json.loads(status) == {"code": 0, "pools": True}
    out = json.loads(line)
    assert out["tokens"] == gen.generate(PROMPT, 10, "steps:1.0@0,0.4@4").tokens
    assert (
        out["dense"]["tokens"] == Generator.from_onnx(tiny_lm["onnx"]).generate(PROMPT, 10).tokens
    )
    assert "EP Error" not in proc.stderr + proc.stdout  # no session fell back
