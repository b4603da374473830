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
def retrieval_ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    chunk: int = 4096,
    max_rank: int = 50,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each query's first correct answer lands in its top-`max_rank` list (max_rank if not
    there), without the full similarity matrix.

    text_to_image[j] is the image that caption j describes (several captions per image allowed).
    image_ranks[i]: position of image i's first caption among its most similar texts;
    text_ranks[j]: position of caption j's image among its most similar images. Position 0 is a hit
    at R@1; recall@k (k <= max_rank) is the fraction of positions below k. The lists come from
    torch.topk over each query's full row, as in CLIP_benchmark, so ties (identical captions of
    different images are common) are broken the same way; only [chunk, N] similarities exist at once.
    """
    device = image_emb.device
    text_to_image = text_to_image.to(device)

    def first_hits(queries, candidates, is_positive):
        positions = []
        for start in range(0, queries.shape[0], chunk):
            sims = queries[start : start + chunk] @ candidates.T
            top = sims.topk(min(max_rank, sims.shape[1]), dim=1).indices
            hit = is_positive(top, start)  # [chunk, k] bool
            # first True along each row, or max_rank when the list has none
            first = torch.where(hit.any(dim=1), hit.int().argmax(dim=1), torch.full_like(top[:, 0], max_rank))
            positions.append(first)
        return torch.cat(positions).cpu()

    def caption_of_image(top, start):  # texts top[i, r] describe image start + i
        owners = torch.arange(start, start + top.shape[0], device=device)[:, None]
        return text_to_image[top] == owners

    def image_of_caption(top, start):
        return top == text_to_image[start : start + top.shape[0], None]

    return first_hits(image_emb, text_emb, caption_of_image), first_hits(
        text_emb, image_emb, image_of_caption
    )


@torch.no_grad()
def retrieval_recall(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks=(1, 5, 10),
    chunk: int = 4096,
) -> dict[str, float]:
    """Recall@k both ways, CLIP_benchmark's definition: image -> text, some caption of the image is
    among the torch.topk(k) texts of its row; text -> image, the caption's image is among the
    topk(k) images of its row. One topk per k, as there, so that ties break the same way."""
    device = image_emb.device
    text_to_image = text_to_image.to(device)
    i2t_hits = {k: 0 for k in ks}
    t2i_hits = {k: 0 for k in ks}
    for start in range(0, image_emb.shape[0], chunk):
        sims = image_emb[start : start + chunk] @ text_emb.T
        owners = torch.arange(start, start + sims.shape[0], device=device)[:, None]
        for k in ks:
            top = sims.topk(min(k, sims.shape[1]), dim=1).indices
            i2t_hits[k] += (text_to_image[top] == owners).any(dim=1).sum().item()
    for start in range(0, text_emb.shape[0], chunk):
        sims = text_emb[start : start + chunk] @ image_emb.T
        own = text_to_image[start : start + sims.shape[0], None]
        for k in ks:
            top = sims.topk(min(k, sims.shape[1]), dim=1).indices
            t2i_hits[k] += (top == own).any(dim=1).sum().item()
    metrics = {}
    for k in ks:
        # CLIP_benchmark's names: "image retrieval" = text -> image, "text retrieval" = image -> text
        metrics[f"text_retrieval_recall@{k}"] = i2t_hits[k] / image_emb.shape[0]
        metrics[f"image_retrieval_recall@{k}"] = t2i_hits[k] / text_emb.shape[0]
    return metrics
