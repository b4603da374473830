"""`clip-data inspect`: what a set of shards holds, looked at before training on it.

    report = inspect_shards("shards/demo", limit=None, samples=24, seed=0, sheet="inspect.png")
    print(format_report(report))

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
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from clip_train.data import DataError
from clip_train.data.pipeline import expand_urls
from clip_train.data.shards import DEFAULT_MAX_PIXELS, ImageTooLarge, open_image, to_rgb

log = logging.getLogger(__name__)

IMAGE_KEYS = "jpg;png;webp;jpeg"  # DataConfig.image_key's default
TEXT_KEY = "txt"  # DataConfig.text_key's default
META_FIELDS = ("source", "category")  # what clip-data writes into every sample's .json
PER_SHARD_ROWS = 12  # list every shard up to this many, else min/median/max per shard
TOP_VALUES = 15  # values of a metadata field printed (the JSON keeps up to JSON_TOP_VALUES)
JSON_TOP_VALUES = 1000
EXAMPLES_PER_REASON = 3
SMALLEST = 3  # images listed by name as the smallest
REPORT_WIDTH = 110  # long lines of values are wrapped to this

# the contact sheet: cells of a thumbnail with its key and wrapped caption underneath
THUMB = 160
PAD = 8
CAPTION_LINES = 4
FONT_SIZE = 12
LINE_HEIGHT = FONT_SIZE + 3
CELL_W = THUMB
CELL_H = THUMB + 4 + (1 + CAPTION_LINES) * LINE_HEIGHT  # thumbnail, gap, key line, caption lines
TITLE_H = LINE_HEIGHT + PAD


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
        # the first reason the training loader would give (pipeline._Prepare's order)
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
# The contact sheet
# ---------------------------------------------------------------------------------------------


def grid_shape(n: int) -> tuple[int, int]:
    """(columns, rows) for n cells: about 3 columns to 2 rows, a wide sheet for a landscape screen."""
    if n <= 0:
        return 0, 0
    cols = min(n, math.ceil(math.sqrt(n * 1.5)))
    return cols, math.ceil(n / cols)


def sheet_size(n: int) -> tuple[int, int]:
    cols, rows = grid_shape(n)
    return cols * CELL_W + (cols + 1) * PAD, TITLE_H + rows * CELL_H + (rows + 1) * PAD


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)  # Pillow's built-in FreeType font
    except (TypeError, OSError):  # Pillow < 10.1, or built without FreeType: the small bitmap font
        return ImageFont.load_default()


def _drawable(text: str, font: Any) -> str:
    # the bitmap fallback font encodes to Latin-1 and raises on anything else
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _fit(text: str, font: Any, width: int, *, from_left: bool = False) -> str:
    """`text` shortened with '...' until it fits `width` pixels (from_left keeps the end)."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength("..." + text if from_left else text + "...") > width:
        text = text[1:] if from_left else text[:-1]
    return "..." + text if from_left else text.rstrip() + "..."


