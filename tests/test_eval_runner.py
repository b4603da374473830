"""The evaluation suite: metric definitions, the field's protocol, distribution, outputs, clip-eval."""

import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clip_train.config import EvalConfig, RetrievalTask, ZeroShotTask, load_config
from clip_train.evaluate.encode import ClassifierCache, EvalContext
from clip_train.evaluate.metrics import classifier_weights, retrieval_ranks, retrieval_recall
from clip_train.evaluate.probe import linear_probe
from clip_train.evaluate.runner import run_evaluation
from clip_train.models.clip import ClipModel
from clip_train.models.tokenizer import build_tokenizer
from clip_train.models.transforms import build_image_transforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["run_dir=/tmp/unused", "data.train_shards=/tmp/unused"]


def tiny_model():
    cfg = load_config([os.path.join(REPO, "configs/tiny.yaml")], TINY)
    torch.manual_seed(0)
    model = ClipModel(cfg.model).eval()
    tokenizer = build_tokenizer(cfg.model.text)
    _, transform = build_image_transforms(model.visual, cfg.model.image)
    return model, tokenizer, transform


# ------------------------------------------------------------------------------------------------
# Retrieval recall


def test_recall_on_a_hand_made_similarity_matrix_with_several_captions_per_image():
    # 3 images, 5 captions: captions 0, 1 -> image 0; 2 -> image 1; 3, 4 -> image 2.
    # Embeddings in 5-d one-hot "caption space" so that sims = image_emb @ text_emb.T is chosen exactly.
    sims = torch.tensor(
        [
            [0.1, 0.9, 0.8, 0.0, 0.0],  # image 0: its caption 1 is first -> i2t rank 0
            [0.7, 0.0, 0.6, 0.1, 0.0],  # image 1: caption 0 beats its caption 2 -> rank 1
            [0.5, 0.4, 0.3, 0.2, 0.1],  # image 2: best own caption (3) has 3 above it -> rank 3
        ]
    )
    text_emb = torch.eye(5)
    owners = torch.tensor([0, 0, 1, 2, 2])
    image_ranks, text_ranks = retrieval_ranks(sims, text_emb, owners)
    assert image_ranks.tolist() == [0, 1, 3]
    # t2i: caption j's column of sims; caption 0: image 0 has 0.1, images 1 (0.7), 2 (0.5) above -> 2;
    # caption 2: image 1 has 0.6, image 0 (0.8) above -> 1; captions 1, 3, 4 lead their columns
    assert text_ranks.tolist() == [2, 0, 1, 0, 0]
    metrics = retrieval_recall(sims, text_emb, owners, ks=(1, 2, 5))
    assert metrics["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert metrics["text_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert metrics["image_retrieval_recall@1"] == pytest.approx(3 / 5)
    assert metrics["image_retrieval_recall@2"] == pytest.approx(4 / 5)
    assert metrics["image_retrieval_recall@5"] == 1.0


def _clip_benchmark_recall(image_emb, text_emb, owners, k):
    """CLIP_benchmark's definition, written from its description: scores[text, image]; positive
    pairs as a boolean matrix; a query is a hit when any positive is among its top-k columns."""
    scores = text_emb @ image_emb.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(owners)), owners] = True

    def hits(s, pos):
        top = s.topk(min(k, s.shape[1]), dim=1).indices
        return pos.gather(1, top).any(dim=1).float().mean().item()

    return hits(scores, positive), hits(scores.T, positive.T)  # (text->image, image->text)


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_chunked_recall_equals_the_unchunked_definition(chunk):
    g = torch.Generator().manual_seed(0)
    image_emb = F.normalize(torch.randn(17, 8, generator=g), dim=-1)
    owners = torch.arange(17).repeat_interleave(2)[:30]  # two captions per image; images 15, 16 have none
    text_emb = F.normalize(image_emb[owners] + 0.8 * torch.randn(30, 8, generator=g), dim=-1)
    text_emb[[5, 9, 21]] = text_emb[[6, 10, 22]]  # identical captions of different images: ties
    got = retrieval_recall(image_emb, text_emb, owners, ks=(1, 5, 10), chunk=chunk)
    for k in (1, 5, 10):
        t2i, i2t = _clip_benchmark_recall(image_emb, text_emb, owners, k)
        assert got[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
        assert got[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)  # a caption-less image never hits
    assert 0 < got["text_retrieval_recall@1"] < got["text_retrieval_recall@5"] < 1  # a test that can fail


# ------------------------------------------------------------------------------------------------
# Zero-shot classification: brute force, and OpenCLIP's own classifier builder


def test_zero_shot_on_a_tiny_model_equals_brute_force_and_openclip_classifier(tiny_data):
    open_clip_zs = pytest.importorskip("open_clip.zero_shot_classifier")
    model, tokenizer, transform = tiny_model()
    templates = ["a {c}", "a {c} shape", "one {c}"]
    task = ZeroShotTask(dataset=str(tiny_data["classes"]), templates=templates)
    metrics = run_evaluation(
        model, tokenizer, transform, EvalConfig(zeroshot=[task]), "", torch.device("cpu"), "fp32"
    )

    from clip_train.evaluate.datasets import load_dataset

    data = load_dataset(str(tiny_data["classes"]))
    with torch.no_grad():
        # brute force: one prompt at a time, one image at a time
        class_emb = []
        for name in data.classnames:
            prompts = torch.cat([model.encode_text(tokenizer([t.format(c=name)])) for t in templates])
            mean = prompts.mean(dim=0)
            class_emb.append(mean / mean.norm())
        class_emb = torch.stack(class_emb)
        images = torch.cat([model.encode_image(transform(data.image(i))[None]) for i in range(len(data))])
        predicted = (100 * images @ class_emb.T).argmax(dim=1)
        # OpenCLIP's builder: [d, C], templates as callables
        openclip_weights = open_clip_zs.build_zero_shot_classifier(
            model, tokenizer, data.classnames, [lambda c, t=t: t.format(c=c) for t in templates], device="cpu"
        )
    assert torch.allclose(openclip_weights.T, class_emb, atol=1e-5)
    labels = torch.tensor(data.labels)
    name = data.name
    assert metrics[f"{name}/acc1"] == pytest.approx((predicted == labels).float().mean().item())
    openclip_pred = (100 * images @ openclip_weights).argmax(dim=1)
    assert metrics[f"{name}/acc1"] == pytest.approx((openclip_pred == labels).float().mean().item())


def test_classifier_is_cached_until_the_weights_change():
    model, tokenizer, _ = tiny_model()
    cache = ClassifierCache()
    ctx = EvalContext(torch.device("cpu"), "fp32", batch_size=4)
    first = cache.get(model, tokenizer, ["circle", "square"], ["a {c}"], ctx)
    again = cache.get(model, tokenizer, ["circle", "square"], ["a {c}"], ctx)
    assert again is first and cache.hits == 1
    with torch.no_grad():
        model.text_proj.weight.mul_(2.0)  # what an optimizer step does: an in-place update
    changed = cache.get(model, tokenizer, ["circle", "square"], ["a {c}"], ctx)
    assert cache.hits == 1 and changed is not first
    manual = classifier_weights(
        torch.stack([model.encode_text(tokenizer([f"a {c}"])) for c in ["circle", "square"]]).detach()
    )
    assert torch.allclose(changed, manual, atol=1e-6)


def test_linear_probe_separates_separable_features_deterministically():
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(3, 6, generator=g)
    labels = torch.arange(60) % 3
    features = centres[labels] + 0.3 * torch.randn(60, 6, generator=g)
    test_labels = torch.arange(30) % 3
    test = centres[test_labels] + 0.3 * torch.randn(30, 6, generator=g)
    first = linear_probe(features, labels, test, test_labels, 3)
    assert first["linear_probe_acc1"] == 1.0
    assert linear_probe(features, labels, test, test_labels, 3) == first


# ------------------------------------------------------------------------------------------------
# Outputs and the command line


def test_outputs_follow_clip_benchmark_schema_with_a_picture_per_task(tmp_path, tiny_data):
    model, tokenizer, transform = tiny_model()
    cfg = EvalConfig(
        zeroshot=[ZeroShotTask(dataset=str(tiny_data["classes"]), templates=["a {c}"])],
        retrieval_tasks=[RetrievalTask(dataset=f"{tiny_data['shards']}/val-000000.tar")],
        retrieval=False,
    )
    run_evaluation(
        model, tokenizer, transform, cfg, "", torch.device("cpu"), "fp32", out_dir=tmp_path, model_name="m"
    )
    records = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert len(records) == 2
    for name, record in records.items():
        assert {"dataset", "model", "task", "metrics"} <= record.keys() and record["model"] == "m"
        assert (tmp_path / name).with_suffix(".png").stat().st_size > 1000
        if record["task"] == "zeroshot_classification":
            assert {"acc1", "mean_per_class_recall"} <= record["metrics"].keys()
        else:
            assert record["task"] == "zeroshot_retrieval"
            assert {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)} == set(
                record["metrics"]
            )


