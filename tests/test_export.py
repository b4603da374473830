"""clip-export: OpenCLIP and Hugging Face exports give clip_train's embeddings, or are refused."""

import contextlib
import json
import os
import re
import stat

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clip_train.cli import export_main, main
from clip_train.config import load_config
from clip_train.export import export_model
from clip_train.export_formats import ExportError
from clip_train.models.clip import ClipModel, load_tokenizer
from clip_train.models.tokenizer import build_tokenizer
from clip_train.models.transforms import build_image_transforms

TINY = ["run_dir=/tmp/unused", "data.train_shards=/tmp/unused"]
# A CLIP text transformer (causal, final LayerNorm, pooler_output at the eos token) on the tiny vocab.
CLIP_TEXT = (
    'model.text.hf_config={"model_type": "clip_text_model", "hidden_size": 32, "num_hidden_layers": 2, '
    '"num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}'
)
CAPTIONS = [
    "a red circle",
    "Two blue squares on a wooden table, seen from above in bright morning light, with long shadows",
    "x",
    "an emoji: a smiling face!",
]
ATOL = 1e-5


# A run config only accepts this as a saved model's (init_from).
SAVED = "model.init_from=/a/saved/model"
CONCAT = ['model.image.concat=["test_efficientnet"]', SAVED]


def _saved_model(tmp_path, *overrides):
    """A tiny model with every weight and BatchNorm statistic moved off its initial value, saved."""
    cfg = load_config(["configs/tiny.yaml"], TINY + list(overrides))
    torch.manual_seed(0)
    model = ClipModel(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for b in model.buffers():
            if b.is_floating_point():  # running means and variances stay positive
                b.mul_(1 + 0.2 * torch.rand_like(b)).add_(0.05 * torch.rand_like(b))
    folder = tmp_path / "model"
    model.save_pretrained(folder, build_tokenizer(cfg.model.text))
    return folder


def _reference(folder):
    """clip_train's own model, tokenizer and evaluation transform, read back from the saved folder."""
    model = ClipModel.from_pretrained(folder).eval()
    _, eval_transform = build_image_transforms(model.visual, model.cfg.image)
    return model, load_tokenizer(folder), eval_transform


def _inputs(size):
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    rng = np.random.default_rng(2)
    pil = Image.fromarray(rng.integers(0, 256, (size + 23, size + 9, 3), dtype=np.uint8))  # not square
    return images, pil


def _assert_close(got, want, what):
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, f"{what} differ by {diff:.2g}"


def _nothing_written(out):
    assert not out.exists()
    if out.parent.exists():  # no temporary folder left behind either
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # EfficientNet + BERT with mean pooling, InfoNCE
        [
            "model.image.name=test_vit",
            "model.image.image_size=160",
            "model.text.pooling=cls",
            "loss.kind=siglip",
        ],  # a ViT at timm's own size (OpenCLIP cannot size it), cls pooling, SigLIP's logit bias
        ["model.image_proj=mlp"],  # OpenCLIP's timm_proj mlp head
    ],
    ids=["efficientnet-mean", "vit-cls-siglip", "mlp-projection"],
)
def test_openclip_export_gives_clip_train_embeddings(tmp_path, monkeypatch, overrides):
    open_clip = pytest.importorskip("open_clip")
    folder = _saved_model(tmp_path, *overrides)
    result = export_model(folder, "openclip", tmp_path / "exports" / "oc")
    assert result.folder == tmp_path / "exports" / "oc" and max(result.max_diff.values()) <= ATOL

    monkeypatch.chdir(tmp_path / "exports")  # the text tower is found from any working directory
    name = f"local-dir:{result.folder}"
    oc_model, _, preprocess = open_clip.create_model_and_transforms(name)
    oc_tokenizer = open_clip.get_tokenizer(name)
    oc_model.eval()
    model, tokenizer, eval_transform = _reference(folder)
    images, pil = _inputs(model.cfg.image.image_size)
    assert torch.equal(oc_tokenizer(CAPTIONS), tokenizer(CAPTIONS))
    assert torch.allclose(preprocess(pil), eval_transform(pil), atol=1e-6)
    with torch.no_grad():
        ids = tokenizer(CAPTIONS)
        _assert_close(oc_model.encode_image(images, normalize=True), model.encode_image(images), "image emb")
        _assert_close(oc_model.encode_text(ids, normalize=True), model.encode_text(ids), "text emb")
    assert torch.equal(oc_model.logit_scale, model.logit_scale)
    if model.logit_bias is None:
        assert oc_model.logit_bias is None
    else:
        assert torch.equal(oc_model.logit_bias, model.logit_bias)


