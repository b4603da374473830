"""Distillation from a teacher CLIP (distill.*): the KL term, its composition with the contrastive
loss, gradient accumulation and processes, online against offline teacher embeddings, the
`clip-data teacher` shards, refusals, and an exact resume."""

import json
import os
import socket
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from runs import REPO, losses, run_train

from clip_train.accumulation import accumulated_backward
from clip_train.config import ConfigError, load_config
from clip_train.data.pipeline import build_train_loader
from clip_train.data.teacher_members import IMAGE_MEMBER, META_NAME, TEXT_MEMBER
from clip_train.loss.contrastive import ContrastiveLoss
from clip_train.loss.distill import DistillLoss, distill_kl
from clip_train.models.clip import ClipModel
from clip_train.models.tokenizer import build_tokenizer
from clip_train.models.transforms import batch_normalizer, build_image_transforms
from clip_train.tracking import read_metrics
from clip_train.train.teacher import Distillation, OnlineTeacher, TeacherView
from clip_train.train.teacher_shards import write_teacher_shards

NO_EVAL = ["eval.zeroshot=[]", "data.val_shards="]


def _embeddings(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(
        torch.randn(n, d, generator=g), dim=-1
    )


def _reference_kl(image, text, scale, t_image, t_text, t_scale) -> float:
    """KL(teacher || student) row by row in float64, both directions, written out."""
    total = 0.0
    for s_logits, t_logits in [
        (scale * image.double() @ text.double().T, t_scale * t_image.double() @ t_text.double().T),
        (scale * text.double() @ image.double().T, t_scale * t_text.double() @ t_image.double().T),
    ]:
        for s_row, t_row in zip(s_logits, t_logits):
            p_t = torch.exp(t_row) / torch.exp(t_row).sum()
            p_s = torch.exp(s_row) / torch.exp(s_row).sum()
            total += float((p_t * (p_t.log() - p_s.log())).sum()) / len(s_logits)
    return total / 2


def test_kl_term_equals_a_written_out_reference():
    image, text = _embeddings(12, 8, seed=0)
    t_image, t_text = _embeddings(12, 5, seed=1)  # the teacher's space may have another width
    got = distill_kl(image, text, torch.tensor(14.0), t_image, t_text, 30.0)
    assert got.item() == pytest.approx(_reference_kl(image, text, 14.0, t_image, t_text, 30.0), rel=1e-5)
    # the teacher against itself: no divergence; a teacher that disagrees: a positive one
    assert distill_kl(t_image, t_text, torch.tensor(30.0), t_image, t_text, 30.0).item() == pytest.approx(
        0, abs=1e-6
    )
    assert got.item() > 0.01


def _loss_and_grads(fn, image, text, scale, *extra):
    leaves = [
        image.clone().requires_grad_(True),
        text.clone().requires_grad_(True),
        scale.clone().requires_grad_(True),
    ]
    loss = fn(leaves[0], leaves[1], leaves[2].exp(), None, *extra)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def test_weight_zero_is_exactly_the_contrastive_loss_and_weight_adds_the_kl():
    image, text = _embeddings(10, 8, seed=2)
    t_image, t_text = _embeddings(10, 8, seed=3)
    scale = torch.tensor(2.0)
    contrastive = ContrastiveLoss()
    want, want_grads = _loss_and_grads(contrastive, image, text, scale)
    got, got_grads = _loss_and_grads(DistillLoss(contrastive, 0.0, 20.0), image, text, scale, t_image, t_text)
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w)
    weighted, _ = _loss_and_grads(DistillLoss(contrastive, 0.5, 20.0), image, text, scale, t_image, t_text)
    kl = _reference_kl(image, text, scale.exp().item(), t_image, t_text, 20.0)
    assert weighted.item() == pytest.approx(want.item() + 0.5 * kl, rel=1e-5)


def _tiny_cfg(tmp_path, *overrides):
    return load_config(
        [f"{REPO}/configs/tiny.yaml"], [f"run_dir={tmp_path}/run", "data.train_shards=x", *overrides]
    )


