"""Training FLOPs per pair (clip_train/flops.py) and the FLOP fields of the train log."""

import os
import subprocess
import sys

import pytest
import torch

from clip_train.config import load_config
from clip_train.flops import FlopMetrics, count_training_flops
from clip_train.models.clip import ClipModel
from clip_train.tracking import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["run_dir=/tmp/unused", "data.train_shards=/tmp/unused"]


def _model(*overrides):
    cfg = load_config(["configs/tiny.yaml"], TINY + list(overrides))
    torch.manual_seed(0)
    return cfg, ClipModel(cfg.model)


def test_the_tiny_models_text_tower_counts_as_its_matmuls_and_attention():
    cfg, model = _model()
    flops = count_training_flops(model)
    assert flops.image_forward > 0 and flops.per_sample == flops.forward + flops.backward
    # BERT, 2 layers, width 32, MLP 64, at the full context length of 16 tokens: per layer the
    # q, k, v, output projections, the two MLP matmuls and attention's two L x L x d products
    # (2 FLOPs per multiply-add; on a CPU the attention is the kernel torch has no formula for)
    length, width, mlp = 16, 32, 64
    per_layer = (
        4 * 2 * length * width * width + 2 * 2 * length * width * mlp + 2 * 2 * length * length * width
    )
    assert flops.text_forward == 2 * per_layer
    assert flops.text_backward == 2 * flops.text_forward  # all trainable, embeddings included
    assert (
        flops.head_forward == 2 * (model.visual.num_features + model.text.num_features) * cfg.model.embed_dim
    )
    # a fully trainable conv tower: just under 2x its forward (the stem gets no input gradient);
    # torch's own convolution-backward formula ignores groups and made this 2.3x
    assert 1.8 < flops.image_backward / flops.image_forward < 2.0


def test_a_locked_image_tower_is_counted_forward_only():
    _, trainable = _model()
    _, locked = _model("model.image.lock=true")
    full, lit = count_training_flops(trainable), count_training_flops(locked)
    assert lit.image_forward == full.image_forward and lit.image_backward == 0
    assert lit.text_forward == full.text_forward and lit.text_backward == full.text_backward
    # what goes: the tower's backward and the image projection's gradient towards the tower
    towards_tower = 2 * locked.visual.num_features * locked.cfg.embed_dim
    assert lit.per_sample == full.per_sample - full.image_backward - towards_tower
    _, top_group = _model("model.image.lock=true", "model.image.unlocked_groups=1")
    partly = count_training_flops(top_group)
    assert 0 < partly.image_backward < full.image_backward / 10  # the head group only


def test_counting_leaves_the_model_gradients_and_random_streams_alone():
    _, model = _model("model.image.freeze_bn_stats=false")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    count_training_flops(model)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BatchNorm stats too


def test_mfu_only_with_a_peak_and_per_device():
    assert FlopMetrics(1000)(50.0) == {"flops_per_sample": 1000}
    assert FlopMetrics(1000, world_size=2, peak_flops=1e5)(50.0) == {
        "flops_per_sample": 1000,
        "mfu": pytest.approx(1000 * 25.0 / 1e5),
    }


@pytest.mark.slow
def test_train_records_carry_flops_and_mfu_only_with_peak_flops(tmp_path, tiny_data):
    def train(run_dir, *extra):
        cmd = [
            sys.executable, "-m", "clip_train", "train", "configs/tiny.yaml", f"run_dir={run_dir}",
            f"data.train_shards={tiny_data['shards']}/train-*.tar", "train.steps=2", "train.ckpt_every=0",
            *extra,
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert done.returncode == 0, done.stderr[-2000:]
        return done, read_metrics(run_dir, "train")

    plain, records = train(tmp_path / "plain")
    _, model = _model()
    expected = count_training_flops(model).per_sample
    assert [r["flops_per_sample"] for r in records] == [expected, expected]
    assert not any("mfu" in r for r in records) and "flops_per_sample" in plain.stdout

    _, records = train(tmp_path / "peak", "train.peak_flops=1e9")
    for r in records:
        assert r["mfu"] == pytest.approx(r["flops_per_sample"] * r["samples_per_s"] / 1e9)
