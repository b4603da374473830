"""The benchmark scripts run end to end in their quick mode (figures are not asserted here)."""

import inspect
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
    assert set(sides) == {"clip_train_cold", "clip_train_warm", "open_clip", "open_clip_small_batch"}
    assert result["meta"]["open_clip_small_batch"] == result["meta"]["clip_train_image_chunk"] == 8
    # both sides' image forward is timed (clip_train's runs through its chunked, traced tower)
    assert all(s["median_run"]["forward_s"] > 0 for s in sides.values())
    assert all(s["images_per_s"] > 0 for s in sides.values())
    # the same model, images and prompts under the same protocol: the same predictions
    top1 = {name: s["acc1"] for name, s in sides.items()}
    assert max(top1.values()) - min(top1.values()) == pytest.approx(0, abs=1e-6), top1
    assert result["meta"]["num_images"] == 40 and result["meta"]["num_templates"] == 80
    # the warm run took its class embeddings from the cache: (almost) no time in text encoding
    assert sides["clip_train_warm"]["median_run"]["text_s"] < sides["clip_train_cold"]["median_run"]["text_s"]
    assert "vs OpenCLIP" in done.stdout


def test_data_benchmark_quick_mode_times_every_pipeline_on_the_same_batches(tmp_path):
    out = tmp_path / "data.json"
    done = _run("data.py", "--quick", "--out", str(out), timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    # the rows that must be there: clip_train without draft decoding always; with it when
    # build_train_loader has a switch for it; OpenCLIP when its venv (benchmarks/openclip_venv.sh) exists
    from clip_train.data.pipeline import build_train_loader

    expected = {"clip_train_draft_off"}
    if {"draft_decode", "decode_size"} & set(inspect.signature(build_train_loader).parameters):
        expected.add("clip_train_draft_on")
    cache = os.path.expanduser(os.environ.get("CLIP_TRAIN_CACHE", "~/.cache/clip_train"))
    venv = os.environ.get("OPENCLIP_VENV", os.path.join(cache, "venv-openclip"))
    if os.path.exists(os.path.join(venv, "bin", "python")):
        expected.add("openclip")
    sides = result["sides"]
    assert set(sides) == expected
    for side in sides.values():
        assert side["images_per_s"] > 0 and side["images_per_run"] == 4 * 8
        # the tiny model: 64 px images, 16 tokens; the same on every side
        assert side["image_batch"] == [8, 3, 64, 64]
        assert side["token_batch"] == [8, 16] and side["token_dtype"] == "int64"
    # training's loader hands over uint8 images (the step normalises them); OpenCLIP's, floats
    assert sides["clip_train_draft_off"]["image_dtype"] == "uint8"
    assert sides.get("openclip", {"image_dtype": "float32"})["image_dtype"] == "float32"
    assert all(errors["skipped"] == 0 for errors in sides["clip_train_draft_off"]["data_errors"])
    # synthetic 1024 px JPEGs written by the project's shard writer
    assert result["shards"]["samples"] == 24 and result["shards"]["stored_long_side_median"] == 1024
    assert "images/s" in done.stdout


def test_train_benchmark_quick_mode_trains_the_same_model_on_both_sides(tmp_path):
    out = tmp_path / "train.json"
    done = _run("train.py", "--quick", "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    cache = os.path.expanduser(os.environ.get("CLIP_TRAIN_CACHE", "~/.cache/clip_train"))
    venv = os.environ.get("OPENCLIP_VENV", os.path.join(cache, "venv-openclip"))
    peer = os.path.exists(os.path.join(venv, "bin", "python"))
    runs = result["runs"]
    assert set(runs) == ({"clip_train", "openclip"} if peer else {"clip_train"})
    flops = result["model"]["flops"]["per_sample"]
    for run in runs.values():
        assert sorted(int(s) for s in run["per_step"]) == list(range(1, 7))  # every step logged
        assert run["steady"]["samples_per_s"] > 0 and run["steady"]["window_steps"] == [3, 6]
    # clip_train's own log carries the FLOPs the benchmark counted on the same model
    assert {r["flops_per_sample"] for r in runs["clip_train"]["per_step"].values()} == {flops}
    # one model, one starting point: OpenCLIP's init imported exactly, equal losses on one batch
    assert max(result["model"]["import_max_diff"].values()) < 1e-4
    profile = result["profile"]
    assert profile["same_batch_loss"][0] == pytest.approx(profile["same_batch_loss"][1], abs=1e-4)
    assert len(set(profile["decayed_params"].values())) == 1
    for side in ("clip_train", "openclip"):
        assert profile[side]["total"] > 0 and profile[f"{side}_top_ops"]
    if peer:
        curves = result["loss_curves"]["clip_train vs openclip"]
        assert curves["steps"] == 6 and curves["max_lr_diff"] < 1e-6
        assert "vs OpenCLIP" in done.stdout and result["ratio"] > 0


def test_gpu_benchmark_dry_mode_runs_every_stage_on_the_cpu(tmp_path):
    """benchmarks/gpu.sh --dry: the GPU script's stages, children and report at tiny size, so that
    the script a GPU machine runs once cannot rot between such runs."""
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--dry", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "GPU_WORK": str(tmp_path / "work")},
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    result = json.loads(out.read_text())
    assert result["dry"] and result["shards"]["samples"] == 64
    # the loss stage: the three implementations ran and agree (Inf-CL in Triton's interpreter)
    loss_rows = result["loss"]["rows"]
    assert {r["impl"] for r in loss_rows} == {"tiled", "open_clip", "inf_cl"}
    assert all(r["status"] == "ok" for r in loss_rows), loss_rows
    assert max(r["loss"] for r in loss_rows) - min(r["loss"] for r in loss_rows) == pytest.approx(0, abs=1e-4)
    # the training stage: clip_train's model-only step and trainer, OpenCLIP's trainer, eager and compiled
    cells = {(r["side"], r.get("mode"), r["compile"]): r for r in result["train_rows"]}
    for side, mode in (("clip_train", "model_only"), ("clip_train", "pipeline"), ("open_clip", "pipeline")):
        for compile_ in (False, True):
            row = cells[(side, mode, compile_)]
            assert row["status"] == "ok" and row["samples_per_s"] > 0, row
    assert all(line["ratio"] > 0 for line in result["train_table"])
    # the evaluation stage: one of OpenCLIP's architectures by name, both sides timed
    evaluation = result["eval"]["result"]
    assert evaluation["meta"]["arch"] == "openclip:ViT-B-32" and evaluation["meta"]["num_templates"] == 2
    assert all(side["images_per_s"] > 0 for side in evaluation["sides"].values())
    # the report: every goal is stated, reached or not
    assert set(result["goals"]) >= {"train_ratio_reached", "b16_mfu_reached", "loss_1m_reached"}
    assert "goals: training >= 1.3x OpenCLIP" in done.stdout and "zero-shot evaluation" in done.stdout


def test_patch_dropout_benchmark_quick_mode_times_each_rate_against_rate_zero(tmp_path):
    out = tmp_path / "patch_dropout.json"
    done = _run("patch_dropout.py", "--quick", "--rates", "0,0.5", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["patch_dropout"] for r in result["rows"]] == [0.0, 0.5]
    reference = result["rows"][0]
    assert reference["train_speedup"] == reference["image_tower_speedup"] == 1.0
    assert all(r["train_samples_per_s"] > 0 and r["image_tower_samples_per_s"] > 0 for r in result["rows"])
    assert result["meta"]["timm_model"] == "bench_vit_p16_2x64" and "speed-up" in done.stdout


def test_patch_dropout_benchmark_refuses_a_rate_of_one(tmp_path):
    done = _run("patch_dropout.py", "--quick", "--rates", "0,1", "--out", str(tmp_path / "x.json"))
    assert done.returncode == 2 and "each rate must be in [0, 1)" in done.stderr
    assert not (tmp_path / "x.json").exists()
