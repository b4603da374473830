"""Synthetic image-caption shards for gpu.sh's training stage, written by the project's own writer.

    build_shards(folder, samples=4096, size=224, shard_size=128, procs=16) -> summary dict
    captions(n, seed) -> list of captions like the shards' (the model-only runs tokenize these)

Images: smooth random colour fields plus noise (as benchmarks/data.py's synthetic JPEGs: pure noise
would make an unrealistically slow entropy decode), made at 4:3 a little above `size` and shrunk
by clip_train.data.shards.write_shards to a longer side of `size` (JPEG quality 90), all in the
train split. Made in `procs` processes, each from its own seed, so no two samples are the same
(the writer drops duplicates).

Captions: "a photo of" and 6-24 common words, each one CLIP BPE token, so 11-29 tokens with the
start and end tokens (LAION captions are mostly 10-30). Their length matters to the comparison:
clip_train's text tower drops the columns that are padding in the whole batch (to a multiple of
16 when compiled), OpenCLIP's always runs all 77. Kept under 32 tokens so that a compiled model
sees one text shape in every batch, as it would after its first few batches of real captions.
"""

from __future__ import annotations

import io
from multiprocessing import Pool
from pathlib import Path

WORDS = (
    "red green blue yellow black white small large old new happy little dog cat bird horse car "
    "boat tree house street city beach river mountain sky cloud sun night water food table chair "
    "man woman child girl boy people group playing standing sitting running near with on in at "
    "the of and a two three wooden stone glass bright dark view close field park garden road"
).split()
MIN_WORDS, MAX_WORDS = 6, 24


def caption(rng) -> str:
    count = int(rng.integers(MIN_WORDS, MAX_WORDS + 1))
    return "a photo of " + " ".join(rng.choice(WORDS, size=count))


def captions(n: int, seed: int = 0) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [caption(rng) for _ in range(n)]


def _records(job: tuple[int, int, int]) -> list:
    """`count` records from seed `start`: (first index, count, size)."""
    import numpy as np
    from PIL import Image

    from clip_train.data.sources import Record

    start, count, size = job
    rng = np.random.default_rng(1_000_003 + start)
    width, height = size * 8 // 7, size * 6 // 7  # 4:3, the longer side above `size`
    out = []
    for i in range(start, start + count):
        small = rng.integers(0, 256, size=(9, 12, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))
        pixels = field.astype(np.int16) + rng.integers(-12, 13, size=field.shape)
        encoded = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(encoded, "JPEG", quality=90)
        meta = {"category": "", "path": ""}
        out.append(Record("synthetic", f"synthetic/{i:06d}", encoded.getvalue(), caption(rng), meta))
    return out


def _all_records(samples: int, size: int, procs: int):
    per_job = max(1, -(-samples // max(procs * 4, 1)))
    jobs = [(start, min(per_job, samples - start), size) for start in range(0, samples, per_job)]
    if procs <= 1:
        for job in jobs:
            yield from _records(job)
        return
    with Pool(procs) as pool:
        for chunk in pool.imap(_records, jobs):
            yield from chunk


def build_shards(folder: Path, samples: int, size: int, shard_size: int, procs: int) -> dict:
    """Write the shards into `folder` (which must not exist yet); return what they hold."""
    from data import shard_summary  # benchmarks/data.py (benchmarks/ is on sys.path)

    from clip_train.data.shards import write_shards

    stats = write_shards(
        _all_records(samples, size, procs),
        folder,
        max_size=size,
        val_frac=0.0,
        shard_size=shard_size,
        num_procs=max(1, procs),
    )
    return {
        **shard_summary(folder, stats),
        "pattern": f"{folder}/{stats['patterns']['train']}",
        "caption_words": [MIN_WORDS, MAX_WORDS],
    }
