"""One picture per evaluation task: a confusion matrix, or recall@k curves for retrieval."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines

import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import torch  # noqa: E402


def plot_confusion(matrix: list[list[int]], classnames: list[str], title: str, path: Path) -> None:
    """Rows: true class, columns: predicted; each row normalised to the share of its images."""
    counts = torch.tensor(matrix, dtype=torch.float64)
    shares = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.45 * len(classnames) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classnames)), classnames, rotation=90, fontsize=8)
    ax.set_yticks(range(len(classnames)), classnames, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(classnames) <= 20:  # numbers are unreadable beyond that
        for (row, col), share in _cells(shares):
            ax.text(col, row, f"{share:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if share > 0.5 else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cells(shares: torch.Tensor):
    for row in range(shares.shape[0]):
        for col in range(shares.shape[1]):
            yield (row, col), shares[row, col].item()


def plot_recall_curves(image_ranks: torch.Tensor, text_ranks: torch.Tensor, title: str, path: Path) -> None:
    """Recall@k for k = 1..50 in both directions (ranks from metrics.retrieval_ranks)."""
    ks = list(range(1, 51))
    fig, ax = plt.subplots(figsize=(6, 4))
    for ranks, label in ((image_ranks, "image -> text"), (text_ranks, "text -> image")):
        ax.plot(ks, [(ranks < k).float().mean().item() for k in ks], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