def test_off_a_terminal_evaluation_logs_a_line_per_task_with_images_per_second_and_eta(tiny_data, capsys):
    model, tokenizer, transform = tiny_model()
    cfg = EvalConfig(
        zeroshot=[ZeroShotTask(dataset=str(tiny_data["classes"]), templates=["a {c}"])],
        retrieval_tasks=[RetrievalTask(dataset=f"{tiny_data['shards']}/val-000000.tar")],
        retrieval=False,
        plots=False,
    )
    run_evaluation(model, tokenizer, transform, cfg, "", torch.device("cpu"), "fp32")
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("[eval ")]
    pattern = r"\[eval (\d)/2\] (\S+): (\d+) images in [\d.]+ s, [\d.]+ images/s, ETA \d+ s"
    matches = [re.fullmatch(pattern, line) for line in lines]
    assert len(lines) == 2 and all(matches), captured.err
    assert [m[1] for m in matches] == ["1", "2"] and matches[1][2].startswith("retrieval-")
    assert all(int(m[3]) > 0 for m in matches)
    assert "\r" not in captured.err and "[eval" not in captured.out  # no bar; stdout left alone


def test_on_a_terminal_evaluation_shows_a_bar_instead_of_lines(monkeypatch):
    from clip_train.evaluate.progress import EvalProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    progress = EvalProgress(2)
    progress.task_done("a", images=10)
    progress.task_done("b", images=10)
    progress.close()
    drawn = terminal.getvalue()
    assert "eval:" in drawn and "/2 [" in drawn and "\r" in drawn and "[eval" not in drawn  # a tqdm bar
    silent = Terminal()
    monkeypatch.setattr(sys, "stderr", silent)
    quiet = EvalProgress(2, enabled=False)  # the other ranks of a process group
    quiet.task_done("a", images=10)
    quiet.close()
    assert silent.getvalue() == ""