def test_an_accumulated_step_equals_one_big_batch_with_distillation(tmp_path):
    cfg = _tiny_cfg(tmp_path)
    torch.manual_seed(0)
    # eval mode: BatchNorm with fixed statistics and no dropout, the two things that make any
    # micro-batching differ from one batch (accumulation.py); every parameter still gets a gradient
    model = ClipModel(cfg.model).eval()
    g = torch.Generator().manual_seed(4)
    images = torch.randn(8, 3, 64, 64, generator=g)
    tokens = torch.randint(5, 200, (8, 16), generator=g)
    teacher = _embeddings(8, 6, seed=5)
    loss_fn = DistillLoss(ContrastiveLoss(), 2.0, 25.0)

    model.zero_grad()
    loss_fn(*model(images, tokens), *teacher).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def accumulated(teacher_parts):
        model.zero_grad()
        joined = Distillation.join(teacher_parts)
        halves = [(images[:4], tokens[:4]), (images[4:], tokens[4:])]
        accumulated_backward(model, halves, lambda *out: loss_fn(*out, *joined))
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def worst(got):  # the largest difference, relative to the largest gradient of the tensor
        return max(float((got[n] - w).abs().max() / w.abs().max().clamp_min(1e-12)) for n, w in want.items())

    # the teacher's rows travel with their micro-batches and are joined in the same order
    parts = [(teacher[0][:4], teacher[1][:4]), (teacher[0][4:], teacher[1][4:])]
    assert worst(accumulated(parts)) < 1e-5
    assert worst(accumulated(parts[::-1])) > 1e-3  # joined out of order: another loss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        image, text = _embeddings(10, 6, seed=6)  # the global batch on every rank; each passes its rows
        t_image, t_text = _embeddings(10, 4, seed=7)
        rows = slice(rank * 5, (rank + 1) * 5)
        leaf = image[rows].clone().requires_grad_(True)
        kl = distill_kl(leaf, text[rows], torch.tensor(9.0), t_image[rows], t_text[rows], 40.0)
        kl.backward()
        out[rank] = (kl.item(), leaf.grad)
    finally:
        dist.destroy_process_group()


