"""LoRA adapters (models/lora.py): only adapters train, the base stays put, exports are merged and
plain, a killed run resumes exactly, WiSE-FT interpolates merged weights, bad configs are refused."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from runs import REPO, losses, run_train, train_args
from safetensors.torch import load_file

from clip_train.config import ConfigError, load_config, to_dict
from clip_train.export import export_model
from clip_train.models.clip import ClipModel
from clip_train.models.lora import merged_copy, merged_state_dict
from clip_train.models.tokenizer import build_tokenizer
from clip_train.train import finish
from clip_train.train.build import build_model
from clip_train.train.checkpointing import model_fingerprint
from clip_train.train.trainer import Trainer

TINY = ["run_dir=/tmp/unused", "data.train_shards=/tmp/unused"]
LORA = ["model.image.lora.rank=4", "model.text.lora.rank=4", "model.text.lora.alpha=8"]
CLIP_TEXT = (
    'model.text.hf_config={"model_type": "clip_text_model", "hidden_size": 32, "num_hidden_layers": 2, '
    '"num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}'
)
HEAD = ("image_proj.", "text_proj.", "logit_scale", "logit_bias")
ATOL = 1e-5


def _adapted(*overrides, seed=0):
    """A tiny model with adapters whose B factors are moved off zero (as after training)."""
    cfg = load_config(["configs/tiny.yaml"], TINY + LORA + list(overrides))
    model, _ = build_model(cfg, None, world_size=1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval(), cfg


def _inputs(cfg):
    size = cfg.model.image.image_size
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    tokens = build_tokenizer(cfg.model.text)(["a red circle", "two blue squares", "x"])
    return images, tokens


def _embeddings(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


@pytest.fixture(scope="module")
def lora_run(tiny_data, tmp_path_factory):
    """A saved start model, then 6 LoRA steps from it in-process: (trainer, start folder)."""
    root = tmp_path_factory.mktemp("lora_run")
    cfg = load_config(["configs/tiny.yaml"], TINY)
    torch.manual_seed(0)
    start = ClipModel(cfg.model)
    start.save_pretrained(root / "start", build_tokenizer(cfg.model.text))
    shards = tiny_data["shards"]
    overrides = [
        f"run_dir={root / 'run'}",
        f"data.train_shards={shards}/train-*.tar",
        f"model.init_from={root / 'start'}",
        "train.steps=6",
        "train.ckpt_every=0",
        *LORA,
    ]
    trainer = Trainer(load_config(["configs/tiny.yaml"], overrides))
    trainer.fit()
    return trainer, root / "start"


def test_only_adapters_and_the_head_train(lora_run):
    trainer, _ = lora_run
    named = dict(trainer.unwrapped.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    adapters = {n for n in named if ".lora_" in n}
    assert adapters and adapters <= trainable
    assert {n for n in trainable - adapters if not n.startswith(HEAD)} == set()
    # both towers got adapters: EfficientNet's pointwise convolutions, BERT's attention and dense layers
    assert any(n.startswith("visual.") for n in adapters) and any(".query.lora_A" in n for n in adapters)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(named[n]) for n in trainable}


def test_training_moves_the_adapters_and_leaves_the_base_exactly(lora_run):
    trainer, start = lora_run
    state = trainer.unwrapped.state_dict()
    base = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    want = load_file(str(start / "model.safetensors"))
    towers = [k for k in base if k.startswith(("visual.", "text."))]
    # BatchNorm statistics included: a tower with adapters keeps them fixed
    assert any("running_mean" in k for k in towers)
    assert [k for k in towers if not torch.equal(base[k], want[k])] == []
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # the adapters trained


def test_the_exported_model_is_plain_and_computes_the_adapted_model(lora_run):
    trainer, _ = lora_run
    folder = Path(trainer.run_dir) / "model"
    keys = load_file(str(folder / "model.safetensors")).keys()
    assert not [k for k in keys if "lora" in k or "base_layer" in k]
    plain = ClipModel.from_pretrained(folder).eval()
    assert plain.cfg.image.lora.rank == 0 and plain.cfg.text.lora.rank == 0
    adapted = trainer.unwrapped.eval()
    images, tokens = _inputs(trainer.cfg)
    for got, want in zip(_embeddings(plain, images, tokens), _embeddings(adapted, images, tokens)):
        assert (got - want).abs().max() <= ATOL


@pytest.mark.parametrize(
    "to, overrides, adapted",
    [
        ("openclip", [], ".query.lora_A"),  # EfficientNet + BERT
        ("hf", [CLIP_TEXT, "model.text.pooling=eos"], ".q_proj.lora_A"),  # the HF export's CLIP text tower
    ],
)
def test_openclip_and_hf_exports_of_a_lora_model_are_plain(tmp_path, to, overrides, adapted):
    pytest.importorskip("open_clip" if to == "openclip" else "transformers.models.timm_wrapper")
    model, cfg = _adapted(*overrides)
    assert any(adapted in n for n, _ in model.named_parameters())  # the text tower kind's defaults
    model.save_pretrained(tmp_path / "model", build_tokenizer(cfg.model.text))
    result = export_model(tmp_path / "model", to, tmp_path / to)  # checks its reload reproduces the model
    assert max(result.max_diff.values()) <= ATOL
    for weights in Path(result.folder).rglob("*.safetensors"):
        assert not [k for k in load_file(str(weights)) if "lora" in k or "base_layer" in k]


def test_merged_copy_equals_the_adapted_model_on_a_vit():
    model, cfg = _adapted("model.image.name=test_vit", "model.image.image_size=160")
    adapted = [n for n, _ in model.visual.named_modules() if n.endswith(".lora_A")]
    # the default ViT targets: each block's attention and MLP layers, not the patch embedding
    assert adapted and all(n.startswith("blocks.") for n in adapted)
    assert {n.split(".")[-2] for n in adapted} == {"qkv", "proj", "fc1", "fc2"}
    images, tokens = _inputs(cfg)
    plain = merged_copy(model).eval()
    assert not [k for k in plain.state_dict() if "lora" in k or "base_layer" in k]
    for got, want in zip(_embeddings(plain, images, tokens), _embeddings(model, images, tokens)):
        assert (got - want).abs().max() <= ATOL


def test_wise_ft_interpolates_the_merged_weights(tmp_path, monkeypatch):
    model, cfg = _adapted(seed=1)
    start, _ = build_model(cfg, None, world_size=1)  # the same seed: the base weights, adapters at 0
    start_dir = tmp_path / "start"
    start.save_pretrained(start_dir, build_tokenizer(cfg.model.text))
    seen = {}

    def record(evaluated, *args, model_name, **kwargs):
        seen[model_name.rsplit("alpha-", 1)[1]] = {k: v.clone() for k, v in evaluated.state_dict().items()}
        return {"a/acc1": 0.0, "b/acc1": 0.0}

    monkeypatch.setattr(finish, "run_evaluation", record)
    cfg.finetune.wise_alphas = [0, 0.5, 1]
    cfg.eval.plots = False
    accelerator = SimpleNamespace(device=torch.device("cpu"), is_main_process=True, print=lambda *a: None)
    finish.run_wise_ft(model, start_dir, cfg, None, None, accelerator, tmp_path / "run")
    want_start, want_end = load_file(str(start_dir / "model.safetensors")), merged_state_dict(model)
    assert seen["0"].keys() == want_end.keys()
    assert all(torch.equal(seen["0"][k], want_start[k]) for k in want_end)
    assert all(torch.equal(seen["1"][k], want_end[k]) for k in want_end)
    half = seen["0.5"]["visual.conv_head.weight"]
    assert torch.allclose(
        half, (want_start["visual.conv_head.weight"] + want_end["visual.conv_head.weight"]) / 2
    )
    assert any(".lora_" in k for k in model.state_dict())  # the run's own model keeps its adapters


@pytest.mark.slow
def test_killed_lora_run_resumes_to_the_same_weights(tmp_path, tiny_data):
    straight = run_train(tmp_path / "straight", tiny_data, *LORA)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run_train(tmp_path / "resumed", tiny_data, *LORA, faults=("--kill-at-step", "6"))
    assert killed.returncode == -9
    ckpt = tmp_path / "resumed" / "checkpoints" / "step-000000004"
    held = {k for f in ckpt.rglob("*.safetensors") for k in load_file(str(f))}
    assert any(".lora_A." in k for k in held)  # the resumable state holds the adapters
    resumed = run_train(tmp_path / "resumed", tiny_data, *LORA)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want, got = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [got[s] for s in range(5, 9)] == [want[s] for s in range(5, 9)]
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.image.lora.rank=4", "model.image.lock=true"],
            "model.image.lora.rank=4 with model.image.lock=true",
        ),
        (
            ["model.text.lora.rank=2", "model.text.lock=true"],
            "model.text.lora.rank=2 with model.text.lock=true",
        ),
        (["model.text.lora.rank=2", "model.text.lora.target_modules=[query, 're:.*key']"], "mixes a regex"),
        (["model.image.lora.rank=-1"], "model.image.lora.rank"),
        (["model.text.lora.rank=2", "model.text.lora.dropout=1.0"], "model.text.lora.dropout"),
    ],
)
def test_impossible_lora_configs_are_refused_when_loaded(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as e:
        load_config(["configs/tiny.yaml"], TINY + overrides)
    assert "\n" not in str(e.value)


def test_targets_missing_from_the_tower_are_refused_in_one_line_before_the_run_dir(tmp_path, tiny_data):
    run_dir = tmp_path / "run"
    args = train_args(run_dir, tiny_data, "model.text.lora.rank=2", "model.text.lora.target_modules=[qkv]")
    proc = subprocess.run(
        [sys.executable, "-m", "clip_train", "train", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.text.lora.target_modules=['qkv']" in lines[0]
    assert "e.g. embeddings" not in lines[0] and "query" in lines[0]  # it lists layers that can be adapted
    assert not run_dir.exists()


def test_checkpoints_without_lora_keep_their_fingerprint():
    # a checkpoint written before LoRA existed records no lora keys: runs with it off still resume
    cfg = load_config(["configs/tiny.yaml"], TINY)
    model = model_fingerprint(to_dict(cfg.model))
    assert "lora" not in model["image"] and "lora" not in model["text"]
    on = load_config(["configs/tiny.yaml"], TINY + ["model.image.lora.rank=4"])
    assert model_fingerprint(to_dict(on.model))["image"]["lora"]["rank"] == 4


def test_gradient_checkpointing_gives_the_adapters_the_same_gradients():
    def adapter_grads(*extra):
        model, cfg = _adapted(*extra)
        images, tokens = _inputs(cfg)
        image_emb, text_emb, _, _ = model(images, tokens)  # eval mode: no dropout to replay
        (image_emb @ text_emb.T).sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = adapter_grads(), adapter_grads("train.grad_checkpointing=true")
    assert plain.keys() == checkpointed.keys() and any(".lora_A." in n for n in plain)
    assert all(torch.equal(plain[n], checkpointed[n]) for n in plain)
