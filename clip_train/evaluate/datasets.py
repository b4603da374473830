"""Labelled image sets for zero-shot classification, by name or by path.

fashion-mnist            the Debian package dataset-fashion-mnist's test split (10k, 10 classes)
<folder>                 one sub-folder per class (ImageFolder layout); class names from the
                         sub-folder names with "_" read as spaces
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# The dataset's own label names, with "T-shirt/top" read as its first name so the prompt is a
# phrase a caption would contain.
FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


class DatasetError(ValueError):
    """A dataset name or path that cannot be read, with the fix."""


@dataclass
class LabelledImages:
    name: str
    classnames: list[str]
    labels: list[int]
    _load: Callable[[int], Image.Image]  # index -> PIL RGB image (lazy: Fashion-MNIST is 10k images)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Image.Image:
        return self._load(index)


def load_dataset(spec: str, limit: int = 0) -> LabelledImages:
    if spec == "fashion-mnist":
        data = fashion_mnist(FASHION_MNIST_DIR)
    elif Path(spec).is_dir():
        data = image_folder(Path(spec))
    else:
        raise DatasetError(
            f"zero-shot dataset {spec!r} is neither 'fashion-mnist' nor an existing folder: "
            "give a folder with one sub-folder of images per class"
        )
    if limit and limit < len(data):
        # An evenly spaced subset keeps every class represented (the files are sorted by class
        # in ImageFolder layout, so taking the first N would drop the last classes).
        keep = np.linspace(0, len(data) - 1, limit).round().astype(int).tolist()
        load = data._load
        data = LabelledImages(
            data.name, data.classnames, [data.labels[i] for i in keep], lambda i: load(keep[i])
        )
    return data


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def fashion_mnist(root: Path, split: str = "t10k") -> LabelledImages:
    images_path = root / f"{split}-images-idx3-ubyte.gz"
    labels_path = root / f"{split}-labels-idx1-ubyte.gz"
    if not images_path.is_file() or not labels_path.is_file():
        raise DatasetError(f"Fashion-MNIST not found in {root}: apt-get install -y dataset-fashion-mnist")
    pixels = _read_idx(images_path, 16).reshape(-1, 28, 28)  # idx format: 16-byte header for images
    labels = _read_idx(labels_path, 8).astype(int).tolist()  # and 8 bytes for labels
    return LabelledImages(
        "fashion-mnist", FASHION_MNIST_CLASSES, labels, lambda i: Image.fromarray(pixels[i]).convert("RGB")
    )


def image_folder(root: Path) -> LabelledImages:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{root} has no class sub-folders: expected <root>/<class name>/<image files>")
    files, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
                labels.append(label)
    if not files:
        raise DatasetError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    classnames = [name.replace("_", " ") for name in classes]
    return LabelledImages(root.name, classnames, labels, lambda i: Image.open(files[i]).convert("RGB"))
