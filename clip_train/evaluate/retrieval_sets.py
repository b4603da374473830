"""Evaluation data for image-text retrieval: images with one or more captions each.

`load_retrieval(spec, limit, image_col=, caption_col=, captions=)`: webdataset shards whose `txt`
holds one caption per line (or whose json holds a caption list), or a CSV/TSV/JSONL manifest where
several rows may share an image. Every caption of an image is evaluated. Images load
lazily, decoded as datasets.py decodes the labelled sets for classification.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from clip_train.data import DataError
from clip_train.data.captions import JSON_PREFIX, read_captions
from clip_train.data.pipeline import expand_urls
from clip_train.data.quality import SampleError
from clip_train.data.sources import manifest_records, record_captions
from clip_train.evaluate.datasets import (
    MANIFEST_SUFFIXES,
    DatasetError,
    _members,
    _open_rgb,
    _shard_image,
    _shard_samples,
    _where,
)


@dataclass
class CaptionedImages:
    """Images with one or more captions each: caption j describes image caption_image[j]."""

    name: str
    captions: list[str]
    caption_image: list[int]
    num_images: int
    _load: Callable[[int], Image.Image]  # image index -> PIL RGB image

    def image(self, index: int) -> Image.Image:
        return self._load(index)


def load_retrieval(
    spec: str,
    limit: int = 0,
    *,
    image_col: str = "image",
    caption_col: str = "caption",
    captions: str = "txt-lines",
) -> CaptionedImages:
    """Captioned images for image-text retrieval.

    `spec`: a CSV/TSV/JSONL manifest (`image_col` holds the image path, relative to the manifest's
    folder unless absolute; `caption_col` a caption; rows with the same image give it several
    captions), or webdataset shards (as expand_urls reads them, optionally prefixed `wds:`) where
    each sample's `txt` holds one caption per line (or, by `captions` as data.captions reads
    them, the first line or a json field's caption list). Empty captions are ignored, and an image left
    with none is left out. `limit`: the first N images, with all their captions.
    """
    try:
        path = Path(spec)
        if path.suffix.lower() in MANIFEST_SUFFIXES and not spec.startswith("wds:"):
            data = manifest_retrieval(path, image_col=image_col, caption_col=caption_col)
        else:
            data = shard_retrieval(spec[len("wds:") :] if spec.startswith("wds:") else spec, captions)
    except DataError as e:
        raise DatasetError(str(e)) from None
    if limit and limit < data.num_images:
        kept = [j for j, i in enumerate(data.caption_image) if i < limit]
        data = CaptionedImages(
            data.name,
            [data.captions[j] for j in kept],
            [data.caption_image[j] for j in kept],
            limit,
            data._load,  # images keep their indices: the first N are 0..N-1
        )
    return data


def _captioned(name: str, pairs: Iterable[tuple[Any, str | None]], load: Callable[[Any], Image.Image]):
    """(image identity, caption) pairs -> CaptionedImages, images in order of first appearance."""
    captions_of: dict[Any, list[str]] = {}  # insertion-ordered: the image order
    for image, caption in pairs:
        caption = " ".join((caption or "").split())
        captions_of.setdefault(image, [])
        if caption:
            captions_of[image].append(caption)
    images = [image for image, caps in captions_of.items() if caps]
    if not images:
        raise DatasetError(f"{name} holds no captioned images")
    captions, caption_image = [], []
    for i, image in enumerate(images):
        captions += captions_of[image]
        caption_image += [i] * len(captions_of[image])
    return CaptionedImages(name, captions, caption_image, len(images), lambda i: load(images[i]))


def manifest_retrieval(
    path: Path, *, image_col: str = "image", caption_col: str = "caption"
) -> CaptionedImages:
    records = list(manifest_records(path, image_col=image_col, caption_col=caption_col))
    # "./a.png" and "a.png" are one image; a cell with a list of captions gives them all
    pairs = [
        (os.path.normpath(r.image), c["text"] if isinstance(c, dict) else c)
        for r in records
        for c in record_captions(r) or [None]
    ]
    missing = sorted({image for image, _ in pairs if not Path(image).is_file()})
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DatasetError(
            f"{len(missing)} image(s) of {path} not found: {shown}; "
            f"paths in {image_col!r} are relative to the manifest's folder"
        )
    return _captioned(path.stem, pairs, _open_rgb)


def _json_captions(sample: dict, captions: str) -> list[str]:
    try:
        return [text for text, _ in read_captions(sample, captions, "txt", _where(sample))]
    except SampleError as e:
        if e.reason == "empty_caption":
            return []  # an image with no caption is left out, as with empty txt lines
        raise DatasetError(str(e)) from None


def shard_retrieval(shards: str, captions: str = "txt-lines") -> CaptionedImages:
    """Captions as data.captions reads them (`captions`), all of them: "json:<field>" the json
    list, "first-line" the first non-empty txt line, else every txt line ("whole" included)."""
    urls = expand_urls(shards, split="val")
    encoded: list[bytes] = []
    pairs: list[tuple[int, str | None]] = []
    for sample in _shard_samples(urls):
        image = _shard_image(sample)
        if captions.startswith(JSON_PREFIX):
            lines = _json_captions(sample, captions)
        elif "txt" not in sample:
            raise DatasetError(f"{_where(sample)} has no txt member (it has {_members(sample)})")
        else:
            try:
                lines = sample["txt"].decode("utf-8").splitlines()
            except UnicodeDecodeError:
                raise DatasetError(f"{_where(sample)}: its txt member is not UTF-8") from None
            if captions == "first-line":
                lines = [line for line in lines if line.strip()][:1]
        # images are known by their position: two samples with equal bytes are still two images
        pairs += [(len(encoded), line) for line in lines] or [(len(encoded), None)]
        encoded.append(image)
    name = Path(urls[0]).parent.name or "shards"
    return _captioned(name, pairs, lambda n: _open_rgb(encoded[n]))
