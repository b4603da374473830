"""distill.*: the teacher's embeddings of each training batch, and the loss they enter.

    distill = build_distillation(cfg, model, device, contrastive_loss)  # None when distill.mode=none
    teacher = distill.embeddings(batch)          # per micro-batch: ([n, d_t], [n, d_t]), no gradients
    loss = distill.loss(*model(...), *distill.join([teacher, ...]))   # per step, over all micro-batches

online: the teacher (a saved clip_train model) runs on the same batch, in eval mode, frozen, under
its own autocast (distill.precision). Its image input is the student's view of the batch: the
student's normalisation undone, resized to the teacher's image size (bilinear, antialiased) and
normalised the teacher's way; its text input is the batch's captions through its own tokenizer.
offline: the embeddings were written into the shards by `clip-data teacher` (teacher_shards.py)
from one fixed view per image, the teacher's eval transform, so they ignore the student's random
crop; the loader puts them into the batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from clip_train.config import RunConfig
from clip_train.data.pipeline import Batch, config_sources
from clip_train.data.teacher_members import teacher_meta
from clip_train.loss.distill import DistillLoss
from clip_train.models.clip import ClipModel, load_tokenizer
from clip_train.models.transforms import image_normalization
from clip_train.paths import resolve_model_folder

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_distill_inputs(cfg: RunConfig) -> None:
    """Before anything is built: the online teacher is a saved model, the offline shards carry
    teacher embeddings (NoModelError / DataError, one line each)."""
    if cfg.distill.mode == "online":
        resolve_model_folder(cfg.distill.teacher, setting="distill.teacher")
    elif cfg.distill.mode == "offline":
        for i, source in enumerate(config_sources(cfg.data)):
            teacher_meta(
                source.shards, f"data.sources[{i}].shards" if cfg.data.sources else "data.train_shards"
            )


class TeacherView:
    """A batch normalised for the student -> the same pixels normalised (and sized) for the teacher."""

    def __init__(self, student: tuple[list, list], teacher: tuple[list, list], size: int):
        def column(values):
            return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)

        self.identity = student == teacher
        self.student_mean, self.student_std = column(student[0]), column(student[1])
        self.teacher_mean, self.teacher_std = column(teacher[0]), column(teacher[1])
        self.size = size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not self.identity:
            device = images.device
            pixels = images.float() * self.student_std.to(device) + self.student_mean.to(device)
            images = (pixels - self.teacher_mean.to(device)) / self.teacher_std.to(device)
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=True)
        return images


class OnlineTeacher:
    """A saved model as a frozen teacher on `device`: embed(student images, captions)."""

    def __init__(self, folder: Path, student: ClipModel, device, precision: str):
        model = ClipModel.from_pretrained(folder)
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = load_tokenizer(folder)
        self.logit_scale = model.logit_scale.exp().item()
        self.device, self.precision = torch.device(device), precision
        self.view = TeacherView(
            image_normalization(student.visual, student.cfg.image),
            image_normalization(model.visual, model.cfg.image),
            model.cfg.image.image_size,
        )

    @torch.no_grad()
    def embed(self, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = AUTOCAST.get(self.precision)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            image = self.model.encode_image(self.view(images))
            text = self.model.encode_text(self.tokenizer(captions).to(self.device))
        return image.float(), text.float()


class Distillation:
    """What the trainer asks of distillation (see the module docstring)."""

    def __init__(self, loss: DistillLoss, teacher: OnlineTeacher | None):
        self.loss, self.teacher = loss, teacher

    def embeddings(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.teacher is None:
            return batch.teacher_image, batch.teacher_text
        return self.teacher.embed(batch.images, batch.captions)

    @staticmethod
    def join(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """A step's micro-batches' teacher embeddings, in the order their student embeddings are
        joined (accumulation.py), so that row i of both is the same pair."""
        return torch.cat([image for image, _ in parts]), torch.cat([text for _, text in parts])

    def metrics(self) -> dict:
        kl = self.loss.last_kl
        return {"distill_kl": kl.item()} if kl is not None else {}


def build_distillation(cfg: RunConfig, student: ClipModel, device, contrastive) -> Distillation | None:
    distill = cfg.distill
    if distill.mode == "none":
        return None
    teacher = None
    if distill.mode == "online":
        folder = resolve_model_folder(distill.teacher, setting="distill.teacher")
        teacher = OnlineTeacher(folder, student, device, distill.precision)
        scale = teacher.logit_scale
    else:
        scale = teacher_meta(config_sources(cfg.data)[0].shards, "data.train_shards")["logit_scale"]
    if distill.teacher_logit_scale is not None:
        scale = distill.teacher_logit_scale
    return Distillation(DistillLoss(contrastive, distill.weight, scale), teacher)
