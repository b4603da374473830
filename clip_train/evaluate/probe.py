"""Linear probe: multinomial logistic regression on frozen image features.

The supervised reference for a zero-shot number (as in the CLIP paper's linear-probe tables): how
well a linear classifier trained on labelled images does with the same image tower. Features are
the image tower's outputs (before the projection), standardised with the training set's statistics.
The L2 penalty is chosen from a small grid on a held-out fifth of the training features, then the
probe is refit on all of them; L-BFGS runs full-batch, so the result is deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

L2_GRID = (1e-6, 1e-4, 1e-2, 1.0)


def _fit(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float) -> torch.Tensor:
    weights = torch.zeros(features.shape[1] + 1, num_classes, dtype=torch.float64, requires_grad=True)
    with_bias = F.pad(features, (0, 1), value=1.0)
    optimizer = torch.optim.LBFGS([weights], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(with_bias @ weights, labels) + l2 * weights[:-1].square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weights.detach()


def _accuracy(weights: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> float:
    logits = F.pad(features, (0, 1), value=1.0) @ weights
    return (logits.argmax(dim=1) == labels).double().mean().item()


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
) -> dict[str, float]:
    mean, std = train_features.mean(dim=0), train_features.std(dim=0).clamp(min=1e-6)
    train = ((train_features - mean) / std).double()
    test = ((test_features - mean) / std).double()
    # every fifth training image validates the penalty (deterministic, spread over the set)
    is_val = torch.arange(len(train)) % 5 == 0
    scores = {
        l2: _accuracy(
            _fit(train[~is_val], train_labels[~is_val], num_classes, l2), train[is_val], train_labels[is_val]
        )
        for l2 in L2_GRID
    }
    best = max(L2_GRID, key=lambda l2: (scores[l2], l2))  # ties: the stronger penalty
    weights = _fit(train, train_labels, num_classes, best)
    return {"linear_probe_acc1": _accuracy(weights, test, test_labels), "linear_probe_l2": best}
