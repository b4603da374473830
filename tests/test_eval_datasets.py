import gzip

import numpy as np
import pytest
import torch

from clip_train.config import EvalConfig, ZeroShotTask
from clip_train.evaluate import datasets
from clip_train.evaluate.datasets import DatasetError, load_dataset
from clip_train.evaluate.runner import run_evaluation


def _write_idx(root, split: str, pixels: np.ndarray, labels: np.ndarray) -> None:
    with gzip.open(root / f"{split}-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\0" * 16 + pixels.astype(np.uint8).tobytes())
    with gzip.open(root / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\0" * 8 + labels.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_reader_and_even_subset(tmp_path, monkeypatch):
    pixels = np.stack([np.full((28, 28), 10 * i) for i in range(20)])
    labels = np.arange(20) % 10
    _write_idx(tmp_path, "t10k", pixels, labels)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path)
    data = load_dataset("fashion-mnist")
    assert len(data) == 20 and data.classnames[0] == "t-shirt" and data.classnames[9] == "ankle boot"
    assert data.image(3).mode == "RGB" and data.image(3).getpixel((5, 5)) == (30, 30, 30)
    subset = load_dataset("fashion-mnist", limit=5)
    assert subset.labels == [0, 5, 0, 4, 9]  # indices 0, 5, 10, 14, 19: spread over the whole split
    assert subset.image(4).getpixel((0, 0)) == (190, 190, 190)


def test_missing_dataset_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(DatasetError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist")
    with pytest.raises(DatasetError, match="one sub-folder of images per class"):
        load_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_dataset(str(tmp_path / "empty"))


class _OracleModel(torch.nn.Module):
    """Encodes an image by its mean colour channel and a text by its class word: zero-shot is exact."""

    words = ["red", "green", "blue"]

    def encode_image(self, images):
        return torch.nn.functional.one_hot(images.mean(dim=(2, 3)).argmax(dim=1), 3).float()

    def encode_text(self, tokens):
        return torch.nn.functional.one_hot(tokens[:, 0], 3).float()


def test_runner_zero_shot_on_an_image_folder_with_a_perfect_model(tmp_path):
    from PIL import Image

    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    for name, rgb in colours.items():
        (tmp_path / "cls" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), rgb).save(tmp_path / "cls" / name / f"{i}.png")
    tokenizer = lambda texts: torch.tensor([[_OracleModel.words.index(t.split()[-1])] for t in texts])  # noqa: E731
    transform = lambda img: torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)  # noqa: E731
    cfg = EvalConfig(zeroshot=[ZeroShotTask(dataset=str(tmp_path / "cls"), templates=["a {c}", "the {c}"])])
    metrics = run_evaluation(
        _OracleModel(), tokenizer, transform, cfg, "", torch.device("cpu"), "fp32", out_dir=tmp_path / "out"
    )
    assert metrics["cls/acc1"] == 1.0 and metrics["cls/mean_per_class_recall"] == 1.0
    saved = (tmp_path / "out" / "cls_zeroshot_classification.json").read_text()
    assert '"task": "zeroshot_classification"' in saved and '"acc1": 1.0' in saved
