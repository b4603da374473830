"""`clip-data`: build image-text shards once, before training.

    clip-data demo --out shards/demo --emoji-package fluent-emoji-3d.tgz
    clip-data folder photos/ --out shards/photos
    clip-data manifest pairs.csv --image-col file --caption-col text --out shards/pairs
    clip-data inspect shards/demo --sheet inspect.png     # statistics and a contact sheet, reads only

Re-running is cheap: when the output folder already holds a finished build (its stats.json), the
command says so and exits 0 without touching it, unless --overwrite is given.

`demo` is not this module's: it knows folders and manifests, and main() takes further sub-commands
from the packages above it (cli.py passes clip_train/demo/build.py's), each an `add(commands,
common)` that adds its sub-parser with the shared build options and `set_defaults(write=...)`, a
function (args, settings) -> stats called in place of write_folder or write_manifest; or, for a
command that builds no shards from images (`teacher`, train/teacher_shards.py), `set_defaults(run=...)`,
a function (args) -> exit code that main() hands the parsed arguments to.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from clip_train.data import DataError
from clip_train.errors import fail

PROG = "clip-data"
# a sub-command from a package above this one: add(commands, common), see the module docstring
AddCommand = Callable[[argparse._SubParsersAction, argparse.ArgumentParser], None]


def _parser(extra: Sequence[AddCommand] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Write image-text pairs as webdataset tar shards."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, type=Path, help="output folder (created atomically)")
    common.add_argument("--max-size", type=int, default=256, help="longer image side in pixels (default 256)")
    common.add_argument("--val-frac", type=float, default=0.08, help="fraction held out by content hash")
    common.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    common.add_argument("--workers", type=int, default=2, help="decode processes (default 2)")
    common.add_argument("--jpeg-quality", type=int, default=90)
    common.add_argument("--overwrite", action="store_true", help="rebuild even if OUT already holds shards")

    for add in extra:
        add(commands, common)

    folder = commands.add_parser(
        "folder", parents=[common], help="a folder of images with same-named .txt captions"
    )
    folder.add_argument("src", type=Path)

    manifest = commands.add_parser(
        "manifest", parents=[common], help="a CSV, TSV or JSONL file of image paths and captions"
    )
    manifest.add_argument("file", type=Path)
    manifest.add_argument("--image-col", required=True, help="column with the image path")
    manifest.add_argument("--caption-col", required=True, help="column with the caption")
    manifest.add_argument(
        "--category-col", default="", help="optional column stored as the sample's json category (a class)"
    )
    manifest.add_argument(
        "--caption-sep",
        default="",
        metavar="TEXT",
        help="split each caption cell at TEXT into several captions of its image (e.g. '|'); rows of "
        "the same image and JSONL lists give several captions too",
    )
    manifest.add_argument(
        "--sep",
        default="auto",
        help="auto (JSONL by extension or a JSON first line, else the separator that splits the header "
        "into the most columns), tab, comma, jsonl or a character",
    )

    # reads shards and writes no shards: not a child of `common` (no --out, no stats.json check)
    inspect = commands.add_parser(
        "inspect", help="statistics of existing shards, bad samples, and a contact sheet of samples"
    )
    inspect.add_argument(
        "shards", help="a folder of .tar shards, a brace pattern, a glob, pipe: URLs, several joined by '::'"
    )
    inspect.add_argument("--split", choices=["train", "val"], help="only this split of a clip-data folder")
    inspect.add_argument("--limit", type=int, metavar="N", help="read at most N samples, spread over shards")
    inspect.add_argument("--samples", type=int, default=24, metavar="N", help="on the sheet (0: none)")
    inspect.add_argument("--seed", type=int, default=0, metavar="N", help="picks the sheet's samples")
    inspect.add_argument(
        "--sheet", type=Path, default=Path("inspect.png"), metavar="PATH", help="default ./inspect.png"
    )
    inspect.add_argument("--json", type=Path, metavar="PATH", help="also write the statistics as JSON")
    commands.metavar = "{" + ",".join(commands.choices) + "}"  # the added ones too
    return parser


def _inspect(args: argparse.Namespace) -> int:
    # inspect.py imports PIL and webdataset (and so torch): only once the arguments are good
    from clip_train.data.inspection import inspect_shards
    from clip_train.data.inspection_report import format_report

    try:
        report = inspect_shards(
            args.shards, split=args.split, limit=args.limit, samples=args.samples, seed=args.seed,
            sheet=args.sheet,
        )  # fmt: skip
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    except (DataError, OSError) as e:  # OSError: a --sheet or --json we may not write
        return fail(PROG, e)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(format_report(report))
    if args.json:
        print(f"statistics written to {args.json}")
    return 0


def _summary(stats: dict[str, Any], out: Path) -> str:
    rows = [("source", "train", "val", "skipped")]
    for name, counts in stats["sources"].items():
        rows.append((name, counts["train"], counts["val"], sum(counts["skipped"].values())))
    total = stats["total"]
    rows.append(("total", total["train"], total["val"], total["skipped"]))
    lines = [f"{r[0]:<14}{r[1]:>8}{r[2]:>8}{r[3]:>9}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    if stats.get("several_captions"):
        lines.append(
            f"{stats['several_captions']} images have several captions (txt lines, json captions): "
            "train with data.captions=txt-lines or data.captions=json:captions"
        )
    if stats["skipped"]:
        lines.append("skipped: " + ", ".join(f"{reason} {n}" for reason, n in stats["skipped"].items()))
    shards = stats["shards"]
    lines.append(
        f"{stats['images_per_second']} images/s ({stats['seconds']:.1f} s); "
        f"shards: {shards['train']} train, {shards['val']} val in {out} (details in stats.json)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None, commands: Sequence[AddCommand] = ()) -> int:
    """clip-data, with the sub-commands `commands` adds (cli.py's data_main adds `demo`)."""
    try:
        args = _parser(commands).parse_args(argv)
    except SystemExit as e:  # argparse has printed its usage message already
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.INFO, format=f"{PROG}: %(message)s", stream=sys.stderr)
    if args.command == "inspect":  # reads only: the quick exit below is for the build commands
        return _inspect(args)
    if hasattr(args, "run"):  # an added sub-command that is not a shard build (e.g. `teacher`)
        return args.run(args)

    if (args.out / "stats.json").exists() and not args.overwrite:
        print(f"shards already built in {args.out} (delete it or pass --overwrite)")
        return 0

    # the writers import PIL and webdataset (and so torch): after the quick exits above
    from clip_train.data.shards import write_folder, write_manifest

    settings = dict(
        max_size=args.max_size,
        val_frac=args.val_frac,
        shard_size=args.shard_size,
        num_procs=args.workers,
        jpeg_quality=args.jpeg_quality,
        overwrite=args.overwrite,
    )
    try:
        if hasattr(args, "write"):  # an added sub-command
            stats = args.write(args, settings)
        elif args.command == "folder":
            stats = write_folder(args.src, args.out, **settings)
        else:
            stats = write_manifest(
                args.file,
                args.out,
                image_col=args.image_col,
                caption_col=args.caption_col,
                sep=args.sep,
                category_col=args.category_col,
                caption_sep=args.caption_sep,
                **settings,
            )
    except (DataError, OSError) as e:  # OSError: an --out folder we may not write to, a full disk
        return fail(PROG, e)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written to {args.out}", file=sys.stderr)
        return 130
    print(_summary(stats, args.out))
    return 0
