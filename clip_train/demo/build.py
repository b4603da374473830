"""`clip-data demo`: the real demo sources as shards, a sub-command that cli.py adds to clip-data.

    clip-data demo --out shards/demo --emoji-package fluent-emoji-3d.tgz

data/build.py (clip-data) knows folders and manifests only; it takes the demo's sub-command as an
`add(commands, common)` function, as any package above it could add one.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

from clip_train.atomic import replace_text
from clip_train.demo.sources import DEMO_SOURCES, demo_records
from clip_train.demo.versions import demo_data_versions


def add_demo_command(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """The `demo` sub-parser, with the build options of `common`; data/build.py calls its `write`."""
    demo = commands.add_parser(
        "demo", parents=[common], help="the real demo sources (Tux Paint, emoji, OpenClipart)"
    )
    demo.add_argument(
        "--sources",
        default=",".join(DEMO_SOURCES),
        help=f"comma-separated subset of {','.join(DEMO_SOURCES)}",
    )
    demo.add_argument(
        "--emoji-package",
        type=Path,
        help="the .tgz from `npm pack @lobehub/fluent-emoji-3d`, or its extracted folder",
    )
    demo.set_defaults(write=_write)


def _write(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    return write_demo(args.out, sources=sources, emoji_package=args.emoji_package, **settings)


def write_demo(
    out_dir: str | Path,
    *,
    sources: list[str] | tuple[str, ...] = ("tuxpaint", "emoji", "openclipart"),
    emoji_package: str | Path | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Shards from the real demo sources (reference/offline-data.md); their stats.json also records
    the versions of the packages they came from (demo/versions.py)."""
    # the writer imports PIL and webdataset (and so torch): only once the arguments are good
    from clip_train.data.shards import write_shards

    records = itertools.chain(*demo_records(sources, emoji_package=emoji_package))
    stats = write_shards(records, out_dir, **kwargs)
    stats["data_versions"] = demo_data_versions(list(sources), emoji_package)
    replace_text(Path(out_dir) / "stats.json", json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    return stats
