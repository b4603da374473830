"""`clip-data inspect`: counts, caption and image statistics, bad samples, the contact sheet.

Shards are written here with webdataset's TarWriter (one of every kind of bad sample) and with the
project's own writer (conftest's tiny_data, which carries a stats.json and a .json per sample).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from clip_train.data import pipeline
from clip_train.data.build import main as clip_data
from clip_train.data.contact_sheet import sheet_size


def _encoded(img: Image.Image, fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


GOOD = [  # (key, size, caption, source, category)
    ("a0", (40, 30), "a red square", "alpha", "shapes"),
    ("a1", (20, 60), "a tall  green\nbar on white", "alpha", "shapes"),
    ("a2", (64, 64), "one", "beta", "words"),
]


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """Two shards: shard 0 with 3 good samples (one a PNG cut-out) and 5 bad ones, shard 1 with 3."""
    folder = tmp_path / "shards"
    folder.mkdir()
    with wds.TarWriter(str(folder / "part-000000.tar")) as sink:
        for key, size, caption, source, category in GOOD:
            sink.write(
                {
                    "__key__": key,
                    "jpg": _encoded(Image.new("RGB", size, (200, 30, 30))),
                    "txt": caption,
                    "json": json.dumps({"source": source, "category": category}),
                }
            )
        sink.write({"__key__": "cutout", "png": _encoded(Image.new("RGBA", (10, 10)), "PNG"), "txt": "a b"})
        sink.write({"__key__": "broken", "jpg": b"\xff\xd8\xff not a jpeg", "txt": "broken image"})
        truncated = _encoded(Image.effect_noise((64, 48), 60).convert("RGB"))
        truncated = truncated[: len(truncated) * 2 // 3]  # the header reads, the pixels do not
        sink.write({"__key__": "truncated", "jpg": truncated, "txt": "cut short"})
        sink.write({"__key__": "nocaption", "jpg": _encoded(Image.new("RGB", (8, 8)))})
        latin1 = "caf\xe9".encode("latin-1")
        sink.write({"__key__": "latin1", "jpg": _encoded(Image.new("RGB", (8, 8))), "txt": latin1})
        sink.write({"__key__": "blank", "jpg": _encoded(Image.new("RGB", (8, 8))), "txt": " \n "})
        sink.write({"__key__": "textonly", "txt": "no picture", "json": b"{not json"})
    with wds.TarWriter(str(folder / "part-000001.tar")) as sink:
        for i in range(3):
            sink.write(
                {
                    "__key__": f"b{i}",
                    "jpg": _encoded(Image.new("RGB", (100 + i, 50), (30, 30, 200))),
                    "txt": f"blue picture number {i}",
                    "json": json.dumps({"source": "beta", "category": "blue"}),
                }
            )
    return folder


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = clip_data(["inspect", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_statistics_bad_samples_and_sheet(shards, tmp_path, capsys):
    sheet, stats = tmp_path / "out" / "sheet.png", tmp_path / "out" / "stats.json"
    code, out, _ = _run([str(shards), "--samples", "5", "--sheet", str(sheet), "--json", str(stats)], capsys)
    assert code == 0, out
    report = json.loads(stats.read_text())

    assert report["shards"]["count"] == 2
    assert [(s["samples"], s["bad"]) for s in report["shards"]["per_shard"]] == [(10, 6), (3, 0)]
    assert report["samples"] == {"read": 13, "usable": 7, "bad": 6, "limit": None}
    assert report["bad"]["by_reason"] == {
        "undecodable_image": 2,
        "no_caption": 1,
        "caption_not_utf8": 1,
        "empty_caption": 1,
        "no_image": 1,
    }
    assert report["bad"]["tar_errors"] == {}
    known = getattr(pipeline, "SKIP_REASONS", None)  # the pipeline's names, where it has them
    assert known is None or set(report["bad"]["by_reason"]) <= set(known)
    assert any("truncated" in e for e in report["bad"]["examples"]["undecodable_image"])
    assert report["members"] == {"txt": 12, "jpg": 11, "json": 7, "png": 1}

    # captions: whitespace collapsed as the pipeline does; the latin-1 one is not readable, the
    # blank one is readable and empty
    captions = report["captions"]
    assert captions["readable"] == 11 and captions["empty"] == 1
    lengths = sorted(
        [len("a red square"), len("a tall green bar on white"), 3, 3, 12, 9, 0, 10]
        + [len(f"blue picture number {i}") for i in range(3)]
    )
    assert captions["chars"]["min"] == 0 and captions["chars"]["max"] == lengths[-1] == 25
    assert captions["chars"]["median"] == lengths[len(lengths) // 2]
    assert captions["words"]["max"] == 6

    # images: every header that reads (the broken JPEG's does not; the truncated one's does)
    images = report["images"]
    assert images["readable_header"] == 11
    assert images["width"]["max"] == 102 and images["height"]["min"] == 8
    assert images["long_side"]["max"] == 102 and images["long_side"]["min"] == 8
    assert images["modes"] == {"RGB": 10, "RGBA": 1} and images["formats"] == {"JPEG": 10, "PNG": 1}
    assert images["file_bytes"]["total"] > 0
    assert [(s["width"], s["height"]) for s in images["smallest"]] == [(8, 8)] * 3

    meta = report["metadata"]
    assert meta["source"] == {"beta": 4, "alpha": 2} and meta["category"]["blue"] == 3
    assert meta["json_samples"] == 7 and meta["json_unreadable"] == 1

    # the printed report says the same
    assert f"shards: 2 in {shards}" in out
    assert "part-000000.tar" in out and "10 samples  (6 bad)" in out
    assert "samples: 13 read, 7 usable, 6 bad" in out
    assert "source (.json, 2 distinct, 6 samples): beta 4 (66.7%), alpha 2 (33.3%)" in out
    assert "bad samples (training skips them): undecodable_image 2, " in out
    assert "e.g. no_caption: part-000000.tar nocaption: no .txt" in out
    assert "  smallest: part-000000.tar/" in out and " 8x8" in out  # far below the median side, 60

    # the sheet: 5 of the 7 usable samples, a 3 x 2 grid
    assert report["sheet"]["samples"] == 5 and (report["sheet"]["cols"], report["sheet"]["rows"]) == (3, 2)
    assert f"written to {sheet.resolve()}" in out
    with Image.open(sheet) as img:
        assert img.format == "PNG" and img.size == sheet_size(5) == tuple(report["sheet"]["size"])


def test_sheet_is_seeded_and_defaults_to_the_current_folder(shards, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _run([str(shards), "--samples", "4", "--seed", "1"], capsys)[0] == 0
    first = (tmp_path / "inspect.png").read_bytes()
    assert _run([str(shards), "--samples", "4", "--seed", "1", "--sheet", "again.png"], capsys)[0] == 0
    assert (tmp_path / "again.png").read_bytes() == first
    assert _run([str(shards), "--samples", "4", "--seed", "2", "--sheet", "other.png"], capsys)[0] == 0
    assert (tmp_path / "other.png").read_bytes() != first
    # more samples asked than usable: all of them, 7 in a 4 x 2 grid
    code, out, _ = _run([str(shards), "--sheet", "all.png"], capsys)
    assert code == 0 and "contact sheet: 7 random usable samples (seed 0), 4 x 2" in out
    with Image.open(tmp_path / "all.png") as img:
        assert img.size == sheet_size(7)
    # --samples 0: no sheet
    code, out, _ = _run([str(shards), "--samples", "0", "--sheet", "none.png"], capsys)
    assert code == 0 and not (tmp_path / "none.png").exists() and "contact sheet" not in out


def test_limit_lists_and_pipes(shards, tmp_path, capsys):
    one, two = shards / "part-000000.tar", shards / "part-000001.tar"
    report_path = tmp_path / "r.json"
    args = ["--samples", "2", "--sheet", str(tmp_path / "s.png"), "--json", str(report_path)]
    code, out, _ = _run([f"{one}::pipe:cat {two}", "--limit", "4", *args], capsys)
    assert code == 0, out
    report = json.loads(report_path.read_text())
    assert report["samples"]["read"] == 4 and report["samples"]["limit"] == 4
    # an even share of the limit from each shard, from its start; neither read to its end
    assert sorted(s["samples"] for s in report["shards"]["per_shard"]) == [2, 2]
    assert report["shards"]["complete"] == 0
    assert "--limit 4: 2 of 2 shards visited, 0 read to the end" in out
    assert f"pipe:cat {two}" in out  # a pipe is listed by its whole URL

    # a brace pattern, read to the end through the pipe
    code, _, _ = _run([f"pipe:cat {shards}/part-{{000000..000001}}.tar", *args], capsys)
    report = json.loads(report_path.read_text())
    assert code == 0 and report["samples"]["read"] == 13 and report["shards"]["complete"] == 2


def test_many_shards_give_min_median_max(tmp_path, capsys):
    for i, n in enumerate([1, 2, 2, 3] * 4):  # 16 shards: more than are listed one by one
        with wds.TarWriter(str(tmp_path / f"s-{i:02d}.tar")) as sink:
            for j in range(n):
                jpg = _encoded(Image.new("RGB", (8, 8), (i * 10, j * 50, 0)))
                sink.write({"__key__": f"k{j}", "jpg": jpg, "txt": f"shard {i} sample {j}"})
    code, out, _ = _run([str(tmp_path / "s-*.tar"), "--samples", "0"], capsys)
    assert code == 0
    assert "shards: 16 in" in out and "s-00.tar" not in out
    assert "  samples per shard: min 1, median 2, max 3" in out and "samples: 32 read" in out


def test_broken_tar_is_counted_once_and_reading_goes_on(shards, tmp_path, capsys):
    data = (shards / "part-000000.tar").read_bytes()
    (shards / "part-000000.tar").write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    report_path = tmp_path / "r.json"
    code, out, _ = _run([str(shards), "--samples", "0", "--json", str(report_path)], capsys)
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["bad"]["tar_errors"] == {"unreadable_shard": 1}
    assert "unreadable_shard" in getattr(pipeline, "SKIP_REASONS", ["unreadable_shard"])
    assert report["shards"]["per_shard"][1]["samples"] == 3  # the next shard is read in full
    assert "broken tars: unreadable_shard 1" in out


def test_project_shards_are_not_blocked_by_stats_json(tiny_data, tmp_path, capsys):
    folder = tiny_data["shards"]
    assert (folder / "stats.json").exists()  # the build commands' quick exit must not apply here
    built = json.loads((folder / "stats.json").read_text())
    report_path = tmp_path / "r.json"
    for split in ("train", "val"):
        code, out, _ = _run(
            [str(folder), "--split", split, "--samples", "3", "--sheet", str(tmp_path / f"{split}.png"),
             "--json", str(report_path)],
            capsys,
        )  # fmt: skip
        assert code == 0, out
        report = json.loads(report_path.read_text())
        assert report["samples"]["read"] == report["samples"]["usable"] == built["total"][split]
        assert report["shards"]["count"] == built["shards"][split]
        assert report["metadata"]["source"] == {"folder": built["total"][split]}
        assert set(report["members"]) == {"jpg", "txt", "json"}
        assert report["images"]["long_side"]["max"] <= 48  # the writer's max_size


def test_missing_shards_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nope" / "train-{000000..000002}.tar"
    code, out, err = _run([str(missing), "--json", "r.json"], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("clip-data: error: 3 shard(s) not found: ") and str(tmp_path / "nope") in err
    code, _, err = _run([str(tmp_path)], capsys)  # a folder without shards
    assert code == 2 and "no *.tar shards in" in err and "clip-data demo|folder|manifest" in err
    assert list(tmp_path.iterdir()) == []  # no sheet, no JSON


def test_bad_settings(shards, tmp_path, capsys):
    assert _run([str(shards), "--limit", "0"], capsys)[0] == 2
    code, _, err = _run([str(shards), "--sheet", str(tmp_path)], capsys)
    assert code == 2 and "is a folder" in err
