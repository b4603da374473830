"""The webdataset input pipeline: shard list -> (images, tokens) batches, for training and evaluation.

    loader = build_train_loader("shards/demo", batch_size=64, num_workers=2, seed=0, rank=0,
                                world_size=1, transform=train_transform, tokenize=tokenizer)
    images, tokens = next(iter(loader))

Training, resampled (the default): every rank and worker draws shards with replacement from its own
seeded stream, so the data never runs out and training is counted in steps. Not resampled: one pass,
shards dealt out disjointly to ranks (round robin on rank/world_size, passed in explicitly) and then to
workers. Both the shard order and the sample shuffle are seeded from (seed, rank, worker id), so two
loaders built with the same arguments yield identical batches.

Bad samples (undecodable or oversized image, missing or empty caption, unreadable tar) are skipped
and counted by one DataErrors handler given to every stage: it logs the first few with their shard
URL and key, exposes the counts as `loader.data_errors.stats()`, and raises DataQualityError when the
skip rate over a window passes `max_skip_frac` (silent data loss is the real failure mode). It is not
wds.warn_and_continue, which sleeps 0.5 s per error.

This module never imports the models: the image transform and the tokenizer arrive as callables.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import itertools
import logging
import multiprocessing
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand  # webdataset's own dependency for {000..009} patterns
from PIL import Image

from clip_train.data import DataError
from clip_train.data.shards import DEFAULT_MAX_PIXELS, open_image, to_rgb

log = logging.getLogger(__name__)

_REMOTE = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]*://)")  # pipe:curl ..., s3://, https://


class SampleError(ValueError):
    """One sample is unusable (its message names the shard URL and the key)."""


class DataQualityError(DataError):
    """Too many samples were skipped: the data (or a transform) is broken, not merely noisy."""


# errors that mean "this sample or shard is bad"; anything else (a bug in a transform or the
# tokenizer, say) propagates instead of being counted away
_DATA_ERRORS = (SampleError, OSError, EOFError, ValueError, tarfile.TarError)


# ---------------------------------------------------------------------------------------------
# Shard lists
# ---------------------------------------------------------------------------------------------


def _folder_shards(folder: Path, split: str | None) -> list[str]:
    tars = sorted(folder.glob("*.tar"))
    # a folder written by clip-data holds train-*.tar and val-*.tar: never mix the two
    if split and any(t.name.startswith(("train-", "val-")) for t in tars):
        tars = [t for t in tars if t.name.startswith(f"{split}-")]
    if not tars:
        what = f"{split}-*.tar" if split else "*.tar"
        raise DataError(
            f"no {what} shards in {folder}: build them with `clip-data demo|folder|manifest --out {folder}`"
        )
    return [str(t) for t in tars]


def expand_urls(spec: str, *, split: str | None = None) -> list[str]:
    """Shard URLs from a spec: brace patterns (`dir/train-{000000..000009}.tar`), globs, folders
    and `pipe:`/remote URLs, several joined with `::`.

    A folder gives its *.tar files in sorted order; with `split` ("train"/"val") and a folder laid
    out by clip-data, only `<split>-*.tar`. Local files that do not exist, and globs or folders that
    match nothing, raise DataError. Remote and `pipe:` URLs are passed through unchecked.
    """
    parts = [p.strip() for p in (spec or "").split("::") if p.strip()]
    if not parts:
        raise DataError(
            "no shards given: pass a folder of .tar shards, a brace pattern or a list joined by '::'"
        )
    urls: list[str] = []
    missing: list[str] = []
    for part in parts:
        if _REMOTE.match(part):
            urls.extend(braceexpand(part))
            continue
        part = os.path.expanduser(part)
        if Path(part).is_dir():
            urls.extend(_folder_shards(Path(part), split))
        elif any(ch in part for ch in "*?["):
            matched = sorted({m for pattern in braceexpand(part) for m in glob.glob(pattern)})
            if not matched:
                raise DataError(f"no shards match {part}: check the folder and the pattern")
            urls.extend(matched)
        else:
            for path in braceexpand(part):
                (urls if Path(path).is_file() else missing).append(path)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(f"{len(missing)} shard(s) not found: {shown}; check the path and the brace range")
    return urls


# ---------------------------------------------------------------------------------------------
# Counting bad samples
# ---------------------------------------------------------------------------------------------


class DataErrors:
    """The `handler=` of every webdataset stage: count a bad sample, log the first few, go on.

    The totals live in shared memory so the main process sees what the loader workers skipped.
    """

    def __init__(self, *, max_skip_frac: float | None = 0.01, window: int = 1000, log_first: int = 5):
        self._seen = multiprocessing.Value("q", 0)
        self._skipped = multiprocessing.Value("q", 0)
        self.max_skip_frac, self.window, self.log_first = max_skip_frac, window, log_first
        self._logged = 0  # these three are per process (each worker has its own copy)
        self._window_seen = 0
        self._window_skipped = 0

    def __call__(self, exn: BaseException) -> bool:
        if not isinstance(exn, _DATA_ERRORS):
            raise exn
        with self._skipped.get_lock():
            self._skipped.value += 1
        self._window_skipped += 1
        if self._logged < self.log_first:
            self._logged += 1
            more = " (further bad samples are counted, not logged)" if self._logged == self.log_first else ""
            log.warning("skipped a bad sample: %s: %s%s", type(exn).__name__, exn, more)
        self._check()
        return True  # keep going

    def ok(self) -> None:
        with self._seen.get_lock():
            self._seen.value += 1
        self._window_seen += 1
        self._check()

    def _check(self) -> None:
        total = self._window_seen + self._window_skipped
        if total < self.window:
            return
        frac = self._window_skipped / total
        self._window_seen = self._window_skipped = 0
        if self.max_skip_frac is not None and frac > self.max_skip_frac:
            raise DataQualityError(
                f"{frac:.1%} of the last {total} samples were bad (limit {self.max_skip_frac:.1%}): "
                "see the logged examples; fix the shards or raise max_skip_frac"
            )

    def stats(self) -> dict[str, int]:
        return {"seen": self._seen.value, "skipped": self._skipped.value}


# ---------------------------------------------------------------------------------------------
# Pipeline stages (module-level callables, so the pipeline pickles for any worker start method)
# ---------------------------------------------------------------------------------------------


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


def _seed(*parts: Any) -> int:
    """A stable 63-bit seed from its parts (Python's hash() of a str is salted per process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _shard_seed(seed: int, rank: int) -> int:
    return _seed("shards", seed, rank, _worker_id())  # called inside the worker


def _split_by_rank(src: Iterable, *, rank: int, world_size: int) -> Iterator:
    # wds.split_by_node asks torch.distributed (or $RANK); the trainer tells us instead
    yield from itertools.islice(src, rank, None, world_size)


def _shuffle_samples(src: Iterable, *, bufsize: int, seed: int, rank: int) -> Iterator:
    # the seed needs the worker id, which is only known once iteration starts in the worker
    yield from wds.shuffle(bufsize, initial=bufsize, seed=_seed("samples", seed, rank, _worker_id()))(
        iter(src)
    )


class _Prepare:
    """A raw tar sample -> (image tensor, token ids[, caption, key]); bad data raises SampleError."""

    def __init__(
        self,
        *,
        image_key: str,
        text_key: str,
        transform: Callable,
        tokenize: Callable,
        max_pixels: int,
        errors: DataErrors,
        with_meta: bool | str,
        augment_seed: tuple | None = None,
    ):
        self.image_keys = [k.strip().lower() for k in image_key.split(";") if k.strip()]
        self.text_key, self.transform, self.tokenize = text_key, transform, tokenize
        self.max_pixels, self.errors, self.with_meta = max_pixels, errors, with_meta
        self.augment_seed = augment_seed
        self.position = 0  # samples this copy (one per loader worker) has prepared

    def __call__(self, sample: dict[str, Any]) -> tuple:
        self.position += 1
        key = sample.get("__key__")
        where = f"{sample.get('__url__')} {key}"
        data = next((sample[k] for k in self.image_keys if k in sample), None)
        if data is None:
            raise SampleError(f"{where}: no image (looked for {', '.join(self.image_keys)})")
        raw = sample.get(self.text_key)
        if raw is None:
            raise SampleError(f"{where}: no caption ({self.text_key})")
        try:
            caption = " ".join((raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)).split())
        except UnicodeDecodeError:
            raise SampleError(f"{where}: caption is not UTF-8") from None
        if not caption:
            raise SampleError(f"{where}: empty caption")
        try:
            image = open_image(data, self.max_pixels)
            image.load()  # decode here, so a truncated file is reported with its key
            image = to_rgb(image)
        except Exception as e:  # noqa: BLE001 - whatever PIL raises, this image is unusable
            raise SampleError(f"{where}: undecodable image ({type(e).__name__}: {e})") from None
        if self.augment_seed is None:
            pixels = self.transform(image)
        else:
            with _seeded_random(_seed("augment", *self.augment_seed, _worker_id(), self.position)):
                pixels = self.transform(image)
        tokens = torch.as_tensor(self.tokenize(caption), dtype=torch.long)
        if tokens.dim() == 2 and tokens.shape[0] == 1:  # tokenizers that return [1, L] for one text
            tokens = tokens[0]
        self.errors.ok()
        if self.with_meta == "url_key":  # unique across shard sets (keys are unique per writer only)
            key = f"{sample.get('__url__')}/{key}"
        return (pixels, tokens, caption, key) if self.with_meta else (pixels, tokens)


