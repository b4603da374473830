"""Several captions per image: where a sample's captions are, and which one a visit reads.

    reader = CaptionReader("json:captions", "weighted", text_key="txt")
    caption = reader(sample, where, url, seed=1234)   # one caption; SampleError if there is none

`data.captions` names where the captions are (see DataConfig): the text member whole (the default,
what shards always meant: one caption, line breaks read as spaces), its non-empty lines, its first
line, or a field of the json member holding a caption, a list of captions or a list of
{"text": ..., "weight": ...}. `data.caption_sampling` picks one per visit: uniform, weighted (the
json weights, 1 where a caption has none) or first.

The pick is drawn from a seed the caller derives from (run seed, segment, rank, loader worker,
position of the sample in that worker's stream): the same numbers a resumed run rebuilds, so it
reads the same captions as the interrupted one, and nothing else's random stream moves.
A sample whose captions cannot be read is a bad sample (SampleError, counted and skipped).
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

from clip_train.data.quality import SampleError

JSON_PREFIX = "json:"


def _clean(text: str) -> str:
    return " ".join(text.split())


def _decode_text(raw: Any, where: str, url: str | None) -> str:
    try:
        return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        raise SampleError("caption_not_utf8", f"{where}: caption is not UTF-8", url) from None


def caption_list(value: Any, where: str, url: str | None = None) -> list[tuple[str, float]]:
    """A json caption field -> [(caption, weight)]: a string, or a list of strings and
    {"text", "weight"} objects (weight >= 0, default 1). Empty captions are dropped."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise SampleError(
            "bad_captions", f"{where}: captions are a {type(value).__name__}, not a list of captions", url
        )
    out = []
    for item in value:
        if isinstance(item, str):
            text, weight = item, 1.0
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            text, weight = item["text"], item.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
                raise SampleError(
                    "bad_captions", f"{where}: caption weight {weight!r} is not a number >= 0", url
                )
            if not math.isfinite(weight):
                raise SampleError("bad_captions", f"{where}: caption weight {weight!r} is not finite", url)
        else:
            raise SampleError(
                "bad_captions", f"{where}: caption {item!r:.60} is neither a string nor {{text, weight}}", url
            )
        text = _clean(text)
        if text:
            out.append((text, float(weight)))
    if not out:
        raise SampleError("empty_caption", f"{where}: empty caption list", url)
    return out


def _json_captions(sample: dict, field: str, where: str, url: str | None) -> list[tuple[str, float]]:
    raw = sample.get("json")
    if raw is None:
        raise SampleError("no_caption", f"{where}: no json member (data.captions=json:{field})", url)
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise SampleError("bad_captions", f"{where}: its json member is not JSON ({e})", url) from None
    if not isinstance(meta, dict) or field not in meta:
        raise SampleError("no_caption", f"{where}: its json member has no field {field!r}", url)
    return caption_list(meta[field], where, url)


def read_captions(
    sample: dict, spec: str, text_key: str, where: str, url: str | None = None
) -> list[tuple[str, float]]:
    """Every caption of a raw tar sample by data.captions `spec`, as [(caption, weight)]."""
    if spec.startswith(JSON_PREFIX):
        return _json_captions(sample, spec[len(JSON_PREFIX) :], where, url)
    raw = sample.get(text_key)
    if raw is None:
        raise SampleError("no_caption", f"{where}: no caption ({text_key})", url)
    text = _decode_text(raw, where, url)
    if spec == "whole":
        texts = [_clean(text)]
    else:
        texts = [line for line in map(_clean, text.splitlines()) if line]
        texts = texts[:1] if spec == "first-line" else texts
    texts = [t for t in texts if t]
    if not texts:
        raise SampleError("empty_caption", f"{where}: empty caption", url)
    return [(t, 1.0) for t in texts]


def pick(captions: list[tuple[str, float]], sampling: str, seed: int | None) -> str:
    """One caption: the first (sampling "first", a single caption, or no seed: evaluation), else
    drawn uniformly or by weight from an RNG of its own seeded with `seed`."""
    if len(captions) == 1 or sampling == "first" or seed is None:
        return captions[0][0]
    rng = random.Random(seed)
    if sampling == "weighted":
        weights = [w for _, w in captions]
        if not sum(weights) > 0:
            return captions[0][0]  # all weights 0: nothing to prefer, take the first
        return captions[rng.choices(range(len(captions)), weights)[0]][0]
    return captions[rng.randrange(len(captions))][0]


class CaptionReader:
    """data.captions and data.caption_sampling as one callable of the pipeline's _Prepare stage."""

    def __init__(self, spec: str = "whole", sampling: str = "uniform", *, text_key: str = "txt"):
        self.spec, self.sampling, self.text_key = spec, sampling, text_key

    def __call__(self, sample: dict, where: str, url: str | None, seed: int | None = None) -> str:
        return pick(read_captions(sample, self.spec, self.text_key, where, url), self.sampling, seed)
