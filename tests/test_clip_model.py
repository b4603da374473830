import json

import pytest
import torch

from clip_train.config import ConfigError, ImageTowerConfig, load_config
from clip_train.models.clip import ClipModel, load_tokenizer
from clip_train.models.image_tower import build_image_tower
from clip_train.models.tokenizer import build_tokenizer

TINY = ["run_dir=/tmp/unused", "data.train_shards=/tmp/unused"]


def _model(*overrides):
    cfg = load_config(["configs/tiny.yaml"], TINY + list(overrides))
    torch.manual_seed(0)
    model = ClipModel(cfg.model)
    with torch.no_grad():  # move every weight away from its initial value, as training would
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return cfg, model.eval()


@pytest.mark.parametrize(("lock", "image_proj"), [(False, "linear"), (True, "linear"), (False, "mlp")])
def test_save_and_from_pretrained_reproduce_embeddings_exactly(tmp_path, lock, image_proj):
    cfg, model = _model(f"model.image.lock={str(lock).lower()}", f"model.image_proj={image_proj}")
    tokenizer = build_tokenizer(cfg.model.text)
    images = torch.randn(3, 3, 64, 64)
    texts = ["a red circle", "two blue squares on a table", "x"]
    with torch.no_grad():
        want = model.encode_image(images), model.encode_text(tokenizer(texts))
    model.save_pretrained(tmp_path / "m", tokenizer)
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model"]["text"]["tokenizer"] == "tokenizer" and saved["model"]["image"]["pretrained"] == ""
    assert saved["model"]["image_proj"] == image_proj

    loaded = ClipModel.from_pretrained(tmp_path / "m").eval()
    loaded_tokenizer = load_tokenizer(tmp_path / "m")
    assert torch.equal(loaded_tokenizer(texts), tokenizer(texts))
    with torch.no_grad():
        got = loaded.encode_image(images), loaded.encode_text(loaded_tokenizer(texts))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(loaded.logit_scale, model.logit_scale)


def test_a_saved_model_with_concatenated_image_towers_loads_without_their_weights(tmp_path):
    weights = tmp_path / "extra.pth"
    torch.save(build_image_tower(ImageTowerConfig(name="test_efficientnet")).state_dict(), weights)
    cfg, model = _model(f'model.image.concat=["test_efficientnet={weights}"]')
    weights.unlink()  # the saved model must not need it
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model.encode_image(images)
    model.save_pretrained(tmp_path / "m", build_tokenizer(cfg.model.text))
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model"]["image"]["concat"] == ["test_efficientnet"]  # the weights are in the file
    loaded = ClipModel.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), want)


def test_a_model_saved_with_a_label_prior_loads_when_it_was_off_and_is_refused_when_on(tmp_path):
    # models saved before model.label_prior was removed record it in their config.json
    cfg, model = _model()
    model.save_pretrained(tmp_path / "m", build_tokenizer(cfg.model.text))
    config = tmp_path / "m" / "config.json"
    saved = json.loads(config.read_text())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model.encode_image(images)
    for weight in (0.0, 0.85):
        saved["model"]["label_prior"] = {"weight": weight, "top_k": 10, "labels": "imagenet"}
        config.write_text(json.dumps(saved))
        if weight == 0:
            loaded = ClipModel.from_pretrained(tmp_path / "m").eval()
            with torch.no_grad():
                assert torch.equal(loaded.encode_image(images), want)
        else:
            with pytest.raises(ConfigError, match="uses model.label_prior, which clip_train no longer has"):
                ClipModel.from_pretrained(tmp_path / "m")


def test_embeddings_are_unit_length_and_logit_scale_is_clamped():
    model = ClipModel(load_config(["configs/tiny.yaml"], TINY).model)
    tokens = build_tokenizer(model.cfg.text)(["a cat", "a dog"])
    image_emb, text_emb, scale, bias = model(torch.randn(2, 3, 64, 64), tokens)
    assert torch.allclose(image_emb.norm(dim=-1), torch.ones(2)) and torch.allclose(
        text_emb.norm(dim=-1), torch.ones(2)
    )
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-2) and bias is None  # InfoNCE: no bias
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale()
    assert model.logit_scale.exp().item() == pytest.approx(100.0)


def test_from_pretrained_on_a_wrong_folder_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved clip_train model"):
        ClipModel.from_pretrained(tmp_path)


def test_gradient_checkpointing_gives_the_same_gradients_with_dropout_on():
    _, plain = _model("model.text.hf_config.hidden_dropout_prob=0.2")
    _, checkpointed = _model("model.text.hf_config.hidden_dropout_prob=0.2")
    checkpointed.set_grad_checkpointing(True)
    tokens = build_tokenizer(plain.cfg.text)(["a red circle", "a blue square", "a green star"])
    images = torch.randn(3, 3, 64, 64)
    grads = []
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(7)  # the same dropout masks in both
        image_emb, text_emb, scale, _ = model(images, tokens)
        (image_emb @ text_emb.T * scale).logsumexp(dim=1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name
    assert checkpointed.visual.grad_checkpointing and checkpointed.text.transformer.gradient_checkpointing


def test_a_tower_without_gradient_checkpointing_is_a_config_error(monkeypatch):
    from clip_train.config import ConfigError

    _, model = _model()

    def unsupported(enable=True):
        raise NotImplementedError

    monkeypatch.setattr(model.visual, "set_grad_checkpointing", unsupported)
    with pytest.raises(
        ConfigError, match="does not support gradient checkpointing: set train.grad_checkpointing=false"
    ):
        model.set_grad_checkpointing(True)
    monkeypatch.undo()  # the image tower supports it again; now the text tower does not
    monkeypatch.setattr(model.text.transformer, "supports_gradient_checkpointing", False)
    with pytest.raises(ConfigError, match=r"text model \(bert\) does not support gradient checkpointing"):
        model.set_grad_checkpointing(True)
