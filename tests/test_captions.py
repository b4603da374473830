"""Several captions per image: reading them (txt lines, json lists with weights), the seeded pick
per visit and its exact replay on resume, clip-data's multi-caption shards, retrieval over them."""

import collections
import io
import json

import pytest
import torch
import webdataset as wds
from conftest import COLOURS, SHAPES, draw, train_loader
from PIL import Image
from runs import losses, run_train
from safetensors.torch import load_file

from clip_train.config import ConfigError, load_config
from clip_train.data.build import main as clip_data
from clip_train.data.captions import pick, read_captions
from clip_train.data.quality import SampleError
from clip_train.evaluate.metrics import retrieval_recall
from clip_train.evaluate.retrieval_sets import load_retrieval

WHERE = "shard.tar key"
LOADER = dict(batch_size=4, num_workers=0, sample_shuffle=0, seed=0, transform=lambda im: torch.zeros(1))
LOADER["tokenize"] = lambda text: torch.tensor([len(text)])


def _json(**fields) -> dict:
    return {"json": json.dumps(fields).encode()}


def test_captions_are_read_whole_by_line_first_line_and_from_json_lists_with_weights():
    sample = {"txt": b"a red circle\n\n  a round   red thing \nred"}
    assert read_captions(sample, "whole", "txt", WHERE) == [("a red circle a round red thing red", 1.0)]
    assert read_captions(sample, "txt-lines", "txt", WHERE) == [
        ("a red circle", 1.0), ("a round red thing", 1.0), ("red", 1.0),
    ]  # fmt: skip
    assert read_captions({"txt": b"\n first\nsecond"}, "first-line", "txt", WHERE) == [("first", 1.0)]
    listed = _json(captions=["one", {"text": "two", "weight": 3}, {"text": " ", "weight": 9}, "  "])
    assert read_captions(listed, "json:captions", "txt", WHERE) == [("one", 1.0), ("two", 3.0)]
    assert read_captions(_json(alt="just one"), "json:alt", "txt", WHERE) == [("just one", 1.0)]


@pytest.mark.parametrize(
    "sample, reason, words",
    [
        ({"txt": b"x"}, "no_caption", "no json member"),
        ({"json": b"{not json"}, "bad_captions", "is not JSON"),
        (_json(other=["x"]), "no_caption", "no field 'captions'"),
        (_json(captions=[]), "empty_caption", "empty caption list"),
        (_json(captions=["", " "]), "empty_caption", "empty caption list"),
        (_json(captions=7), "bad_captions", "int, not a list"),
        (_json(captions=[{"weight": 1}]), "bad_captions", "neither a string"),
        (_json(captions=[{"text": "a", "weight": -1}]), "bad_captions", "not a number >= 0"),
        (_json(captions=[{"text": "a", "weight": "2"}]), "bad_captions", "not a number >= 0"),
    ],
)
def test_unreadable_caption_lists_are_bad_samples_with_their_reason(sample, reason, words):
    with pytest.raises(SampleError, match=words) as caught:
        read_captions(sample, "json:captions", "txt", WHERE)
    assert caught.value.reason == reason and str(caught.value).startswith(WHERE)


def test_the_pick_follows_the_weights_is_a_function_of_its_seed_and_first_takes_the_first():
    captions = [("a", 1.0), ("b", 3.0), ("never", 0.0)]
    picks = [pick(captions, "weighted", seed) for seed in range(8000)]
    assert picks == [pick(captions, "weighted", seed) for seed in range(8000)]
    counts = collections.Counter(picks)
    assert counts["never"] == 0
    assert counts["b"] / len(picks) == pytest.approx(0.75, abs=0.02)
    uniform = collections.Counter(pick(captions, "uniform", seed) for seed in range(9000))
    assert all(n / 9000 == pytest.approx(1 / 3, abs=0.02) for n in uniform.values())
    assert {pick(captions, "first", seed) for seed in range(50)} == {"a"}
    assert pick(captions, "uniform", None) == "a"  # no seed: evaluation reads the first


