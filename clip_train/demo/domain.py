"""The fine-tuning recipe's demo domain (launch/finetune_domain.sh): the Tux Paint stamps written as
a CSV manifest, the way a user's own data would come.

    python -m clip_train finetune demo-manifest --categories animals,food --out domain.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from clip_train.data import DataError
from clip_train.demo.eval_sets import CLASSNAMES_DIR, load_class_map, tuxpaint_category
from clip_train.demo.sources import tuxpaint_records

PROG = "python -m clip_train finetune demo-manifest"


def write_demo_manifest(out: str | Path, categories: list[str]) -> int:
    """The demo domain as a user's CSV would be: Tux Paint stamps of the given top-level categories
    ("all": every one) with image path, caption and class name (for zero-shot). Returns the count."""
    names = load_class_map(CLASSNAMES_DIR / "tuxpaint.tsv")
    stamps = [(r, tuxpaint_category(r.meta["category"])) for r in tuxpaint_records() if r.caption]
    known = sorted({category.split("/")[0] for _, category in stamps})
    unknown = [c for c in categories if c != "all" and c not in known]
    if unknown or not categories:
        raise DataError(
            f"demo-manifest: no Tux Paint category {', '.join(unknown) or '(none given)'}: "
            f"pass --categories with some of {', '.join(known)}, or all"
        )
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    count = 0
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "category"])
        for record, category in stamps:
            if "all" not in categories and category.split("/")[0] not in categories:
                continue
            writer.writerow([record.image, record.caption, names.get(category, category.split("/")[-1])])
            count += 1
    tmp.rename(out)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Write the demo's fine-tuning domain as a CSV.")
    parser.add_argument("--categories", default="all", help="Tux Paint top folders (animals,food,...) or all")
    parser.add_argument("--out", type=Path, required=True, help="the CSV to write")
    args = parser.parse_args(argv)
    try:
        count = write_demo_manifest(args.out, [c.strip() for c in args.categories.split(",") if c.strip()])
    except DataError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"{count} Tux Paint stamps of {args.categories} written to {args.out}")
    return 0
