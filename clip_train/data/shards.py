"""Write image-text pairs as webdataset tar shards, once, so training never decodes a big original.

    stats = write_shards(records, "shards/demo", max_size=256, val_frac=0.08)

Each record is decoded, converted to RGB (transparency composited on white), shrunk so its longer
side is at most `max_size`, re-encoded as JPEG and written to `train-NNNNNN.tar` or `val-NNNNNN.tar`.
The split is decided by the SHA-1 of the original image bytes, so it is deterministic and an image
that appears twice can never straddle train and val (and the second copy is dropped anyway).
Every sample holds `<key>.jpg`, `<key>.txt` (the caption, UTF-8) and `<key>.json` (source, category,
original path and size; for an image with several captions, txt holds them one per line and json's
`captions` lists them). `stats.json` records what was written and what was skipped, and why.

The output folder appears atomically: everything is built in `<out>.tmp-<pid>` and renamed at the
end, so an interrupted build leaves no half-written shard folder behind.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image, ImageOps

from clip_train.atomic import publish_folder
from clip_train.data import DataError
from clip_train.data.sources import Record, folder_records, group_by_image, manifest_records

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000  # same cap as DataConfig.max_pixels
_EXAMPLES_PER_REASON = 5
_TAR_MTIME = 1_700_000_000  # a fixed mtime inside the tars, so rebuilding gives byte-identical shards
_WHITE = (255, 255, 255)


class ImageTooLarge(Exception):
    """The image's header declares more pixels than the cap: it is skipped before decoding."""


# ---------------------------------------------------------------------------------------------
# Decoding, shared with the training pipeline (pipeline.py imports these two)
# ---------------------------------------------------------------------------------------------


