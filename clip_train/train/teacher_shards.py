"""`clip-data teacher`: copies of shards with a teacher's embeddings in every sample (offline
distillation, MobileCLIP's "reinforced" data; the format is data/teacher_members.py's).

    clip-data teacher --teacher runs/demo --shards shards/demo --out shards/demo-teacher

Every .tar of --shards (train and val) is copied under its own name, sample by sample and in order,
with `teacher_image.npy` and `teacher_text.npy` added. The image embedding is of the teacher's eval
view of the stored image (resize, centre crop, its normalisation): one fixed view, so a student
trained on these shards distills against it whatever random crop it sees itself. Samples that the
loader would skip (no caption, undecodable image, ...) are left out and counted. The folder
appears whole (built beside it, then renamed) with teacher.json and stats.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import webdataset as wds

from clip_train.atomic import publish_folder
from clip_train.config import DataConfig
from clip_train.data import DataError
from clip_train.data.pipeline import expand_urls
from clip_train.data.pipeline_stages import _Prepare
from clip_train.data.quality import DataErrors, SampleError
from clip_train.data.shards import _TAR_MTIME
from clip_train.data.teacher_members import IMAGE_MEMBER, META_NAME, TEXT_MEMBER, encode_embedding
from clip_train.errors import fail
from clip_train.models.clip import ClipModel, load_tokenizer
from clip_train.models.transforms import build_image_transforms
from clip_train.paths import resolve_model_folder
from clip_train.train.teacher import AUTOCAST

PROG = "clip-data teacher"


def add_teacher_command(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """The `teacher` sub-parser of clip-data (not a shard build: it runs itself, see data/build.py)."""
    teacher = commands.add_parser("teacher", help="copy shards with a teacher's embeddings added")
    teacher.add_argument("--teacher", required=True, help="model folder, checkpoint or run directory")
    teacher.add_argument("--shards", required=True, help="shard spec: a folder, brace pattern or glob")
    teacher.add_argument("--out", required=True, type=Path, help="output folder (created atomically)")
    teacher.add_argument("--batch-size", type=int, default=64, help="samples per teacher call")
    teacher.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    teacher.add_argument("--device", default="cpu")
    teacher.add_argument("--overwrite", action="store_true", help="rebuild even if OUT holds a build")
    teacher.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        stats = write_teacher_shards(
            args.teacher, args.shards, args.out, batch_size=args.batch_size, precision=args.precision,
            device=args.device, overwrite=args.overwrite,
        )  # fmt: skip
    except (DataError, OSError) as e:  # OSError: no such teacher (NoModelError), an unwritable --out
        return fail(PROG, e)
    skipped = ", ".join(f"{reason} {n}" for reason, n in stats["skipped"].items()) or "none"
    print(
        f"{stats['samples']} samples in {stats['shards']} shards with teacher embeddings (dim "
        f"{stats['embed_dim']}) in {args.out}; skipped: {skipped}; {stats['seconds']:.1f} s"
    )
    return 0


def _check_out(out: Path, overwrite: bool) -> bool:
    """Whether out holds a finished build to replace; DataError for a folder we did not write."""
    if not out.exists():
        return False
    if (out / "stats.json").is_file() and (out / META_NAME).is_file():
        if overwrite:
            return True
        raise DataError(f"teacher shards already written in {out}: delete it or pass --overwrite")
    if not out.is_dir() or any(out.iterdir()):
        raise DataError(f"{out} exists and holds no teacher shards: choose a new --out folder")
    return False


class _Teacher:
    def __init__(self, path: str, device: str, precision: str):
        self.folder = resolve_model_folder(path, setting="--teacher")
        self.model = ClipModel.from_pretrained(self.folder).to(device).eval().requires_grad_(False)
        self.tokenize = load_tokenizer(self.folder)
        self.view = build_image_transforms(self.model.visual, self.model.cfg.image)[1]
        self.device, self.dtype = torch.device(device), AUTOCAST.get(precision)

    @torch.no_grad()
    def embed(self, pixels: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            image = self.model.encode_image(pixels.to(self.device))
            text = self.model.encode_text(self.tokenize(captions).to(self.device))
        return image.float().cpu(), text.float().cpu()


def _copy_shard(url: str, target: Path, teacher: _Teacher, batch_size: int, skipped: Counter) -> int:
    """One shard copied with the teacher's members; the number of samples written."""
    data = DataConfig()
    errors = DataErrors([url])
    prepare = _Prepare(
        image_key=data.image_key,
        text_key=data.text_key,
        transform=teacher.view,
        tokenize=len,
        max_pixels=data.max_pixels,
        errors=errors,
        with_meta=True,
    )  # fmt: skip  (tokenize: a stand-in; the captions are tokenized in batches below)
    kept, pixels, captions, images, texts = [], [], [], [], []
    for sample in wds.tarfile_samples([{"url": url}]):
        try:
            image, _, caption, _ = prepare(sample)
        except SampleError as e:
            skipped[e.reason] += 1
            continue
        kept.append(sample)
        pixels.append(image)
        captions.append(caption)
        if len(pixels) == batch_size:  # the raw samples are kept, their float views only per batch
            image_emb, text_emb = teacher.embed(torch.stack(pixels), captions)
            images.extend(image_emb)
            texts.extend(text_emb)
            pixels, captions = [], []
    if pixels:
        image_emb, text_emb = teacher.embed(torch.stack(pixels), captions)
        images.extend(image_emb)
        texts.extend(text_emb)
    if not kept:
        return 0
    with wds.TarWriter(str(target), encoder=False, mtime=_TAR_MTIME) as sink:
        for sample, image, text in zip(kept, images, texts, strict=True):
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            sink.write(
                {"__key__": sample["__key__"], **members,
                 IMAGE_MEMBER: encode_embedding(image), TEXT_MEMBER: encode_embedding(text)}
            )  # fmt: skip
    return len(kept)


def write_teacher_shards(
    teacher_path: str, shards: str, out: str | Path, *, batch_size: int = 64, precision: str = "fp32",
    device: str = "cpu", overwrite: bool = False,
) -> dict:  # fmt: skip
    """Copy every shard of `shards` into `out` with the teacher's embeddings; returns stats.json."""
    out = Path(out)
    urls = expand_urls(shards)
    local = [url for url in urls if Path(url).is_file()]
    if len(local) != len(urls) or len({Path(url).name for url in urls}) != len(urls):
        raise DataError(f"--shards {shards}: give local shards with distinct file names")
    replace = _check_out(out, overwrite)
    start = time.perf_counter()
    teacher = _Teacher(teacher_path, device, precision)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        skipped: Counter = Counter()
        counts = {
            Path(url).name: _copy_shard(url, tmp / Path(url).name, teacher, batch_size, skipped)
            for url in urls
        }
        if not sum(counts.values()):
            raise DataError(f"--shards {shards}: no sample could be read")
        meta = {
            "teacher": str(teacher.folder.resolve()),
            "logit_scale": teacher.model.logit_scale.exp().item(),
            "embed_dim": teacher.model.cfg.embed_dim,
            "image_size": teacher.model.cfg.image.image_size,
            "precision": precision,
        }
        stats = {
            **meta, "source": shards, "shards": len(counts), "samples": sum(counts.values()),
            "per_shard": counts, "skipped": dict(skipped.most_common()),
            "seconds": round(time.perf_counter() - start, 2),
        }  # fmt: skip
        (tmp / META_NAME).write_text(json.dumps(meta, indent=1) + "\n")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
        publish_folder(tmp, out, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stats
