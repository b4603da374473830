"""The webdataset input pipeline: shard list -> (images, tokens) batches, for training and evaluation.

    loader = build_train_loader(DataConfig(train_shards="shards/demo", batch_size=64), seed=0,
                                transform=train_transform, tokenize=tokenizer)
    batch = next(iter(loader))   # a Batch: batch.images, batch.tokens, batch.keys, ...

Training, resampled (the default): every rank and worker draws shards with replacement from its own
seeded stream, so the data never runs out and training is counted in steps. Not resampled: one pass,
shards dealt out disjointly to ranks (round robin on rank/world_size, passed in explicitly) and then to
workers. Both the shard order and the sample shuffle are seeded from (seed, rank, worker id), so two
loaders built with the same arguments yield identical batches.

Bad samples (undecodable or oversized image, missing or empty caption, unreadable tar) are skipped
and counted by one DataErrors handler given to every stage (quality.py): it logs the first few with
their shard URL and key and exposes the counts as `loader.data_errors.stats()`; the trainer's
SkipRateGuard stops the run when too many are bad. It is not wds.warn_and_continue, which sleeps
0.5 s per error.

This module never imports the models: the image transform and the tokenizer arrive as callables.
"""

from __future__ import annotations

import collections
import glob
import logging
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from braceexpand import braceexpand  # webdataset's own dependency for {000..009} patterns
from PIL import Image

from clip_train import preemption
from clip_train.config import DataConfig
from clip_train.data import DataError
from clip_train.data.captions import CaptionReader
from clip_train.data.pipeline_stages import (
    SOURCE_FIELD,
    _Prepare,
    _seed,
    _shuffle_samples,
    _split_by_rank,
    _tag_source,
    _worker_id,
)
from clip_train.data.quality import DataErrors
from clip_train.data.shards import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

_REMOTE = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]*://)")  # pipe:curl ..., s3://, https://


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
# Batches and the DataLoader (the stages before them are pipeline_stages.py's)
# ---------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One batch: images [B,3,H,W] (uint8 from the training workers, float once normalised), token
    ids [B,L], and per sample its caption and key. Training batches also carry, per sample, the
    source it came from and where in its loader worker's stream it was: (worker, n), the n-th raw
    sample (what a resume skips through); their keys are prefixed with the shard URL. Loaders of
    shards written by `clip-data teacher` add the teacher's embeddings [B, d_t] (teacher_members.py)."""

    images: torch.Tensor
    tokens: torch.Tensor
    captions: list[str]
    keys: list[str]
    sources: list[str] = field(default_factory=list)
    positions: list[tuple[int, int]] = field(default_factory=list)
    teacher_image: torch.Tensor | None = None
    teacher_text: torch.Tensor | None = None


_TRAINING_FIELDS = 6  # images, tokens, caption, key, source, position; then the teacher's two


def _collate(samples: list[tuple]) -> Batch:
    images = torch.stack([s[0] for s in samples])
    tokens = torch.stack([s[1] for s in samples])
    teacher = [torch.stack([s[i] for s in samples]) for i in range(_TRAINING_FIELDS, len(samples[0]))]
    # then one list per meta field: captions, keys (and, in training, sources, stream positions)
    metas = (s[2:_TRAINING_FIELDS] for s in samples)
    return Batch(images, tokens, *[list(meta) for meta in zip(*metas, strict=True)], *teacher)


def config_sources(data: DataConfig) -> list[Source]:
    """The training sources a data config names: its data.sources, else data.train_shards alone."""
    if data.sources:
        return [Source(s.name, s.shards, s.weight) for s in data.sources]
    return [Source("train", data.train_shards)]


def _loader(stages: list, num_workers: int, errors: DataErrors) -> torch.utils.data.DataLoader:
    # Batching happens in the pipeline (batch_size=None here); shuffle stays off because the
    # seeded stages already shuffle, and DataLoader's own shuffle is for map datasets.
    # A plain DataLoader rather than wds.WebLoader: WebLoader starts the DataLoader's iterator
    # lazily, at the first batch, and that is when torch's RNG is drawn for the workers' base seed;
    # a resume must be able to put the RNG back right after iter(loader) (see train.py).
    # Workers ignore preemption signals sent to the whole job (see clip_train/preemption.py).
    loader = torch.utils.data.DataLoader(
        wds.DataPipeline(*stages),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=preemption.ignore_in_worker if num_workers else None,
    )
    loader.data_errors = errors  # `loader.data_errors.stats()` -> {"seen": ..., "skipped": ...}
    return loader


