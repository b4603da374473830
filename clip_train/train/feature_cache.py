"""train.cache_image_features: the outputs of a fully locked image tower, computed once per sample."""

from __future__ import annotations

import torch

from clip_train.evaluate.encode import in_chunks
from clip_train.models.clip import ClipModel


class ImageFeatureCache:
    """Outputs of a fully locked image tower, per sample key.

    Exact, not an approximation: the locked tower's BatchNorm layers are frozen (fixed statistics in
    any mode), timm towers built with num_classes=0 have no dropout on their features, and the
    training images get the deterministic eval transform, so recomputing gives the same values.
    Not saved in checkpoints; a resumed run refills it with the same values.
    """

    def __init__(self, chunk: int):
        self.features: dict[str, torch.Tensor] = {}
        self.chunk = chunk  # images per tower call (eval.image_chunk, resolved for the device)

    @torch.no_grad()
    def lookup(self, model: ClipModel, images: torch.Tensor, keys: list[str], autocast) -> torch.Tensor:
        missing = [i for i, key in enumerate(keys) if key not in self.features]
        if missing:
            with autocast():
                computed = in_chunks(model.image_tower_features, images[missing], self.chunk).float().cpu()
            for i, feature in zip(missing, computed):
                self.features[keys[i]] = feature
        return torch.stack([self.features[key] for key in keys]).to(images.device)
