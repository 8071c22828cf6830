"""Interrupted runs resume bit for bit; the same inputs give byte-identical outputs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flarc.cli import main
from flarc.core.store import CURRENT, Store
from flarc.rewrite.analysis_file import load_analysis

from _models import Mlp3d, export
from _outcome import message_lines

REPO = Path(__file__).resolve().parents[1]


class Wide(nn.Module):
    """Three wide layers: enough work per batch that a kill lands mid-run."""

    def __init__(self, d: int = 96, layers: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    model = export(Wide(), (torch.randn(4, 8, 96),), folder / "w.onnx", ["x"], {"x": {0: "b"}})
    rng = np.random.default_rng(0)
    # 200 batches of 4: 175 calibration batches, 25 held out.
    np.savez(folder / "c.npz", x=rng.standard_normal((800, 8, 96)).astype(np.float32))
    return model, folder / "c.npz"


def analyze_args(model: Path, calib: Path, out: Path, *extra: str) -> list[str]:
    return [
        "analyze",
        str(model),
        "-o",
        str(out),
        "--calib",
        str(calib),
        "--batch-size",
        "4",
        *extra,
    ]


# The CLI in a child whose N-th publication of a store group dies after the new version is
# complete and before it is published (what a power cut or kill -9 at the worst moment leaves).
CRASHING = """
import os, sys
import flarc.core.store as store
real, calls = store.publish, []
def publish(folder, version, *sync):
    calls.append(version)
    if len(calls) == int(os.environ["CRASH_AT"]):
        os._exit(77)
    real(folder, version, *sync)
