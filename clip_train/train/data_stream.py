"""The training data of one process as a stream of batches that a restart continues exactly.

The loader is rebuilt at every checkpoint boundary with a seed derived from (seed, segment, pass),
where a segment is the span of steps between two checkpoints: an uninterrupted run and a run
resumed from the checkpoint at the start of a segment read the same batches. A run resumed inside
a segment (from a preemption checkpoint) has its loader drop, undecoded, the samples the
interrupted run had used.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from clip_train.accumulation import capture_rng, restore_rng
from clip_train.config import DataConfig
from clip_train.data import DataError
from clip_train.data.pipeline import Batch, build_train_loader, config_sources, in_worker_order
from clip_train.data.quality import SKIP_REASONS, DataCounts, SkipRateGuard, add_shard_counts
from clip_train.train.state import StreamState


def segment_seed(seed: int, segment: int, data_pass: int) -> int:
    digest = hashlib.sha256(f"{seed}/{segment}/{data_pass}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class DataStream:
    """This process's batches, on its device, normalised; the stream state advances with each."""

    def __init__(
        self,
        data: DataConfig,
        state: StreamState,
        *,
        seed: int,
        segment_len: int,
        rank: int,
        world_size: int,
        transform: Callable,
        tokenize: Callable,
        decode_size: int | None,
        skip_history: list,
        teacher_members: bool = False,
    ):
        self.teacher_members = teacher_members  # distill.mode=offline: batches carry the teacher's
        self.data, self.state, self.seed, self.segment_len = data, state, seed, segment_len
        self.rank, self.world_size = rank, world_size
        self.transform, self.tokenize, self.decode_size = transform, tokenize, decode_size
        self.sources = config_sources(data)
        self.counts = DataCounts([source.name for source in self.sources])
        self.skip_guard = SkipRateGuard(data.max_skip_frac, data.skip_window, skip_history)
        self.loader = None
        self.batches = None
        self.wait_s = 0.0  # seconds spent waiting for batches (see take_wait)

    def _build_loader(self, step: int, skip_through: dict[int, int] | None = None):
        self.counts.retire(self.loader)
        return build_train_loader(
            self.data,
            seed=segment_seed(self.seed, step // self.segment_len, self.state.data_pass),
            rank=self.rank,
            world_size=self.world_size,
            transform=self.transform,
            tokenize=self.tokenize,
            decode_size=self.decode_size,
            skip_through=skip_through,
            teacher_members=self.teacher_members,
        )

    def start(self, step: int) -> int | None:
        """Open the stream at `step` (0 or a resumed step). Inside a segment (resumed from a
        preemption checkpoint): returns how many samples it skips to get there; else None."""
        inside_segment = step % self.segment_len != 0
        if not inside_segment:
            self.state.reset()
        # Starting a loader's iterator draws from torch's RNG (DataLoader's base seed); inside a
        # segment the checkpoint's RNG state already holds that draw: put the state back after it.
        rng_before = (capture_rng(), random.getstate(), np.random.get_state())
        self.loader = self._build_loader(step, skip_through=self.state.positions)
        self.batches = in_worker_order(
            iter(self.loader), num_workers=self.data.num_workers, first_worker=self.state.next_worker
        )
        if not inside_segment:
            return None
        restore_rng(rng_before[0])
        random.setstate(rng_before[1])
        np.random.set_state(rng_before[2])
        return sum(self.state.positions.values())

    def new_segment(self, step: int) -> None:
        """A checkpoint was written at `step`: the next segment reads its own stream."""
        self.state.reset()
        self.loader = self._build_loader(step)
        self.batches = iter(self.loader)

    def _next_raw(self, step: int):
        try:
            return next(self.batches)
        except StopIteration:  # one pass over non-resampled shards ended: start the next pass
            self.state.next_pass()
            self.loader = self._build_loader(step)
            self.batches = iter(self.loader)
            batch = next(self.batches, None)
            if batch is None:
                raise DataError(
                    f"rank {self.rank}'s shards yield no full batch of {self.data.batch_size}: "
                    "lower data.batch_size or set data.resampled=true"
                ) from None
            return batch

    def next_batch(self, step: int, device: torch.device, normalize: Callable) -> Batch:
        """The next batch, images normalised on `device`; `step` is the last finished step."""
        fetch_start = time.perf_counter()
        batch = self._next_raw(step)
        self.wait_s += time.perf_counter() - fetch_start
        batch.images = normalize(batch.images.to(device))
        batch.tokens = batch.tokens.to(device)
        if batch.teacher_image is not None:
            batch.teacher_image, batch.teacher_text = (
                batch.teacher_image.to(device),
                batch.teacher_text.to(device),
            )
        self.counts.add_sources(batch.sources)
        self.state.advance(batch.positions, self.data.num_workers)
        return batch

    def take_wait(self) -> float:
        """Seconds waited for data since the last call."""
        wait, self.wait_s = self.wait_s, 0.0
        return wait

    def totals(self) -> list[int]:
        """[good, skipped per reason] of this process's loaders (summed over ranks by the caller)."""
        return self.counts.totals(self.loader)

    def check_skip_rate(self, totals: list[int]) -> None:
        """totals: the run's [good, skipped per reason] over all ranks. Raises DataQualityError on
        every rank at once (they agree on the totals); the worst shards are gathered from all."""
        frac = self.skip_guard.update(sum(totals), sum(totals[1:]))
        if frac is None:
            return
        from accelerate.utils import gather_object

        shards: dict[str, tuple[int, int]] = {}
        for counts in gather_object([self.counts.shard_counts(self.loader)]):
            shards = add_shard_counts(shards, counts)
        raise self.skip_guard.error(frac, dict(zip(SKIP_REASONS, totals[1:], strict=True)), shards)

    def metrics(self, sum_over_ranks: Callable) -> dict:
        return self.counts.metrics(self.loader, sum_over_ranks)

    def shard_counts(self):
        return partial(self.counts.shard_counts, self.loader)
