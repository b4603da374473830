"""`clip-data inspect`: what a set of shards holds, looked at before training on it.

    report = inspect_shards("shards/demo", limit=None, samples=24, seed=0, sheet="inspect.png")
    print(format_report(report))   # clip_train.data.inspection_report

Reads the tars through webdataset's own tar iterator and key grouping, so a sample here is exactly
a sample to the training pipeline, and judges each one by the pipeline's rules: the image is the
first of `jpg;png;webp;jpeg` present, the caption is `txt` decoded as UTF-8 with its whitespace
collapsed, the image goes through `open_image` (pixel cap) and `to_rgb`. A sample the training
loader would skip is counted under the first reason the loader would give; nothing here raises on
bad data. The statistics describe the data as stored: caption lengths cover every caption that
decodes (empty ones included), image sizes every image whose header reads (under the pixel cap).

Sizes come from the image header (PIL opens lazily); the decode that proves an image usable runs
at 1/8 scale for JPEGs (libjpeg's draft mode), so a large photo costs little. `limit` caps the
samples read: shards are visited in a seeded random order and each gives its share of the limit
from its start, so a capped look spreads over the whole set instead of its first shards.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import math
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import UnidentifiedImageError

from clip_train.data import DataError
from clip_train.data.contact_sheet import write_sheet
from clip_train.data.pipeline import expand_urls
from clip_train.data.shards import DEFAULT_MAX_PIXELS, ImageTooLarge, open_image, to_rgb

log = logging.getLogger(__name__)

IMAGE_KEYS = "jpg;png;webp;jpeg"  # DataConfig.image_key's default
TEXT_KEY = "txt"  # DataConfig.text_key's default
META_FIELDS = ("source", "category")  # what clip-data writes into every sample's .json
JSON_TOP_VALUES = 1000
EXAMPLES_PER_REASON = 3
SMALLEST = 3  # images listed by name as the smallest


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


class _ShardErrors:
    """The webdataset `handler=`: a broken tar (or a file twice under one key) is counted, and the
    reading goes on with what could be read."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def __call__(self, exn: Exception) -> bool:
        # webdataset appends streams and URLs to exn.args; the first argument is the message
        message = str(exn.args[0]) if exn.args else type(exn).__name__
        reason = "duplicate_file" if "duplicate file name" in message else "unreadable_shard"
        self.events.append((reason, f"{type(exn).__name__}: {message}"[:300]))
        return True


def _read_shard(url: str, handler: _ShardErrors) -> Iterator[dict[str, Any]]:
    """The samples of one shard (a path, or any URL webdataset's gopen opens, `pipe:` included)."""
    try:
        stream = wds.gopen(url)
    except Exception as e:  # noqa: BLE001 - an unopenable shard is counted like a broken one
        handler(e)
        return
    try:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        yield from wds.tariterators.group_by_keys(files, handler=handler)
    finally:
        # a `pipe:` closed before its end reports the SIGPIPE it caused: that is not an error here
        with contextlib.suppress(Exception):
            stream.close()


def _visit(urls: list[str], limit: int | None, seed: int, handler: _ShardErrors) -> Iterator[tuple]:
    """(url, sample, None) per sample, then (url, None, complete) at the end of each shard visited;
    complete is False when `limit` stopped the reading before the shard's end."""
    order = list(urls)
    if limit is not None:
        random.Random(f"shards/{seed}").shuffle(order)
    remaining = limit
    for i, url in enumerate(order):
        if remaining == 0:
            break
        samples = _read_shard(url, handler)
        if remaining is None:
            yield from ((url, s, None) for s in samples)
            yield url, None, True
            continue
        # an even share of what is left, so a small shard's shortfall passes to the shards after it
        quota = math.ceil(remaining / (len(order) - i))
        taken = 0
        for sample in itertools.islice(samples, quota):
            taken += 1
            yield url, sample, None
        complete = next(samples, None) is None  # one sample more tells whether the shard goes on
        samples.close()
        remaining -= taken
        yield url, None, complete


