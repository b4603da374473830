"""Iterators over image-text sources: the record every source yields, and the user-data layouts (a
folder of image + caption pairs, a CSV/TSV/JSONL manifest). The real demo sources are
clip_train/demo/sources.py's.

Every source yields `Record(source, key, image, caption, meta)` where `image` is a file path or
the encoded bytes, `caption` is None when the source has no caption for that image (the shard
writer counts those as `no_caption` rather than the source dropping them silently), and `meta`
holds at least `category` and `path` (where the image came from, for stats and debugging).
Each function checks its input eagerly (so a missing file fails before any work starts) and then
returns a generator.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from clip_train.data import DataError

# what the folder writer picks up; .svg is added when rsvg-convert can rasterise it
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class Record(NamedTuple):
    source: str
    key: str
    image: str | bytes  # a file path, or the encoded image itself
    caption: str | None  # None: the source has no caption for this image
    meta: dict[str, Any]


def svg_supported() -> bool:
    """SVGs are rasterised with librsvg's `rsvg-convert` (Debian librsvg2-bin) when it is on PATH."""
    return shutil.which("rsvg-convert") is not None


def _clean(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# User data: a folder of image + caption pairs, a CSV/TSV/JSONL manifest
# ---------------------------------------------------------------------------------------------


def folder_records(root: str | Path, *, source: str = "folder") -> Iterator[Record]:
    """Every image under `root` (recursive) with the caption in the same-named `.txt`.

    The whole .txt is the caption (whitespace collapsed); the category is the image's folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"image folder {root} does not exist: pass a folder of images with same-named .txt captions"
        )
    suffixes = IMAGE_SUFFIXES + ((".svg",) if svg_supported() else ())
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
    if not paths:
        raise DataError(f"no images found in {root} (looked for {' '.join(suffixes)} files, recursively)")

    def generate() -> Iterator[Record]:
        for path in paths:
            rel = path.relative_to(root)
            try:
                caption = _clean(path.with_suffix(".txt").read_text(encoding="utf-8-sig", errors="replace"))
            except FileNotFoundError:
                caption = None
            meta = {"category": rel.parent.as_posix() if rel.parent != Path(".") else "", "path": str(path)}
            yield Record(source, rel.with_suffix("").as_posix(), str(path), caption, meta)

    return generate()


def _manifest_format(path: Path, sep: str) -> str:
    """Return "jsonl" or the field separator of a CSV/TSV file."""
    if sep not in ("auto", ""):
        return {"tab": "\t", "\\t": "\t", "comma": ",", "jsonl": "jsonl"}.get(sep, sep)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        header = f.readline()
    if header.lstrip().startswith("{"):
        return "jsonl"
    # The header decides: the separator that splits it into the most columns (a ".csv" written by a
    # spreadsheet in many locales uses ";"), the extension's own on a tie.
    preferred = "\t" if suffix in (".tsv", ".tab") else ","
    counts = {sep: header.count(sep) for sep in (preferred, ",", "\t", ";", "|")}
    best = max(counts, key=lambda sep: counts[sep])  # first maximum: the preferred one on a tie
    return best if counts[best] > 0 else preferred


def _manifest_rows(path: Path, fmt: str) -> tuple[list[str], Iterator[tuple[int, dict]]]:
    """(column names, iterator of (line number, row)) of a manifest."""
    if fmt == "jsonl":
        rows = []
        with open(path, encoding="utf-8-sig") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{line_no} is not valid JSON ({e.msg}): "
                        "a JSONL manifest holds one JSON object per line"
                    ) from None
                if not isinstance(row, dict):
                    raise DataError(
                        f"{path}:{line_no} is not a JSON object: "
                        "a JSONL manifest holds one JSON object per line"
                    )
                rows.append((line_no, row))
        columns = list(dict.fromkeys(k for _, row in rows for k in row))
        return columns, iter(rows)
    text = path.read_text(encoding="utf-8-sig")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=fmt)
    columns = list(reader.fieldnames or [])
    return columns, ((reader.line_num, row) for row in reader)


def manifest_records(
    path: str | Path,
    *,
    image_col: str,
    caption_col: str,
    sep: str = "auto",
    source: str = "manifest",
    category_col: str = "",
    caption_sep: str = "",
) -> Iterator[Record]:
    """Rows of a CSV, TSV or JSONL manifest: `image_col` holds an image path (relative to the
    manifest's folder unless absolute), `caption_col` the caption. `sep="auto"`: .jsonl/.json files and
    files whose first line is a JSON object are JSONL; otherwise the header line decides the separator
    (the one among , tab ; | that splits it into the most columns; the extension's own on a tie).

    A caption cell may hold several captions: a JSONL list (of strings or {"text", "weight"}), or
    a text split at `caption_sep`; such a record's caption is its captions one per line, and
    meta["captions"] lists them (with their weights, where any was given)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist: pass a CSV, TSV or JSONL file")
    try:
        fmt = _manifest_format(path, sep)
        columns, rows = _manifest_rows(path, fmt)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read manifest {path} ({e}): it must be UTF-8 CSV, TSV or JSONL") from None
    wanted = [("--image-col", image_col), ("--caption-col", caption_col), ("--category-col", category_col)]
    for flag, column in wanted:
        if column and column not in columns:
            shown = ", ".join(repr(c) for c in columns[:12]) or "none"
            sep_name = {"\t": "tab", ",": "comma", "jsonl": "jsonl"}.get(fmt, repr(fmt))
            hint = f"pass {flag} with one of them"
            if fmt != "jsonl" and len(columns) == 1:
                hint = f"read with separator {sep_name} that is one column: pass --sep (tab, comma, ';', '|')"
            raise DataError(f"manifest {path} has no column {column!r} (columns found: {shown}); {hint}")
    base = path.parent

    def generate() -> Iterator[Record]:
        try:
            for line_no, row in rows:
                image = str(row.get(image_col) or "").strip()
                try:
                    caption, captions = _row_captions(row.get(caption_col), caption_sep)
                except ValueError as e:
                    raise DataError(f"{path}:{line_no}: {e}: fix the {caption_col!r} column") from None
                image_path = Path(image) if Path(image).is_absolute() else base / image
                category = _clean(str(row.get(category_col) or "")) if category_col else ""
                meta = {"category": category, "path": str(image_path), "line": line_no}
                if captions:
                    meta["captions"] = captions
                key = Path(image).with_suffix("").as_posix() if Path(image).name else f"line{line_no}"
                yield Record(source, key, str(image_path), caption, meta)
        except csv.Error as e:  # the CSV rows are parsed lazily
            raise DataError(f"cannot parse manifest {path} ({e}): check its quoting or pass --sep") from None

    return generate()


# ---------------------------------------------------------------------------------------------
# Several captions per image (read back by clip_train/data/captions.py)
# ---------------------------------------------------------------------------------------------


def _row_captions(value: Any, caption_sep: str) -> tuple[str | None, list | None]:
    """A manifest cell -> (the record's caption, meta["captions"] or None when it holds one)."""
    if value is None:
        return None, None
    if isinstance(value, list):
        items = value
    elif caption_sep:
        items = str(value).split(caption_sep)
    else:
        return _clean(str(value)), None
    captions: list = []
    for item in items:
        if isinstance(item, dict) and "text" in item:
            text = _clean(str(item["text"]))
            weight = item.get("weight", 1.0)
            if (
                isinstance(weight, bool)
                or not isinstance(weight, int | float)
                or not 0 <= weight < float("inf")
            ):
                raise ValueError(f"caption weight {weight!r} is not a number >= 0")
            if text:
                captions.append({"text": text, "weight": weight})
        elif _clean(str(item)):
            captions.append(_clean(str(item)))
    return _multi_caption(captions)


def _multi_caption(captions: list) -> tuple[str, list | None]:
    texts = [c["text"] if isinstance(c, dict) else c for c in captions]
    if len(texts) <= 1:
        return (texts[0] if texts else ""), None
    if not any(isinstance(c, dict) for c in captions):
        return "\n".join(texts), texts
    weighted = [c if isinstance(c, dict) else {"text": c, "weight": 1.0} for c in captions]
    return "\n".join(texts), weighted


def record_captions(record: Record) -> list:
    """A record's captions: meta["captions"] (strings or {text, weight}), else its one caption."""
    if "captions" in record.meta:
        return list(record.meta["captions"])
    return [] if record.caption is None or not record.caption.strip() else [record.caption]


def group_by_image(records: Iterable[Record]) -> Iterator[Record]:
    """Records of the same image file (repeated manifest rows) as one record with all their
    captions, in order of first appearance; the first record's key and meta stand for the image."""
    first: dict[str, Record] = {}
    captions: dict[str, list] = {}
    for record in records:
        image = os.path.normpath(record.image) if isinstance(record.image, str) else record.key
        first.setdefault(image, record)
        captions.setdefault(image, []).extend(record_captions(record))
    for image, record in first.items():
        texts = captions[image]
        if not texts:  # no caption at all: the writer counts it (no_caption / empty_caption)
            yield record
            continue
        caption, listed = _multi_caption(texts)
        meta = {k: v for k, v in record.meta.items() if k != "captions"}
        yield record._replace(caption=caption, meta={**meta, "captions": listed} if listed else meta)