def test_two_processes_average_to_the_global_batch_term():
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    image, text = _embeddings(10, 6, seed=6)
    t_image, t_text = _embeddings(10, 4, seed=7)
    leaf = image.clone().requires_grad_(True)
    want = distill_kl(leaf, text, torch.tensor(9.0), t_image, t_text, 40.0)
    want.backward()
    assert (out[0][0] + out[1][0]) / 2 == pytest.approx(want.item(), rel=1e-5)
    for rank in range(2):  # gradients summed into the owner by the gather; DDP divides by W
        assert torch.allclose(out[rank][1] / 2, leaf.grad[rank * 5 : (rank + 1) * 5], atol=1e-6)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny model (other weights than any student's) saved as a teacher with its tokenizer."""
    folder = tmp_path_factory.mktemp("teacher") / "model"
    cfg = _tiny_cfg(folder.parent)
    torch.manual_seed(123)
    ClipModel(cfg.model).save_pretrained(folder, tokenizer=build_tokenizer(cfg.model.text))
    return folder


@pytest.fixture(scope="module")
def teacher_shards(teacher_dir, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher_shards") / "shards"
    stats = write_teacher_shards(str(teacher_dir), str(tiny_data["shards"]), out, batch_size=5)
    return out, stats


def _members(tar: Path) -> dict[str, set[str]]:
    samples = defaultdict(set)
    with tarfile.open(tar) as f:
        for name in f.getnames():
            key, _, member = Path(name).name.partition(".")
            samples[key].add(member)
    return samples


def test_teacher_shards_copy_every_sample_with_both_embeddings(teacher_shards, tiny_data, teacher_dir):
    out, stats = teacher_shards
    sources = sorted(Path(tiny_data["shards"]).glob("*.tar"))
    assert sorted(p.name for p in out.glob("*.tar")) == [p.name for p in sources]
    for source in sources:
        original, copy = _members(source), _members(out / source.name)
        assert set(copy) == set(original)  # the same samples, none lost
        for key, members in copy.items():
            assert members == original[key] | {IMAGE_MEMBER, TEXT_MEMBER}
    assert stats["samples"] == sum(len(_members(s)) for s in sources) and not stats["skipped"]
    meta = json.loads((out / META_NAME).read_text())
    assert meta["logit_scale"] == pytest.approx(
        ClipModel.from_pretrained(teacher_dir).logit_scale.exp().item()
    )
    assert meta["embed_dim"] == 32
    again = subprocess.run(
        [sys.executable, "-m", "clip_train", "data", "teacher", "--teacher", str(teacher_dir),
         "--shards", str(tiny_data["shards"]), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"clip-data teacher: error: teacher shards already written in {out}: delete it or pass --overwrite"
    ]


def test_offline_and_online_teacher_give_the_same_loss_on_the_same_batch(
    teacher_shards, teacher_dir, tmp_path
):
    """The student sees the teacher's eval view (same size and normalisation), so the view the
    online teacher gets from the student's batch is the one the offline embeddings were made from."""
    out, _ = teacher_shards
    cfg = _tiny_cfg(tmp_path, f"data.train_shards={out}/train-*.tar")
    torch.manual_seed(0)
    student = ClipModel(cfg.model)
    fixed_view = build_image_transforms(student.visual, cfg.model.image, uint8=True)[1]
    loader = build_train_loader(
        cfg.data, seed=0, transform=fixed_view, tokenize=build_tokenizer(cfg.model.text), teacher_members=True
    )
    batch = next(iter(loader))
    images = batch_normalizer(student.visual, cfg.model.image)(batch.images)
    online = OnlineTeacher(teacher_dir, student, "cpu", "fp32")
    online_image, online_text = online.embed(images, batch.captions)
    assert torch.allclose(online_image, batch.teacher_image, atol=1e-5)
    assert torch.allclose(online_text, batch.teacher_text, atol=1e-6)
    loss_fn = DistillLoss(ContrastiveLoss(), 1.0, online.logit_scale)
    with torch.no_grad():
        outputs = student(images, batch.tokens)
        offline_loss = loss_fn(*outputs, batch.teacher_image, batch.teacher_text)
        online_loss = loss_fn(*outputs, online_image, online_text)
    assert online_loss.item() == pytest.approx(offline_loss.item(), rel=1e-6)
    assert loss_fn.last_kl.item() > 0  # the teacher disagrees with this student: the term is live


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["distill.mode=online"], "distill.mode=online needs distill.teacher"),
        (["distill.teacher=runs/t"], "distill.teacher=runs/t is set but distill.mode=none"),
        (["distill.mode=offline", "distill.teacher=runs/t"], "drop distill.teacher=runs/t"),
        (["distill.mode=online", "distill.teacher=t", "train.cache_image_features=true",
          "model.image.lock=true"], "train.cache_image_features replaces"),
        (["distill.mode=online", "distill.teacher=t", "distill.weight=-1"], "distill.weight"),
        (["distill.mode=teacher"], "distill.mode"),
        (["distill.mode=offline", "data.captions=txt-lines"], "set data.captions=whole"),
    ],
)  # fmt: skip
def test_bad_distill_settings_are_refused_in_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        _tiny_cfg(tmp_path, *overrides)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_missing_teacher_and_shards_without_teacher_embeddings_exit_2_writing_nothing(tmp_path, tiny_data):
    cases = [
        (["distill.mode=online", f"distill.teacher={tmp_path}/nowhere"], "distill.teacher="),
        (["distill.mode=offline"], "carries no teacher embeddings (no teacher.json)"),
    ]
    for i, (overrides, message) in enumerate(cases):
        result = run_train(tmp_path / f"run{i}", tiny_data, *overrides)
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / f"run{i}").exists()


