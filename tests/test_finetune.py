"""Fine-tuning: starting from a saved model, what trains, WiSE-FT interpolation."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from clip_train.finetune import default_metrics, format_before_after, interpolate_state, wise_ft_sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_interpolation_is_exact_at_the_endpoints_and_linear_between():
    torch.manual_seed(0)
    start = {"w": torch.randn(3, 4), "steps": torch.tensor(5)}
    end = {"w": torch.randn(3, 4), "steps": torch.tensor(9)}
    assert torch.equal(interpolate_state(start, end, 0.0)["w"], start["w"])
    assert torch.equal(interpolate_state(start, end, 1.0)["w"], end["w"])
    quarter = interpolate_state(start, end, 0.25)["w"]
    assert torch.allclose(quarter, 0.75 * start["w"] + 0.25 * end["w"], atol=1e-6)
    assert interpolate_state(start, end, 0.5)["steps"] == 9  # counters are not blended
    with pytest.raises(ValueError, match="shape"):
        interpolate_state({"w": torch.zeros(2)}, {"w": torch.zeros(3)}, 0.5)


def test_the_sweep_evaluates_each_alpha_and_puts_the_fine_tuned_weights_back():
    model = nn.Linear(2, 1, bias=False)
    start = {"weight": torch.zeros(1, 2)}
    with torch.no_grad():
        model.weight.fill_(2.0)
    rows = wise_ft_sweep(model, start, [0, 0.5, 1], lambda a: {"w/acc1": model.weight.sum().item(), "x": a})
    assert [r["w/acc1"] for r in rows] == [0.0, 2.0, 4.0]
    assert torch.equal(model.weight, torch.full((1, 2), 2.0))
    assert default_metrics(rows) == ("w/acc1", "x")


def test_the_before_after_table_puts_the_chosen_metrics_first():
    rows = [{"alpha": a, "x/acc1": a, "ref/acc1": 1 - a, "ref/seconds": 3.0} for a in (0, 0.5, 1)]
    table = format_before_after({"domain_metric": "ref/acc1", "reference_metric": "x/acc1", "rows": rows})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "before", "a=0.5", "after"]
    assert lines[1].split() == ["ref/acc1", "1.0000", "0.5000", "0.0000"] and lines[2].split()[0] == "x/acc1"
    assert "seconds" not in table


def _train(*args):
    cmd = [sys.executable, "-m", "clip_train", "train", "configs/tiny.yaml", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.slow
def test_fine_tuning_a_saved_model_with_a_locked_image_tower_and_wise_ft(tmp_path, tiny_data):
    shards = tiny_data["shards"]
    data = [f"data.train_shards={shards}/train-*.tar", f"data.val_shards={shards}/val-000000.tar"]
    evaluation = f"eval.zeroshot=[{{dataset: {tiny_data['classes']}}}]"
    base = _train(f"run_dir={tmp_path / 'base'}", *data, evaluation, "eval.plots=false")
    assert base.returncode == 0, base.stderr[-2000:]

    tuned = _train(
        f"run_dir={tmp_path / 'tuned'}", *data, evaluation,
        f"model.init_from={tmp_path / 'base'}",  # a run directory: its model/ is used
        "model.embed_dim=999",  # ignored: the architecture is the saved model's
        "model.image.lock=true", "optim.text_lr_mult=0.5", "train.steps=4",
        "finetune.wise_alphas=[0, 0.5, 1]", "finetune.reference_metric=retrieval/text_retrieval_recall@1",
    )  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    assert "trainable: image 0.00M/" in tuned.stdout  # the log states what trains
    assert "WiSE-FT" in tuned.stdout

    start = load_file(str(tmp_path / "base" / "model" / "model.safetensors"))
    end = load_file(str(tmp_path / "tuned" / "model" / "model.safetensors"))
    assert end.keys() <= start.keys()
    for key, value in end.items():
        if key.startswith("visual.") and value.is_floating_point():
            assert torch.equal(value, start[key]), key  # locked: not one step moved it
    moved = [k for k in end if k.startswith(("text.", "text_proj.")) and not torch.equal(end[k], start[k])]
    assert len(moved) > 10  # unlocked: trained

    results = json.loads((tmp_path / "tuned" / "results.json").read_text())
    base_results = json.loads((tmp_path / "base" / "results.json").read_text())
    rows = {row["alpha"]: row for row in results["wise"]["rows"]}
    assert results["wise"]["domain_metric"] == "shapes/acc1"
    for key in ("shapes/acc1", "retrieval/text_retrieval_recall@1", "retrieval/image_retrieval_recall@5"):
        assert rows[0][key] == pytest.approx(base_results[key], abs=1e-6)  # alpha 0: the start model
        assert rows[1][key] == pytest.approx(results[key], abs=1e-6)  # alpha 1: the fine-tuned one
    assert (tmp_path / "tuned" / "eval" / "wise" / "wise.png").is_file()
    table = subprocess.run(
        [sys.executable, "-m", "clip_train", "finetune", str(tmp_path / "tuned")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    header, first = table.stdout.splitlines()[1:3]
    assert header.split()[1:] == ["before", "a=0.5", "after"] and first.split()[0] == "shapes/acc1"

    # the run's own saved config (with the resolved architecture) continues it: here, already finished
    again = subprocess.run(
        [sys.executable, "-m", "clip_train", "train", str(tmp_path / "tuned" / "config.yaml")],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert again.returncode == 0 and "already finished 4 steps" in again.stdout, again.stderr[-2000:]

    missing = _train(f"run_dir={tmp_path / 'bad'}", *data, f"model.init_from={tmp_path / 'nowhere'}")
    assert missing.returncode == 2 and "holds no saved model" in missing.stderr.strip().splitlines()[-1]


def test_demo_manifest_writes_the_chosen_categories_and_refuses_an_unknown_one(tmp_path, monkeypatch, capsys):
    from clip_train.cli import finetune_main
    from clip_train.data.sources import Record
    from clip_train.demo import domain

    stamps = [
        Record("tuxpaint", "a", "/stamps/cat.png", "a cat", {"category": "animals/mammals/cats"}),
        Record("tuxpaint", "b", "/stamps/pear.png", "a pear", {"category": "food/fruit/cartoon"}),
        Record("tuxpaint", "c", "/stamps/x.png", None, {"category": "food/fruit"}),  # no caption: left out
    ]
    monkeypatch.setattr(domain, "tuxpaint_records", lambda: iter(stamps))
    out = tmp_path / "domain.csv"
    assert finetune_main(["demo-manifest", "--categories", "food", "--out", str(out)]) == 0
    rows = out.read_text().splitlines()
    assert (
        rows[0] == "image,caption,category"
        and len(rows) == 2
        and rows[1].startswith("/stamps/pear.png,a pear,")
    )

    assert finetune_main(["demo-manifest", "--categories", "fod", "--out", str(tmp_path / "typo.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no Tux Paint category fod" in err and "animals, food" in err and "\n" not in err
    assert not (tmp_path / "typo.csv").exists() and not list(tmp_path.glob("typo.csv*"))


def test_the_before_after_table_of_a_run_without_wise_ft_is_a_one_line_error(tmp_path):
    table = subprocess.run(
        [sys.executable, "-m", "clip_train", "finetune", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert table.returncode == 2 and not table.stdout
    assert table.stderr.strip() == (
        f"python -m clip_train finetune: error: {tmp_path}/results.json holds no WiSE-FT results: "
        "run with finetune.wise_alphas set"
    )