def _wrap(caption: str, font: Any, width: int, lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels, at most `lines` lines, the last one ending in '...' when
    the caption goes on. Words longer than a line are cut by characters."""
    out: list[str] = []
    words = caption.split()
    while words and len(out) < lines:
        line = ""
        while words:
            candidate = f"{line} {words[0]}" if line else words[0]
            if font.getlength(candidate) <= width:
                line, words = candidate, words[1:]
            elif not line:  # one word wider than the cell: split it
                cut = 1
                while cut < len(words[0]) and font.getlength(words[0][: cut + 1]) <= width:
                    cut += 1
                line, words = words[0][:cut], [words[0][cut:], *words[1:]]
                break
            else:
                break
        out.append(line)
    if words:
        out[-1] = _fit(out[-1] + " " + " ".join(words), font, width)
    return out


def _thumbnail(data: bytes, max_pixels: int) -> Image.Image:
    img = open_image(data, max_pixels)
    if img.format == "JPEG":
        img.draft(None, (THUMB, THUMB))  # decode near thumbnail size
    img = to_rgb(img)
    img.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    return img


def write_sheet(
    chosen: list[tuple[str, str, bytes]], path: Path, title: str, max_pixels: int
) -> dict[str, Any]:
    """A PNG grid: each thumbnail centred in its square, its shard/key in grey and the caption
    wrapped below. Returns what was written (path, samples, columns, rows, size)."""
    cols, rows = grid_shape(len(chosen))
    size = sheet_size(len(chosen))
    sheet = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(sheet)
    font = _font()
    draw.text((PAD, PAD // 2), _drawable(_fit(title, font, size[0] - 2 * PAD), font), fill="black", font=font)
    for i, (where, caption, data) in enumerate(chosen):
        x = PAD + (i % cols) * (CELL_W + PAD)
        y = TITLE_H + PAD + (i // cols) * (CELL_H + PAD)
        draw.rectangle([x - 1, y - 1, x + THUMB, y + THUMB], outline=(200, 200, 200))
        try:
            thumb = _thumbnail(data, max_pixels)
            sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        except Exception:  # noqa: BLE001 - checked decodable once already; never fail the sheet on it
            draw.text((x + PAD, y + THUMB // 2), "(undecodable)", fill="red", font=font)
        ty = y + THUMB + 4
        draw.text((x, ty), _drawable(_fit(where, font, CELL_W, from_left=True), font), fill="gray", font=font)
        for j, line in enumerate(_wrap(_drawable(caption, font), font, CELL_W, CAPTION_LINES)):
            draw.text((x, ty + (j + 1) * LINE_HEIGHT), line, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, "PNG")
    return {"path": str(path.resolve()), "samples": len(chosen), "cols": cols, "rows": rows, "size": [*size]}


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


# ---------------------------------------------------------------------------------------------
# The printed report
# ---------------------------------------------------------------------------------------------


def _table(rows: list[tuple[str, dict[str, Any] | None]], scale: float = 1.0) -> list[str]:
    rows = [(label, stats) for label, stats in rows if stats]
    if not rows:
        return []
    columns = [c for c in rows[0][1] if c != "total"]
    lines = ["  " + " " * 12 + "".join(f"{c:>9}" for c in columns)]
    for label, stats in rows:
        cells = "".join(f"{_number(stats[c] / scale)!s:>9}" for c in columns)
        lines.append(f"  {label:<12}{cells}")
    return lines


def _human_bytes(n: int) -> str:
    value, unit = float(n), "bytes"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"


def _counts(counter: dict[str, int], total: int, *, limit: int = TOP_VALUES) -> list[str]:
    shown = [f"{value or '(empty)'} {n} ({n / total:.1%})" for value, n in list(counter.items())[:limit]]
    if len(counter) > limit:
        shown.append(f"+ {len(counter) - limit} more")
    return shown


def _wrapped(head: str, items: list[str]) -> list[str]:
    """`head` then the items joined by ', ', wrapped between items to REPORT_WIDTH."""
    lines = [head]
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        if len(lines[-1]) + 1 + len(piece) > REPORT_WIDTH and lines[-1].strip():
            lines.append("   ")
        lines[-1] += " " + piece
    return lines


def _shard_lines(report: dict[str, Any]) -> list[str]:
    shards = report["shards"]
    per_shard = shards["per_shard"]
    urls = [s["url"] for s in per_shard]
    folders = {os.path.dirname(u) for u in urls}
    short = len(folders) == 1 and not any(u.startswith("pipe:") or "://" in u for u in urls)
    where = f" in {folders.pop() or '.'}" if short else ""
    lines = [f"shards: {shards['count']}{where}"]
    if shards["count"] <= PER_SHARD_ROWS:
        for s in per_shard:
            name = os.path.basename(s["url"]) if short else s["url"]
            notes = [f"{s['bad']} bad"] if s["bad"] else []
            notes += [f"{s['tar_errors']} tar error(s)"] if s["tar_errors"] else []
            notes += [] if s["complete"] else ["--limit: stopped before the end"]
            note = f"  ({', '.join(notes)})" if notes else ""
            lines.append(f"  {name:<24}{s['samples']:>8} samples{note}")
        if shards["visited"] < shards["count"]:
            lines.append(f"  {shards['count'] - shards['visited']} shard(s) not read (--limit)")
    elif shards["samples_per_shard"]:
        per = shards["samples_per_shard"]
        what = "samples read per shard" if report["samples"]["limit"] else "samples per shard"
        lines.append(f"  {what}: min {per['min']}, median {per['median']}, max {per['max']}")
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The statistics as the few dozen lines `clip-data inspect` prints."""
    samples, shards = report["samples"], report["shards"]
    lines = _shard_lines(report)
    read = f"samples: {samples['read']} read, {samples['usable']} usable, {samples['bad']} bad"
    if samples["limit"]:
        read += (
            f" (--limit {samples['limit']}: {shards['visited']} of {shards['count']} shards visited, "
            f"{shards['complete']} read to the end)"
        )
    lines.append(read)
    total = max(1, samples["read"])
    if report["members"]:
        members = ", ".join(f".{ext} {n}" for ext, n in report["members"].items())
        layouts = report["layouts"]
        if len(layouts) == 1:
            members += f" (every sample: {next(iter(layouts))})"
        else:
            members += f"; layouts: {', '.join(_counts(layouts, total, limit=5))}"
        lines.append(f"members: {members}")

    captions = report["captions"]
    lines.append(f"captions: {captions['readable']} readable, {captions['empty']} empty")
    lines += _table([("characters", captions["chars"]), ("words", captions["words"])])

    images = report["images"]
    line = f"images: {images['readable_header']} with a readable header"
    if images["modes"]:
        line += f"; modes {', '.join(_counts(images['modes'], images['readable_header'], limit=5))}"
        line += f"; formats {', '.join(_counts(images['formats'], images['readable_header'], limit=5))}"
    lines.append(line)
    sides = [("width", images["width"]), ("height", images["height"]), ("long side", images["long_side"])]
    lines += _table(sides)
    if images["file_bytes"]:
        lines += _table([("file KiB", images["file_bytes"])], scale=1024)
        lines[-1] += f"   total {_human_bytes(images['file_bytes']['total'])}"
    # named only when far below the typical size: with all images alike they would be noise
    small = [
        f"{s['sample']} {s['width']}x{s['height']}"
        for s in images["smallest"]
        if max(s["width"], s["height"]) < images["long_side"]["median"] / 2
    ]
    if small:
        lines += _wrapped("  smallest:", small)

    meta = report["metadata"]
    for field in META_FIELDS:
        if meta[field]:
            counted = sum(meta[field].values())
            head = f"{field} (.json, {meta['distinct'][field]} distinct, {counted} samples):"
            lines += _wrapped(head, _counts(meta[field], counted))
    if meta["json_unreadable"]:
        lines.append(f".json: {meta['json_unreadable']} of {meta['json_samples']} are not valid JSON")

    bad = report["bad"]
    if bad["by_reason"]:
        reasons = ", ".join(f"{reason} {n}" for reason, n in bad["by_reason"].items())
        lines.append(f"bad samples (training skips them): {reasons}")
    else:
        lines.append("bad samples: none")
    if bad["tar_errors"]:
        lines.append("broken tars: " + ", ".join(f"{reason} {n}" for reason, n in bad["tar_errors"].items()))
    for reason in [*bad["by_reason"], *bad["tar_errors"]]:
        lines += [f"  e.g. {reason}: {example}" for example in bad["examples"].get(reason, [])]

    seconds = report["seconds"]
    rate = f" ({samples['read'] / seconds:.0f} samples/s)" if seconds > 0 else ""
    lines.append(f"read in {seconds:.1f} s{rate}")
    sheet = report["sheet"]
    if sheet:
        lines.append(
            f"contact sheet: {sheet['samples']} random usable samples (seed {sheet['seed']}), "
            f"{sheet['cols']} x {sheet['rows']}, written to {sheet['path']}"
        )
    elif report.get("sheet_requested"):
        lines.append("contact sheet: not written (no usable sample)")
    return "\n".join(lines)