store.publish = publish
from flarc.cli import main
sys.exit(main(sys.argv[1:]))
"""


def spawn(args: list[str], crash_at: int | None = None) -> subprocess.Popen:
    code = ["-c", CRASHING] if crash_at else ["-m", "flarc.cli"]
    return subprocess.Popen(
        [sys.executable, *code, *args],
        cwd=REPO,
        env={**os.environ, "CRASH_AT": str(crash_at or 0)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def manifest(folder: Path) -> dict:
    """The meta of the statistics saved in the checkpoint folder (KeyError when none)."""
    saved = Store(folder, writable=False).group("statistics")
    if saved is None:
        raise KeyError("statistics")
    return saved[1]


def leftovers(folder: Path) -> list[Path]:
    """What killed writers left in the statistics group: unpublished versions, temporary files."""
    group = folder / "statistics"
    live = (group / CURRENT).read_text()
    return [p for p in group.iterdir() if p.name not in (CURRENT, live)]


def folder_sha(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def assert_same_statistics(a_path: Path, b_path: Path) -> None:
    a, b = load_analysis(a_path), load_analysis(b_path)
    assert list(a.stats) == list(b.stats)
    for attr in ("stats", "heldout_stats"):
        for key, ma in getattr(a, attr).items():
            mb = getattr(b, attr)[key]
            assert ma.count == mb.count
            assert ma.sum4 == mb.sum4
            for field in ("gram", "sum1", "sum2x"):
                # Bit for bit, not approximately.
                assert getattr(ma, field).tobytes() == getattr(mb, field).tobytes(), (key, field)
    for name, ea in a.entries.items():
        assert ea.spectrum.sigma.tobytes() == b.entries[name].spectrum.sigma.tobytes()


@pytest.fixture(scope="module")
def reference(wide, tmp_path_factory):
    model, calib = wide
    out = tmp_path_factory.mktemp("ref") / "ref.analysis"
    assert main(analyze_args(model, calib, out)) == 0
    return out


def kill_after_checkpoint(args: list[str], ckpt: Path, after_batch: int) -> int:
    """Start the CLI, SIGKILL it as soon as a checkpoint past ``after_batch`` is on disk."""
    proc = spawn(args)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (ckpt / "statistics" / CURRENT).exists() and manifest(ckpt)[
                "batches_done"
            ] > after_batch:
                break
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = manifest(ckpt)["batches_done"]
    assert after_batch < done < manifest(ckpt)["batches_total"]
    return done


def test_kill9_then_resume_is_bit_identical(wide, reference, tmp_path):
    model, calib = wide
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "resumed.analysis"
    args = analyze_args(model, calib, out, "--checkpoint", str(ckpt), "--checkpoint-every", "1")
    first = kill_after_checkpoint(args, ckpt, 0)
    # Killed again while resuming: the second run continues from the first one's checkpoint.
    second = kill_after_checkpoint([*args, "--resume"], ckpt, first)
    assert second > first
    assert not out.exists()
    assert main([*args, "--resume"]) == 0
    assert manifest(ckpt)["batches_done"] == manifest(ckpt)["batches_total"] == 175
    assert_same_statistics(reference, out)
    assert not leftovers(ckpt)


def test_crash_inside_checkpoint_write_keeps_the_old_one(wide, reference, tmp_path, capsys):
    model, calib = wide
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "resumed.analysis"
    args = analyze_args(model, calib, out, "--checkpoint", str(ckpt), "--checkpoint-every", "5")
    # The third save dies after its version is complete, before it is published.
    proc = spawn(args, crash_at=3)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 77, err.decode()
    # Saves land at the end of the first shard (of consecutive batches whose products are
    # stacked) after every 5 batches: the second of them, intact.
    meta = manifest(ckpt)
    ends = meta["identity"].get("shard_ends", list(range(1, 176)))
    saves = [
        end for before, end in zip([0, *ends[:-1]], ends, strict=True) if end // 5 > before // 5
    ]
    assert meta["batches_done"] == saves[1]
    (stale,) = leftovers(ckpt)
    assert (stale / "meta.json").stat().st_size > 0
    assert not out.exists()
    assert main([*args, "--resume"]) == 0, capsys.readouterr().err
    assert_same_statistics(reference, out)
    assert not leftovers(ckpt)


def test_crash_in_first_checkpoint_write_starts_over(wide, reference, tmp_path, capsys):
    model, calib = wide
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "resumed.analysis"
    args = analyze_args(model, calib, out, "--checkpoint", str(ckpt), "--checkpoint-every", "50")
    proc = spawn(args, crash_at=1)
    proc.communicate(timeout=120)
    assert proc.returncode == 77
    with pytest.raises(KeyError):  # the half-made save was never published
        manifest(ckpt)
    assert main([*args, "--resume"]) == 0, capsys.readouterr().err
    assert_same_statistics(reference, out)


def one_error(capsys, argv: list[str], *expect: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0, err
    lines = message_lines(err)
    assert len(lines) == 1 and lines[0].startswith("flarc: error:"), err
    for word in expect:
        assert word in lines[0], lines[0]
    return lines[0]


def test_checkpoint_of_another_model_options_or_data_is_refused(wide, tmp_path, capsys):
    model, calib = wide
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "a.analysis"
    base = ["--checkpoint", str(ckpt), "--checkpoint-every", "40"]
    assert main(analyze_args(model, calib, out, *base)) == 0
    before = folder_sha(ckpt / "statistics")
    resume = [*base, "--resume"]
    # Another model (a different seed, same shapes).
    torch.manual_seed(1)
    other = export(Wide(), (torch.randn(4, 8, 96),), tmp_path / "o.onnx", ["x"], {"x": {0: "b"}})
    one_error(capsys, analyze_args(other, calib, out, *resume), "checkpoint", "model")
    # Other statistics options.
    one_error(
        capsys,
        analyze_args(model, calib, out, *resume, "--stats-precision", "float64"),
        "precision",
    )
    # Other calibration data, and the same data in another order of batches.
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "c2.npz", x=rng.standard_normal((800, 8, 96)).astype(np.float32))
    one_error(capsys, analyze_args(model, tmp_path / "c2.npz", out, *resume), "feeds")
    one_error(capsys, analyze_args(model, calib, out, *resume, "--batch-size", "8"), "feeds")
    assert folder_sha(ckpt / "statistics") == before  # a refused resume never touches it
    # A checkpoint whose arrays were changed after it was written fails its checksum.
    gram = ckpt / "statistics" / (ckpt / "statistics" / CURRENT).read_text() / "s0_gram.npy"
    np.save(gram, np.load(gram) + 1.0)
    one_error(capsys, analyze_args(model, calib, out, *resume), "checksum")
    # --resume without a folder.
    one_error(capsys, analyze_args(model, calib, out, "--resume"), "--checkpoint")


def test_completed_checkpoint_resumes_without_running(wide, reference, tmp_path):
    model, calib = wide
    ckpt = tmp_path / "ckpt"
    args = analyze_args(model, calib, tmp_path / "a.analysis", "--checkpoint", str(ckpt))
    assert main(args) == 0
    assert manifest(ckpt)["batches_done"] == 175  # written after the last batch, too
    args[3] = str(tmp_path / "b.analysis")
    assert main([*args, "--resume"]) == 0
    assert_same_statistics(reference, tmp_path / "b.analysis")


# -- determinism ---------------------------------------------------------------------------

# Report fields that legitimately differ between two runs: wall-clock and where files went.
VOLATILE = {"output", "latency", "report", "plot"}


def stable_report(path: Path) -> dict:
    report = json.loads(path.read_text())
    for key in ("output",):
        report.pop(key, None)
    report["options"] = {k: v for k, v in report["options"].items() if k not in VOLATILE}
    return report


@pytest.mark.parametrize(
    "extra", [["--ratio", "0.5"], ["--search", "bisect", "--criterion", "output"]]
)
def test_same_inputs_give_byte_identical_outputs(tmp_path, extra):
    torch.manual_seed(0)
    model = export(Mlp3d(), (torch.randn(2, 5, 24),), tmp_path / "m.onnx", ["x"], {"x": {0: "b"}})
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((48, 5, 24)).astype(np.float32))
    before = sha(model)
    outputs = []
    for run, hash_seed in (("a", "1"), ("b", "2")):
        out, report = tmp_path / f"{run}.onnx", tmp_path / f"{run}.json"
        argv = ["compress", str(model), "-o", str(out), "--calib", str(tmp_path / "c.npz")]
        argv += ["--align", "4", *extra, "--report", str(report)]
        # Separate processes with different string hashing: set/dict-order accidents show up.
        proc = subprocess.run(
            [sys.executable, "-m", "flarc.cli", *argv],
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        outputs.append((sha(out), stable_report(report)))
    assert outputs[0][0] == outputs[1][0], "the output model differs between two identical runs"
    assert outputs[0][1] == outputs[1][1], "the report differs between two identical runs"
    assert sha(model) == before


def test_removals_run_while_the_block_runs_and_a_failure_is_only_logged(tmp_path, caplog):
    """removing_meanwhile: the removals run beside the block (a removal waiting for the block's
    signal finishes), are done when the block ends, and one that fails is logged, not raised."""
    import shutil
    import threading

    from flarc.core.files import removing_meanwhile

    folder = tmp_path / "dead"
    folder.mkdir()
    (folder / "a.npy").write_bytes(b"x" * 1000)
    signal_ = threading.Event()
    seen = []

    def remove_after_signal() -> None:
        seen.append(signal_.wait(timeout=30))  # False only if the block never ran alongside
        shutil.rmtree(folder)

    def fail() -> None:
        raise PermissionError("denied")

    with removing_meanwhile([fail, remove_after_signal]):
        signal_.set()
    assert seen == [True] and not folder.exists()
    assert "could not remove temporary files: denied" in caplog.text
