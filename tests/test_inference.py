"""clip_train.load and the zero-shot classifier: what a user of a trained model calls."""

import torch
from PIL import Image

import clip_train
from clip_train.config import load_config
from clip_train.evaluate.metrics import classifier_weights
from clip_train.models.clip import ClipModel
from clip_train.models.tokenizer import build_tokenizer

TINY = ["run_dir=/tmp/unused", "data.train_shards=/tmp/unused"]


def _saved_run(tmp_path):
    cfg = load_config(["configs/tiny.yaml"], TINY)
    torch.manual_seed(0)
    model = ClipModel(cfg.model).eval()
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step-000000004"
    model.save_pretrained(ckpt / "model", build_tokenizer(cfg.model.text))
    (ckpt / "COMPLETE").write_text("")
    (run / "config.yaml").write_text("{}")
    return run, ckpt, model


def _images():
    return [Image.new("RGB", (40, 30), colour) for colour in ("red", "blue", "green")]


def test_load_gives_the_saved_model_its_eval_preprocessing_and_tokenizer_from_any_path(tmp_path):
    run, ckpt, model = _saved_run(tmp_path)
    texts = ["a red circle", "a blue square"]
    for path in (run, ckpt, ckpt / "model"):
        loaded, preprocess, tokenizer = clip_train.load(path)
        assert not loaded.training
        images = torch.stack([preprocess(image) for image in _images()])
        size = model.cfg.image.image_size
        assert images.shape == (3, 3, size, size)
        with torch.no_grad():
            assert torch.equal(loaded.encode_image(images), model.encode_image(images))
            assert torch.equal(loaded.encode_text(tokenizer(texts)), model.encode_text(tokenizer(texts)))


def test_the_zero_shot_classifier_is_the_mean_prompt_embedding_and_100_x_cosine(tmp_path):
    run, _, _ = _saved_run(tmp_path)
    model, preprocess, tokenizer = clip_train.load(run)
    names, templates = ["red", "blue", "green", "square"], ["a {c} shape", "a photo of {c}"]
    classifier = clip_train.ZeroShotClassifier(model, tokenizer, names, templates)
    with torch.no_grad():
        prompts = model.encode_text(tokenizer([t.format(c=n) for n in names for t in templates]))
        weights = classifier_weights(prompts.view(4, 2, -1))
        images = model.encode_image(torch.stack([preprocess(image) for image in _images()]))
    assert torch.allclose(classifier.weights, weights, atol=1e-6)
    probs = classifier.probabilities(_images(), preprocess)
    want = (100 * images @ weights.T).softmax(dim=-1)
    assert probs.shape == (3, 4) and torch.allclose(probs, want, atol=1e-5)
    assert classifier.classify(_images(), preprocess) == [names[i] for i in want.argmax(dim=-1).tolist()]


def test_the_readme_python_api_example_runs_as_written(tmp_path, capsys):
    from test_docs import README, code_blocks

    text = README.read_text(encoding="utf-8")
    blocks = ["\n".join(lines) for lines in code_blocks(text[text.index("## Python API") :])]
    example = next(block for block in blocks if "clip_train.load" in block)
    run, _, _ = _saved_run(tmp_path)
    _images()[0].save(tmp_path / "cat.png")
    exec(
        example.replace('"runs/demo"', repr(str(run))).replace('"cat.png"', repr(str(tmp_path / "cat.png"))),
        {},
    )
    printed = capsys.readouterr().out
    assert printed.startswith("tensor([[") and printed.count(",") == 1  # [1, 2] probabilities