def _clip_eval(*args):
    return subprocess.run(
        [sys.executable, "-m", "clip_train", "eval", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


@pytest.mark.slow
def test_clip_eval_runs_tasks_from_the_command_line_and_rejects_a_bad_dataset(tmp_path, tiny_data):
    model, tokenizer, _ = tiny_model()
    model.save_pretrained(tmp_path / "model", tokenizer)
    out = tmp_path / "results"
    done = _clip_eval(
        str(tmp_path / "model"), "--zeroshot", str(tiny_data["classes"]), "--templates", "a {c}",
        "--retrieval", f"{tiny_data['shards']}/val-000000.tar", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert f"{tiny_data['classes'].name}/acc1" in summary
    assert any(k.startswith("retrieval-") and k.endswith("text_retrieval_recall@1") for k in summary)
    assert len(list(out.glob("*.png"))) == 2

    bad = _clip_eval(str(tmp_path / "model"), "--zeroshot", str(tmp_path / "nowhere"), "--out", str(out))
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "clip-eval: error:" in bad.stderr


def _clip_benchmark_set(root, name: str, n: int) -> None:
    """<root>/<name>/test/0.tar in CLIP_benchmark's webdataset layout: png, cls index, txt caption;
    the class names in <root>/<name>/classnames.txt."""
    import webdataset as wds
    from PIL import Image

    colours = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220)}
    (root / name / "test").mkdir(parents=True)
    (root / name / "classnames.txt").write_text("\n".join(colours) + "\n")
    with wds.TarWriter(str(root / name / "test" / "0.tar")) as sink:
        for i in range(n):
            colour = list(colours)[i % 3]
            image = io.BytesIO()
            Image.new("RGB", (40, 32), colours[colour]).save(image, "PNG")
            sink.write({"__key__": f"{i:04d}", "png": image.getvalue(), "cls": str(i % 3).encode(),
                        "txt": f"a {colour} square".encode()})  # fmt: skip


def test_sets_in_folders_of_one_name_get_results_of_their_own(tmp_path, monkeypatch, capsys):
    from clip_train.cli import eval_main

    model, tokenizer, _ = tiny_model()
    model.save_pretrained(tmp_path / "model", tokenizer)
    _clip_benchmark_set(tmp_path, "a", 3)
    _clip_benchmark_set(tmp_path, "b", 5)
    monkeypatch.chdir(tmp_path)  # the specs as a CLIP_benchmark user writes them
    argv = ["model", "--zeroshot", "wds:a/test/0.tar", "wds:b/test/0.tar", "--classnames", "a/classnames.txt",
            "--templates", "a {c}", "--retrieval", "a/test/0.tar", "b/test/0.tar", "--no-plots",
            "--out", "out"]  # fmt: skip
    assert eval_main(argv) == 0, capsys.readouterr().err
    for task in ("zeroshot_classification", "zeroshot_retrieval"):
        records = {p.name: json.loads(p.read_text()) for p in (tmp_path / "out").glob(f"*_{task}.json")}
        assert sorted(records) == [f"a-test_{task}.json", f"b-test_{task}.json"]
        assert [records[f"{s}-test_{task}.json"]["num_images"] for s in "ab"] == [3, 5]
        assert [records[f"{s}-test_{task}.json"]["dataset"] for s in "ab"] == ["a-test", "b-test"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {"a-test/acc1", "b-test/acc1", "retrieval-a-test/text_retrieval_recall@1"} <= summary.keys()
    assert "retrieval-b-test/image_retrieval_recall@1" in summary


def test_names_take_as_many_folders_as_tell_the_sets_apart(tmp_path):
    from clip_train.evaluate.datasets import naming_path
    from clip_train.evaluate.runner import unique_names

    paths = [Path("/x/a/test"), Path("/x/b/test"), Path("/y/shapes"), Path("/x/a/test")]
    assert unique_names(paths) == ["a-test", "b-test", "shapes", "a-test-2"]
    assert unique_names([Path("heldout"), Path("/x/heldout"), Path("fashion-mnist")]) == [
        "heldout", "x-heldout", "fashion-mnist",
    ]  # fmt: skip
    # numbers never land on a name another set has, and file names stay distinct
    assert unique_names([Path("/x/t"), Path("/x/t"), Path("/y/t-2")]) == ["t", "t-3", "t-2"]
    assert unique_names([Path("/a b"), Path("/a_b")]) == ["a b", "a_b-2"]
    # one set keeps the name its loader gives it
    _clip_benchmark_set(tmp_path, "a", 1)
    assert naming_path(f"wds:{tmp_path}/a/test/0.tar") == tmp_path / "a" / "test"
    assert naming_path(f"{tmp_path}/a/test/0.tar", retrieval=True).name == "test"
    assert naming_path(f"{tmp_path}/pairs.csv", retrieval=True) == tmp_path / "pairs"
    assert naming_path("fashion-mnist") == Path("fashion-mnist")


# ------------------------------------------------------------------------------------------------
# Two processes: each encodes its share; every rank gets the single-process numbers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eval_config(tiny_data) -> EvalConfig:
    return EvalConfig(
        zeroshot=[ZeroShotTask(dataset=str(tiny_data["classes"]), templates=["a {c}", "the {c} shape"])],
        retrieval_tasks=[RetrievalTask(dataset=f"{tiny_data['shards']}/val-000000.tar")],
        retrieval=False,
        batch_size=3,  # several batches per rank, and ranks with different counts
    )


def _eval_worker(rank, world, port, tiny_data, out_dir, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, tokenizer, transform = tiny_model()
        metrics = run_evaluation(
            model,
            tokenizer,
            transform,
            _eval_config(tiny_data),
            "",
            torch.device("cpu"),
            "fp32",
            out_dir=out_dir,
        )
        results[rank] = {k: v for k, v in metrics.items() if k != "eval_seconds"}
    finally:
        dist.destroy_process_group()


def test_two_process_evaluation_equals_one_process(tmp_path, tiny_data):
    model, tokenizer, transform = tiny_model()
    single = run_evaluation(
        model, tokenizer, transform, _eval_config(tiny_data), "", torch.device("cpu"), "fp32"
    )
    single.pop("eval_seconds")
    results = mp.Manager().dict()
    mp.spawn(_eval_worker, args=(2, _free_port(), tiny_data, tmp_path / "out", results), nprocs=2, join=True)
    assert results[0] == results[1] == single
    assert len(single) == 8  # acc1, mean per-class recall (3 classes: no top-5), 6 recalls
    assert len(list((tmp_path / "out").glob("*.json"))) == 2  # written once, by the main process


def _close(got, want) -> bool:
    # fp32 rounding relative to the output's scale (folding BatchNorm reorders the arithmetic)
    return (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_traced_image_tower_gives_the_eager_embeddings_and_follows_weight_changes():
    from clip_train.evaluate.encode import InferenceTowers

    model, _, _ = tiny_model()
    images = torch.randn(5, 3, 64, 64)
    towers = InferenceTowers()
    ctx = EvalContext(torch.device("cpu"), "fp32", batch_size=4)
    with torch.inference_mode():
        traced = towers.get(model, images, ctx)
        assert traced is not model.image_tower_features  # the tiny tower does trace
        assert _close(traced(images), model.image_tower_features(images))
        assert towers.get(model, images, ctx) is traced  # unchanged weights: reused
    with torch.no_grad():
        for p in model.visual.parameters():
            p.mul_(1.1)
    with torch.inference_mode():
        retraced = towers.get(model, images, ctx)
        assert retraced is not traced
        assert _close(retraced(images), model.image_tower_features(images))
        # bf16/fp16 evaluation, or the switch off: the eager tower itself
        assert (
            towers.get(model, images, EvalContext(torch.device("cpu"), "bf16", 4))
            == model.image_tower_features
        )
        off = EvalContext(torch.device("cpu"), "fp32", 4, jit_image_tower=False)
        assert towers.get(model, images, off) == model.image_tower_features


def test_images_are_encoded_in_chunks_with_the_same_embeddings():
    from PIL import Image

    from clip_train.evaluate.encode import encode_images, image_chunk_size

    model, _, transform = tiny_model()
    pictures = [Image.new("RGB", (40, 30), (20 * i, 255 - 30 * i, 7 * i)) for i in range(7)]
    calls = []
    original = model.visual.forward
    model.visual.forward = lambda x: calls.append(len(x)) or original(x)
    whole = EvalContext(torch.device("cpu"), "fp32", batch_size=7, jit_image_tower=False, image_chunk=100)
    chunked = EvalContext(torch.device("cpu"), "fp32", batch_size=7, jit_image_tower=False, image_chunk=3)
    reference = encode_images(model, pictures.__getitem__, 7, transform, whole)
    assert calls == [7]
    calls.clear()
    got = encode_images(model, pictures.__getitem__, 7, transform, chunked)
    assert calls == [3, 3, 1]
    assert _close(got, reference)
    # auto (0): chunks of 8 on a CPU, the whole batch on other devices; a set value wins
    assert image_chunk_size(torch.device("cpu")) == 8
    assert image_chunk_size(torch.device("cuda")) > 10_000
    assert image_chunk_size(torch.device("cpu"), 32) == 32


def test_plots_write_readable_pictures_for_few_and_many_classes(tmp_path):
    from PIL import Image

    from clip_train.evaluate.plots import plot_confusion, plot_recall_curves

    for classes in (3, 25):  # numbers in the cells only up to 20 classes
        matrix = (torch.eye(classes, dtype=torch.long) * 4 + 1).tolist()
        path = tmp_path / f"confusion{classes}.png"
        plot_confusion(matrix, [f"class {i}" for i in range(classes)], "title", path)
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 400
    path = tmp_path / "recall.png"
    plot_recall_curves(torch.tensor([0, 3, 60]), torch.tensor([1, 0, 7]), "title", path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (600, 400)
