"""The benchmark scripts run end to end in their quick mode (figures are not asserted here)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_loss_benchmark_quick_mode_measures_every_implementation(tmp_path):
    out = tmp_path / "loss.json"
    done = _run("loss.py", "--quick", "--out", str(out))
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
    done = _run("loss.py", "--quick", "--impls", "tiled,flash", "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "unknown --impls ['flash']" in done.stderr
    assert not (tmp_path / "x").exists()


def test_eval_benchmark_quick_mode_times_both_sides_at_equal_accuracy(tmp_path):
    out = tmp_path / "eval.json"
    done = _run("eval.py", "--quick", "--out", str(out), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    sides = result["sides"]
    assert set(sides) == {"clip_train_cold", "clip_train_warm", "open_clip"}
    assert all(s["images_per_s"] > 0 for s in sides.values())
    # the same model, images and prompts under the same protocol: the same predictions
    top1 = {name: s["acc1"] for name, s in sides.items()}
    assert max(top1.values()) - min(top1.values()) == pytest.approx(0, abs=1e-6), top1
    assert result["meta"]["num_images"] == 40 and result["meta"]["num_templates"] == 80
    # the warm run took its class embeddings from the cache: (almost) no time in text encoding
    assert sides["clip_train_warm"]["median_run"]["text_s"] < sides["clip_train_cold"]["median_run"]["text_s"]
    assert "vs OpenCLIP" in done.stdout
