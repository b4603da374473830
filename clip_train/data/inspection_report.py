"""The printed report of `clip-data inspect`: inspection.py's statistics as a few dozen lines."""

from __future__ import annotations

import os
from typing import Any

from clip_train.data.inspection import META_FIELDS, _number

PER_SHARD_ROWS = 12  # list every shard up to this many, else min/median/max per shard
TOP_VALUES = 15  # values of a metadata field printed (the JSON keeps up to JSON_TOP_VALUES)
REPORT_WIDTH = 110  # long lines of values are wrapped to this


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
