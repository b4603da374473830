"""Image-text data: user-data sources, shard writers, the webdataset training/eval pipeline.

    sources.py           Record, and iterators over user data (a folder of image + .txt pairs, a
                         CSV/TSV/JSONL manifest); the demo's sources are clip_train/demo/sources.py
    shards.py            write_shards(): decode, resize, JPEG, split by content hash, tar shards +
                         stats.json
    pipeline.py          expand_urls(), build_train_loader(), build_eval_loader()
    pipeline_stages.py   their stages: a raw tar sample -> (image tensor, token ids), seeded shuffles
    quality.py           bad-sample counts and the skip-rate guard
    inspection.py        inspect_shards(): what shards hold (statistics, bad samples, a contact sheet)
    inspection_report.py format_report(): those statistics as `clip-data inspect` prints them
    contact_sheet.py     write_sheet(): the contact sheet, a PNG grid of sample thumbnails
    build.py             the `clip-data` command

This file stays import-light on purpose: it holds only the error type every module shares.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad input the user can fix (missing folder, unreadable manifest, missing column, no shards).

    The message is one line that names the thing and the fix; entry points print it and exit 2.
    """