def _pairs(folder, count=24):
    """count shape images in folder; returns [(file name, [captions])], three per image."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        colour, shape = list(COLOURS)[i % 4], SHAPES[i % 3]
        draw(shape, colour, seed=i).save(folder / f"{i:03d}.png")
        rows.append((f"{i:03d}.png", [f"a {colour} {shape}", f"{shape} in {colour}", f"picture {i}"]))
    return rows


@pytest.fixture(scope="module")
def multi_shards(tmp_path_factory):
    """Shards of 24 images, three weighted captions each (1, 2, 1), written by clip-data from JSONL."""
    root = tmp_path_factory.mktemp("multi")
    rows = _pairs(root / "src")
    lines = [
        {"file": f, "text": [{"text": c, "weight": w} for c, w in zip(caps, (1, 2, 1), strict=True)]}
        for f, caps in rows
    ]
    (root / "src" / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ["manifest", str(root / "src" / "pairs.jsonl"), "--image-col", "file", "--caption-col", "text"]
    out = root / "shards"
    assert (
        clip_data([*args, "--out", str(out), "--val-frac", "0", "--shard-size", "6", "--workers", "1"]) == 0
    )
    return {"shards": out, "captions": dict(rows)}


def _read_all(path) -> dict[str, dict]:
    return {s["__key__"]: s for s in wds.WebDataset(str(path), shardshuffle=False)}


def test_clip_data_writes_one_sample_per_image_from_repeated_rows_and_list_cells(tmp_path, capsys):
    rows = _pairs(tmp_path / "src", count=4)
    csv = "file,text\n" + "".join(f"{f},{c}\n" for f, caps in rows for c in caps)  # repeated rows
    (tmp_path / "src" / "rows.csv").write_text(csv)
    piped = "file\ttext\n" + "".join(f"{f}\t{'|'.join(caps)}\n" for f, caps in rows)  # a list cell
    (tmp_path / "src" / "cells.tsv").write_text(piped)
    common = ["--image-col", "file", "--caption-col", "text", "--val-frac", "0", "--workers", "1"]
    assert (
        clip_data(["manifest", str(tmp_path / "src" / "rows.csv"), "--out", str(tmp_path / "a"), *common])
        == 0
    )
    assert "4 images have several captions" in capsys.readouterr().out
    cells = ["manifest", str(tmp_path / "src" / "cells.tsv"), "--caption-sep", "|", *common]
    assert clip_data([*cells, "--out", str(tmp_path / "b")]) == 0
    for out in ("a", "b"):
        samples = _read_all(tmp_path / out / "train-000000.tar")
        assert len(samples) == 4  # one sample per image, not one per row
        for (_, caps), sample in zip(rows, samples.values(), strict=True):
            assert sample["txt"].decode().splitlines() == caps
            assert json.loads(sample["json"])["captions"] == caps
        assert json.loads((tmp_path / out / "stats.json").read_text())["several_captions"] == 4


def test_a_bad_weight_in_a_manifest_is_refused_with_its_line(tmp_path, capsys):
    _pairs(tmp_path / "src", count=1)
    line = {"file": "000.png", "text": [{"text": "a", "weight": "heavy"}]}
    (tmp_path / "src" / "m.jsonl").write_text(json.dumps(line) + "\n")
    args = ["manifest", str(tmp_path / "src" / "m.jsonl"), "--image-col", "file", "--caption-col", "text"]
    assert clip_data([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"clip-data: error: {tmp_path / 'src' / 'm.jsonl'}:1: caption weight 'heavy' is not a "
                   "number >= 0: fix the 'text' column"]  # fmt: skip
    assert not (tmp_path / "out").exists()


def _captions_read(shards, **kwargs) -> list[tuple[str, str]]:
    loader = train_loader(f"{shards}/train-*.tar", defaults=LOADER, **kwargs)
    batches = iter(loader)
    return [(key.rsplit("/", 1)[1], cap) for _ in range(12) for batch in [next(batches)]
            for key, cap in zip(batch.keys, batch.captions, strict=True)]  # fmt: skip


def test_the_loader_picks_by_weight_per_visit_and_a_rebuilt_loader_reads_the_same(multi_shards):
    spec = dict(captions="json:captions", caption_sampling="weighted", num_workers=2)
    read = _captions_read(multi_shards["shards"], **spec)
    assert read == _captions_read(multi_shards["shards"], **spec)
    by_key = multi_shards["captions"]
    assert all(cap in by_key[f"{key}.png"] for key, cap in read)
    second = collections.Counter(by_key[f"{key}.png"].index(cap) for key, cap in read)
    assert second[1] / len(read) == pytest.approx(0.5, abs=0.15)  # weight 2 of 4
    assert len({cap for _, cap in read}) > 30  # several captions of the same images were read
    # another seed draws other captions; the default reads the txt whole, as shards always were
    assert read != _captions_read(multi_shards["shards"], **spec, seed=1)
    whole = _captions_read(multi_shards["shards"], num_workers=2)
    assert all(cap == " ".join(by_key[f"{key}.png"]) for key, cap in whole)
    # a loader that skips through the first 5 batches of each worker reads on the same captions
    skipped = _captions_read(multi_shards["shards"], **spec, skip_through={0: 20, 1: 20})
    assert skipped[: len(read) - 40] == read[40:]


def test_corrupt_caption_lists_are_skipped_and_counted(tmp_path):
    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as tar:
        for i in range(8):
            image = io.BytesIO()
            draw("circle", "red", seed=i).save(image, "PNG")
            meta = b"{oops" if i == 3 else json.dumps({"captions": [] if i == 5 else ["a", "b"]}).encode()
            tar.write({"__key__": f"s{i}", "png": image.getvalue(), "json": meta})
    loader = train_loader(
        str(tmp_path), defaults=LOADER, captions="json:captions", batch_size=2, resampled=False
    )
    assert sum(len(b.keys) for b in loader) == 6
    stats = loader.data_errors.stats()
    assert (stats["skipped/bad_captions"], stats["skipped/empty_caption"], stats["seen"]) == (1, 1, 6)


def _unit(*values) -> torch.Tensor:
    v = torch.tensor(values, dtype=torch.float32)
    return v / v.norm()


def test_retrieval_over_multi_caption_val_shards_counts_each_caption_and_any_caption_per_image(tmp_path):
    captions = [["t0", "t1"], ["t2"], ["t3", "t4"]]  # images 0, 1, 2 have 2, 1 and 2 captions
    with wds.TarWriter(str(tmp_path / "val-000000.tar")) as tar:
        for i, caps in enumerate(captions):
            image = io.BytesIO()
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(image, "PNG")
            tar.write({"__key__": f"i{i}", "png": image.getvalue(), "txt": "\n".join(caps).encode(),
                       "json": json.dumps({"captions": caps}).encode()})  # fmt: skip
    by_json = load_retrieval(str(tmp_path), captions="json:captions")
    assert (by_json.captions, by_json.caption_image, by_json.num_images) == (
        ["t0", "t1", "t2", "t3", "t4"], [0, 0, 1, 2, 2], 3,
    )  # fmt: skip
    by_lines = load_retrieval(str(tmp_path))
    assert (by_lines.captions, by_lines.caption_image) == (by_json.captions, by_json.caption_image)
    assert load_retrieval(str(tmp_path), captions="first-line").captions == ["t0", "t2", "t3"]
    # By hand: t0 looks like image 1 and t2 like image 2 (misses), the other three are hits, so
    # text -> image R@1 = 3/5. Image 0's best text is t1 (its own), image 1's is t0 (image 0's: a
    # miss), image 2's is t3 (its own): image -> text R@1 = 2/3. At k=2 every caption's image is in
    # its top 2 (5/5), and image 1's top 2 (t0, t4) still holds none of its own (2/3).
    images = torch.eye(3)
    texts = {"t0": _unit(0.2, 1, 0), "t1": _unit(1, 0.1, 0), "t2": _unit(0, 0.1, 1),
             "t3": _unit(0.05, 0, 1), "t4": _unit(0, 0.3, 1)}  # fmt: skip
    text_emb = torch.stack([texts[c] for c in by_json.captions])
    got = retrieval_recall(images, text_emb, torch.tensor(by_json.caption_image), ks=(1, 2))
    assert got == pytest.approx({
        "image_retrieval_recall@1": 3 / 5, "text_retrieval_recall@1": 2 / 3,
        "image_retrieval_recall@2": 1.0, "text_retrieval_recall@2": 2 / 3,
    })  # fmt: skip


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "data.captions=lines",
            "data.captions='lines' is not a caption source: did you mean txt-lines\\? choose one of",
        ),
        ("data.captions='json:'", "data.captions='json:' is not a caption source"),
        ("data.caption_sampling=random", "data.caption_sampling='random' is not allowed"),
        ("data.caption_sampling=weighted", "data.caption_sampling=weighted needs caption weights"),
    ],
)
def test_bad_caption_settings_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match="^" + message) as caught:
        load_config(["configs/tiny.yaml"], ["run_dir=r", "data.train_shards=x", override])
    assert "\n" not in str(caught.value)


def test_clip_train_exits_2_on_a_bad_caption_source_and_writes_nothing(tmp_path, tiny_data):
    proc = run_train(tmp_path / "run", tiny_data, "data.captions=json")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "clip-train: error: data.captions='json' is not a caption source: choose one of whole, txt-lines, "
        "first-line or json:<field> (e.g. json:captions)"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_preempted_and_resumed_run_on_multi_caption_shards_reads_the_same_captions(
    tmp_path, tiny_data, multi_shards
):
    settings = [
        f"data.train_shards={multi_shards['shards']}", "data.captions=json:captions",
        "data.caption_sampling=weighted", "data.num_workers=2", "eval.zeroshot=[]", "data.val_shards=",
    ]  # fmt: skip
    straight = run_train(tmp_path / "straight", tiny_data, *settings)
    assert straight.returncode == 0, straight.stderr[-2000:]
    # SIGUSR1 as step 3 starts: a checkpoint inside the first segment (ckpt_every=4), exit 75
    stopped = run_train(tmp_path / "run", tiny_data, *settings, faults=("--signal-at", "3:0"))
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    resumed = run_train(tmp_path / "run", tiny_data, *settings)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "skipping" in resumed.stdout
    want, got = losses(tmp_path / "straight"), losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 9)) and got == want  # bit for bit
    a, b = (load_file(str(tmp_path / r / "model" / "model.safetensors")) for r in ("straight", "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the pick matters: always the first caption trains otherwise
    first = run_train(tmp_path / "first", tiny_data, *settings, "data.caption_sampling=first")
    assert first.returncode == 0, first.stderr[-2000:]
    assert losses(tmp_path / "first")[8] != want[8]
