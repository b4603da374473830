"""Iterators over the three real demo sources: Tux Paint stamps, Fluent Emoji 3D and OpenClipart.

Each yields clip_train.data.sources' `Record`s. Images that a source leaves out *by rule* (Tux
Paint alphabets, emoji skin-tone variants, OpenClipart's icon folders and symlinks) are not yielded
at all: they are not data errors. The demo sources are described in reference/offline-data.md;
each function checks its input eagerly (so a missing package fails before any work starts) and
then returns a generator.
"""

from __future__ import annotations

import html
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from clip_train.data import DataError
from clip_train.data.sources import Record, _clean, svg_supported

TUXPAINT_DIR = Path("/usr/share/tuxpaint/stamps")
OPENCLIPART_PNG_DIR = Path("/usr/share/openclipart/png")
OPENCLIPART_SVG_DIR = Path("/usr/share/openclipart/svg")
DEMO_SOURCES = ("tuxpaint", "emoji", "openclipart")


def _first_line(path: Path) -> str | None:
    """The first line of a caption file, or None when there is no such file."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            return _clean(f.readline())
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------
# Tux Paint stamps
# ---------------------------------------------------------------------------------------------


def tuxpaint_records(root: str | Path = TUXPAINT_DIR, *, svg: bool | None = None) -> Iterator[Record]:
    """Tux Paint stamps: `<category path>/<name>.png` captioned by the first line of `<name>.txt`.

    The later lines of the .txt are translations (`xx.utf8=...`) and are ignored. `symbols/alphabets`
    (letters, no useful captions) is left out. SVG-only stamps are included when `rsvg-convert` is
    on PATH (svg=None detects it); when a stamp exists as both PNG and SVG the PNG is used.
    `*_mirror.png` stamps have no .txt of their own and end up counted as `no_caption`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"Tux Paint stamps not found at {root}: install them with "
            "`apt-get install -y tuxpaint-stamps-default` (or leave tuxpaint out of --sources)"
        )
    use_svg = svg_supported() if svg is None else svg

    def generate() -> Iterator[Record]:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if path.suffix not in (".png", ".svg") or rel.parts[:2] == ("symbols", "alphabets"):
                continue
            if path.suffix == ".svg" and (not use_svg or path.with_suffix(".png").exists()):
                continue
            if path.is_symlink() or not path.is_file():
                continue
            caption = _first_line(path.with_suffix(".txt"))
            meta = {"category": rel.parent.as_posix(), "path": str(path)}
            yield Record("tuxpaint", "tuxpaint/" + rel.with_suffix("").as_posix(), str(path), caption, meta)

    return generate()


# ---------------------------------------------------------------------------------------------
# Fluent Emoji 3D (npm @lobehub/fluent-emoji-3d)
# ---------------------------------------------------------------------------------------------

_SKIN_TONES = range(0x1F3FB, 0x1F400)  # Fitzpatrick modifiers: the variants of a base emoji
_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
_TAG_CANCEL = 0xE007F
_VS16 = 0xFE0F  # emoji presentation selector: file names use it inconsistently


def _emoji_assets(package: Path) -> list[tuple[str, str | bytes, str]]:
    """(file name, path or bytes, origin) of every .webp under `assets/`, from a .tgz or a folder."""
    found: list[tuple[str, str | bytes, str]] = []
    if package.is_file():
        try:
            with tarfile.open(package, "r:*") as tar:
                for member in tar:
                    if member.isfile() and re.search(r"(^|/)assets/[^/]+\.webp$", member.name):
                        data = tar.extractfile(member).read()
                        found.append((member.name.rsplit("/", 1)[1], data, f"{package}:{member.name}"))
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(
                f"cannot read the emoji package {package} as a .tgz ({e}); "
                "pass the file from `npm pack @lobehub/fluent-emoji-3d` or its extracted folder"
            ) from None
    else:
        for folder in (package / "package" / "assets", package / "assets", package):
            if folder.is_dir() and any(folder.glob("*.webp")):
                found = [(p.name, str(p), str(p)) for p in folder.glob("*.webp")]
                break
    if not found:
        raise DataError(
            f"no emoji .webp files found in {package}: pass the .tgz from "
            "`npm pack @lobehub/fluent-emoji-3d` or the folder it extracts to"
        )
    return sorted(found, key=lambda item: item[0])


def _emoji_caption(codepoints: list[int], emoji_data: dict) -> str | None:
    text = "".join(map(chr, codepoints))
    plain = text.replace(chr(_VS16), "")
    # the package writes tag sequences (flags of England, Scotland, Wales) without the cancel tag,
    # and some names with or without VS16, so try the spellings EMOJI_DATA may know
    for candidate in (
        text,
        plain,
        text + chr(_TAG_CANCEL),
        plain + chr(_TAG_CANCEL),
        plain[:1] + chr(_VS16) + plain[1:],
    ):
        if candidate in emoji_data:
            name = emoji_data[candidate]["en"]
            break
    else:
        return None
    words = _clean(name.strip(":").replace("_", " "))
    # country and region flags are named by the country alone (":Japan:"); the picture is a flag
    is_flag = (len(codepoints) == 2 and all(c in _REGIONAL_INDICATORS for c in codepoints)) or (
        codepoints[0] == 0x1F3F4 and len(codepoints) > 1 and 0xE0000 <= codepoints[1] <= _TAG_CANCEL
    )
    return f"flag of {words}" if is_flag else words


