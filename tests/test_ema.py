"""train.ema: the EMA of the weights against the formula, through skipped and accumulated steps,
across a kill and resume, in evaluation and in clip-export --weights ema; bad settings refused."""

import json
import subprocess
import sys

import pytest
import torch
from runs import REPO, run_train
from safetensors.torch import load_file

from clip_train.checkpoint import ResumeError
from clip_train.cli import export_main
from clip_train.config import ConfigError, EmaConfig, load_config
from clip_train.tracking import read_metrics
from clip_train.train import Trainer, TrainHooks
from clip_train.train.ema import WeightEma, check_ema_resume, ema_fingerprint

TINY = ["run_dir=/tmp/unused", "data.train_shards=/tmp/unused"]
EMA = ["train.ema.decay=0.8", "train.ema.warmup=true", "train.ema.warmup_gamma=2"]


def _decay(update: int, cfg: EmaConfig) -> float:
    """The decay of the update-th update (from 1), written out: the first copies the weights;
    with warmup, t updates after the first: min(decay, 1 - (1 + t / gamma) ** -power)."""
    t = update - 1
    if t == 0:
        return 0.0
    if not cfg.warmup:
        return cfg.decay
    return min(cfg.decay, 1 - (1 + t / cfg.warmup_gamma) ** -cfg.warmup_power)


def _reference_update(reference: dict, weights: dict, decay: float) -> None:
    for key, value in weights.items():
        if value.is_floating_point():
            reference[key] = decay * reference[key] + (1 - decay) * value
        else:  # counters (BatchNorm's num_batches_tracked) are copied
            reference[key] = value.clone()


@pytest.mark.parametrize("warmup", [False, True])
def test_the_average_follows_the_decay_formula_and_ignores_skipped_steps(warmup):
    cfg = EmaConfig(decay=0.9, warmup=warmup, warmup_gamma=1.5, warmup_power=0.75)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = WeightEma.build(cfg, model)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    decays = []
    for step in range(1, 8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model(torch.randn(5, 4))  # moves the running statistics and the counter
        applied = step != 4  # a step skipped after all (fp16 GradScaler): nothing moves or counts
        decays.append(ema.decay())
        ema.update(model, applied=applied)
        if applied:
            _reference_update(reference, model.state_dict(), _decay(ema.updates, cfg))
    assert ema.updates == 6
    expected = [_decay(n, cfg) for n in (1, 2, 3, 4, 4, 5, 6)]  # step 4 skipped: its decay reused
    assert decays == pytest.approx(expected, abs=1e-12)
    if warmup:
        assert 0 < decays[1] < decays[-1] < cfg.decay  # still ramping up after 6 updates
    got = ema.average.module.state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)
    assert not torch.equal(got["0.weight"], model.state_dict()["0.weight"])


def test_off_by_default_and_then_a_no_op():
    cfg = load_config(["configs/tiny.yaml"], TINY)
    assert cfg.train.ema.decay == 0
    ema = WeightEma.build(cfg.train.ema, torch.nn.Linear(2, 2))
    ema.update(torch.nn.Linear(2, 2))
    assert (ema.enabled, ema.checkpointed(), ema.eval_models(), ema_fingerprint(cfg.train.ema)) == (
        False, [], [], {},
    )  # fmt: skip


