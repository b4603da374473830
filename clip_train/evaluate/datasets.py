"""Evaluation data: labelled image sets for zero-shot classification, captioned sets for retrieval.

Classification, `load_dataset(spec, limit, classnames=, class_key=)`:

<registered name>        a set registered with registry.register_dataset: the demo's fashion-mnist,
                         tuxpaint and emoji (clip_train/demo/eval_sets.py), or your own
wds:<shards>             webdataset shards; the class from a member (`cls`) or a json field
<folder>                 one sub-folder per class (ImageFolder layout); class names from the
                         sub-folder names with "_" read as spaces

Retrieval, `load_retrieval(spec, limit, image_col=, caption_col=)` (retrieval_sets.py): webdataset
shards whose `txt` holds one caption per line, or a CSV/TSV/JSONL manifest where several rows may
share an image.

Images load lazily (`data.image(i)`, PIL RGB); a missing package or file raises DatasetError with
one line naming what is missing and the command that installs it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from clip_train.data import DataError
from clip_train.data.pipeline import expand_urls
from clip_train.data.shards import open_image, to_rgb
from clip_train.evaluate.prompts import load_classnames
from clip_train.evaluate.registry import RegisteredDataset, registered, registered_names

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
# shard members that hold the image, in the order build_eval_loader looks for them
SHARD_IMAGE_KEYS = ("jpg", "png", "webp", "jpeg")
MANIFEST_SUFFIXES = {".csv", ".tsv", ".tab", ".jsonl", ".ndjson"}


class DatasetError(ValueError):
    """A dataset name or path that cannot be read, with the fix."""


@dataclass
class LabelledImages:
    name: str
    classnames: list[str]
    labels: list[int]
    _load: Callable[[int], Image.Image]  # index -> PIL RGB image (lazy: Fashion-MNIST is 10k images)
    # where each image comes from (file path, tarball member, shard URL/key, split index): for
    # tracing a misclassified image back, and for tests to check what a set holds
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Image.Image:
        return self._load(index)


def _open_rgb(src: bytes | str | Path) -> Image.Image:
    # the training pipeline's decoding: the pixel-count guard, and transparency on white
    img = open_image(src)
    img.load()
    return to_rgb(img)


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------


def load_dataset(
    spec: str, limit: int = 0, *, classnames: str = "", class_key: str = "cls"
) -> LabelledImages:
    """A labelled image set by name or path (see the module docstring).

    `classnames`: a file with one class name per line. For `wds:` it gives the names of integer
    classes (line i = class i) and the order of named ones; for the other datasets it renames
    their classes in order and must have as many lines. `class_key` is for `wds:` only.
    `limit`: an evenly spaced subset of that many images.
    """
    try:
        entry = registered(spec)  # first: a registered name wins over a folder of that name
        if entry is not None:
            data = _built(entry, "test")
        elif spec.startswith("wds:"):
            data = wds_classification(spec[len("wds:") :], class_key=class_key, classnames=classnames)
        elif Path(spec).is_dir():
            data = image_folder(Path(spec))
        else:
            raise DatasetError(
                f"zero-shot dataset {spec!r} is none of {', '.join(registered_names())}, wds:<shards> "
                "or an existing folder: give a folder with one sub-folder of images per class"
            )
        if classnames and not spec.startswith("wds:"):
            data = _renamed(data, _classnames(classnames), classnames)
    except DataError as e:  # from the data layer (sources, expand_urls): already names the fix
        raise DatasetError(str(e)) from None
    if limit and limit < len(data):
        # An evenly spaced subset keeps every class represented (the files are sorted by class
        # in ImageFolder layout, so taking the first N would drop the last classes).
        keep = np.linspace(0, len(data) - 1, limit).round().astype(int).tolist()
        load = data._load
        data = LabelledImages(
            data.name,
            data.classnames,
            [data.labels[i] for i in keep],
            lambda i: load(keep[i]),
            [data.ids[i] for i in keep] if data.ids else [],
        )
    return data


def load_train_split(spec: str) -> LabelledImages | None:
    """The training split of a registered dataset (the linear probe's), or None when it has none."""
    entry = registered(spec)
    if entry is None or "train" not in entry.splits:
        return None
    try:
        return _built(entry, "train")
    except DataError as e:
        raise DatasetError(str(e)) from None


def _built(entry: RegisteredDataset, split: str) -> LabelledImages:
    data = entry.builder(split)
    if not isinstance(data, LabelledImages):
        raise DatasetError(
            f"the builder of dataset {entry.name!r} returned a {type(data).__name__}: "
            "make it return a clip_train.evaluate.datasets.LabelledImages"
        )
    # named as registered: the results' file names and the dataset's own templates go by it
    return data if data.name == entry.name else dataclasses.replace(data, name=entry.name)


def naming_path(spec: str, *, retrieval: bool = False) -> Path:
    """The path a set is named after: its last part is the name the loaders give it (a shard set's
    folder, an image folder, a manifest's stem, a registered name); the parts before it tell two
    sets of one name apart, as in CLIP_benchmark's layout where every set is in <name>/test/."""
    if not retrieval and registered(spec) is not None:
        return Path(spec)
    manifest = Path(spec).suffix.lower() in MANIFEST_SUFFIXES and not spec.startswith("wds:")
    if retrieval and manifest:
        path = Path(spec).with_suffix("")
    elif retrieval or spec.startswith("wds:"):
        try:
            path = Path(expand_urls(spec.removeprefix("wds:"), split="val")[0]).parent
        except DataError as e:
            raise DatasetError(str(e)) from None
    else:
        path = Path(spec)
    return Path(os.path.abspath(path))  # "." and "test/0.tar" have parents too


def _classnames(path: str) -> list[str]:
    try:
        return load_classnames(path)
    except ValueError as e:
        raise DatasetError(str(e)) from None


def _renamed(data: LabelledImages, names: list[str], path: str) -> LabelledImages:
    if len(names) != len(data.classnames):
        raise DatasetError(
            f"{path} has {len(names)} names but {data.name} has {len(data.classnames)} "
            f"classes ({', '.join(data.classnames[:5])}, ...): write one name per class, in that order"
        )
    return LabelledImages(data.name, names, data.labels, data._load, data.ids)


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
    return LabelledImages(
        root.name, classnames, labels, lambda i: _open_rgb(files[i]), [str(f) for f in files]
    )


# ---- webdataset classification ----------------------------------------------------------------


def _shard_samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    # DataPipeline rather than wds.WebDataset: the latter refuses to run under torch.distributed
    # unless told how to split nodes, and evaluation wants every sample on every rank
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
    try:
        yield from pipeline
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DatasetError(
            f"cannot read the shards ({type(e).__name__}: {e}): check that they are tar files"
        ) from None


def _where(sample: dict[str, Any]) -> str:
    return f"sample {sample.get('__key__')} of {sample.get('__url__')}"


def _members(sample: dict[str, Any]) -> str:
    return ", ".join(k for k in sample if not k.startswith("__"))


def _shard_image(sample: dict[str, Any]) -> bytes:
    data = next((sample[k] for k in SHARD_IMAGE_KEYS if k in sample), None)
    if data is None:
        raise DatasetError(
            f"{_where(sample)} has no image member ({', '.join(SHARD_IMAGE_KEYS)}; it has {_members(sample)})"
        )
    return data


def _sample_class(sample: dict[str, Any], class_key: str) -> int | str:
    """The class of a sample: an int (an index) or a str (a name)."""
    if class_key.startswith("json:"):
        field = class_key[len("json:") :]
        if "json" not in sample:
            raise DatasetError(
                f"{_where(sample)} has no json member for class_key {class_key!r} "
                f"(it has {_members(sample)}): pass class_key=<member> instead"
            )
        try:
            meta = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DatasetError(f"{_where(sample)}: its json member is not valid JSON ({e})") from None
        if not isinstance(meta, dict) or field not in meta:
            fields = ", ".join(meta) if isinstance(meta, dict) else "none"
            raise DatasetError(f"{_where(sample)}: its json has no field {field!r} (fields: {fields})")
        value = meta[field]
        # JSON keeps its types: a number is a class index, a string a class name
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip():
            raise DatasetError(
                f"{_where(sample)}: json field {field!r} is {value!r}, not a class index or name"
            )
        return value if isinstance(value, int) else " ".join(value.split())
    if class_key not in sample:
        raise DatasetError(
            f"{_where(sample)} has no {class_key!r} member (it has {_members(sample)}): "
            "pass class_key=<member> or json:<field>"
        )
    try:
        text = " ".join(sample[class_key].decode("utf-8").split())
    except UnicodeDecodeError:
        raise DatasetError(f"{_where(sample)}: its {class_key} member is not UTF-8 text") from None
    if not text:
        raise DatasetError(f"{_where(sample)}: its {class_key} member is empty")
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def wds_classification(shards: str, *, class_key: str = "cls", classnames: str = "") -> LabelledImages:
    """A classification set in webdataset shards (brace pattern, glob, folder; several joined
    with `::`; a clip-data folder gives its val shards). Every sample needs an image member
    (jpg/png/webp/jpeg) and a class; the encoded images are kept in memory and decoded lazily."""
    urls = expand_urls(shards, split="val")
    names = _classnames(classnames) if classnames else None
    images: list[bytes] = []
    ids: list[str] = []
    values: list[int | str] = []
    for sample in _shard_samples(urls):
        images.append(_shard_image(sample))
        ids.append(f"{sample['__url__']}/{sample['__key__']}")
        values.append(_sample_class(sample, class_key))
    if not images:
        raise DatasetError(f"the shards {shards} hold no samples")
    if names is None:
        if any(isinstance(v, int) for v in values):
            raise DatasetError(
                f"the classes in {shards} ({class_key}) are indices: pass classnames=<file> "
                "with one class name per line (line i names class i)"
            )
        names = sorted(set(values))  # all names here: indices were refused above
    index = {name: i for i, name in enumerate(names)}
    labels = []
    for value in values:
        if isinstance(value, int):
            if not 0 <= value < len(names):
                raise DatasetError(
                    f"class index {value} in {shards} is outside the {len(names)} names of {classnames}"
                )
            labels.append(value)
        elif value in index:
            labels.append(index[value])
        else:
            raise DatasetError(f"class {value!r} in {shards} is not in {classnames}: add it to that file")
    name = Path(urls[0]).parent.name or "wds"
    return LabelledImages(name, list(names), labels, lambda i: _open_rgb(images[i]), ids)
