"""Distillation from a teacher CLIP: how far the student's batch similarities are from the teacher's.

    kl = distill_kl(image_emb, text_emb, logit_scale, teacher_image, teacher_text, teacher_scale)
    loss = contrastive + weight * kl

Each image row of the batch similarity matrix, softmaxed over the batch's texts, is a distribution
for the teacher (its embeddings, its logit scale) and for the student (its own, with gradients);
so is each text row over the images. The term is KL(teacher || student) averaged over all rows
of both directions (MobileCLIP's and TinyCLIP's affinity distillation). Over the global batch:
both models' embeddings are gathered from every process like the contrastive loss's, and a rank
takes the mean over its own rows against all columns, so the average over ranks (DDP's gradient
averaging) is the global term. A logit bias shifts a whole row and cancels in the softmax, so
SigLIP students distill the same way. The n x N logits are formed whatever loss.impl is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clip_train import distributed


def _rows_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher row) || softmax(student row))."""
    return F.kl_div(
        F.log_softmax(student_logits, dim=1),
        F.log_softmax(teacher_logits, dim=1),
        log_target=True,
        reduction="batchmean",
    )


def distill_kl(image_emb, text_emb, logit_scale, teacher_image, teacher_text, teacher_scale) -> torch.Tensor:
    """image_emb, text_emb: this rank's [n, d] student rows (L2-normalised); logit_scale:
    exp(temperature parameter); teacher_*: the teacher's [n, d_t] rows of the same pairs;
    teacher_scale: the teacher's multiplier. Returns the mean KL over this rank's rows."""
    all_image = distributed.all_gather_with_grad(image_emb)
    all_text = distributed.all_gather_with_grad(text_emb)
    teacher_all_image = distributed.all_gather_no_grad(teacher_image)
    teacher_all_text = distributed.all_gather_no_grad(teacher_text)
    n = image_emb.shape[0]
    if distributed.world_size() == 1:
        rows = (all_image, all_text, teacher_all_image, teacher_all_text)
    else:
        own = slice(distributed.rank() * n, (distributed.rank() + 1) * n)
        rows = (image_emb, text_emb, teacher_all_image[own], teacher_all_text[own])
    image_rows, text_rows, teacher_image_rows, teacher_text_rows = rows
    # fp32 with autocast off, like the contrastive logits: softmax over N columns
    with torch.autocast(device_type=image_emb.device.type, enabled=False):
        scale = logit_scale.float()
        student_i2t = scale * image_rows.float() @ all_text.float().T
        student_t2i = scale * text_rows.float() @ all_image.float().T
        teacher_i2t = teacher_scale * teacher_image_rows.float() @ teacher_all_text.float().T
        teacher_t2i = teacher_scale * teacher_text_rows.float() @ teacher_all_image.float().T
        return (_rows_kl(teacher_i2t, student_i2t) + _rows_kl(teacher_t2i, student_t2i)) / 2


class DistillLoss(nn.Module):
    """contrastive(student) + weight * distill_kl(student, teacher); the last KL term is kept
    (detached) for the log."""

    def __init__(self, contrastive: nn.Module, weight: float, teacher_scale: float):
        super().__init__()
        self.contrastive, self.weight, self.teacher_scale = contrastive, weight, teacher_scale
        self.last_kl: torch.Tensor | None = None

    def forward(self, image_emb, text_emb, logit_scale, logit_bias, teacher_image, teacher_text):
        loss = self.contrastive(image_emb, text_emb, logit_scale, logit_bias)
        kl = distill_kl(image_emb, text_emb, logit_scale, teacher_image, teacher_text, self.teacher_scale)
        self.last_kl = kl.detach()
        return loss + self.weight * kl
