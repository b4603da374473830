"""The contact sheet of `clip-data inspect` (inspection.py): a PNG grid of sample thumbnails, each with
its shard/key and wrapped caption underneath."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from clip_train.data.shards import open_image, to_rgb

# the contact sheet: cells of a thumbnail with its key and wrapped caption underneath
THUMB = 160
PAD = 8
CAPTION_LINES = 4
FONT_SIZE = 12
LINE_HEIGHT = FONT_SIZE + 3
CELL_W = THUMB
CELL_H = THUMB + 4 + (1 + CAPTION_LINES) * LINE_HEIGHT  # thumbnail, gap, key line, caption lines
TITLE_H = LINE_HEIGHT + PAD


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
