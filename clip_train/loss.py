"""The contrastive loss: the only place where image-text logits are formed.

Symmetric InfoNCE (CLIP): for a batch of N matched pairs, cross-entropy of each image against all
N texts and of each text against all N images, averaged over both directions.

With several processes each rank holds N/W pairs. Its embeddings are all-gathered with autograd and
the rank scores only its own rows against all N columns ("local loss"): W times less logit memory
than building the full N x N matrix on every rank, and, once DDP averages the parameter gradients,
exactly the gradient of the loss on the concatenated global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clip_train import distributed


class ClipLoss(nn.Module):
    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """image_emb, text_emb: [n, d] L2-normalised rows of this rank; logit_scale: exp(temperature)."""
        n = image_emb.shape[0]
        all_image = distributed.all_gather_with_grad(image_emb)
        all_text = distributed.all_gather_with_grad(text_emb)
        # Logits in fp32 even under autocast: the softmax over N columns is where bf16 loses digits.
        logits_per_image = logit_scale.float() * image_emb.float() @ all_text.float().T
        logits_per_text = logit_scale.float() * text_emb.float() @ all_image.float().T
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias.float()
            logits_per_text = logits_per_text + logit_bias.float()
        # This rank's pair i is column rank * n + i of the gathered matrices.
        labels = torch.arange(n, device=image_emb.device) + distributed.rank() * n
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def reference_clip_loss(image_emb, text_emb, logit_scale, logit_bias=None) -> torch.Tensor:
    """Brute force on one process: explicit log-softmax over the full N x N matrix (for tests)."""
    logits = logit_scale * image_emb.double() @ text_emb.double().T
    if logit_bias is not None:
        logits = logits + logit_bias
    idx = torch.arange(logits.shape[0])
    image_to_text = -torch.log_softmax(logits, dim=1)[idx, idx].mean()
    text_to_image = -torch.log_softmax(logits, dim=0)[idx, idx].mean()
    return (image_to_text + text_to_image) / 2
