"""Image-text data: real demo sources, shard writers, the webdataset training/eval pipeline.

    sources.py   iterators over the demo sources (Tux Paint, Fluent Emoji 3D, OpenClipart) and
                 over user data (a folder of image + .txt pairs, a CSV/TSV/JSONL manifest)
    shards.py    write_shards(): decode, resize, JPEG, split by content hash, tar shards + stats.json
    pipeline.py  expand_urls(), build_train_loader(), build_eval_loader()
    inspection.py inspect_shards(): what shards hold (statistics, bad samples, a contact sheet)
    build.py     the `clip-data` command

This file stays import-light on purpose: it holds only the error type every module shares.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad input the user can fix (missing folder, unreadable manifest, missing column, no shards).

    The message is one line that names the thing and the fix; entry points print it and exit 2.
    """
