"""model.label_prior: the image towers' own classifier heads, read in the frozen text tower's words."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F

from clip_train.config import ConfigError, load_config, validate
from clip_train.models.clip import ClipModel, config_from_saved
from clip_train.models.label_prior import read_labels
from clip_train.models.towers import build_tokenizer

TINY = ["run_dir=/tmp/unused", "data.train_shards=/tmp/unused"]
LABELS = ["red circle", "blue square", "green triangle", "yellow star", "black line"]
TEMPLATES = '["a photo of a {c}.", "a {c}."]'


@pytest.fixture
def classifier_weights(tmp_path):
    """A test_efficientnet trained 'for classification' (5 classes) saved to a file, and its labels."""
    torch.manual_seed(1)
    classifier = timm.create_model("test_efficientnet", num_classes=len(LABELS)).eval()
    with torch.no_grad():
        classifier.classifier.weight.mul_(20)  # confident enough that the top-k cut matters
    weights = tmp_path / "classifier.pth"
    torch.save(classifier.state_dict(), weights)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    return classifier, weights, labels


def _prior_model(weights, labels, *overrides, weight=0.5, top_k=2):
    cfg = load_config(
        ["configs/tiny.yaml"],
        TINY
        + [
            f"model.image.pretrained={weights}",
            "model.image.lock=true",
            "model.text.lock=true",
            f"model.label_prior.weight={weight}",
            f"model.label_prior.top_k={top_k}",
            f"model.label_prior.labels={labels}",
            f"model.label_prior.templates={TEMPLATES}",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    return cfg, ClipModel(cfg.model).eval()


def test_image_embedding_is_the_projection_beside_the_convex_combination_of_label_embeddings(
    classifier_weights,
):
    classifier, weights, labels = classifier_weights
    cfg, model = _prior_model(weights, labels)
    tokenizer = build_tokenizer(cfg.model.text)
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        # the label embeddings: per label, the mean of its normalised template embeddings
        per_template = [
            F.normalize(model.text(tokenizer([t.format(c=c) for c in LABELS])), dim=-1)
            for t in ("a photo of a {c}.", "a {c}.")
        ]
        label_emb = F.normalize(torch.stack(per_template).mean(0), dim=-1)
        assert torch.allclose(model.label_prior.label_embeddings, label_emb, atol=1e-6)
        # the head on the pooled features is the file's own classifier on the images
        probs = classifier(images).softmax(-1)
        top_p, top_i = probs.topk(2, dim=-1)
        prior = F.normalize((top_p.unsqueeze(-1) * label_emb[top_i]).sum(1), dim=-1)
        learned = F.normalize(model.image_proj(model.image_tower_features(images)), dim=-1)
        want = torch.cat([learned, 0.5 * prior], dim=-1) / (1 + 0.5**2) ** 0.5
        got = model.encode_image(images)
    assert got.shape == (4, cfg.model.embed_dim + model.text.num_features) == (4, model.output_dim)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_similarity_mixes_learned_and_prior_cosines_by_the_weight(classifier_weights):
    _, weights, labels = classifier_weights
    cfg, model = _prior_model(weights, labels, weight=2.0)
    tokenizer = build_tokenizer(cfg.model.text)
    images, tokens = torch.randn(3, 3, 64, 64), tokenizer(["a red circle", "two blue squares", "x"])
    with torch.no_grad():
        features, text_features = model.image_tower_features(images), model.text(tokens)
        cos_learned = (
            F.normalize(model.image_proj(features), dim=-1)
            @ F.normalize(model.text_proj(text_features), dim=-1).T
        )
        cos_prior = model.label_prior(features) @ F.normalize(text_features, dim=-1).T
        got = model.encode_image(images) @ model.encode_text(tokens).T
    assert torch.allclose(got, (cos_learned + 4.0 * cos_prior) / 5.0, atol=1e-5)


def test_a_saved_model_keeps_its_prior_without_the_weights_or_the_label_file(classifier_weights, tmp_path):
    _, weights, labels = classifier_weights
    cfg, model = _prior_model(weights, labels)
    tokenizer = build_tokenizer(cfg.model.text)
    images, tokens = torch.randn(2, 3, 64, 64), tokenizer(["a red circle", "x"])
    with torch.no_grad():
        want = model.encode_image(images), model.encode_text(tokens)
    weights.unlink()
    labels.unlink()  # read when the model was built: saving (a checkpoint, say) needs neither
    model.save_pretrained(tmp_path / "m", tokenizer)
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model"]["label_prior"]["labels"] == "labels.txt"
    assert model.cfg.label_prior.labels == str(labels)  # saving did not edit the live model's config
    loaded = ClipModel.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        got = loaded.encode_image(images), loaded.encode_text(tokens)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_top_k_keeps_only_the_most_probable_labels(classifier_weights):
    _, weights, labels = classifier_weights
    _, one = _prior_model(weights, labels, top_k=1)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        features = one.image_tower_features(images)
        top = (features @ one.label_prior.head_weight_0.T + one.label_prior.head_bias_0).argmax(-1)
        # with k = 1 the prior is exactly the top label's embedding
        assert torch.allclose(one.label_prior(features), one.label_prior.label_embeddings[top], atol=1e-6)


def test_what_the_prior_cannot_work_with_is_refused_in_one_line(classifier_weights, tmp_path):
    _, weights, labels = classifier_weights
    prior = ["model.label_prior.weight=0.5", f"model.label_prior.labels={labels}"]
    base = [f"model.image.pretrained={weights}", "model.image.lock=true", "model.text.lock=true", *prior]
    for overrides, message in [
        ([*base, "model.text.unlocked_layers=1"], "needs a locked text tower: .*unlocked_layers=0"),
        ([*base, "model.image.lock=false"], "needs a fully locked image tower"),
        ([*base, "model.image.freeze_bn_stats=false"], "needs a fully locked image tower"),
        (["model.image.lock=true", "model.text.lock=true", *prior], "needs pretrained image weights"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(["configs/tiny.yaml"], TINY + overrides)
    load_config(["configs/tiny.yaml"], TINY + base)

    with pytest.raises(ConfigError, match="model.label_prior.top_k=0 is out of range: it must be at least 1"):
        load_config(["configs/tiny.yaml"], TINY + [*base, "model.label_prior.top_k=0"])
    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    with pytest.raises(ConfigError, match="one name per classifier row"):
        _prior_model(weights, three)
    with pytest.raises(ConfigError, match="neither a shipped set .* nor a file"):
        _prior_model(weights, tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="must each hold"):
        _prior_model(weights, labels, 'model.label_prior.templates=["a photo"]')
    bare = tmp_path / "bare.pth"
    torch.save(timm.create_model("test_efficientnet", num_classes=0).state_dict(), bare)
    with pytest.raises(ConfigError, match="model.image.pretrained: weights .* hold no classifier head"):
        _prior_model(bare, labels)


def test_the_shipped_imagenet_labels_are_a_thousand_distinct_names():
    names = read_labels("imagenet")
    assert len(names) == len(set(names)) == 1000
    assert names[:2] == ["tench", "goldfish"] and names[774] == "sandal"


def test_with_a_frozen_text_copy_the_text_tower_trains_and_the_prior_side_stays(classifier_weights):
    _, weights, labels = classifier_weights
    cfg, model = _prior_model(
        weights, labels, "model.text.lock=false", "model.label_prior.frozen_text=true", weight=1.0
    )
    validate(cfg)  # an unlocked text tower is fine with the copy
    tokens = build_tokenizer(cfg.model.text)(["a red circle", "two blue squares on a table"])
    half = cfg.model.embed_dim
    with torch.no_grad():
        before = model.encode_text(tokens)
    model.train()
    assert not model.prior_text.training  # the copy never drops out
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.encode_text(tokens)[:, :half].sum().backward()
    optimizer.step()
    assert all(p.grad is None for p in model.prior_text.parameters())
    with torch.no_grad():
        train_mode = model.encode_text(tokens)
        model.eval()
        after = model.encode_text(tokens)
    assert not torch.allclose(after[:, :half], before[:, :half])  # the learned half moved
    # the prior half is the frozen copy's: unchanged by the step, and the same in train mode
    assert torch.allclose(after[:, half:], before[:, half:], atol=1e-6)
    assert torch.allclose(train_mode[:, half:], after[:, half:], atol=1e-6)


def test_concatenated_towers_each_read_their_own_head(classifier_weights, tmp_path):
    classifier, weights, labels = classifier_weights
    torch.manual_seed(2)
    other_classifier = timm.create_model("test_efficientnet", num_classes=len(LABELS)).eval()
    other = tmp_path / "other.pth"
    torch.save(other_classifier.state_dict(), other)
    _, model = _prior_model(weights, labels, f'model.image.concat=["test_efficientnet={other}"]')
    images = torch.randn(3, 3, 64, 64)
    label_emb = model.label_prior.label_embeddings
    with torch.no_grad():
        # per tower: its own classifier's top-2 mix of the label embeddings; then their normalised sum
        per_tower = []
        for tower in (classifier, other_classifier):
            top_p, top_i = tower(images).softmax(-1).topk(2, dim=-1)
            per_tower.append(F.normalize((top_p.unsqueeze(-1) * label_emb[top_i]).sum(1), dim=-1))
        want = F.normalize(per_tower[0] + per_tower[1], dim=-1)
        got = model.label_prior(model.image_tower_features(images))
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(per_tower[0], per_tower[1], atol=1e-3)  # the two heads do differ


def test_init_from_keeps_the_saved_prior_and_takes_the_runs_weight(classifier_weights, tmp_path):
    _, weights, labels = classifier_weights
    cfg, model = _prior_model(weights, labels, weight=0.5)
    model.save_pretrained(tmp_path / "prior", build_tokenizer(cfg.model.text))
    plain_cfg = load_config(["configs/tiny.yaml"], TINY)
    ClipModel(plain_cfg.model).save_pretrained(tmp_path / "plain", build_tokenizer(plain_cfg.model.text))

    def run(*overrides):  # what a fine-tuning run may set (the locks a prior needs)
        locks = ["model.image.lock=true", "model.text.lock=true", f"model.init_from={tmp_path}"]
        return load_config(["configs/tiny.yaml"], TINY + locks + list(overrides)).model

    kept = config_from_saved(tmp_path / "prior", run())  # the default weight 0 keeps the prior
    assert kept.label_prior.weight == 0.5 and kept.label_prior.top_k == 2
    retuned = run("model.label_prior.weight=2", "model.label_prior.top_k=3")
    changed = config_from_saved(tmp_path / "prior", retuned)
    assert changed.label_prior.weight == 2 and changed.label_prior.top_k == 3
    with pytest.raises(ConfigError, match="keeps no frozen text copy for its label prior"):
        config_from_saved(tmp_path / "prior", run("model.label_prior.frozen_text=true"))
    with pytest.raises(ConfigError, match="has no label prior to start from"):
        config_from_saved(tmp_path / "plain", run("model.label_prior.weight=0.5"))
    assert config_from_saved(tmp_path / "plain", run()).label_prior.weight == 0
