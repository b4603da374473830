"""Files and folders that appear whole or not at all: written under a temporary sibling name, then renamed.

A rename within one folder is atomic on a POSIX file system, so a reader (a resume after a kill, a user
loading an export) sees the old state or the finished new one, never a half-written one. The temporary
name is a sibling of the final one so that the rename never crosses file systems.

    with temporary_folder(out) as tmp:   # .<out name>.<random>.tmp beside out
        write_everything(tmp)            # raises: tmp is removed, out is untouched
    # here out holds what was written into tmp

    replace_text(root / "latest", "step-000000200")   # via root/latest.tmp
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_synced(path: Path, text: str) -> None:
    """Write `text` to `path` and fsync it: a rename after this never publishes a file whose data a
    crash has lost."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def replace_text(path: Path, text: str) -> None:
    """Make `text` the content of `path` in one step: written and synced to `<name>.tmp`, then renamed
    onto `path`. A failed write leaves `path` as it was (and the .tmp file for the next call to overwrite)."""
    tmp = path.with_name(path.name + ".tmp")
    write_synced(tmp, text)
    os.replace(tmp, path)


def publish_folder(tmp: Path, final: Path, *, replace: bool = False) -> None:
    """Rename the finished folder `tmp` to `final`.

    Without `replace`, `final` must be missing or an empty folder, which is removed first (a rename
    cannot replace a folder portably). With `replace`, an existing `final` is moved aside to
    `.old-<name>` and deleted only once `tmp` is in its place, so that a kill in between leaves one
    of the two whole; a `.old-<name>` that such a kill left behind is deleted then too.
    """
    if not replace:
        if final.exists():
            final.rmdir()
        os.replace(tmp, final)
        return
    aside = final.with_name(f".old-{final.name}")
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def temporary_folder(final: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A new empty folder beside `final` (hidden: `.<name>.<random><suffix>`, made by mkdtemp, so
    private to its owner) for the block to write into. When the block ends without an error it is
    renamed onto `final`, which must be missing or an empty folder (publish_folder); when the block
    raises, it is removed and `final` is not touched."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent))
    try:
        yield tmp
        publish_folder(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
