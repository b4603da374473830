"""Shards that carry a teacher's embeddings (MobileCLIP's "reinforced" datasets): the format.

`clip-data teacher` (train/teacher_shards.py) writes a copy of a shard folder in which every
sample has two more members, `<key>.teacher_image.npy` and `<key>.teacher_text.npy` (float32
vectors: the teacher's L2-normalised embeddings of the sample's image, in the teacher's eval view,
and of its caption), and the folder a `teacher.json` naming the teacher and its logit scale.
The training loader reads them into Batch.teacher_image / teacher_text (distill.mode=offline).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from clip_train.data import DataError

IMAGE_MEMBER = "teacher_image.npy"
TEXT_MEMBER = "teacher_text.npy"
META_NAME = "teacher.json"


def encode_embedding(vector: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, vector.detach().float().cpu().numpy(), allow_pickle=False)
    return buffer.getvalue()


def decode_embedding(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))


def teacher_meta(spec: str, setting: str) -> dict:
    """The teacher.json shared by every shard of `spec` (setting names the key in the error);
    DataError when a shard's folder has none, or two folders name different teachers."""
    from clip_train.data.pipeline import expand_urls  # pipeline's stages import this module

    metas: dict[Path, dict] = {}
    for url in expand_urls(spec, split="train"):
        folder = Path(url).parent
        if folder in metas:
            continue
        path = folder / META_NAME
        if not path.is_file():
            raise DataError(
                f"{setting}={spec}: {folder} carries no teacher embeddings (no {META_NAME}); write them "
                f"with `clip-data teacher --teacher MODEL --shards {folder} --out NEW` and train on NEW"
            )
        metas[folder] = json.loads(path.read_text())
    scales = {meta["logit_scale"] for meta in metas.values()}
    if len(scales) > 1:
        raise DataError(
            f"{setting}={spec}: its shard folders carry embeddings of different teachers "
            f"({', '.join(str(f) for f in metas)}): write them all with the same teacher"
        )
    return next(iter(metas.values()))
