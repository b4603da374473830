"""Several captions per image: what the seeded pick costs the training loader, and what it reads.

    python benchmarks/captions.py [--images 240] [--batches 60] [--out benchmarks/results/captions.json]

Builds shards of generated shape images with three captions each, weighted 1, 2, 1, with
`clip-data manifest` from a JSONL list column, then reads --batches batches of 32 (2 loader
workers, 64 px crops, the tiny tokenizer) with data.captions=whole (the text as one caption, the
default) and with data.captions=json:captions, caption_sampling=weighted. Reports samples/s of
each, the microseconds of the caption read and pick alone per sample, and, for the weighted side,
the share of each caption position (expected 0.25, 0.5, 0.25).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import COLOURS, SHAPES, draw  # noqa: E402  (the tests' shape drawer)
from torchvision import transforms  # noqa: E402

from clip_train.config import DataConfig, load_config  # noqa: E402
from clip_train.data.build import main as clip_data  # noqa: E402
from clip_train.data.captions import CaptionReader  # noqa: E402
from clip_train.data.pipeline import build_train_loader  # noqa: E402
from clip_train.models.tokenizer import build_tokenizer  # noqa: E402

WEIGHTS = (1, 2, 1)


def _shards(root: Path, images: int) -> tuple[Path, dict[str, list[str]]]:
    src, lines, captions = root / "src", [], {}
    src.mkdir()
    for i in range(images):
        colour, shape = list(COLOURS)[i % 4], SHAPES[i % 3]
        draw(shape, colour, size=96, seed=i).save(src / f"{i:04d}.png")
        caps = [f"a {colour} {shape}", f"{shape} in {colour}", f"picture number {i}"]
        captions[f"{i:04d}"] = caps
        lines.append(
            {"file": f"{i:04d}.png", "text": [{"text": c, "weight": w} for c, w in zip(caps, WEIGHTS)]}
        )
    (src / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ["manifest", str(src / "m.jsonl"), "--image-col", "file", "--caption-col", "text"]
    assert clip_data([*args, "--out", str(root / "shards"), "--val-frac", "0", "--shard-size", "40"]) == 0
    return root / "shards", captions


def _read(shards: Path, batches: int, **captions) -> tuple[float, list[tuple[str, str]]]:
    transform = transforms.Compose(
        [transforms.RandomResizedCrop(64, scale=(0.9, 1)), transforms.PILToTensor()]
    )
    tokenizer = build_tokenizer(
        load_config(["configs/tiny.yaml"], ["run_dir=r", "data.train_shards=x"]).model.text
    )
    data = DataConfig(train_shards=str(shards), batch_size=32, num_workers=2, **captions)
    it = iter(build_train_loader(data, seed=0, transform=transform, tokenize=tokenizer))
    next(it)  # workers started
    start, read = time.perf_counter(), []
    for _ in range(batches):
        batch = next(it)
        read += [(key.rsplit("/", 1)[1], cap) for key, cap in zip(batch.keys, batch.captions)]
    return len(read) / (time.perf_counter() - start), read


def _pick_us(spec: str, sampling: str, sample: dict, n: int = 20000) -> float:
    """Microseconds per call of the pipeline's caption reader (read + seeded pick) on one sample."""
    reader = CaptionReader(spec, sampling)
    start = time.perf_counter()
    for seed in range(n):
        reader(sample, "where", None, seed)
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/captions.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards, captions = _shards(Path(tmp), args.images)
        whole_rate, _ = _read(shards, args.batches)
        weighted_rate, read = _read(
            shards, args.batches, captions="json:captions", caption_sampling="weighted"
        )
    caps = [{"text": f"caption number {i}", "weight": w} for i, w in enumerate(WEIGHTS)]
    sample = {"txt": b"a red circle", "json": json.dumps({"captions": caps, "source": "x"}).encode()}
    pick_us = {
        "whole": _pick_us("whole", "uniform", sample),
        "json_weighted": _pick_us("json:captions", "weighted", sample),
    }
    positions = collections.Counter(captions[key].index(cap) for key, cap in read)
    result = {
        "command": "python benchmarks/captions.py " + " ".join(sys.argv[1:]),
        "samples": len(read),
        "samples_per_s": {"whole": round(whole_rate, 1), "json_weighted": round(weighted_rate, 1)},
        "caption_read_and_pick_us": {k: round(v, 2) for k, v in pick_us.items()},
        "caption_share": {
            f"position_{p}_weight_{w}": round(positions[p] / len(read), 3) for p, w in enumerate(WEIGHTS)
        },
        "expected_share": [w / sum(WEIGHTS) for w in WEIGHTS],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
