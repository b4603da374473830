"""A label prior for the image embedding: what a pretrained classifier head says the image is, written
in the text tower's own words (ConSE, Norouzi et al., "Zero-shot learning by convex combination of
semantic embeddings", ICLR 2014).

A locked ImageNet tower already knows a sandal from a sneaker; a projection trained on a few thousand
clip-art captions does not learn it when no caption mentions them. The prior hands that knowledge
over without training data: the tower's own classifier head (kept from its pretrained weights) gives
class probabilities, and the image's prior is the probability-weighted mean of the frozen text
tower's embeddings of the top-k class names ("a photo of a sandal.", ...). It lives in the text
tower's space, so ClipModel compares it with the text tower's own (unprojected) embedding of a
caption, beside the learned projections (see ClipModel.encode_text).

    prior = LabelPrior(widths=[1280], num_labels=1000, label_dim=384, top_k=10, heads=[(weight, bias)])
    prior.set_label_embeddings(text_embeddings)   # [1000, 384], L2-normalised rows
    prior(features)                               # [B, 384], L2-normalised

Everything here is a buffer, saved with the model: a saved model needs neither the weights files
nor the label list to rebuild it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clip_train.config import ConfigError

LABEL_SETS_DIR = Path(__file__).resolve().parents[1] / "assets" / "classnames"
# The label sets that ship with the package: name -> file (one class name per line, line i = row i
# of the classifier head). imagenet: the 1,000 ImageNet-1k classes in the readable names of the CLIP
# paper's zero-shot classifier (as OpenCLIP ships them), with the two repeated names told apart
# (row 744 "projectile", row 836 "burning glass").
SHIPPED_LABEL_SETS = {"imagenet": LABEL_SETS_DIR / "imagenet.txt"}


def read_labels(spec: str) -> list[str]:
    """Class names of a shipped set ("imagenet") or a file, one per line (ConfigError naming the fix)."""
    path = SHIPPED_LABEL_SETS.get(spec) or Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"model.label_prior.labels={spec!r} is neither a shipped set ({', '.join(SHIPPED_LABEL_SETS)}) "
            "nor a file: give a text file with one class name per line, in the classifier's order"
        )
    names = [" ".join(line.split()) for line in path.read_text(encoding="utf-8-sig").splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or not all(names):
        raise ConfigError(f"label file {path} is empty or has a blank line: line i names classifier row i")
    return names


class LabelPrior(nn.Module):
    """features [B, sum of the towers' widths] -> [B, label_dim] ConSE embedding, L2-normalised.

    heads: per image tower (in the order its features are concatenated), its classifier's
    (weight [num_labels, width], bias [num_labels]), or None for a model about to be loaded from a
    saved state (the buffers are then filled by load_state_dict). With several towers each gets its
    own prior and their normalised sum is the image's.
    """

    def __init__(
        self,
        widths: list[int],
        num_labels: int,
        label_dim: int,
        top_k: int,
        heads: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        super().__init__()
        self.widths = list(widths)
        self.top_k = min(top_k, num_labels)
        for i, width in enumerate(self.widths):
            weight, bias = heads[i] if heads else (torch.zeros(num_labels, width), torch.zeros(num_labels))
            if tuple(weight.shape) != (num_labels, width) or tuple(bias.shape) != (num_labels,):
                raise ConfigError(
                    f"image tower {i}'s classifier is {tuple(weight.shape)} but the towers give {width} "
                    f"features and the labels are {num_labels}: give model.label_prior.labels with one "
                    "name per classifier row"
                )
            self.register_buffer(f"head_weight_{i}", weight.detach().float().clone())
            self.register_buffer(f"head_bias_{i}", bias.detach().float().clone())
        self.register_buffer("label_embeddings", torch.zeros(num_labels, label_dim))

    @torch.no_grad()
    def set_label_embeddings(self, embeddings: torch.Tensor) -> None:
        self.label_embeddings.copy_(F.normalize(embeddings.float(), dim=-1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # in fp32 under autocast too: a 1,000-way softmax and its top k are where bf16 rounding
        # would reorder near-ties
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self._prior(features.float()).to(features.dtype)

    def _prior(self, features: torch.Tensor) -> torch.Tensor:
        prior = 0
        for i, part in enumerate(features.split(self.widths, dim=-1)):
            weight, bias = getattr(self, f"head_weight_{i}"), getattr(self, f"head_bias_{i}")
            probs = F.linear(part, weight, bias).softmax(dim=-1)
            # only the top k: the long tail of a 1,000-way softmax is noise that pulls every image
            # towards the mean of all labels
            top_probs, top_labels = probs.topk(self.top_k, dim=-1)
            mixed = (top_probs.unsqueeze(-1) * self.label_embeddings[top_labels]).sum(dim=1)
            prior = prior + F.normalize(mixed, dim=-1)
        return F.normalize(prior, dim=-1)