@pytest.mark.parametrize(
    "overrides",
    [
        [CLIP_TEXT, "model.text.pooling=eos"],
        # a ViT away from its default size (TimmWrapper passes img_size) and SigLIP's bias, which HF lacks
        [CLIP_TEXT, "model.text.pooling=eos", "model.image.name=test_vit", "loss.kind=siglip"],
    ],
    ids=["efficientnet-cliptext", "vit64-cliptext-siglip"],
)
def test_hf_export_gives_clip_train_embeddings(tmp_path, overrides):
    pytest.importorskip("transformers.models.timm_wrapper")
    from transformers import AutoImageProcessor, AutoTokenizer, VisionTextDualEncoderModel

    folder = _saved_model(tmp_path, *overrides)
    result = export_model(folder, "hf", tmp_path / "hf")
    assert max(result.max_diff.values()) <= ATOL
    # the missing logit bias is told, and that transformers' tokenizer does not clean text
    assert any("logit bias" in n for n in result.notes) == ("loss.kind=siglip" in overrides)
    assert any("does not clean text" in n and "clean_text" in n for n in result.notes)

    hf_model = VisionTextDualEncoderModel.from_pretrained(result.folder).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(result.folder)
    processor = AutoImageProcessor.from_pretrained(str(result.folder / "preprocessor_config.json"))
    model, tokenizer, eval_transform = _reference(folder)
    images, pil = _inputs(model.cfg.image.image_size)
    tokens = hf_tokenizer(CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(tokens["input_ids"], tokenizer(CAPTIONS))
    assert torch.allclose(processor(pil)["pixel_values"][0], eval_transform(pil), atol=1e-6)
    with torch.no_grad():
        image_emb = F.normalize(hf_model.get_image_features(pixel_values=images).pooler_output, dim=-1)
        text_emb = F.normalize(hf_model.get_text_features(**tokens).pooler_output, dim=-1)
        _assert_close(image_emb, model.encode_image(images), "image embeddings")
        _assert_close(text_emb, model.encode_text(tokenizer(CAPTIONS)), "text embeddings")
        # the model's own forward (normalised embeddings, scaled cosine logits) agrees too
        out = hf_model(pixel_values=images, **tokens)
        _assert_close(out.logits_per_image, model.logit_scale.exp() * image_emb @ text_emb.T, "logits")
    assert torch.equal(hf_model.logit_scale, model.logit_scale)


@pytest.mark.parametrize(
    ("to", "overrides", "message"),
    [
        (
            "openclip",
            ["model.text.pooling=eos"],
            "reproduce model.text.pooling=eos: OpenCLIP's HFTextEncoder",
        ),
        (
            "openclip",
            ["model.image.name=test_vit"],
            "test_vit at model.image.image_size=64: OpenCLIP's TimmModel",
        ),
        ("openclip", [CLIP_TEXT], "cannot load a clip_text_model text model"),
        ("openclip", CONCAT, "cannot express model.image.concat"),
        ("hf", CONCAT, "cannot express model.image.concat"),
        ("hf", [], "cannot reproduce model.text.pooling=mean: .* for bert is tanh"),
        ("hf", ["model.text.pooling=cls"], "cannot reproduce model.text.pooling=cls: .* for bert is tanh"),
        ("hf", [CLIP_TEXT], "pooling=mean: .* for clip_text_model is the hidden state at the first eos"),
        (
            "hf",
            [CLIP_TEXT, "model.text.pooling=eos", "model.image_proj=mlp"],
            "model.image_proj=mlp: .*--to openclip",
        ),
    ],
)
def test_what_the_target_cannot_reproduce_is_refused_in_one_line(tmp_path, capsys, to, overrides, message):
    pytest.importorskip("open_clip" if to == "openclip" else "transformers.models.timm_wrapper")
    folder = _saved_model(tmp_path, *overrides)
    out = tmp_path / "exports" / "x"
    capsys.readouterr()
    assert export_main([str(folder), "--to", to, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("clip-export: error: --to ")
    assert re.search(message, err), err
    _nothing_written(out)


def test_cli_exports_a_checkpoint_and_never_overwrites(tmp_path, capsys):
    pytest.importorskip("open_clip")
    # a checkpoint folder as the trainer writes it: <run>/checkpoints/step-N/model/
    checkpoint = tmp_path / "run" / "checkpoints" / "step-8"
    _saved_model(tmp_path).rename(checkpoint.mkdir(parents=True) or checkpoint / "model")
    out = tmp_path / "oc"
    # its save cut off (no COMPLETE marker yet): refused in one line, nothing written
    assert main(["export", str(checkpoint), "--to", "openclip", "--out", str(out)]) == 2
    assert "without its COMPLETE marker" in capsys.readouterr().err and not out.exists()
    (checkpoint / "COMPLETE").write_text("")
    assert main(["export", str(checkpoint), "--to", "openclip", "--out", str(out)]) == 0
    assert "max embedding difference: image" in capsys.readouterr().out
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["hf_model_name"] == str(out)  # absolute: found from anywhere
    assert export_main([str(checkpoint), "--to", "hf", "--out", str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert export_main([str(tmp_path / "missing"), "--to", "hf", "--out", str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_an_export_that_does_not_reproduce_the_model_is_not_written(tmp_path, monkeypatch):
    pytest.importorskip("open_clip")
    import clip_train.export_formats as formats

    right = formats.openclip_state_dict

    def wrong(model):  # a mapping bug: the text projection loses a row
        state = right(model)
        state["text.proj.weight"] = state["text.proj.weight"].clone()  # not the model's own weight
        state["text.proj.weight"][0] = 0
        return state

    monkeypatch.setattr(formats, "openclip_state_dict", wrong)
    out = tmp_path / "oc"
    with pytest.raises(ExportError, match="OpenCLIP export's text embeddings differ from clip_train's"):
        export_model(_saved_model(tmp_path), "openclip", out)
    _nothing_written(out)


# ----------------------------------------------------------------------------------------------
# Round trips, text cleaning and file modes

# Text that OpenCLIP's cleaning changes, other than the export's own probes: curly quotes, HTML
# entities (double-escaped too), ligatures, full-width letters, mojibake, a no-break space.
DIRTY = [
    "\u201ca photo\u201d of a dog",
    "salt &amp;amp; pepper",
    "the \ufb01rst \ufb02ower",
    "\uff21\uff22\uff23 blocks",
    "na\u00c3\u00afve caf\u00c3\u00a9",
    "a&nbsp;cat &lt;3",
]


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # test_efficientnet: a conv tower whose global_pool is a module
        ["model.image.name=test_resnet"],  # a residual tower, global_pool a module too
        ["model.image.name=test_vit", "model.image.image_size=160"],  # a ViT, at timm's own size
    ],
    ids=["efficientnet", "resnet", "vit"],
)
def test_the_openclip_export_imports_back_with_the_same_weights_and_embeddings(tmp_path, capsys, overrides):
    pytest.importorskip("open_clip")
    folder = _saved_model(tmp_path, *overrides)
    exported = tmp_path / "oc"
    assert export_main([str(folder), "--to", "openclip", "--out", str(exported)]) == 0
    weights = exported / "open_clip_model.safetensors"
    argv = ["import", "--model", str(exported), "--checkpoint", str(weights), "--out", str(tmp_path / "back")]
    assert main(argv) == 0, capsys.readouterr().err

    model, tokenizer, _ = _reference(folder)
    back, back_tokenizer, _ = _reference(tmp_path / "back")
    assert back.cfg.image.name == model.cfg.image.name
    want, got = model.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    images, _ = _inputs(model.cfg.image.image_size)
    ids = tokenizer(CAPTIONS + DIRTY)
    assert torch.equal(back_tokenizer(CAPTIONS + DIRTY), ids)
    with torch.no_grad():
        # the weights are equal bit for bit (above); the image embeddings to rounding only, since the
        # importer picks the tower's memory format (channels_last off for a ViT) where the saved
        # model may have had it on, and the patch convolution rounds differently in each
        torch.testing.assert_close(back.encode_image(images), model.encode_image(images), rtol=0, atol=1e-6)
        assert torch.equal(back.encode_text(ids), model.encode_text(ids))


def test_text_that_openclip_cleans_gets_openclip_token_ids(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.tokenizer import basic_clean, whitespace_clean

    from clip_train.models.tokenizer import clean_text

    assert [clean_text(t) for t in DIRTY] == [whitespace_clean(basic_clean(t)) for t in DIRTY]
    folder = _saved_model(tmp_path)
    result = export_model(folder, "openclip", tmp_path / "oc")
    tokenizer = load_tokenizer(folder)
    theirs = open_clip.get_tokenizer(f"local-dir:{result.folder}")(DIRTY)
    assert torch.equal(tokenizer(DIRTY), theirs)
    # without the cleaning clip_train's ids would differ: these texts test it
    raw = _uncleaned_ids(tokenizer.tokenizer, DIRTY)
    assert sum(not torch.equal(a, b) for a, b in zip(raw, theirs)) >= 5
    assert any("alpha channel" in note and "white" in note for note in result.notes)


def test_plain_ascii_captions_keep_their_token_ids(tmp_path):
    from clip_train.models.tokenizer import TextTokenizer, clean_text, tiny_tokenizer

    ascii_texts = [*CAPTIONS, "a red circle.", "it's 3 o'clock, isn't it?", "50% off (today) - #1 <b>"]
    assert [clean_text(t) for t in ascii_texts] == ascii_texts
    tokenizers = [tiny_tokenizer()]
    with contextlib.suppress(ImportError):  # byte-level BPE too: OpenCLIP's vocabulary, as imported
        from open_clip.tokenizer import SimpleTokenizer
        from transformers import AutoTokenizer

        from clip_train.models.openclip_convert import write_clip_tokenizer

        write_clip_tokenizer(SimpleTokenizer(), tmp_path / "bpe", 16)
        tokenizers.append(AutoTokenizer.from_pretrained(str(tmp_path / "bpe")))
    for hf in tokenizers:
        assert torch.equal(TextTokenizer(hf, 16)(ascii_texts), _uncleaned_ids(hf, ascii_texts))


def _uncleaned_ids(hf_tokenizer, texts) -> torch.Tensor:
    tokens = hf_tokenizer(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    return tokens["input_ids"]


@pytest.mark.parametrize("to", ["openclip", "hf"])
def test_exported_files_are_ordinary_files(tmp_path, to):
    pytest.importorskip("open_clip" if to == "openclip" else "transformers.models.timm_wrapper")
    folder = _saved_model(tmp_path, *([CLIP_TEXT, "model.text.pooling=eos"] if to == "hf" else []))
    umask = os.umask(0o022)
    try:
        out = export_model(folder, to, tmp_path / "out").folder
    finally:
        os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {0o644}, modes