def emoji_records(package: str | Path) -> Iterator[Record]:
    """Fluent Emoji 3D renders, base emoji only, captioned with the emoji's CLDR name.

    `package` is the .tgz from `npm pack @lobehub/fluent-emoji-3d` or the folder it extracts to.
    File names are hex code points joined by '-' (tag sequences by '_'). Skin-tone variants are
    left out, and so are the few files that spell the same emoji twice (`33-fe0f-20e3` next to
    `0033-fe0f-20e3`, with and without VS16): the first in sorted order is kept. The category is
    left empty: the `emoji` package has no categories (they live in npm emoji-datasource-google).
    """
    try:
        import emoji  # PyPI `emoji`: the names of the code point sequences
    except ImportError:
        raise DataError("the emoji source needs the PyPI package `emoji`: pip install emoji") from None
    package = Path(package)
    if not package.exists():
        raise DataError(
            f"Fluent Emoji 3D package not found at {package}: run "
            "`npm pack @lobehub/fluent-emoji-3d` and pass the .tgz (or its extracted folder)"
        )
    assets = _emoji_assets(package)

    def generate() -> Iterator[Record]:
        seen: set[tuple[int, ...]] = set()
        for name, image, origin in assets:
            stem = name[: -len(".webp")]
            try:
                codepoints = [int(part, 16) for part in re.split(r"[-_]", stem)]
            except ValueError:
                codepoints = []
            if any(c in _SKIN_TONES for c in codepoints):
                continue
            identity = tuple(c for c in codepoints if c != _VS16)
            if identity and identity in seen:
                continue
            seen.add(identity)
            caption = _emoji_caption(codepoints, emoji.EMOJI_DATA) if codepoints else None
            meta = {"category": "", "codepoints": stem, "path": origin}
            yield Record("emoji", "emoji/" + stem, image, caption, meta)

    return generate()


# ---------------------------------------------------------------------------------------------
# OpenClipart 0.18 (Debian openclipart-png + openclipart-svg)
# ---------------------------------------------------------------------------------------------

OPENCLIPART_EXCLUDE = ("computer", "shapes", "buttons")  # icons and geometric shapes, not pictures
_WORK = re.compile(rb"<cc:Work\b.*?</cc:Work>", re.S)
_AGENT = re.compile(rb"<cc:Agent\b.*?</cc:Agent>", re.S)  # publisher/creator titles are not the title
_TITLE = re.compile(rb"<dc:title>(.*?)</dc:title>", re.S)
_SUBJECT = re.compile(rb"<dc:subject>(.*?)</dc:subject>", re.S)
_LI = re.compile(rb"<rdf:li>(.*?)</rdf:li>", re.S)
# "Clipart by Nicu Buculei - pear" is a template title, often copied onto other drawings
# (cherries.png carries it), so the file name describes the picture better
_NOISE_TITLE = re.compile(r"^\s*clip\s*-?arts?\s+by\b", re.I)
# tags that describe the collection, the upload or nothing at all
_NOISE_KEYWORDS = {
    "",
    "hash",
    "unsorted",
    "mapsym",
    "united nations member",
    "signs and symbols",
    "clip art",
    "clipart",
    "media",
    "image",
    "png",
    "svg",
    "public domain",
    "externalsource",
}
_MAX_KEYWORDS = 6
# a title shared by this many files names a series ("card", "AIGA_Symbol_Signs", "Various Cliparts"),
# so the file name is added to tell the pictures apart
_SERIES_TITLE_MIN = 8


_CREATOR = re.compile(rb"<dc:(?:creator|rights)>.*?<dc:title>(.*?)</dc:title>", re.S)


class _ClipartMeta(NamedTuple):
    title: str | None
    keywords: list[str]
    creators: set[str]  # lower-case words of the author names (file names often carry them)


def _svg_metadata(svg: Path) -> _ClipartMeta:
    """dc:title, dc:subject keywords and creator names from the drawing's <cc:Work> block, read
    without an XML parser (the metadata sits near the top; some files are megabytes of paths)."""
    try:
        data = svg.read_bytes()
    except OSError:
        return _ClipartMeta(None, [], set())
    work = _WORK.search(data)
    if not work:
        return _ClipartMeta(None, [], set())

    def text(raw: bytes) -> str:
        return _clean(html.unescape(raw.decode("utf-8", "replace")).replace("_", " "))

    creators = {
        w.lower() for name in _CREATOR.findall(work.group(0)) for w in re.split(r"\W+", text(name)) if w
    }
    block = _AGENT.sub(b"", work.group(0))
    title = _TITLE.search(block)
    subject = _SUBJECT.search(block)
    keywords = [text(k) for k in _LI.findall(subject.group(1))] if subject else []
    return _ClipartMeta(text(title.group(1)) if title else None, keywords, creators)


