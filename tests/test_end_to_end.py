"""A tiny real run through the command line: train, get killed, resume, evaluate."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import REPO, losses, run_train

from clip_train.config import ImageTowerConfig
from clip_train.models.image_tower import build_image_tower
from clip_train.tracking import read_metrics

pytestmark = pytest.mark.slow


def _resumes_exactly(tmp_path, tiny_data, *extra) -> dict[int, float]:
    """Train straight and killed-at-6-then-resumed with `extra`; steps 5-8 must give the same
    losses. Returns the straight run's losses."""
    straight = run_train(tmp_path / "straight", tiny_data, *extra)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run_train(tmp_path / "resumed", tiny_data, *extra, faults=("--kill-at-step", "6"))
    assert killed.returncode == -9
    resumed = run_train(tmp_path / "resumed", tiny_data, *extra)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want, got = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [got[s] for s in range(5, 9)] == pytest.approx([want[s] for s in range(5, 9)], abs=1e-6)
    return want


def _clip_eval(run_dir, out) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-m", "clip_train", "eval", str(run_dir), "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((Path(out) / "summary.json").read_text())


def test_killed_run_resumes_to_the_same_losses_and_evaluates(tmp_path, tiny_data):
    straight = run_train(tmp_path / "straight", tiny_data)
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed = run_train(tmp_path / "resumed", tiny_data, faults=("--kill-at-step", "6"))
    assert killed.returncode == -9  # SIGKILL: no handler ran, nothing was tidied up
    ckpts = tmp_path / "resumed" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-000000004"
    resumed = run_train(tmp_path / "resumed", tiny_data)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "step 4" in resumed.stdout

    want, got = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(want) == sorted(got) == list(range(1, 9))
    # Steps 5-8 after the resume see the same weights, optimizer state, RNG and batches.
    assert [got[s] for s in range(5, 9)] == pytest.approx([want[s] for s in range(5, 9)], abs=1e-6)

    # metrics.jsonl has the required fields; eval results are in metrics and in JSON files
    record = read_metrics(tmp_path / "resumed", "train")[-1]
    for key in ("step", "loss", "lr", "logit_scale", "samples_per_s", "data_wait_frac"):
        assert key in record
    evals = read_metrics(tmp_path / "resumed", "eval")
    assert evals and evals[-1]["step"] == 8 and "retrieval/text_retrieval_recall@1" in evals[-1]
    eval_dir = tmp_path / "resumed" / "eval" / "step-000000008"
    result = json.loads((eval_dir / "shapes_zeroshot_classification.json").read_text())
    assert result["task"] == "zeroshot_classification" and 0.0 <= result["metrics"]["acc1"] <= 1.0
    assert [p.name for p in sorted(ckpts.glob("step-*"))] == ["step-000000004", "step-000000008"]

    # starting a finished run again reports it and leaves its results alone
    results = (tmp_path / "resumed" / "results.json").read_text()
    again = run_train(tmp_path / "resumed", tiny_data)
    assert again.returncode == 0 and "already finished 8 steps" in again.stdout
    assert (tmp_path / "resumed" / "results.json").read_text() == results
    assert "retrieval/text_retrieval_recall@1" in again.stdout

    # clip-eval on the run directory reproduces the trainer's final numbers from the saved model
    summary = _clip_eval(tmp_path / "resumed", tmp_path / "clip_eval")
    for key in ("shapes/acc1", "retrieval/text_retrieval_recall@1", "retrieval/image_retrieval_recall@5"):
        assert summary[key] == pytest.approx(evals[-1][key])


def test_cached_image_features_resume_exactly(tmp_path, tiny_data):
    # The feature cache is not checkpointed: the resumed run recomputes each image's features, which
    # must be the values the uninterrupted run had cached, or the losses after the resume differ.
    _resumes_exactly(tmp_path, tiny_data, "model.image.lock=true", "train.cache_image_features=true")


