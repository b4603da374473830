"""Brute-force losses in float64 on one process: the full N x N matrix, written the obvious way.

The ground truth that every ContrastiveLoss mode is tested against; never used for training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _logits(image, text, scale, bias):
    logits = scale.double() * image.double() @ text.double().T
    return logits + bias.double() if bias is not None else logits


def reference_infonce(image, text, scale, bias=None) -> torch.Tensor:
    """Mean over both directions of the cross-entropy of each item against the whole batch."""
    logits = _logits(image, text, scale, bias)
    idx = torch.arange(logits.shape[0])
    image_to_text = -torch.log_softmax(logits, dim=1)[idx, idx].mean()
    text_to_image = -torch.log_softmax(logits, dim=0)[idx, idx].mean()
    return (image_to_text + text_to_image) / 2


def reference_siglip(image, text, scale, bias=None) -> torch.Tensor:
    """SigLIP: -log sigmoid(z_ij * S_ij) summed over all pairs (z = +1 matched, -1 not) / N."""
    logits = _logits(image, text, scale, bias)
    signs = 2 * torch.eye(logits.shape[0], dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]
