import pytest
import torch

from clip_train.evaluate.metrics import (
    classification_metrics,
    classifier_weights,
    confusion_matrix,
    retrieval_recall,
)


def _one_hot_rows(order: list[list[int]], width: int) -> torch.Tensor:
    """Similarity rows whose ranking is given explicitly: order[i] lists columns best first."""
    sims = torch.zeros(len(order), width)
    for i, ranked in enumerate(order):
        for rank, col in enumerate(ranked):
            sims[i, col] = 1.0 - rank / width
    return sims


def test_recall_at_k_on_hand_made_rankings_with_two_captions_per_image():
    # 4 images, 8 captions: captions 2i and 2i+1 describe image i.
    text_to_image = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    # Build embeddings whose dot products reproduce a chosen similarity matrix: image rows are
    # one-hot over 8 "caption" dims; caption j's embedding is column j of the desired sims.
    image_sims = _one_hot_rows(
        [
            [1, 5, 6, 7, 0, 2, 3, 4],  # image 0: its caption 1 at rank 1 -> hit at R@1
            [0, 4, 6, 3, 1, 2, 5, 7],  # image 1: first own caption (3) at rank 4 -> R@5 hit
            [0, 1, 2, 3, 6, 7, 5, 4],  # image 2: own captions at ranks 7 and 8 -> only R@10
            [6, 0, 1, 2, 3, 4, 5, 7],  # image 3: own caption 6 first
        ],
        8,
    )
    image_emb = image_sims
    text_emb = torch.eye(8)
    m = retrieval_recall(image_emb, text_emb, text_to_image, ks=(1, 5, 10), chunk=3)
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 4)
    assert m["text_retrieval_recall@5"] == pytest.approx(3 / 4)
    assert m["text_retrieval_recall@10"] == pytest.approx(1.0)
    # text -> image: caption j's similarity to image i is image_sims[i, j]
    t2i_top1 = image_sims.argmax(dim=0)
    expected_r1 = (t2i_top1 == text_to_image).float().mean().item()
    assert m["image_retrieval_recall@1"] == pytest.approx(expected_r1)


def test_chunked_recall_equals_unchunked_recall():
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(100, 16, generator=g), dim=-1)
    owners = torch.arange(100) % 50
    full = retrieval_recall(image, text, owners, chunk=10_000)
    for chunk in (1, 7, 33):
        assert retrieval_recall(image, text, owners, chunk=chunk) == full


def test_classification_metrics_top1_top5_and_balanced_recall():
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # label 0, correct
            [0.8, 0.1, 0.0],  # label 1, wrong (top-2 contains 1)
            [0.0, 0.2, 0.9],  # label 2, correct
            [0.0, 0.3, 0.9],  # label 2, correct
        ]
    )
    labels = torch.tensor([0, 1, 2, 2])
    m = classification_metrics(logits, labels, ks=(1, 2))
    assert m["acc1"] == pytest.approx(3 / 4)
    assert m["acc2"] == pytest.approx(1.0)
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0 + 1) / 3)
    assert confusion_matrix(logits, labels).tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 2]]


def test_classifier_weights_are_renormalised_means_of_prompts():
    prompts = torch.nn.functional.normalize(torch.randn(3, 4, 8), dim=-1)
    weights = classifier_weights(prompts)
    assert torch.allclose(weights.norm(dim=-1), torch.ones(3))
    expected = prompts.mean(1) / prompts.mean(1).norm(dim=-1, keepdim=True)
    assert torch.allclose(weights, expected)