def test_concatenated_locked_towers_train_from_the_cache_and_are_saved(tmp_path, tiny_data):
    weights = tmp_path / "resnet.pth"
    torch.save(build_image_tower(ImageTowerConfig(name="test_resnet")).state_dict(), weights)
    concat = [f'model.image.concat=["test_resnet={weights}"]']
    proc = run_train(
        tmp_path / "run", tiny_data, "model.image.lock=true", "train.cache_image_features=true", *concat
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["model"]["image"]["concat"] == ["test_resnet"]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    # the cached features are both towers' side by side, or the wider projection could not take them
    assert 0 <= results["retrieval/text_retrieval_recall@1"] <= 1


def test_missing_shards_fail_fast_with_one_line(tmp_path, tiny_data):
    proc = run_train(tmp_path / "run", tiny_data, f"data.train_shards={tmp_path}/nope-{{000..002}}.tar")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "3 shard(s) not found" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_a_run_killed_after_its_final_checkpoint_still_gets_its_final_evaluation(tmp_path, tiny_data):
    killed = run_train(tmp_path / "run", tiny_data, faults=("--kill-at-step", "8"))
    assert killed.returncode == -9 and not (tmp_path / "run" / "results.json").exists()
    finished = run_train(tmp_path / "run", tiny_data)
    assert finished.returncode == 0, finished.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["step"] == 8 and "retrieval/text_retrieval_recall@1" in results


def test_a_bad_model_setting_fails_in_one_line_and_leaves_no_run_dir(tmp_path, tiny_data):
    proc = run_train(tmp_path / "run", tiny_data, "model.image.name=resnet5")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "clip-train: error: model.image.name=resnet5 is not a timm model: did you mean resnet50?"
    )
    assert not (tmp_path / "run").exists()


def test_siglip_tiled_with_accumulation_trains_and_records_which_loss_ran(tmp_path, tiny_data):
    run_dir = tmp_path / "siglip"
    loss_settings = ["loss.kind=siglip", "loss.impl=tiled", "loss.block_size=5", "train.accum_steps=2"]
    loss_settings.append("train.grad_checkpointing=true")  # recomputation inside the GradCache replay
    done = run_train(run_dir, tiny_data, *loss_settings, "train.steps=4", "train.ckpt_every=2")
    assert done.returncode == 0, done.stderr[-2000:]
    setup = read_metrics(run_dir, "setup")[0]
    assert setup["loss_kind"] == "siglip" and setup["loss_impl"] == "tiled" and setup["accum_steps"] == 2
    assert setup["contrastive_batch"] == 16  # 2 micro-batches of 8 on one process
    # the tiny config's EfficientNet trains its BatchNorm: accumulation is not exact, and the run says so
    assert setup["accumulation_batchnorm_layers"] > 0
    warning = [line for line in done.stdout.splitlines() if line.startswith("warning: train.accum_steps=2")]
    assert len(warning) == 1 and "BatchNorm layers that train" in warning[0]
    train = read_metrics(run_dir, "train")
    assert train[-1]["samples_seen"] == 4 * 16
    # SigLIP's learnable bias starts at -10 (its paper's init) and is trained
    assert -10.5 < train[0]["logit_bias"] < -9.5 and train[0]["logit_bias"] != train[-1]["logit_bias"]
    assert all(r["loss"] == r["loss"] for r in train)  # finite (NaN != NaN)

    # continuing with another accumulation would read the data differently: refused, one line
    more = run_train(run_dir, tiny_data, *loss_settings[:3], "train.accum_steps=1", "train.steps=6")
    assert more.returncode == 2
    assert "accum_steps was 2 there and is 1 now" in more.stderr