def open_image(src: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image lazily (header only) and refuse it if it has more than `max_pixels` pixels.

    This is the decompression-bomb guard: PIL reads the size from the header, so a 20990x29700 PNG
    is rejected in microseconds instead of allocating 2.5 GB. (PIL's own check, which raises above
    2 x Image.MAX_IMAGE_PIXELS, still applies when `max_pixels` is set higher than that.)
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own cap below
        try:
            img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
        except Image.DecompressionBombError as e:
            raise ImageTooLarge(str(e)) from None
    if img.width * img.height > max_pixels:
        raise ImageTooLarge(f"{img.width}x{img.height} is over the cap of {max_pixels:,} pixels")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with any transparency composited on white (stamps and clipart are cut-outs; black
    behind them, PIL's default for a plain convert, would change what the picture shows)."""
    if img.mode == "RGB" and "transparency" not in img.info:  # an RGB PNG may still have a tRNS colour
        return img
    if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit grayscale: scale, don't clip
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    if img.mode in ("P", "PA", "LA", "La", "RGBa") or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, _WHITE)
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def _rasterize_svg(src: bytes | str, max_size: int) -> Image.Image:
    """Render an SVG with librsvg's `rsvg-convert` to fit in max_size x max_size (vector art has no
    native pixel size worth keeping). Needs Debian librsvg2-bin; without it SVGs are not offered."""
    command = ["rsvg-convert", "--keep-aspect-ratio", "--width", str(max_size), "--height", str(max_size)]
    if isinstance(src, bytes):
        result = subprocess.run(command, input=src, capture_output=True, timeout=60)
    else:
        result = subprocess.run([*command, src], capture_output=True, timeout=60)
    if result.returncode != 0:
        raise ValueError(f"rsvg-convert failed: {result.stderr.decode(errors='replace').strip()[:200]}")
    img = Image.open(io.BytesIO(result.stdout))
    img.load()
    return img


def _is_svg(src: bytes | str, data: bytes) -> bool:
    return (isinstance(src, str) and src.lower().endswith(".svg")) or data[:256].lstrip().startswith(
        (b"<?xml", b"<svg")
    )


def encode_image(
    data: bytes, src: bytes | str, *, max_size: int, jpeg_quality: int, max_pixels: int
) -> tuple[bytes, tuple[int, int] | None, tuple[int, int], str]:
    """Original bytes -> (JPEG bytes, original size or None for SVG, new size, original format)."""
    if _is_svg(src, data):
        img = to_rgb(_rasterize_svg(src if isinstance(src, str) else data, max_size))
        original, fmt = None, "SVG"
    else:
        img = open_image(data, max_pixels)
        original, fmt = img.size, img.format or ""
        scale = max_size / max(img.size)
        if fmt == "JPEG" and scale < 1:
            # let libjpeg decode at 1/2, 1/4 or 1/8 scale: most of the cost of a big photo disappears
            img.draft(None, (max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation (phone photos)
            img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
    if max(img.size) > max_size:
        img.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=jpeg_quality)
    return out.getvalue(), original, img.size, fmt


def _process(record: Record, *, max_size: int, jpeg_quality: int, max_pixels: int) -> tuple[Record, tuple]:
    """Runs in a pool worker: (record without its bytes, ("ok", ...) or ("skip", reason, detail))."""
    light = record._replace(image=record.meta.get("path", "")) if isinstance(record.image, bytes) else record
    if record.caption is None:
        return light, ("skip", "no_caption", "no caption")
    if not record.caption.strip():
        return light, ("skip", "empty_caption", "empty caption")
    try:
        data = record.image if isinstance(record.image, bytes) else Path(record.image).read_bytes()
    except OSError as e:
        return light, ("skip", "unreadable_image", f"{type(e).__name__}: {e.strerror or e}")
    try:
        jpeg, original, size, fmt = encode_image(
            data, record.image, max_size=max_size, jpeg_quality=jpeg_quality, max_pixels=max_pixels
        )
    except ImageTooLarge as e:
        return light, ("skip", "too_large", str(e))
    except Exception as e:  # noqa: BLE001 - any decoder failure means this one image is unusable
        return light, ("skip", "unreadable_image", f"{type(e).__name__}: {e}"[:300])
    return light, ("ok", hashlib.sha1(data).hexdigest(), jpeg, original, size, fmt)


def hash_fraction(sha1_hex: str) -> float:
    """A content hash mapped to [0, 1): the split is `val` when this is below val_frac."""
    return int(sha1_hex[:15], 16) / 16**15


def _safe_key(key: str) -> str:
    """A tar-safe webdataset key: webdataset splits the key from the extension at the first dot of
    the file name, so dots (and anything else unusual) become '_'; a leading '__' would mark it meta."""
    key = re.sub(r"[^A-Za-z0-9_\-/]+", "_", key)
    key = re.sub(r"/+", "/", key).strip("/").lstrip("_")
    return key or "sample"


# ---------------------------------------------------------------------------------------------
# The writer
# ---------------------------------------------------------------------------------------------


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"{out_dir} exists and is not a folder: choose another --out")
    if (out_dir / "stats.json").exists():
        if not overwrite:
            raise DataError(
                f"shards already built in {out_dir}: delete it or pass overwrite=True (--overwrite)"
            )
    elif any(out_dir.iterdir()):
        # never delete a folder we did not write, even with overwrite
        raise DataError(f"{out_dir} is not empty and holds no stats.json: choose a new --out folder")


class _SplitWriters:
    """One wds.ShardWriter per split, opened on the first sample so no empty shard is written."""

    def __init__(self, folder: Path, shard_size: int):
        self.folder, self.shard_size = folder, shard_size
        self.writers: dict[str, wds.ShardWriter] = {}

    def write(self, split: str, sample: dict[str, Any]) -> None:
        if split not in self.writers:
            pattern = str(self.folder / f"{split}-%06d.tar")
            self.writers[split] = wds.ShardWriter(
                pattern, maxcount=self.shard_size, verbose=0, mtime=_TAR_MTIME
            )
        self.writers[split].write(sample)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def _results(records: Iterable[Record], num_procs: int, work: Callable) -> Iterator[tuple[Record, tuple]]:
    if num_procs <= 1:
        yield from map(work, records)
        return
    # imap keeps the input order, so the output (dedup winners, shard contents) is deterministic
    with multiprocessing.Pool(num_procs) as pool:
        yield from pool.imap(work, records, chunksize=8)


def write_shards(
    records: Iterable[Record],
    out_dir: str | Path,
    *,
    max_size: int = 256,
    val_frac: float = 0.08,
    shard_size: int = 1000,
    num_procs: int = 2,
    jpeg_quality: int = 90,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write `records` as train/val tar shards plus stats.json in `out_dir`; return the stats.

    Skips (counted by reason in stats.json, with example paths): no_caption, empty_caption,
    unreadable_image (missing file or undecodable), too_large (over max_pixels), duplicate (the
    same original bytes as an earlier record). Raises DataError when nothing could be written.
    """
    if not 0 <= val_frac < 1:
        raise DataError(f"val_frac must be in [0, 1), got {val_frac}")
    if max_size < 8 or shard_size < 1 or not 1 <= jpeg_quality <= 100:
        raise DataError(
            f"bad settings max_size={max_size} shard_size={shard_size} jpeg_quality={jpeg_quality}: "
            "use max_size >= 8, shard_size >= 1, jpeg_quality in 1..100"
        )
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    settings = dict(
        max_size=max_size,
        val_frac=val_frac,
        shard_size=shard_size,
        num_procs=num_procs,
        jpeg_quality=jpeg_quality,
        max_pixels=max_pixels,
    )
    try:
        stats = _write_all(records, tmp, settings)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
        publish_folder(tmp, out_dir, replace=True)  # the old build stays whole until the swap
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


class _Counts:
    """What _write_all has seen so far: samples written per source and split, skips by reason (with a
    few examples), and the image hashes and sample keys already taken."""

    def __init__(self) -> None:
        self.per_source: dict[str, Counter] = defaultdict(Counter)
        self.skipped_by_source: dict[str, Counter] = defaultdict(Counter)
        self.skipped: Counter = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.first_key_of_hash: dict[str, str] = {}
        self.used_keys: set[str] = set()
        self.source_order: dict[str, None] = {}
        self.several_captions = 0  # samples written with more than one caption

    def skip(self, record: Record, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        self.skipped_by_source[record.source][reason] += 1
        if len(self.examples[reason]) < _EXAMPLES_PER_REASON:
            self.examples[reason].append(f"{record.meta.get('path') or record.image}: {detail}")
            log.debug("skipped %s (%s): %s", record.key, reason, detail)

    def unique_key(self, record_key: str) -> str:
        key = base = _safe_key(record_key)
        for n in itertools.count(2):  # keys must be unique or webdataset merges the samples
            if key not in self.used_keys:
                break
            key = f"{base}_{n}"
        self.used_keys.add(key)
        return key


def _write_all(records: Iterable[Record], tmp: Path, settings: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    work = partial(
        _process,
        max_size=settings["max_size"],
        jpeg_quality=settings["jpeg_quality"],
        max_pixels=settings["max_pixels"],
    )
    counts = _Counts()
    writers = _SplitWriters(tmp, settings["shard_size"])
    seen = 0
    try:
        for record, outcome in _results(records, settings["num_procs"], work):
            seen += 1
            counts.source_order.setdefault(record.source)
            if seen % 1000 == 0:
                log.info("%d images processed (%.0f/s)", seen, seen / (time.perf_counter() - start))
            if outcome[0] == "ok":
                _, sha1, jpeg, original, size, fmt = outcome
                if sha1 in counts.first_key_of_hash:
                    outcome = ("skip", "duplicate", f"same image as {counts.first_key_of_hash[sha1]}")
            if outcome[0] == "skip":
                _, reason, detail = outcome
                counts.skip(record, reason, detail)
                continue
            counts.first_key_of_hash[sha1] = record.key
            key = counts.unique_key(record.key)
            split = "val" if hash_fraction(sha1) < settings["val_frac"] else "train"
            meta = {
                **record.meta,
                "source": record.source,
                "key": record.key,
                "sha1": sha1,
                "format": fmt,
                "original_size": list(original) if original else None,
                "size": list(size),
            }
            writers.write(
                split,
                {
                    "__key__": key,
                    "jpg": jpeg,
                    "txt": record.caption,
                    "json": json.dumps(meta, ensure_ascii=False, sort_keys=True),
                },
            )
            counts.per_source[record.source][split] += 1
            counts.several_captions += "captions" in record.meta
    finally:
        writers.close()
    return _stats(counts, seen, tmp, settings, time.perf_counter() - start)


def _stats(counts: _Counts, seen: int, tmp: Path, settings: dict[str, Any], seconds: float) -> dict[str, Any]:
    """stats.json of a build whose shards are in tmp, from `seen` records; DataError when none could be
    written."""
    per_source, skipped, examples = counts.per_source, counts.skipped, counts.examples
    totals = Counter()
    for source_counts in per_source.values():
        totals.update(source_counts)
    if not totals:
        reasons = ", ".join(f"{r} {n}" for r, n in skipped.most_common()) or "the input was empty"
        hint = f" (e.g. {examples[skipped.most_common(1)[0][0]][0]})" if skipped else ""
        raise DataError(f"no image-text pairs could be written: {reasons}{hint}")
    files = {split: sorted(p.name for p in tmp.glob(f"{split}-*.tar")) for split in ("train", "val")}
    sources = list(counts.source_order)  # in input order
    return {
        "total": {
            "train": totals["train"],
            "val": totals["val"],
            "skipped": sum(skipped.values()),
            "seen": seen,
        },
        "sources": {
            s: {
                "train": per_source[s]["train"],
                "val": per_source[s]["val"],
                "skipped": dict(counts.skipped_by_source[s]),
            }
            for s in sources
        },
        "shards": {split: len(names) for split, names in files.items()},
        "files": files,
        "patterns": {split: _brace_pattern(split, len(names)) for split, names in files.items() if names},
        "skipped": dict(skipped.most_common()),
        "skipped_examples": dict(examples),
        "several_captions": counts.several_captions,
        "seconds": round(seconds, 2),
        "images_per_second": round(seen / seconds, 1) if seconds > 0 else None,
        "settings": settings,
    }


def _brace_pattern(split: str, count: int) -> str:
    """`train-{000000..000005}.tar`, the form expand_urls and webdataset understand."""
    return f"{split}-000000.tar" if count == 1 else f"{split}-{{000000..{count - 1:06d}}}.tar"


# ---------------------------------------------------------------------------------------------
# The two inputs the `clip-data` command offers (its `demo` is clip_train/demo/build.py's)
# ---------------------------------------------------------------------------------------------


def write_folder(src: str | Path, out_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Shards from a folder of images with same-named .txt captions (recursive)."""
    return write_shards(folder_records(src), out_dir, **kwargs)


def write_manifest(
    path: str | Path,
    out_dir: str | Path,
    *,
    image_col: str,
    caption_col: str,
    sep: str = "auto",
    category_col: str = "",
    caption_sep: str = "",
    **kwargs: Any,
) -> dict[str, Any]:
    """Shards from a CSV, TSV or JSONL manifest (image paths relative to the manifest's folder);
    `category_col` fills each sample's json category (a class for zero-shot evaluation).

    Rows of the same image, and caption cells holding a list (JSONL) or texts joined by
    `caption_sep`, make one sample with several captions: its txt holds them one per line and its
    json `captions` lists them (as {text, weight} where weights were given); train on them with
    data.captions=txt-lines or json:captions (docs/data.md)."""
    records = manifest_records(
        path,
        image_col=image_col,
        caption_col=caption_col,
        sep=sep,
        category_col=category_col,
        caption_sep=caption_sep,
    )
    return write_shards(group_by_image(records), out_dir, **kwargs)
