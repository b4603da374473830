"""The benchmark scripts run end to end in their quick mode (figures are not asserted here)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_loss_benchmark_quick_mode_measures_every_implementation(tmp_path):
    out = tmp_path / "loss.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/loss.py", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["impl"], r["n"]) for r in rows} == {
        (i, n) for i in ("dense", "tiled", "open_clip") for n in (256, 512)
    }
    for n in (256, 512):
        ran = [r for r in rows if r["n"] == n]
        assert all(r["status"] == "ok" and r["peak_mib"] > 0 and r["total_s"] > 0 for r in ran)
        # the three compute the same loss on the same inputs (OpenCLIP's ClipLoss is the peer)
        assert max(r["loss"] for r in ran) - min(r["loss"] for r in ran) == pytest.approx(0, abs=1e-4)
    assert "open_clip" in done.stdout and "peak MiB" in done.stdout


def test_loss_benchmark_rejects_an_unknown_implementation(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/loss.py",
            "--quick",
            "--impls",
            "tiled,flash",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 2 and "unknown --impls ['flash']" in done.stderr
    assert not (tmp_path / "x").exists()