def test_nan_steps_are_skipped_logged_and_too_many_stop_the_run(tmp_path, tiny_data):
    run_dir = tmp_path / "nan"
    done = run_train(run_dir, tiny_data, "train.steps=6", faults=("--nan-at-steps", "3"))
    assert done.returncode == 0, done.stderr[-2000:]
    skips = read_metrics(run_dir, "skip")
    assert [s["step"] for s in skips] == [3] and math.isnan(float(skips[0]["loss"]))
    assert len(skips[0]["keys"]) == 8 and all("/" in key for key in skips[0]["keys"])  # shard URL / key
    train = {r["step"]: r for r in read_metrics(run_dir, "train")}
    assert 3 not in train and sorted(train) == [1, 2, 4, 5, 6]  # no optimizer step, nothing averaged
    assert not any(math.isnan(r["loss"]) for r in train.values())
    # the schedule did not advance on the skipped step: step 4 has the lr step 3 would have had
    assert train[4]["lr"] == pytest.approx(_train_lr(3, 6))

    stopped = run_train(
        tmp_path / "nan2",
        tiny_data,
        "train.max_consecutive_skips=2",
        faults=("--nan-at-steps", "2,3"),
    )
    assert stopped.returncode == 2
    assert "2 consecutive non-finite steps up to step 3" in stopped.stderr and stopped.stderr.count("\n") == 1


def test_a_nan_step_under_accumulation_is_skipped_like_a_plain_one(tmp_path, tiny_data):
    run_dir = tmp_path / "nan_accum"
    done = run_train(
        run_dir, tiny_data, "train.steps=6", "train.accum_steps=2", faults=("--nan-at-steps", "3")
    )
    assert done.returncode == 0, done.stderr[-2000:]
    skips = read_metrics(run_dir, "skip")
    assert [s["step"] for s in skips] == [3] and math.isnan(float(skips[0]["loss"]))
    assert len(skips[0]["keys"]) == 16  # both micro-batches' samples
    train = {r["step"]: r for r in read_metrics(run_dir, "train")}
    assert sorted(train) == [1, 2, 4, 5, 6] and not any(math.isnan(r["loss"]) for r in train.values())
    assert train[4]["lr"] == pytest.approx(_train_lr(3, 6))


def _train_lr(step: int, total: int) -> float:
    from clip_train.config import OptimConfig
    from clip_train.optim import lr_factor

    return 1e-3 * lr_factor(step, total, OptimConfig(lr=1e-3, warmup_steps=2))


def test_weighted_sources_with_two_workers_resume_exactly_and_resume_changes_need_consent(
    tmp_path, tiny_data
):
    shards = tiny_data["shards"]
    sources = (
        f"data.sources=[{{shards: '{shards}/train-000000.tar', weight: 1, name: small}}, "
        f"{{shards: '{shards}/train-00000[1-9].tar', weight: 3, name: big}}]"
    )
    settings = [sources, "data.train_shards=", "data.num_workers=2", "eval.zeroshot=[]", "data.val_shards="]
    straight = run_train(tmp_path / "straight", tiny_data, *settings)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run_train(tmp_path / "run", tiny_data, *settings, faults=("--kill-at-step", "6"))
    assert killed.returncode == -9
    # another worker count changes the data order: refused, unless the config says it is fine
    refused = run_train(tmp_path / "run", tiny_data, *settings, "data.num_workers=0")
    assert refused.returncode == 2
    assert "num_workers was 2 there and is 0 now" in refused.stderr
    assert "train.allow_resume_change=true" in refused.stderr
    resumed = run_train(tmp_path / "run", tiny_data, *settings)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want, got = losses(tmp_path / "straight"), losses(tmp_path / "run")
    assert [got[s] for s in range(5, 9)] == pytest.approx([want[s] for s in range(5, 9)], abs=1e-6)

    record = read_metrics(tmp_path / "run", "train")[-1]
    assert record["data/share/small"] + record["data/share/big"] == pytest.approx(1.0)
    assert record["data/seen"] >= 4 * 8 and record["data/skipped"] == 0

    allowed = run_train(
        tmp_path / "run", tiny_data, *settings, "data.num_workers=0", "train.steps=10",
        "train.allow_resume_change=true",
    )  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "num_workers 2 -> 0" in allowed.stdout and "differs from an uninterrupted run" in allowed.stdout


def test_too_few_shards_for_the_readers_is_a_config_error_before_training(tmp_path, tiny_data):
    shards = tiny_data["shards"]
    proc = run_train(
        tmp_path / "run", tiny_data, f"data.train_shards={shards}/train-000000.tar",
        "data.resampled=false", "data.num_workers=2",
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "1 shard(s) for 2 readers" in lines[0]
    assert not (tmp_path / "run").exists()
