"""Bad samples: why each was skipped (counted per worker in shared memory), and the guard that
stops a run when too many are bad.

Silent data loss is the real failure mode of a streaming loader, so a skip is counted, never just
passed over. The counts live in each loader; SkipRateGuard reads them in the main process, summed
over every worker and rank, over a rolling window of samples that spans checkpoint segments (a new
loader per segment) and restarts (its history travels in the checkpoint), so a bad source cannot
hide behind short segments, many workers or many ranks.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import tarfile

from clip_train.data import DataError

log = logging.getLogger("clip_train.data.pipeline")


class SampleError(ValueError):
    """One sample is unusable: `reason` is one of SKIP_REASONS, the message names shard and key."""

    def __init__(self, reason: str, message: str, url: str | None = None):
        super().__init__(message)
        self.reason, self.url = reason, url


class DataQualityError(DataError):
    """Too many samples were skipped: the data (or a transform) is broken, not merely noisy."""


# errors that mean "this sample or shard is bad"; anything else (a bug in a transform or the
# tokenizer, say) propagates instead of being counted away
_DATA_ERRORS = (SampleError, OSError, EOFError, ValueError, tarfile.TarError)


# Why a sample was skipped. The order is fixed: it indexes the shared counters below.
SKIP_REASONS = (
    "unreadable_shard",  # missing, truncated or corrupt tar (or a failing pipe: command)
    "no_image",
    "no_caption",
    "empty_caption",  # empty or whitespace only
    "caption_not_utf8",
    "undecodable_image",  # random bytes, 0 bytes, truncated file
    "image_too_large",  # over data.max_pixels (decompression bomb)
    "bad_captions",  # data.captions=json:<field>: no JSON, or not a caption list (data/captions.py)
    "other",
)


class DataErrors:
    """The `handler=` of every webdataset stage: count a bad sample by reason and shard, log the
    first few of each reason with shard and key, go on. Whether too many are bad is decided over
    all workers and ranks of a run by SkipRateGuard, in the main process.

    The totals live in shared memory so the main process sees what the loader workers skipped.
    """

    def __init__(
        self,
        urls: list[str] = (),
        *,
        log_first: int = 3,
    ):
        self._url_index = {url: i for i, url in enumerate(urls)}
        self._urls = list(urls)
        self._seen = multiprocessing.Value("q", 0)
        self._by_reason = multiprocessing.Array("q", len(SKIP_REASONS))
        # per shard, so the guard can name the shards that cause the skips
        self._shard_seen = multiprocessing.Array("q", max(len(self._urls), 1))
        self._shard_skipped = multiprocessing.Array("q", max(len(self._urls), 1))
        self.log_first = log_first
        self._logged: dict[str, int] = {}  # these three are per process (each worker has its own)
        self._broken_stream: str | None = None
        # unreadable-tar errors whose broken sample may still come (through the shuffle buffer)
        self._cuts: collections.deque = collections.deque(maxlen=16)

    @staticmethod
    def _classify(exn: BaseException) -> str:
        if isinstance(exn, SampleError):
            return exn.reason
        if isinstance(exn, (tarfile.TarError, EOFError, OSError)):
            return "unreadable_shard"
        return "other"

    def _shard_of(self, exn: BaseException) -> int | None:
        # webdataset appends the shard URL to the args of errors raised while reading a tar
        url = getattr(exn, "url", None)
        candidates = [url] if url else [a for a in exn.args if isinstance(a, str)]
        for candidate in candidates:
            if candidate in self._url_index:
                return self._url_index[candidate]
        return None

    def _reported_twice(self, exn: BaseException) -> bool:
        """webdataset reports a tar that breaks inside a member twice: first its inner loop, with
        " @ <stream>" appended to the message and no URL, then its outer loop, with the stream and
        URL appended. The first is counted (and remembered); the second only names the shard."""
        first = exn.args[0] if exn.args and isinstance(exn.args[0], str) else ""
        if " @ " in first and not any(a in self._url_index for a in exn.args if isinstance(a, str)):
            self._broken_stream = first.rsplit(" @ ", 1)[1]
            return False
        broken = self._broken_stream
        if broken is not None and len(exn.args) >= 2 and str(exn.args[-2]) == broken:
            self._broken_stream = None
            return True
        return False

    def __call__(self, exn: BaseException) -> bool:
        if not isinstance(exn, _DATA_ERRORS) or isinstance(exn, DataError):
            raise exn  # a bug, or a verdict about the whole run (DataError): never counted away
        reason = self._classify(exn)
        if reason == "unreadable_shard" and self._reported_twice(exn):
            self._count_for_shard(exn)  # now with its URL: attribute it, but count it once
            return True
        if self._cut_victim(exn, reason):
            return True  # counted, and attributed, as the cut
        if reason == "unreadable_shard":
            self._cuts.append(" ".join(str(a) for a in exn.args))
        with self._by_reason.get_lock():
            self._by_reason[SKIP_REASONS.index(reason)] += 1
        self._count_for_shard(exn)
        logged = self._logged.get(reason, 0)
        if logged < self.log_first:
            self._logged[reason] = logged + 1
            more = " (further ones are counted, not logged)" if logged + 1 == self.log_first else ""
            message = " ".join(str(a) for a in exn.args if isinstance(a, str)) or type(exn).__name__
            log.warning("skipped a bad sample (%s): %s%s", reason, message, more)
        return True  # keep going

    def _cut_victim(self, exn: BaseException, reason: str) -> bool:
        """A tar cut inside a sample's member yields the rest of that sample, which then lacks an
        image or caption: the cut was counted (unreadable_shard), the sample it broke is not counted
        again. Recognised as the first incomplete sample of a shard that an error message names."""
        url = getattr(exn, "url", None)
        if reason not in ("no_image", "no_caption") or not url:
            return False
        for cut in self._cuts:
            if url in cut:
                self._cuts.remove(cut)
                return True
        return False

    def _count_for_shard(self, exn: BaseException) -> None:
        shard = self._shard_of(exn)
        if shard is not None:
            with self._shard_skipped.get_lock():
                self._shard_skipped[shard] += 1

    def ok(self, url: str | None = None) -> None:
        with self._seen.get_lock():
            self._seen.value += 1
        shard = self._url_index.get(url)
        if shard is not None:
            with self._shard_seen.get_lock():
                self._shard_seen[shard] += 1

    def shard_counts(self) -> dict[str, tuple[int, int]]:
        """{url: (bad, read)} for each shard with a bad sample."""
        counts = zip(self._urls, self._shard_skipped[:], self._shard_seen[:])
        return {url: (bad, bad + good) for url, bad, good in counts if bad}

    def skipped_by_reason(self) -> dict[str, int]:
        return {reason: n for reason, n in zip(SKIP_REASONS, self._by_reason[:], strict=True) if n}

    def stats(self) -> dict[str, int]:
        """{"seen": good samples, "skipped": bad ones, "skipped/<reason>": ... for each reason met}."""
        by_reason = self.skipped_by_reason()
        return {
            "seen": self._seen.value,
            "skipped": sum(by_reason.values()),
            **{f"skipped/{reason}": n for reason, n in by_reason.items()},
        }


def worst_shards(counts: dict[str, tuple[int, int]], n: int = 3) -> list[str]:
    """The n shards with the most bad samples, as "url (bad of read)"."""
    worst = sorted(counts.items(), key=lambda item: (-item[1][0], item[0]))[:n]
    return [f"{url} ({bad} bad of {read})" for url, (bad, read) in worst]


class SkipRateGuard:
    """Stops a run when more than max_skip_frac of the last `window` samples read were bad.

    update() takes the run's totals (read and skipped, over all workers and ranks); the rate is
    taken from the newest earlier total at least `window` samples back, so the window rolls over
    loader rebuilds. history is [read, skipped] totals of the run, restarts included: it is saved
    with the train state, and a restarted process's own counts are added to the last one.
    """

    def __init__(self, max_skip_frac: float, window: int, history: list | None = None):
        self.max_skip_frac, self.window = max_skip_frac, window
        self.history: collections.deque = collections.deque(tuple(h) for h in history or [])
        self.offset = self.history[-1] if self.history else (0, 0)

    def update(self, read: int, skipped: int) -> float | None:
        """The skip fraction over the window if it is over the limit, else None."""
        read, skipped = read + self.offset[0], skipped + self.offset[1]
        self.history.append((read, skipped))
        while len(self.history) > 2 and read - self.history[1][0] >= self.window:
            self.history.popleft()  # the next one still spans a whole window
        first_read, first_skipped = self.history[0]
        if read - first_read < self.window:
            return None
        frac = (skipped - first_skipped) / (read - first_read)
        return frac if frac > self.max_skip_frac else None

    def error(self, frac: float, by_reason: dict[str, int], shards: dict[str, tuple[int, int]]):
        span = self.history[-1][0] - self.history[0][0]
        worst = worst_shards(shards)
        return DataQualityError(
            f"{frac:.1%} of the last {span} samples read were bad (limit data.max_skip_frac="
            f"{self.max_skip_frac:.1%}); by reason: "
            + ", ".join(f"{reason} {n}" for reason, n in by_reason.items() if n)
            + (f"; worst shards: {', '.join(worst)}" if worst else "")
            + ": fix or drop those shards, or raise data.max_skip_frac"
        )

    def state(self) -> list:
        return [list(h) for h in self.history]


class DataCounts:
    """A process's samples read and skipped (by reason, by shard) and each source's share, since it
    started: the counts of loaders already replaced (one per checkpoint segment) are carried over."""

    def __init__(self, source_names: list[str]):
        self.names = list(source_names)
        self.carried = collections.Counter()
        self.carried_shards: dict[str, tuple[int, int]] = {}
        self.per_source = collections.Counter()

    def retire(self, loader) -> None:
        if loader is not None:
            self.carried.update(self._local(loader.data_errors))
            self.carried_shards = add_shard_counts(self.carried_shards, loader.data_errors.shard_counts())

    def add_sources(self, names: list[str]) -> None:
        self.per_source.update(names)

    @staticmethod
    def _local(errors: DataErrors) -> collections.Counter:
        return collections.Counter({"seen": errors.stats()["seen"], **errors.skipped_by_reason()})

    def totals(self, loader) -> list[int]:
        """[good samples, then skipped samples per SKIP_REASONS entry], this process."""
        local = self.carried + self._local(loader.data_errors)
        return [local["seen"]] + [local[r] for r in SKIP_REASONS]

    def shard_counts(self, loader) -> dict[str, tuple[int, int]]:
        return add_shard_counts(self.carried_shards, loader.data_errors.shard_counts())

    def metrics(self, loader, sum_over_ranks) -> dict:
        """Summed over all processes by sum_over_ranks (a collective every rank calls at once)."""
        values = self.totals(loader) + [self.per_source[n] for n in self.names]
        total = [int(v) for v in sum_over_ranks(values)]
        seen, skipped, per_source = total[0], total[1 : 1 + len(SKIP_REASONS)], total[1 + len(SKIP_REASONS) :]
        out = {"data/seen": seen, "data/skipped": sum(skipped)}
        out.update({f"data/skipped/{r}": n for r, n in zip(SKIP_REASONS, skipped, strict=True) if n})
        read = max(sum(per_source), 1)
        out.update({f"data/share/{n}": c / read for n, c in zip(self.names, per_source, strict=True)})
        return out


def add_shard_counts(
    a: dict[str, tuple[int, int]], b: dict[str, tuple[int, int]]
) -> dict[str, tuple[int, int]]:
    """Per-shard (bad, read) counts added up."""
    out = dict(a)
    for url, (bad, read) in b.items():
        old_bad, old_read = out.get(url, (0, 0))
        out[url] = (old_bad + bad, old_read + read)
    return out
