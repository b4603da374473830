"""The stages of pipeline.py's webdataset pipelines: module-level callables, so that the pipeline pickles
for any worker start method. _Prepare turns a raw tar sample into (image tensor, token ids[, meta]) by the
rules every reader of the shards follows (inspection.py counts bad samples by the same ones)."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds

from clip_train.data import DataError
from clip_train.data.captions import CaptionReader
from clip_train.data.quality import DataErrors, SampleError
from clip_train.data.shards import ImageTooLarge, open_image, to_rgb
from clip_train.data.teacher_members import IMAGE_MEMBER, TEXT_MEMBER, decode_embedding

SOURCE_FIELD = "__source__"  # the name of the source a raw sample came from


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


def _seed(*parts: Any) -> int:
    """A stable 63-bit seed from its parts (Python's hash() of a str is salted per process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _split_by_rank(src: Iterable, *, rank: int, world_size: int) -> Iterator:
    # wds.split_by_node asks torch.distributed (or $RANK); the trainer tells us instead
    yield from itertools.islice(src, rank, None, world_size)


def _tag_source(src: Iterable[dict], *, name: str) -> Iterator[dict]:
    for sample in src:
        sample[SOURCE_FIELD] = name
        yield sample


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
        decode_size: int | None = None,
        skip_through: dict[int, int] | None = None,
        captions: CaptionReader | None = None,
        teacher_members: bool = False,
    ):
        self.teacher_members = teacher_members  # also return the sample's teacher embeddings
        self.image_keys = [k.strip().lower() for k in image_key.split(";") if k.strip()]
        self.text_key, self.transform, self.tokenize = text_key, transform, tokenize
        self.captions = captions or CaptionReader(text_key=text_key)
        self.max_pixels, self.errors, self.with_meta = max_pixels, errors, with_meta
        self.augment_seed, self.decode_size = augment_seed, decode_size
        self.skip_through = dict(skip_through or {})  # a copy: the caller's may keep changing
        self.position = 0  # samples this copy (one per loader worker) has prepared

    def __call__(self, sample: dict[str, Any]) -> tuple | None:
        self.position += 1
        if self.position <= self.skip_through.get(_worker_id(), 0):
            return None  # consumed before a resume: dropped by wds.map without being decoded
        key, url = sample.get("__key__"), sample.get("__url__")
        where = f"{url} {key}"
        data = next((sample[k] for k in self.image_keys if k in sample), None)
        if data is None:
            raise SampleError("no_image", f"{where}: no image (looked for {', '.join(self.image_keys)})", url)
        # one caption of the sample's: drawn, in training, from this visit's own seed (captions.py)
        pick_seed = (
            None
            if self.augment_seed is None
            else _seed("caption", *self.augment_seed, _worker_id(), self.position)
        )
        caption = self.captions(sample, where, url, pick_seed)
        try:
            image = open_image(data, self.max_pixels)
        except ImageTooLarge as e:
            raise SampleError("image_too_large", f"{where}: {e}", url) from None
        except Exception as e:  # noqa: BLE001 - whatever PIL raises, this image is unusable
            raise SampleError("undecodable_image", f"{where}: {type(e).__name__}: {e}", url) from None
        try:
            if self.decode_size and image.format == "JPEG":
                # JPEG draft mode: decode at 1/2, 1/4 or 1/8 scale in the DCT domain, the
                # smallest that still leaves both sides >= decode_size, so a 1024 px photo headed
                # for a 224 px crop never decodes all of its pixels (PIL keeps the size if no
                # reduction fits).
                image.draft(image.mode, (self.decode_size, self.decode_size))
            image.load()  # decode here, so a truncated file is reported with its key
            image = to_rgb(image)
        except Exception as e:  # noqa: BLE001
            raise SampleError("undecodable_image", f"{where}: {type(e).__name__}: {e}", url) from None
        if self.augment_seed is None:
            pixels = self.transform(image)
        else:
            with _seeded_random(_seed("augment", *self.augment_seed, _worker_id(), self.position)):
                pixels = self.transform(image)
        tokens = torch.as_tensor(self.tokenize(caption), dtype=torch.long)
        if tokens.dim() == 2 and tokens.shape[0] == 1:  # tokenizers that return [1, L] for one text
            tokens = tokens[0]
        self.errors.ok(url)
        if self.with_meta == "url_key":  # training: keys unique across shard sets, the source, and
            # where in this worker's stream the sample was (what a resume skips through)
            where_in_stream = (_worker_id(), self.position)
            meta = (caption, f"{url}/{key}", sample.get(SOURCE_FIELD, ""), where_in_stream)
            return (
                pixels,
                tokens,
                *meta,
                *(_teacher_embeddings(sample, where) if self.teacher_members else ()),
            )
        return pixels, tokens, caption, key


def _teacher_embeddings(sample: dict[str, Any], where: str) -> tuple[torch.Tensor, torch.Tensor]:
    members = [sample.get(IMAGE_MEMBER), sample.get(TEXT_MEMBER)]
    if None in members:
        # not a bad sample but shards that are not what their teacher.json says: stop the run
        raise DataError(
            f"{where} has no {IMAGE_MEMBER} / {TEXT_MEMBER}: rewrite its shards with clip-data teacher"
        )
    return decode_embedding(members[0]), decode_embedding(members[1])


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
