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
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each query's first correct answer lands, without the full similarity matrix.

    text_to_image[j] is the image that caption j describes (several captions per image allowed).
    image_ranks[i]: how many texts score strictly higher than image i's best-scoring caption;
    text_ranks[j]: how many images score strictly higher than caption j's image. Rank 0 is a hit
    at R@1; recall@k is the fraction of ranks below k. Only [chunk, N] similarities exist at once.
    """
    device = image_emb.device
    text_to_image = text_to_image.to(device)
    image_ranks = []
    for start in range(0, image_emb.shape[0], chunk):
        sims = image_emb[start : start + chunk] @ text_emb.T
        owners = torch.arange(start, start + sims.shape[0], device=device)[:, None]
        best_positive = sims.masked_fill(text_to_image[None, :] != owners, float("-inf")).amax(dim=1)
        image_ranks.append((sims > best_positive[:, None]).sum(dim=1))
    text_ranks = []
    for start in range(0, text_emb.shape[0], chunk):
        sims = text_emb[start : start + chunk] @ image_emb.T
        positive = sims.gather(1, text_to_image[start : start + sims.shape[0], None])
        text_ranks.append((sims > positive).sum(dim=1))
    return torch.cat(image_ranks).cpu(), torch.cat(text_ranks).cpu()


def recall_at(ranks: torch.Tensor, k: int) -> float:
    return (ranks < k).float().mean().item()


@torch.no_grad()
def retrieval_recall(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks=(1, 5, 10),
    chunk: int = 4096,
) -> dict[str, float]:
    """Recall@k both ways. image -> text: some caption of the image is among its k most similar
    texts; text -> image: the caption's image is among its k most similar images."""
    image_ranks, text_ranks = retrieval_ranks(image_emb, text_emb, text_to_image, chunk)
    metrics = {}
    for k in ks:
        # CLIP_benchmark's names: "image retrieval" = text -> image, "text retrieval" = image -> text
        metrics[f"text_retrieval_recall@{k}"] = recall_at(image_ranks, k)
        metrics[f"image_retrieval_recall@{k}"] = recall_at(text_ranks, k)
    return metrics