class RecordWeights(TrainHooks):
    """The live weights and the EMA after each step, and a NaN loss at nan_at."""

    def __init__(self, nan_at: int):
        self.nan_at, self.live, self.ema = nan_at, {}, {}

    def on_loss(self, step, loss):
        return loss * float("nan") if step == self.nan_at else loss

    def on_step_end(self, trainer, step):
        self.live[step] = {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}
        self.ema[step] = {k: v.clone() for k, v in trainer.ema.average.module.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_a_run_averages_the_weights_after_each_applied_step_plain_or_accumulated(tmp_path, tiny_data, accum):
    shards = tiny_data["shards"]
    overrides = [
        f"run_dir={tmp_path / 'run'}", f"data.train_shards={shards}/train-*.tar", "train.steps=5",
        "train.ckpt_every=0", f"train.accum_steps={accum}", *EMA,
    ]  # fmt: skip
    cfg = load_config(["configs/tiny.yaml"], overrides)
    hooks = RecordWeights(nan_at=3)
    trainer = Trainer(cfg, hooks)
    parameters = [name for name, _ in trainer.unwrapped.named_parameters()]
    trainer.fit()
    assert [r["step"] for r in read_metrics(tmp_path / "run", "skip")] == [3]
    # the skipped step moved no weight (its forward did move BatchNorm's running statistics) and
    # nothing of the average
    for key in hooks.ema[3]:
        assert torch.equal(hooks.ema[3][key], hooks.ema[2][key]), key
    for key in parameters:
        assert torch.equal(hooks.live[3][key], hooks.live[2][key]), key
    reference, updates = {}, 0
    for step in (1, 2, 4, 5):
        updates += 1
        if updates == 1:
            reference = {k: v.clone() for k, v in hooks.live[step].items()}
        else:
            _reference_update(reference, hooks.live[step], _decay(updates, cfg.train.ema))
    assert trainer.ema.updates == 4
    for key, value in reference.items():
        torch.testing.assert_close(hooks.ema[5][key], value, rtol=0, atol=1e-6, msg=key)
    assert not torch.equal(hooks.ema[5]["logit_scale"], hooks.live[5]["logit_scale"])
    saved = load_file(str(tmp_path / "run" / "model-ema" / "model.safetensors"))
    assert all(torch.equal(saved[k], hooks.ema[5][k].cpu()) for k in saved)


def _weights(folder) -> dict:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_a_killed_and_resumed_run_ends_with_the_uninterrupted_runs_ema_bit_for_bit(tmp_path, tiny_data):
    straight = run_train(tmp_path / "straight", tiny_data, *EMA)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run_train(tmp_path / "resumed", tiny_data, *EMA, faults=("--kill-at-step", "6"))
    assert killed.returncode == -9
    assert (tmp_path / "resumed" / "checkpoints" / "step-000000004" / "model-ema").is_dir()
    resumed = run_train(tmp_path / "resumed", tiny_data, *EMA)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout

    want, got = _weights(tmp_path / "straight" / "model-ema"), _weights(tmp_path / "resumed" / "model-ema")
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    live = _weights(tmp_path / "straight" / "model")
    assert not torch.equal(want["logit_scale"], live["logit_scale"])  # an average, not a copy
    # evaluated beside the live weights, in the eval record and results.json
    record = read_metrics(tmp_path / "straight", "eval")[-1]
    ema_keys = sorted(k for k in record if k.startswith("ema/"))
    assert "ema/retrieval/image_retrieval_recall@1" in ema_keys
    assert {k.removeprefix("ema/") for k in ema_keys} <= set(record)
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert {k for k in results if k.startswith("ema/")} == set(ema_keys)
    assert (tmp_path / "straight" / "eval" / "step-000000008" / "ema").is_dir()
    resumed_record = read_metrics(tmp_path / "resumed", "eval")[-1]
    assert {k: resumed_record[k] for k in ema_keys if "seconds" not in k} == {
        k: record[k] for k in ema_keys if "seconds" not in k
    }

    # a resume that changes the average's settings is refused in one line, before training
    changed = run_train(tmp_path / "straight", tiny_data, *EMA[:-1], "train.steps=10")
    assert changed.returncode == 2 and changed.stderr.count("\n") == 1
    assert (
        "its EMA had train.ema.decay=0.8, train.ema.warmup=True, train.ema.warmup_gamma=2.0" in changed.stderr
    )
    assert "and this run has train.ema.decay=0.8, train.ema.warmup=True, train.ema.warmup_gamma=1.0" in (
        changed.stderr
    )

    # clip-export --weights ema writes the EMA's weights (the export also checks its embeddings)
    out = tmp_path / "export"
    assert (
        export_main([str(tmp_path / "straight"), "--weights", "ema", "--to", "openclip", "--out", str(out)])
        == 0
    )
    exported = load_file(str(out / "open_clip_model.safetensors"))
    assert torch.equal(exported["logit_scale"], want["logit_scale"])


def test_resumes_that_would_change_or_invent_the_average_are_refused(tmp_path):
    on, off = EmaConfig(decay=0.99), EmaConfig()
    ckpt = tmp_path / "step-000000004"
    check_ema_resume({"world_size": 1}, off, ckpt)  # a run without EMA, before and after
    check_ema_resume(ema_fingerprint(on), on, ckpt)
    with pytest.raises(ResumeError, match="saved without an EMA of the weights and train.ema.decay=0.99"):
        check_ema_resume({"world_size": 1}, on, ckpt)
    with pytest.raises(ResumeError, match="holds an EMA of the weights .*train.ema.decay=0 now"):
        check_ema_resume(ema_fingerprint(on), off, ckpt)
    with pytest.raises(ResumeError, match="train.ema.decay=0.99, train.ema.warmup=False and this run"):
        check_ema_resume(ema_fingerprint(on), EmaConfig(decay=0.999), ckpt)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.ema.decay=1"], "train.ema.decay=1.0 is out of range: it must be in [0, 1)"),
        (["train.ema.decay=-0.1"], "train.ema.decay=-0.1 is out of range"),
        (
            ["train.ema.decay=0.9", "train.ema.warmup=true", "train.ema.warmup_gamma=0"],
            "warmup_gamma=0.0 is out",
        ),
        (["train.ema.warmup=true"], "train.ema.warmup=true ramps up an EMA that is off"),
        (["train.ema.decay=0.9", "train.ema.warmup_power=0.5"], "acts only with train.ema.warmup=true"),
        (["train.ema.dcay=0.9"], "did you mean train.ema.decay?"),
    ],
)
def test_bad_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=None) as error:
        load_config(["configs/tiny.yaml"], TINY + overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_clip_train_refuses_a_bad_setting_with_exit_2_and_writes_nothing(tmp_path, tiny_data):
    proc = subprocess.run(
        [sys.executable, "-m", "clip_train", "train", "configs/tiny.yaml", f"run_dir={tmp_path / 'run'}",
         f"data.train_shards={tiny_data['shards']}/train-*.tar", "train.ema.decay=1.5"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "train.ema.decay=1.5" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_weights_ema_of_a_model_folder_or_a_run_without_ema_is_refused(tmp_path, capsys):
    from clip_train.paths import NoModelError, resolve_model_folder

    folder = tmp_path / "run" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_text("")
    assert resolve_model_folder(tmp_path / "run") == folder
    with pytest.raises(NoModelError, match="EMA weights are saved by runs with train.ema.decay > 0"):
        resolve_model_folder(tmp_path / "run", weights="ema")
    with pytest.raises(NoModelError, match="is a model folder of its own"):
        resolve_model_folder(folder, weights="ema")
    out = tmp_path / "out"
    assert export_main([str(folder), "--weights", "ema", "--to", "hf", "--out", str(out)]) == 2
    assert "model folder of its own" in capsys.readouterr().err and not out.exists()