# ---------------------------------------------------------------------------------------------
# Judging one sample
# ---------------------------------------------------------------------------------------------


class _Tally:
    def __init__(self, image_keys: list[str], text_key: str, max_pixels: int):
        self.image_keys, self.text_key, self.max_pixels = image_keys, text_key, max_pixels
        self.shards: dict[str, dict[str, Any]] = {}
        self.members: Counter = Counter()
        self.layouts: Counter = Counter()
        self.chars: list[int] = []
        self.words: list[int] = []
        self.empty_captions = 0
        self.widths: list[int] = []
        self.heights: list[int] = []
        self.file_bytes: list[int] = []
        self.modes: Counter = Counter()
        self.smallest: list[tuple] = []  # a max-heap of (-long side, -index, where, width, height)
        self.formats: Counter = Counter()
        self.json_samples = 0
        self.json_unreadable = 0
        self.meta: dict[str, Counter] = {field: Counter() for field in META_FIELDS}
        self.read = 0
        # samples the training loader would skip, by reason (the names of pipeline.SKIP_REASONS)
        self.bad: Counter = Counter()
        self.tar_errors: Counter = Counter()  # broken tars: no sample to blame, counted apart
        self.examples: dict[str, list[str]] = defaultdict(list)

    def shard(self, url: str) -> dict[str, Any]:
        return self.shards.setdefault(
            url, {"url": url, "samples": 0, "bad": 0, "tar_errors": 0, "unreadable": False, "complete": False}
        )

    def _example(self, reason: str, where: str, detail: str) -> None:
        if len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append(f"{where}: {detail}")

    def tar_error(self, url: str, reason: str, detail: str) -> None:
        shard = self.shard(url)
        # webdataset reports a tar that breaks inside a member twice (its inner and outer loops);
        # the reading of a shard stops at its first break, so once per shard is the truth
        if reason == "unreadable_shard" and shard["unreadable"]:
            return
        shard["unreadable"] = shard["unreadable"] or reason == "unreadable_shard"
        shard["tar_errors"] += 1
        self.tar_errors[reason] += 1
        self._example(reason, os.path.basename(url), detail)

    def sample(self, url: str, sample: dict[str, Any]) -> tuple[str, bytes] | None:
        """Count one sample; return (caption, image bytes) when training would use it."""
        shard = self.shard(url)
        shard["samples"] += 1
        self.read += 1
        members = sorted(k for k in sample if not k.startswith("__"))
        self.members.update(members)
        self.layouts["+".join(members)] += 1
        caption, caption_problem = self._caption(sample.get(self.text_key))
        data = next((sample[k] for k in self.image_keys if k in sample), None)
        if "json" in sample:
            self._meta(sample["json"])
        # the first reason the training loader would give (pipeline_stages._Prepare's order)
        if data is None:
            problem = ("no_image", "no " + " or ".join(f".{k}" for k in self.image_keys))
        else:
            # measured even when the caption is already bad
            image_problem = self._image(data, f"{os.path.basename(url)}/{sample.get('__key__')}")
            problem = caption_problem or image_problem
        if problem:
            shard["bad"] += 1
            self.bad[problem[0]] += 1
            self._example(problem[0], f"{os.path.basename(url)} {sample.get('__key__')}", problem[1])
            return None
        return caption, data

    def _caption(self, raw: Any) -> tuple[str, tuple[str, str] | None]:
        if raw is None:
            return "", ("no_caption", f"no .{self.text_key}")
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as e:
            return "", ("caption_not_utf8", f"caption is not UTF-8 ({e.reason} at byte {e.start})")
        caption = " ".join(text.split())  # what the pipeline tokenizes
        self.chars.append(len(caption))
        self.words.append(len(caption.split()))
        if not caption:
            self.empty_captions += 1
            return "", ("empty_caption", "empty caption")
        return caption, None

    def _image(self, data: bytes, where: str) -> tuple[str, str] | None:
        self.file_bytes.append(len(data))
        try:
            img = open_image(data, self.max_pixels)
        except ImageTooLarge as e:
            return "image_too_large", str(e)
        except UnidentifiedImageError:  # its message holds a BytesIO's address: say it plainly
            return "undecodable_image", "UnidentifiedImageError: not an image format PIL knows"
        except Exception as e:  # noqa: BLE001 - whatever PIL raises, the header is unreadable
            return "undecodable_image", f"{type(e).__name__}: {e}"[:200]
        self.widths.append(img.width)
        self.heights.append(img.height)
        # the few smallest, by name: a 3x2 picture upscaled to the model's input is worth a look
        entry = (-max(img.size), -len(self.widths), where, img.width, img.height)
        if len(self.smallest) < SMALLEST:
            heapq.heappush(self.smallest, entry)
        elif entry > self.smallest[0]:
            heapq.heapreplace(self.smallest, entry)
        self.modes[img.mode] += 1
        self.formats[img.format or "?"] += 1
        try:
            if img.format == "JPEG":  # decode at 1/8 scale: every byte is still parsed
                img.draft(None, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
            to_rgb(img)
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file fails only here
            return "undecodable_image", f"{type(e).__name__}: {e}"[:200]
        return None

    def _meta(self, raw: bytes) -> None:
        self.json_samples += 1
        try:
            meta = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            self.json_unreadable += 1
            return
        if not isinstance(meta, dict):
            return
        for field in META_FIELDS:
            value = meta.get(field)
            if value is not None and not isinstance(value, (dict, list)):
                self.meta[field][str(value)] += 1


class _Reservoir:
    """A seeded uniform sample of `size` usable samples from a stream of unknown length."""

    def __init__(self, size: int, seed: int):
        self.size, self.rng = size, random.Random(f"sheet/{seed}")
        self.items: list[tuple[int, str, str, bytes]] = []
        self.seen = 0

    def offer(self, where: str, caption: str, data: bytes) -> None:
        if self.size <= 0:
            return
        if len(self.items) < self.size:
            self.items.append((self.seen, where, caption, data))
        else:
            j = self.rng.randrange(self.seen + 1)
            if j < self.size:
                self.items[j] = (self.seen, where, caption, data)
        self.seen += 1

    def chosen(self) -> list[tuple[str, str, bytes]]:
        return [item[1:] for item in sorted(self.items)]  # in reading order, for a stable layout


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else round(float(x), 1)


def _describe(values: list[int], *, mean: bool = True) -> dict[str, int | float] | None:
    if not values:
        return None
    a = np.asarray(values)
    out = {"min": _number(a.min()), "median": _number(np.median(a))}
    if mean:
        out["mean"] = _number(a.mean())
    out.update(p95=_number(np.percentile(a, 95)), max=_number(a.max()))
    return out


def _top(counter: Counter, n: int = JSON_TOP_VALUES) -> dict[str, int]:
    return dict(counter.most_common(n))


def _summary(tally: _Tally, spec: str, urls: list[str], limit: int | None, seconds: float) -> dict[str, Any]:
    shards = [tally.shards[u] for u in dict.fromkeys(urls) if u in tally.shards]  # a URL given twice: one row
    bad = sum(tally.bad.values())
    long_sides = [max(w, h) for w, h in zip(tally.widths, tally.heights)]
    file_bytes = _describe(tally.file_bytes)
    if file_bytes:
        file_bytes["total"] = int(sum(tally.file_bytes))
    return {
        "shards_spec": spec,
        "shards": {
            "count": len(urls),
            "visited": len(shards),
            "complete": sum(s["complete"] for s in shards),
            "samples_per_shard": _describe([s["samples"] for s in shards], mean=False),
            "per_shard": shards,
        },
        "samples": {"read": tally.read, "usable": tally.read - bad, "bad": bad, "limit": limit},
        "members": _top(tally.members),
        "layouts": _top(tally.layouts),
        "captions": {
            "readable": len(tally.chars),
            "empty": tally.empty_captions,
            "chars": _describe(tally.chars),
            "words": _describe(tally.words),
        },
        "images": {
            "readable_header": len(tally.widths),
            "width": _describe(tally.widths, mean=False),
            "height": _describe(tally.heights, mean=False),
            "long_side": _describe(long_sides, mean=False),
            "modes": _top(tally.modes),
            "formats": _top(tally.formats),
            "file_bytes": file_bytes,
            "smallest": [
                {"sample": where, "width": w, "height": h}
                for *_, where, w, h in sorted(tally.smallest, reverse=True)
            ],
        },
        "metadata": {
            "json_samples": tally.json_samples,
            "json_unreadable": tally.json_unreadable,
            **{field: _top(tally.meta[field]) for field in META_FIELDS},
            "distinct": {field: len(tally.meta[field]) for field in META_FIELDS},
        },
        "bad": {
            "by_reason": dict(tally.bad.most_common()),
            "tar_errors": dict(tally.tar_errors.most_common()),
            "examples": dict(tally.examples),
        },
        "seconds": round(seconds, 2),
    }


# ---------------------------------------------------------------------------------------------
# The whole inspection
# ---------------------------------------------------------------------------------------------


def inspect_shards(
    spec: str,
    *,
    split: str | None = None,
    limit: int | None = None,
    samples: int = 24,
    seed: int = 0,
    sheet: str | Path | None = "inspect.png",
    image_key: str = IMAGE_KEYS,
    text_key: str = TEXT_KEY,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """Read the shards of `spec` (anything expand_urls accepts), write the contact sheet of
    `samples` random usable samples to `sheet` (None or samples=0: none), and return the statistics.

    Raises DataError for missing shards or bad settings, before anything is read or written.
    """
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be at least 1, got {limit}")
    if samples < 0:
        raise DataError(f"--samples must be 0 or more, got {samples}")
    sheet_path = Path(sheet) if sheet is not None and samples > 0 else None
    if sheet_path is not None and sheet_path.is_dir():
        raise DataError(f"--sheet {sheet_path} is a folder: pass a file, e.g. {sheet_path / 'inspect.png'}")
    urls = expand_urls(spec, split=split)
    start = time.perf_counter()
    handler = _ShardErrors()
    tally = _Tally([k.strip().lower() for k in image_key.split(";") if k.strip()], text_key, max_pixels)
    reservoir = _Reservoir(samples if sheet_path is not None else 0, seed)
    events_seen = 0
    for url, sample, complete in _visit(urls, limit, seed, handler):
        # a broken tar is reported through the handler while its shard is being read
        for reason, detail in handler.events[events_seen:]:
            tally.tar_error(url, reason, detail)
        events_seen = len(handler.events)
        if sample is None:
            tally.shard(url)["complete"] = complete
            continue
        usable = tally.sample(url, sample)
        if usable is not None:
            reservoir.offer(f"{os.path.basename(url)}/{sample['__key__']}", *usable)
        if tally.read % 10_000 == 0:
            log.info("%d samples read (%.0f/s)", tally.read, tally.read / (time.perf_counter() - start))
    report = _summary(tally, spec, urls, limit, time.perf_counter() - start)
    report["sheet"], report["sheet_requested"] = None, sheet_path is not None
    if sheet_path is not None and reservoir.items:
        title = f"{len(reservoir.items)} random usable samples of {reservoir.seen} (seed {seed}) from {spec}"
        report["sheet"] = {**write_sheet(reservoir.chosen(), sheet_path, title, max_pixels), "seed": seed}
    return report
