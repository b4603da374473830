import math

import pytest
import torch
from torch import nn

from clip_train.config import OptimConfig
from clip_train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.text = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
        self.image_proj = nn.Linear(4, 2, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.text[0].weight.requires_grad_(False)  # a frozen parameter is left out


def test_groups_exclude_bias_norm_and_logit_scale_from_weight_decay():
    cfg = OptimConfig(lr=1.0, weight_decay=0.2, tower_lr_mult=0.1)
    model = Toy()
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {k: sorted(names[id(p)] for p in g["params"]) for k, g in groups.items()}
    assert members == {
        "head_decay": ["image_proj.weight"],
        "head_no_decay": ["logit_scale"],
        "image_decay": ["visual.0.weight"],
        "image_no_decay": ["visual.0.bias", "visual.1.bias", "visual.1.weight"],
        "text_no_decay": ["text.1.bias", "text.1.weight"],
    }
    assert groups["image_decay"]["weight_decay"] == 0.2 and groups["head_no_decay"]["weight_decay"] == 0.0
    assert groups["image_decay"]["lr"] == pytest.approx(0.1) and groups["head_decay"]["lr"] == 1.0
    assert groups["text_no_decay"]["lr"] == pytest.approx(0.1)


def test_warmup_then_cosine_to_min_ratio():
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 110, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 110, cfg) == pytest.approx(1.0)
    assert lr_factor(60, 110, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, 110, cfg) == pytest.approx(0.1)
    assert lr_factor(50, 110, OptimConfig(warmup_steps=10, schedule="constant")) == 1.0


def test_scheduler_drives_every_group_by_the_same_factor():
    cfg = OptimConfig(lr=1.0, warmup_steps=2, tower_lr_mult=0.5)
    optimizer = build_optimizer(Toy(), cfg)
    scheduler = build_scheduler(optimizer, 10, cfg)
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    factor = lr_factor(6, 10, cfg)
    assert factor == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["head_decay"] == pytest.approx(factor) and lrs["image_decay"] == pytest.approx(0.5 * factor)


def test_per_tower_multipliers_and_layer_wise_decay_on_a_real_model():
    from clip_train.config import load_config
    from clip_train.models.clip import ClipModel
    from clip_train.optim import layer_depths, trainable_summary

    cfg = load_config(["configs/tiny.yaml"], ["run_dir=/tmp/unused", "data.train_shards=/tmp/unused"])
    model = ClipModel(cfg.model)
    optim = OptimConfig(lr=1.0, image_lr_mult=0.1, text_lr_mult=0.5, layer_decay=0.5)
    lr_of = {}
    for group in param_groups(model, optim):
        for p in group["params"]:
            lr_of[id(p)] = group["lr"]
    params = dict(model.named_parameters())
    depths = layer_depths(model)
    # the tiny BERT: embeddings 0, layers 1-2; nothing follows the stack (its pooler is dropped), so
    # the last layer is the top and learns at the tower's lr
    assert depths["text.transformer.embeddings.word_embeddings.weight"] == (0, 2)
    assert depths["text.transformer.encoder.layer.1.output.dense.weight"] == (2, 2)
    assert depths["text.transformer.encoder.layer.0.output.dense.weight"] == (1, 2)
    assert lr_of[id(params["text.transformer.encoder.layer.1.output.dense.weight"])] == pytest.approx(0.5)
    assert lr_of[id(params["text.transformer.embeddings.word_embeddings.weight"])] == pytest.approx(
        0.5 * 0.5**2
    )
    image_names = [n for n in params if n.startswith("visual.")]
    first, last = image_names[0], image_names[-1]  # the stem, the head
    top = depths[last][1]
    assert depths[first][0] == 0 and depths[last][0] == top > 0
    assert lr_of[id(params[last])] == pytest.approx(0.1)
    assert lr_of[id(params[first])] == pytest.approx(0.1 * 0.5**top)
    assert lr_of[id(params["image_proj.weight"])] == 1.0 and lr_of[id(params["logit_scale"])] == 1.0
    assert len(lr_of) == len(params)  # every trainable parameter is in exactly one group

    model.text.lock(unlocked_layers=1)
    summary = trainable_summary(model)
    assert summary.startswith("image ") and "text 0.0" in summary and summary.endswith("M")


def test_layer_wise_decay_reaches_the_first_of_concatenated_image_towers():
    from clip_train.config import load_config
    from clip_train.models.clip import ClipModel

    overrides = [
        "run_dir=/tmp/unused",
        "data.train_shards=/tmp/unused",
        'model.image.concat=["test_resnet"]',
        "model.init_from=/a/saved/model",
    ]
    model = ClipModel(load_config(["configs/tiny.yaml"], overrides).model)
    lr_of = {}
    for group in param_groups(model, OptimConfig(lr=1.0, image_lr_mult=0.1, layer_decay=0.5)):
        lr_of.update({id(p): group["lr"] for p in group["params"]})
    params = dict(model.named_parameters())
    first = [n for n in params if n.startswith("visual.towers.0.")]
    assert lr_of[id(params[first[-1]])] == pytest.approx(0.1)  # its head: the top depth
    assert lr_of[id(params[first[0]])] < 0.1  # its stem: decayed
    # the extra tower is frozen: none of its parameters is in a group
    assert not any(id(p) in lr_of for n, p in params.items() if n.startswith("visual.towers.1."))


def test_fused_adamw_is_used_and_makes_the_same_updates_as_the_default():
    def trained(fused: bool) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = Toy()
        optimizer = build_optimizer(model, OptimConfig(lr=0.01, weight_decay=0.2, fused=fused))
        for step in range(5):
            for p in model.parameters():
                p.grad = torch.sin(torch.arange(p.numel(), dtype=torch.float32) + step).view_as(p)
            optimizer.step()
        return optimizer, [p.detach().clone() for p in model.parameters()]

    fused_opt, fused_params = trained(True)
    plain_opt, plain_params = trained(False)
    assert all(g["fused"] for g in fused_opt.param_groups)
    assert not any(g["fused"] for g in plain_opt.param_groups)
    for a, b in zip(fused_params, plain_params):
        assert torch.allclose(a, b, atol=1e-6)
