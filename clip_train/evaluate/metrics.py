"""Metrics on embeddings: zero-shot accuracy and retrieval recall@k, computed in chunks.

Both work on L2-normalised embeddings, the protocol of OpenCLIP's zero-shot evaluation and of
CLIP_benchmark: class embedding = renormalised mean of the normalised prompt embeddings, logits =
100 x cosine (the scale does not change rankings), an image counts as retrieved if any of its
captions is among the top k.
"""

from __future__ import annotations

import torch


def classifier_weights(class_prompt_embeddings: torch.Tensor) -> torch.Tensor:
    """[C, T, d] normalised embeddings of T prompts per class -> [C, d] class embeddings."""
    mean = class_prompt_embeddings.mean(dim=1)
    return mean / mean.norm(dim=-1, keepdim=True)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracy and mean per-class recall (balanced accuracy) from [N, C] logits."""
    num_classes = logits.shape[1]
    topk = logits.topk(min(max(ks), num_classes), dim=1).indices
    correct = topk == labels[:, None]
    metrics = {f"acc{k}": correct[:, :k].any(dim=1).float().mean().item() for k in ks if k <= num_classes}
    top1 = topk[:, 0]
    recalls = [
        (top1[labels == c] == c).float().mean().item() for c in range(num_classes) if (labels == c).any()
    ]
    metrics["mean_per_class_recall"] = sum(recalls) / len(recalls)
    return metrics


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    num_classes = logits.shape[1]
    pred = logits.argmax(dim=1)
    return torch.bincount(labels * num_classes + pred, minlength=num_classes**2).view(
        num_classes, num_classes
    )


@torch.no_grad()
def retrieval_recall(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks=(1, 5, 10),
    chunk: int = 4096,
) -> dict[str, float]:
    """Recall@k both ways without holding the full [images x texts] similarity matrix.

    text_to_image[j] is the index of the image that caption j describes (several captions per image
    are allowed). image_to_text R@k: some caption of the image is among its k most similar texts;
    text_to_image R@k: the caption's image is among its k most similar images.
    """
    num_images, num_texts = image_emb.shape[0], text_emb.shape[0]
    text_to_image = text_to_image.to(image_emb.device)
    k_max_i2t, k_max_t2i = min(max(ks), num_texts), min(max(ks), num_images)
    i2t_rank_hit = []  # per image: [k_max] bool, does the text at rank r belong to this image
    for start in range(0, num_images, chunk):
        sims = image_emb[start : start + chunk] @ text_emb.T
        top = sims.topk(k_max_i2t, dim=1).indices
        owners = torch.arange(start, start + sims.shape[0], device=sims.device)[:, None]
        i2t_rank_hit.append(text_to_image[top] == owners)
    t2i_rank_hit = []
    for start in range(0, num_texts, chunk):
        sims = text_emb[start : start + chunk] @ image_emb.T
        top = sims.topk(k_max_t2i, dim=1).indices
        t2i_rank_hit.append(top == text_to_image[start : start + sims.shape[0], None])
    i2t, t2i = torch.cat(i2t_rank_hit), torch.cat(t2i_rank_hit)
    metrics = {}
    for k in ks:
        # CLIP_benchmark's names: "image retrieval" = text -> image, "text retrieval" = image -> text
        metrics[f"text_retrieval_recall@{k}"] = i2t[:, :k].any(dim=1).float().mean().item()
        metrics[f"image_retrieval_recall@{k}"] = t2i[:, :k].any(dim=1).float().mean().item()
    return metrics
