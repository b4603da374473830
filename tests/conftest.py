"""Shared fixtures: a tiny real-format dataset (shapes in colours with captions) built per session."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clip_train.data.shards import write_folder

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ["circle", "square", "triangle"]


def draw(shape: str, colour: str, size: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    off = rng.integers(0, size // 6, size=2)
    box = [4 + off[0], 4 + off[1], size - 8 + off[0] // 2, size - 8 + off[1] // 2]
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=fill)
    return img


def write_tiny_shards(root: Path) -> Path:
    """root/shards: 72 'a <colour> <shape>' pairs (6 of each), 20% held out, 16 per shard."""
    pairs = root / "pairs"
    pairs.mkdir(parents=True)
    i = 0
    for _repeat in range(6):
        for colour in COLOURS:
            for shape in SHAPES:
                draw(shape, colour, seed=i).save(pairs / f"{i:04d}.png")
                (pairs / f"{i:04d}.txt").write_text(f"a {colour} {shape}")
                i += 1
    write_folder(pairs, root / "shards", max_size=48, val_frac=0.2, shard_size=16, num_procs=1)
    return root / "shards"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """train/val shards of 'a <colour> <shape>' pairs and an ImageFolder of shapes for zero-shot."""
    root = tmp_path_factory.mktemp("tiny_data")
    shards = write_tiny_shards(root)
    classes = root / "shapes"
    for shape in SHAPES:
        (classes / shape).mkdir(parents=True)
        for j, colour in enumerate(COLOURS):
            draw(shape, colour, seed=1000 + j).save(classes / shape / f"{j}.png")
    return {"shards": shards, "classes": classes}


CUDA_SKIP_REASON = "needs a CUDA GPU (none here)"


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are collected everywhere and skipped, with the reason, without a GPU."""
    cuda_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_items:
        return
    import torch  # asked only when a cuda test was collected; is_available() starts no CUDA context

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in cuda_items:
        item.add_marker(skip)


def train_loader(shards, *, defaults: dict, **kwargs):
    """build_train_loader on `shards` (a shard spec, or a list of pipeline.Source to mix): keyword
    arguments go to the loader itself (seed, rank, transform, ...) or, for data.* keys, into its
    DataConfig; `defaults` are the calling test module's."""
    from clip_train.config import DataConfig, DataSource
    from clip_train.data.pipeline import build_train_loader

    settings = {**defaults, **kwargs}
    loader_keys = {"seed", "rank", "world_size", "transform", "tokenize", "decode_size", "skip_through"}
    loader_args = {k: v for k, v in settings.items() if k in loader_keys}
    data = {k: v for k, v in settings.items() if k not in loader_keys}
    if isinstance(shards, str):
        data["train_shards"] = shards
    else:
        data["sources"] = [DataSource(shards=s.shards, weight=s.weight, name=s.name) for s in shards]
    return build_train_loader(DataConfig(**data), **loader_args)