@contextlib.contextmanager
def _seeded_random(seed: int):
    """Run a random augmentation from its own seed, leaving the global RNGs as they were.

    The crop and flip of a training sample are then a function of (run seed, segment, rank,
    worker, position in the stream), not of whatever else drew from the global RNGs before (dropout,
    a DataLoader's base seed, another sample prepared ahead): a resumed run augments exactly as the
    interrupted one did. timm's transforms draw from Python's random, torchvision's from torch's.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    torch_state = torch.random.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's is untouched
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.random.default_generator.set_state(torch_state)


def _collate(samples: list[tuple]) -> tuple:
    images = torch.stack([s[0] for s in samples])
    tokens = torch.stack([s[1] for s in samples])
    if len(samples[0]) == 2:
        return images, tokens
    return images, tokens, [s[2] for s in samples], [s[3] for s in samples]


def _loader(stages: list, num_workers: int, errors: DataErrors) -> wds.WebLoader:
    # batching happens in the pipeline (batch_size=None here); shuffle stays off because the
    # seeded stages above already shuffle, and DataLoader's own shuffle is for map datasets
    loader = wds.WebLoader(wds.DataPipeline(*stages), batch_size=None, shuffle=False, num_workers=num_workers)
    loader.data_errors = errors  # `loader.data_errors.stats()` -> {"seen": ..., "skipped": ...}
    return loader


# ---------------------------------------------------------------------------------------------
# Public builders
# ---------------------------------------------------------------------------------------------


def build_train_loader(
    shards: str,
    *,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int,
    world_size: int,
    transform: Callable[[Image.Image], torch.Tensor],
    tokenize: Callable[[str], torch.Tensor],
    resampled: bool = True,
    shard_shuffle: int = 100,
    sample_shuffle: int = 1000,
    image_key: str = "jpg;png;webp;jpeg",
    text_key: str = "txt",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_skip_frac: float | None = 0.01,
    with_keys: bool = False,
) -> wds.WebLoader:
    """A WebLoader of `(images [B,3,H,W], tokens [B,L])` batches of exactly `batch_size`
    (with_keys: `(images, tokens, captions, keys)`, each key prefixed with its shard URL).

    Resampled: endless (call next() per step). Not resampled: one pass over this rank's shards;
    build a new loader with seed + 1 for the next pass (the shard order changes with the seed).
    """
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    urls = expand_urls(shards, split="train")
    errors = DataErrors(max_skip_frac=max_skip_frac)
    if resampled:
        # each rank and worker draws its own seeded stream of shards: no split needed
        stages: list = [
            wds.ResampledShards(
                urls, seed=seed, worker_seed=partial(_shard_seed, seed, rank), deterministic=True
            )
        ]
    else:
        if len(urls) < world_size:
            raise DataError(
                f"{len(urls)} shard(s) for {world_size} processes: each process needs at least one; "
                "write smaller shards (clip-data --shard-size) or train resampled"
            )
        per_rank = len(urls[rank::world_size])
        if num_workers > per_rank:
            log.warning(
                "rank %d has %d shard(s) for %d workers: using %d workers",
                rank,
                per_rank,
                num_workers,
                per_rank,
            )
            num_workers = per_rank
        stages = [wds.SimpleShardList(urls)]
        if shard_shuffle > 1:
            # seeded by `seed` alone: every rank and worker must see the same order for the
            # round-robin split below to stay disjoint
            stages.append(wds.shuffle(shard_shuffle, initial=shard_shuffle, seed=_seed("order", seed)))
        stages += [partial(_split_by_rank, rank=rank, world_size=world_size), wds.split_by_worker]
    stages.append(wds.tarfile_to_samples(handler=errors))
    if sample_shuffle > 1:  # shuffle the raw bytes, before the expensive decode
        stages.append(partial(_shuffle_samples, bufsize=sample_shuffle, seed=seed, rank=rank))
    prepare = _Prepare(
        image_key=image_key,
        text_key=text_key,
        transform=transform,
        tokenize=tokenize,
        max_pixels=max_pixels,
        errors=errors,
        with_meta="url_key" if with_keys else False,
        augment_seed=(seed, rank),
    )
    stages += [
        wds.map(prepare, handler=errors),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
    ]
    return _loader(stages, num_workers, errors)


def build_eval_loader(
    shards: str,
    *,
    batch_size: int,
    transform: Callable[[Image.Image], torch.Tensor],
    tokenize: Callable[[str], torch.Tensor],
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    image_key: str = "jpg;png;webp;jpeg",
    text_key: str = "txt",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> wds.WebLoader:
    """A WebLoader of `(images, tokens, captions, keys)` over every sample once, in a fixed order
    (shards in order, dealt to ranks then workers; no shuffle; the last batch may be smaller)."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    urls = expand_urls(shards, split="val")
    num_workers = min(num_workers, len(urls[rank::world_size]))
    errors = DataErrors(max_skip_frac=None)  # evaluation reports what it saw; it never stops a run
    prepare = _Prepare(
        image_key=image_key,
        text_key=text_key,
        transform=transform,
        tokenize=tokenize,
        max_pixels=max_pixels,
        errors=errors,
        with_meta=True,
    )
    stages = [
        wds.SimpleShardList(urls),
        partial(_split_by_rank, rank=rank, world_size=world_size),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=errors),
        wds.map(prepare, handler=errors),
        wds.batched(batch_size, collation_fn=_collate, partial=True),
    ]
    return _loader(stages, num_workers, errors)
