"""Training data at scale: bad data of every kind counted by reason, the skip-rate guard naming the
worst shards, sources mixed by weight, pipe: and fsspec URLs, readers without shards, empty
sources, JPEG draft decoding.

Every shard is written here with webdataset's TarWriter from small PIL images.
"""

from __future__ import annotations

import collections
import io
import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import train_loader
from PIL import Image

from clip_train.data import DataError
from clip_train.data.pipeline import (
    Source,
    check_readers,
    in_worker_order,
)
from clip_train.data.quality import DataErrors, DataQualityError, SampleError, SkipRateGuard

CONTEXT = 24


def tokenize(text: str) -> torch.Tensor:
    ids = list(text.encode())[:CONTEXT]
    return torch.tensor(ids + [0] * (CONTEXT - len(ids)), dtype=torch.long)


def detokenize(tokens: torch.Tensor) -> str:
    return bytes(t for t in tokens.tolist() if t).decode()


def to_tensor(img: Image.Image) -> torch.Tensor:
    assert img.mode == "RGB"  # the pipeline converts every mode before the transform
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)


def encoded(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def good_shard(path: Path, tag: str, n: int = 10) -> None:
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            img = Image.new("RGB", (20, 16), (10 * i, 100, 200))
            sink.write({"__key__": f"{tag}{i:03d}", "jpg": encoded(img), "txt": f"{tag} {i}"})


LOADER_DEFAULTS = dict(
    batch_size=4,
    num_workers=0,
    seed=0,
    transform=to_tensor,
    tokenize=tokenize,
    resampled=False,
    shard_shuffle=1,
    sample_shuffle=1,
)


def loader(shards, **kwargs):
    return train_loader(shards, defaults=LOADER_DEFAULTS, **kwargs)


# ------------------------------------------------------------------------------ bad data


def bad_data_shards(folder: Path) -> dict[str, int]:
    """One shard holding one sample of each bad kind (and the convertible modes), one truncated
    tar. Returns the expected skip counts by reason."""
    folder.mkdir(parents=True, exist_ok=True)
    rgba = Image.new("RGBA", (12, 12), (0, 0, 0, 0))
    rgba.paste(Image.new("RGBA", (4, 4), (255, 0, 0, 255)), (4, 4))
    palette = Image.new("RGB", (12, 12), (0, 200, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
    samples = [
        {"__key__": "good", "jpg": encoded(Image.new("RGB", (12, 12), (1, 2, 3))), "txt": "good"},
        {"__key__": "gray", "png": encoded(Image.new("L", (12, 12), 128), "PNG"), "txt": "grayscale"},
        {"__key__": "rgba", "png": encoded(rgba, "PNG"), "txt": "cut-out"},
        {"__key__": "palette", "png": encoded(palette, "PNG"), "txt": "palette"},
        {"__key__": "nocap", "jpg": encoded(Image.new("RGB", (12, 12)))},
        {"__key__": "blank", "jpg": encoded(Image.new("RGB", (12, 12))), "txt": " \t\n "},
        {"__key__": "latin1", "jpg": encoded(Image.new("RGB", (12, 12))), "txt": "caf\xe9".encode("latin-1")},
        {
            "__key__": "noise",
            "jpg": bytes(random.Random(0).randrange(256) for _ in range(500)),
            "txt": "noise",
        },
        {"__key__": "zero", "jpg": b"", "txt": "zero bytes"},
        {"__key__": "bomb", "png": encoded(Image.new("L", (400, 300)), "PNG"), "txt": "too many pixels"},
        {"__key__": "noimage", "txt": "a caption alone"},
    ]
    with wds.TarWriter(str(folder / "a-mixed.tar")) as sink:
        for sample in samples:
            sink.write(sample)
    good_shard(folder / "b-truncated.tar", "t", n=6)
    data = (folder / "b-truncated.tar").read_bytes()
    (folder / "b-truncated.tar").write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    return {
        "no_caption": 1,
        "empty_caption": 1,
        "caption_not_utf8": 1,
        "undecodable_image": 2,
        "image_too_large": 1,
        "no_image": 1,
        "unreadable_shard": 1,
    }


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_kind_of_bad_data_is_counted_by_reason_and_never_fatal(tmp_path, num_workers, caplog):
    expected = bad_data_shards(tmp_path / "shards")
    run = loader(str(tmp_path / "shards"), batch_size=1, num_workers=num_workers, max_pixels=50_000)
    batches = list(run)
    captions = {detokenize(batch.tokens[0]) for batch in batches}
    good_from_truncated = {c for c in captions if c.startswith("t ")}
    assert captions - good_from_truncated == {"good", "grayscale", "cut-out", "palette"}
    assert 1 <= len(good_from_truncated) < 6  # the members before the cut are read
    assert all(batch.images.shape == (1, 3, 8, 8) for batch in batches)
    by_key = {batch.keys[0].rsplit("/", 1)[1]: batch.images[0] for batch in batches}
    assert torch.allclose(by_key["rgba"][:, 0, 0], torch.ones(3))  # transparency composited on white
    stats = run.data_errors.stats()  # counted across the worker processes
    assert {k.split("/", 1)[1]: v for k, v in stats.items() if k.startswith("skipped/")} == expected
    assert stats["skipped"] == sum(expected.values())
    assert stats["seen"] == len(batches)
    if num_workers == 0:
        messages = [r.getMessage() for r in caplog.records]
        assert any("(image_too_large)" in m and "a-mixed.tar bomb" in m for m in messages)
        assert any("(caption_not_utf8)" in m and "latin1" in m for m in messages)
        assert any("(unreadable_shard)" in m and "b-truncated.tar" in m for m in messages)


def test_a_bad_sample_is_counted_by_reason_and_shard():
    errors = DataErrors(["good.tar", "bad.tar"])
    for _ in range(8):
        errors.ok("good.tar")
    errors(SampleError("no_caption", "bad.tar k1: no caption", "bad.tar"))
    errors(SampleError("undecodable_image", "bad.tar k2: junk", "bad.tar"))
    assert errors.skipped_by_reason() == {"no_caption": 1, "undecodable_image": 1}
    assert errors.shard_counts() == {"bad.tar": (2, 2)}  # good.tar had no bad sample
    with pytest.raises(TypeError):  # a bug in a transform is raised, not counted away
        errors(TypeError("transform bug"))


def test_the_skip_rate_guard_rolls_its_window_over_loader_rebuilds_and_restarts():
    guard = SkipRateGuard(max_skip_frac=0.1, window=100)
    # run totals (read, skipped) step by step: 5% bad, then a bad source sets in
    assert [guard.update(read, read // 20) for read in range(20, 201, 20)] == [None] * 10
    history = guard.state()
    assert history[0] == [100, 5] and history[-1] == [200, 10]  # only what the window needs: saved
    restarted = SkipRateGuard(max_skip_frac=0.1, window=100, history=history)  # a resumed process
    # its own counts start at 0; 40 read, 20 of them bad: over the last 100 of the run, 23% bad
    frac = restarted.update(40, 20)
    assert frac == pytest.approx(
        (200 // 20 + 20 - history[-len(history) + 1][1]) / (240 - history[1][0]), abs=0.2
    )
    assert frac > 0.1
    error = restarted.error(
        frac, {"no_caption": 3, "undecodable_image": 20}, {"bad.tar": (20, 25), "ok.tar": (3, 215)}
    )
    message = str(error)
    assert (
        isinstance(error, DataQualityError)
        and "samples read were bad (limit data.max_skip_frac=10.0%)" in message
    )
    assert "by reason: no_caption 3, undecodable_image 20" in message
    assert "worst shards: bad.tar (20 bad of 25), ok.tar (3 bad of 215)" in message


def test_a_tar_cut_inside_its_last_member_counts_its_sample_once(tmp_path):
    import tarfile

    good_shard(tmp_path / "cut.tar", "c", n=4)
    with tarfile.open(tmp_path / "cut.tar") as tar:
        last = tar.getmembers()[-1]
    data = (tmp_path / "cut.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: last.offset_data + last.size // 2])
    for shuffle in (1, 100):  # the broken sample may come out of the shuffle buffer later
        run = loader(str(tmp_path / "cut.tar"), batch_size=1, sample_shuffle=shuffle)
        assert len(list(run)) == 3
        assert run.data_errors.stats() == {"seen": 3, "skipped": 1, "skipped/unreadable_shard": 1}
        assert run.data_errors.shard_counts() == {str(tmp_path / "cut.tar"): (1, 4)}


# ------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop_after", [3, 4])  # after a batch of worker 0, and of worker 1
def test_a_loader_rebuilt_from_the_positions_continues_with_the_same_batches(
    tmp_path, num_workers, stop_after
):
    for i in range(3):
        good_shard(tmp_path / f"{i}.tar", f"s{i}-", n=10)

    def augment(img):  # a random transform, drawing from torch's global RNG like torchvision's
        return to_tensor(img) * torch.rand(1)

    settings = dict(
        resampled=True, sample_shuffle=8, num_workers=num_workers, batch_size=3, seed=5, transform=augment
    )
    straight = list(itertools.islice(loader(str(tmp_path), **settings), 8))
    positions: dict[int, int] = {}
    for batch in straight[:stop_after]:
        for worker, n in batch.positions:
            positions[worker] = max(n, positions.get(worker, 0))
    next_worker = (straight[stop_after - 1].positions[0][0] + 1) % max(num_workers, 1)
    resumed = in_worker_order(
        iter(loader(str(tmp_path), skip_through=positions, **settings)),
        num_workers=num_workers,
        first_worker=next_worker,
    )
    for want, got in zip(straight[stop_after:], resumed, strict=False):
        assert want.keys == got.keys  # the same samples, in the same order
        assert torch.equal(want.images, got.images)  # augmented the same way
    if num_workers == 2:
        assert len(positions) == 2 and next_worker == stop_after % 2


# ------------------------------------------------------------------------------ sources


def test_sources_are_mixed_by_weight_and_tagged(tmp_path):
    good_shard(tmp_path / "a.tar", "a", n=20)
    good_shard(tmp_path / "b.tar", "b", n=20)
    sources = [Source("big", str(tmp_path / "a.tar"), 3.0), Source("small", str(tmp_path / "b.tar"), 1.0)]
    counts = collections.Counter()
    for batch in itertools.islice(loader(sources, resampled=True, batch_size=8), 250):
        for t, key, name in zip(batch.tokens, batch.keys, batch.sources, strict=True):
            assert detokenize(t)[0] == {"big": "a", "small": "b"}[name]  # the tag is the sample's source
            assert Path(key).parent.name == ("a.tar" if name == "big" else "b.tar")
            counts[name] += 1
    share = counts["big"] / sum(counts.values())
    assert abs(share - 0.75) < 0.03, share  # 2,000 draws: the standard error is about 0.01


def test_a_mix_is_a_pure_function_of_the_seed(tmp_path):
    good_shard(tmp_path / "a.tar", "a")
    good_shard(tmp_path / "b.tar", "b")
    sources = [Source("a", str(tmp_path / "a.tar"), 1.0), Source("b", str(tmp_path / "b.tar"), 1.0)]

    def keys(seed, workers):
        run = loader(sources, resampled=True, seed=seed, num_workers=workers, sample_shuffle=5)
        return [k for batch in itertools.islice(run, 12) for k in batch.keys]

    assert keys(1, 0) == keys(1, 0) and keys(1, 2) == keys(1, 2)
    assert keys(1, 0) != keys(2, 0)


def test_an_empty_source_is_an_error_not_a_hang(tmp_path):
    good_shard(tmp_path / "a.tar", "a")
    with wds.TarWriter(str(tmp_path / "empty.tar")):
        pass
    sources = [Source("a", str(tmp_path / "a.tar")), Source("empty", str(tmp_path / "empty.tar"))]
    with pytest.raises(DataError, match="data source 'empty' gave no sample from 20 shards in a row"):
        for _ in itertools.islice(loader(sources, resampled=True), 100):
            pass


def test_pipe_and_fsspec_urls(tmp_path):
    good_shard(tmp_path / "a.tar", "a", n=8)
    via_pipe = [k for batch in loader(f"pipe:cat {tmp_path}/a.tar") for k in batch.keys]
    assert [k.rsplit("/", 1)[1] for k in via_pipe] == [f"a{i:03d}" for i in range(8)]
    assert via_pipe[0].startswith("pipe:cat ")

    fsspec = pytest.importorskip("fsspec")
    with fsspec.open("memory://shards/a.tar", "wb") as f:
        f.write((tmp_path / "a.tar").read_bytes())
    via_memory = [k for batch in loader("memory://shards/a.tar") for k in batch.keys]
    assert [k.rsplit("/", 1)[1] for k in via_memory] == [f"a{i:03d}" for i in range(8)]


def test_readers_without_a_shard_are_a_config_error(tmp_path):
    for i in range(3):
        good_shard(tmp_path / f"{i}.tar", str(i))
    one = [Source("train", str(tmp_path))]
    check_readers(one, world_size=1, num_workers=2, resampled=False)  # 3 shards, 2 readers
    with pytest.raises(DataError, match=r"3 shard\(s\) for 4 readers \(2 process\(es\) x 2 worker\(s\)\)"):
        check_readers(one, world_size=2, num_workers=2, resampled=False)
    check_readers(one, world_size=2, num_workers=2, resampled=True)  # resampled: any count works
    two = [*one, Source("other", str(tmp_path))]
    with pytest.raises(DataError, match="needs resampled shards"):
        check_readers(two, world_size=1, num_workers=0, resampled=False)


# ------------------------------------------------------------------------------ decoding


def test_jpeg_draft_decoding_never_goes_below_the_requested_size(tmp_path):
    big = Image.radial_gradient("L").resize((1024, 768)).convert("RGB")
    with wds.TarWriter(str(tmp_path / "big.tar")) as sink:
        sink.write({"__key__": "big", "jpg": encoded(big), "txt": "big"})
    sizes = {}

    def record_size(img):
        sizes[len(sizes)] = img.size
        return to_tensor(img)

    full = next(iter(loader(str(tmp_path / "big.tar"), batch_size=1, transform=record_size)))
    draft = next(
        iter(loader(str(tmp_path / "big.tar"), batch_size=1, transform=record_size, decode_size=224))
    )
    assert sizes == {0: (1024, 768), 1: (512, 384)}  # 1/4 would give 192 rows, under 224
    assert torch.allclose(full.images, draft.images, atol=0.05)  # the same picture