# ---------------------------------------------------------------------------------------------
# Several sources, mixed by weight
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One stream of training shards and its share of the samples (weights are relative)."""

    name: str
    shards: str
    weight: float = 1.0


def check_readers(sources: Sequence[Source], *, world_size: int, num_workers: int, resampled: bool) -> None:
    """Refuse a layout that cannot read the shards, before any loader (or process group) starts:
    without resampling every reader (process x worker) needs a shard of its own, or it would wait
    for data that never comes."""
    if resampled:
        return
    if len(sources) > 1:
        raise DataError(
            f"{len(sources)} data sources are mixed by weight, which needs resampled shards: "
            "set data.resampled=true or train on one source"
        )
    count = len(expand_urls(sources[0].shards, split="train"))
    readers = world_size * max(num_workers, 1)
    if count < readers:
        raise DataError(
            f"{count} shard(s) for {readers} readers ({world_size} process(es) x {max(num_workers, 1)} "
            f"worker(s)) without resampling: set data.num_workers to at most {count // world_size or 1}, "
            "write smaller shards (clip-data --shard-size), or set data.resampled=true"
        )


class _ResampledMix(torch.utils.data.IterableDataset):
    """The first stage of a resampled training pipeline: raw samples from several sources.

    Each source draws shards with replacement from its own stream seeded by (seed, rank, worker,
    source); which source gives the next sample is drawn from the weights with an RNG seeded by
    (seed, rank, worker). The samples are a pure function of those, whatever the timing.
    (webdataset's RandomMix draws from the unseeded global RNG, so it cannot be resumed exactly.)

    A source whose shards give no sample at all would make a resampled stream wait forever; after
    `max_empty_shards` shards in a row without one it raises DataError instead.
    """

    def __init__(self, sources: Sequence[tuple[str, list[str], float]], *, seed: int, rank: int, handler):
        super().__init__()
        self.sources, self.seed, self.rank, self.handler = list(sources), seed, rank, handler

    def _source_samples(self, index: int) -> Iterator[dict]:
        name, urls, _ = self.sources[index]
        shard_stream = wds.ResampledShards(
            urls,
            seed=self.seed,
            deterministic=True,
            worker_seed=partial(_seed, "shards", self.seed, self.rank, _worker_id(), index),
        )
        max_empty = max(20, 3 * len(urls))
        empty_run = 0

        def counted_shards() -> Iterator[dict]:
            nonlocal empty_run
            for shard in shard_stream:
                empty_run += 1
                if empty_run > max_empty:
                    raise DataError(
                        f"data source {name!r} gave no sample from {max_empty} shards in a row "
                        f"(e.g. {urls[0]}): check that its shards exist and hold samples"
                    )
                yield shard

        for sample in wds.tarfile_samples(counted_shards(), handler=self.handler):
            empty_run = 0
            sample[SOURCE_FIELD] = name
            yield sample

    def __iter__(self) -> Iterator[dict]:
        streams = [self._source_samples(i) for i in range(len(self.sources))]
        if len(streams) == 1:
            yield from streams[0]
            return
        rng = random.Random(_seed("mix", self.seed, self.rank, _worker_id()))
        indices, weights = list(range(len(streams))), [weight for _, _, weight in self.sources]
        while True:
            yield next(streams[rng.choices(indices, weights)[0]])


def _fsspec_open(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any):
    import fsspec  # torch's own dependency; imported only when such a URL is opened

    return fsspec.open(url, mode).open()


def _register_fsspec_schemes() -> None:
    """Let webdataset open any URL fsspec knows (s3://, gcs://, az://, hdfs://, memory://, ...)
    through its public scheme table, keeping its own handlers (pipe:, http(s), gs, ...) first."""
    try:
        import fsspec
    except ImportError:
        return
    for scheme in fsspec.available_protocols():
        if scheme not in wds.gopen_schemes and scheme != "file":
            wds.gopen_schemes[scheme] = _fsspec_open


_register_fsspec_schemes()


# ---------------------------------------------------------------------------------------------
# Public builders
# ---------------------------------------------------------------------------------------------


def build_train_loader(
    data: DataConfig,
    *,
    seed: int,
    transform: Callable[[Image.Image], torch.Tensor],
    tokenize: Callable[[str], torch.Tensor],
    rank: int = 0,
    world_size: int = 1,
    decode_size: int | None = None,
    skip_through: dict[int, int] | None = None,
    teacher_members: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader of training `Batch`es of exactly data.batch_size, each key prefixed with its
    shard URL, each position `(worker, n)`: the sample was the n-th raw sample of that worker.

    The shards are data.train_shards (see expand_urls) or data.sources mixed by weight (resampled
    only). Resampled: endless (call next() per step). Not resampled: one pass over this rank's
    shards; build a new loader with another seed for the next pass (the shard order follows it).
    `decode_size`: decode JPEGs at reduced scale, never below this many pixels a side (draft mode).
    `skip_through` {worker: n}: drop each worker's first n raw samples undecoded, so a loader built
    with the same arguments continues exactly after the positions an earlier one had reached.
    `teacher_members`: also read each sample's teacher embeddings (see teacher_members.py).
    """
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    sources = config_sources(data)
    num_workers, resampled = data.num_workers, data.resampled
    check_readers(sources, world_size=world_size, num_workers=num_workers, resampled=resampled)
    expanded = [(s.name, expand_urls(s.shards, split="train"), s.weight) for s in sources]
    errors = DataErrors([url for _, urls, _ in expanded for url in urls])
    if resampled:
        # each rank and worker draws its own seeded stream of shards: no split needed
        stages: list = [_ResampledMix(expanded, seed=seed, rank=rank, handler=errors)]
    else:
        stages = [wds.SimpleShardList(expanded[0][1])]
        if data.shard_shuffle > 1:
            # seeded by `seed` alone: every rank and worker must see the same order for the
            # round-robin split below to stay disjoint
            order = _seed("order", seed)
            stages.append(wds.shuffle(data.shard_shuffle, initial=data.shard_shuffle, seed=order))
        stages += [
            partial(_split_by_rank, rank=rank, world_size=world_size),
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=errors),
            partial(_tag_source, name=sources[0].name),
        ]
    if data.sample_shuffle > 1:  # shuffle the raw bytes, before the expensive decode
        stages.append(partial(_shuffle_samples, bufsize=data.sample_shuffle, seed=seed, rank=rank))
    prepare = _Prepare(
        image_key=data.image_key,
        text_key=data.text_key,
        transform=transform,
        tokenize=tokenize,
        max_pixels=data.max_pixels,
        errors=errors,
        with_meta="url_key",
        augment_seed=(seed, rank),
        decode_size=decode_size,
        skip_through=skip_through,
        captions=CaptionReader(data.captions, data.caption_sampling, text_key=data.text_key),
        teacher_members=teacher_members,
    )
    stages += [
        wds.map(prepare, handler=errors),
        wds.batched(data.batch_size, collation_fn=_collate, partial=False),
    ]
    return _loader(stages, num_workers, errors)


def in_worker_order(batches: Iterable[Batch], *, num_workers: int, first_worker: int) -> Iterator[Batch]:
    """Training batches (with positions) in the order an uninterrupted loader would give them.

    DataLoader takes batches from its workers in turn, always starting with worker 0. A loader
    rebuilt to resume after a batch of worker k must start with worker k + 1 instead: hold back
    the (at most num_workers - 1) batches that arrive early.
    """
    if num_workers <= 1 or first_worker % num_workers == 0:
        yield from batches
        return
    waiting: dict[int, collections.deque] = collections.defaultdict(collections.deque)
    expected = first_worker % num_workers
    for batch in batches:
        waiting[batch.positions[0][0]].append(batch)
        while waiting[expected]:
            yield waiting[expected].popleft()
            expected = (expected + 1) % num_workers
    # the stream ended (one pass over non-resampled shards): what is left, in turn
    while any(waiting.values()):
        if waiting[expected]:
            yield waiting[expected].popleft()
        expected = (expected + 1) % num_workers


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
) -> torch.utils.data.DataLoader:
    """A DataLoader of `Batch`es (images, tokens, captions, keys) over every sample once, in a fixed order
    (shards in order, dealt to ranks then workers; no shuffle; the last batch may be smaller)."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    urls = expand_urls(shards, split="val")
    num_workers = min(num_workers, len(urls[rank::world_size]))
    errors = DataErrors(urls)  # evaluation reports what it saw; it never stops a run
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