@pytest.mark.slow
def test_offline_distillation_with_accumulation_resumes_exactly(tmp_path, tiny_data, teacher_shards):
    out, _ = teacher_shards
    settings = [
        f"data.train_shards={out}/train-*.tar",
        "distill.mode=offline",
        "train.accum_steps=2",
        *NO_EVAL,
    ]
    straight = run_train(tmp_path / "straight", tiny_data, *settings)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run_train(tmp_path / "run", tiny_data, *settings, faults=("--kill-at-step", "6"))
    assert killed.returncode != 0
    resumed = run_train(tmp_path / "run", tiny_data, *settings)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want, got = losses(tmp_path / "straight"), losses(tmp_path / "run")
    assert [got[s] for s in range(5, 9)] == pytest.approx([want[s] for s in range(5, 9)], abs=1e-6)
    records = read_metrics(tmp_path / "straight", "train")
    assert all(r["distill_kl"] > 0 for r in records)
    assert read_metrics(tmp_path / "straight", "setup")[0]["distill"] == "offline"


@pytest.mark.slow
def test_online_distillation_trains_and_its_kl_is_logged(tmp_path, tiny_data, teacher_dir):
    result = run_train(tmp_path / "run", tiny_data, "distill.mode=online", f"distill.teacher={teacher_dir}",
                       "distill.weight=2", "train.steps=4", *NO_EVAL)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    records = read_metrics(tmp_path / "run", "train")
    assert len(records) == 4 and all(r["distill_kl"] > 0 for r in records)
    plain = run_train(tmp_path / "plain", tiny_data, "train.steps=4", *NO_EVAL)
    assert plain.returncode == 0, plain.stderr[-2000:]
    # the first step's loss is the contrastive loss plus 2 x KL of the same initial student
    first, plain_first = records[0], read_metrics(tmp_path / "plain", "train")[0]
    assert first["loss"] == pytest.approx(plain_first["loss"] + 2 * first["distill_kl"], rel=1e-5)


def test_the_demo_recipe_loads_as_an_offline_distillation_of_a_smaller_student(tmp_path):
    cfg = load_config(
        [f"{REPO}/configs/demo.yaml", f"{REPO}/configs/distill-demo.yaml"],
        [f"run_dir={tmp_path}/run", "data.train_shards=shards/demo-teacher/train-*.tar"],
    )
    assert (cfg.distill.mode, cfg.distill.weight) == ("offline", 1.0)
    assert cfg.model.image.name == "tf_efficientnet_lite0" and cfg.model.image.concat == []
    assert cfg.model.text.pretrained == "" and cfg.model.text.hf_config["num_hidden_layers"] == 3


@pytest.mark.slow
def test_the_distillation_benchmark_runs_both_arms_and_writes_its_table(tmp_path, tiny_data, teacher_dir):
    out = tmp_path / "distill.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/distill.py", "--dry", "--teacher", str(teacher_dir), "--shards",
         str(tiny_data["shards"]), "--seeds", "0,1", "--work", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(r["arm"], r["seed"]) for r in report["runs"]] == [
        ("plain", 0), ("distill", 0), ("plain", 1), ("distill", 1)
    ]  # fmt: skip
    assert "text_retrieval_recall@1" in " ".join(report["means"]["distill"])
    assert read_metrics(tmp_path / "work" / "distill-seed0", "setup")[0]["distill"] == "offline"
    assert "distill" not in read_metrics(tmp_path / "work" / "plain-seed0", "setup")[0]
    assert "distill | mean" in result.stdout


def test_the_online_teacher_sees_the_student_pixels_in_its_own_size_and_normalisation():
    student = ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    teacher = ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    pixels = torch.rand(2, 3, 64, 64)
    normalised = (pixels - 0.5) / 0.25  # what the student's loader gives
    view = TeacherView(student, teacher, size=32)
    want = F.interpolate(pixels, size=(32, 32), mode="bilinear", antialias=True)
    assert torch.allclose(view(normalised), want, atol=1e-5)
    same = TeacherView(student, student, size=64)
    assert same(normalised) is normalised  # one model's view: passed through untouched