def file_name_words(stem: str, drop: set[str] = frozenset()) -> list[str]:
    """`phone_handset_gray_einar_01` -> ["phone", "handset", "gray"] when "einar" is in `drop`;
    camelCase is split ("MatieresNocives" -> ["Matieres", "Nocives"]) and numbers are dropped."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", stem)
    words = [re.sub(r"(?<=[^\W\d_])\d+$", "", w) for w in re.split(r"[\s_.\-]+", spaced)]  # clock12 -> clock

    def dropped(word: str) -> bool:  # file names cut author names short: "francesc" for Francesco
        low = word.lower()
        return low in drop or (len(low) >= 4 and any(d.startswith(low) for d in drop))

    return [w for w in words if w and not w.isdigit() and not dropped(w)]


def openclipart_caption(meta: _ClipartMeta, stem: str, series: bool) -> str:
    """Caption "title. keyword, keyword", with noise titles replaced by the file name's words."""
    title = meta.title
    if not title or not re.search(r"[^\W\d_]", title) or _NOISE_TITLE.match(title):
        head = " ".join(file_name_words(stem, meta.creators)) or stem
    elif series:
        # the words of the file name that the series title does not already say
        known = meta.creators | {w.lower() for w in re.split(r"\W+", title)}
        extra = [w for w in file_name_words(stem, known) if len(w) > 2 and w.lower() not in known]
        head = f"{' '.join(extra)} ({title})" if extra else title
    else:
        head = title
    kept: list[str] = []
    seen = {head.lower(), (title or "").lower()}
    for keyword in meta.keywords:
        low = keyword.lower()
        words = set(re.split(r"\W+", low)) - {""}
        if (
            low in _NOISE_KEYWORDS
            or low in seen
            or low.startswith(("hash(", "0x"))
            or re.search(rf"\b{re.escape(low)}\b", head.lower())  # already said
            or words <= meta.creators  # the author's name as a tag
            or (len(keyword) > 30 and " " not in keyword)
        ):  # run-together tag soup
            continue
        seen.add(low)
        kept.append(keyword)
    kept = kept[:_MAX_KEYWORDS]
    return f"{head}. {', '.join(kept)}" if kept else head


def openclipart_records(
    png_root: str | Path = OPENCLIPART_PNG_DIR,
    svg_root: str | Path = OPENCLIPART_SVG_DIR,
    *,
    exclude: tuple[str, ...] = OPENCLIPART_EXCLUDE,
) -> Iterator[Record]:
    """OpenClipart PNG renders captioned from the metadata of the SVG at the same path.

    Symlinked PNGs (the same drawing filed twice) are skipped, and so are the top folders in
    `exclude`. The category is the top folder ("animals", "food", ...).
    """
    png_root, svg_root = Path(png_root), Path(svg_root)
    for folder, package in ((png_root, "openclipart-png"), (svg_root, "openclipart-svg")):
        if not folder.is_dir():
            raise DataError(
                f"OpenClipart not found at {folder}: install it with "
                f"`apt-get install -y {package}` (or leave openclipart out of --sources)"
            )

    def generate() -> Iterator[Record]:
        items = []
        for dirpath, dirnames, filenames in os.walk(png_root):  # does not follow symlinked folders
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(png_root)
            if rel_dir.parts and rel_dir.parts[0] in exclude:
                dirnames.clear()
                continue
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if name.endswith(".png") and not path.is_symlink():
                    rel = rel_dir / name
                    items.append((path, rel, _svg_metadata((svg_root / rel).with_suffix(".svg"))))
        # a first pass over the metadata (about a second) to find the series titles
        title_counts = Counter(meta.title.lower() for _, _, meta in items if meta.title)
        for path, rel, clipart in items:
            series = bool(clipart.title) and title_counts[clipart.title.lower()] >= _SERIES_TITLE_MIN
            caption = openclipart_caption(clipart, rel.stem, series)
            meta = {"category": rel.parts[0] if len(rel.parts) > 1 else "", "path": str(path)}
            yield Record(
                "openclipart", "openclipart/" + rel.with_suffix("").as_posix(), str(path), caption, meta
            )

    return generate()


def demo_records(
    sources: list[str] | tuple[str, ...] = DEMO_SOURCES, *, emoji_package: str | Path | None = None
) -> list[Iterator[Record]]:
    """The named demo sources, checked up front, as one iterator each (chain them to write)."""
    unknown = [s for s in sources if s not in DEMO_SOURCES]
    if unknown:
        raise DataError(f"unknown demo source {', '.join(unknown)}: choose from {', '.join(DEMO_SOURCES)}")
    iterators = []
    for name in sources:
        if name == "tuxpaint":
            iterators.append(tuxpaint_records())
        elif name == "emoji":
            if emoji_package is None:
                raise DataError(
                    "the emoji source needs --emoji-package PATH (the .tgz from "
                    "`npm pack @lobehub/fluent-emoji-3d` or its extracted folder), "
                    "or leave emoji out of --sources"
                )
            iterators.append(emoji_records(emoji_package))
        else:
            iterators.append(openclipart_records())
    return iterators
