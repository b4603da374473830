"""Image transforms for the image tower, and the batch normalisation of uint8 images on the device.

    train_tf, eval_tf = build_image_transforms(image, cfg.model.image)   # PIL RGB -> float tensor
    normalize = batch_normalizer(image, cfg.model.image)   # for uint8=True transforms: on the device

Mean and std are those the tower's weights expect (image_normalization), so a saved model can
record them and an exported one normalise the same way.
"""

from __future__ import annotations

import torch
from timm.data import create_transform, resolve_data_config
from torch import nn

from clip_train.config import ImageTowerConfig
from clip_train.models import cpu_tunings
from clip_train.models.pretrained import image_package


def _image_data_config(model: nn.Module, cfg: ImageTowerConfig) -> dict:
    args = {"input_size": (3, cfg.image_size, cfg.image_size), "crop_pct": 1.0}
    pkg = image_package(cfg.pretrained) if cfg.pretrained else None
    if cfg.mean and cfg.std:
        args.update(mean=tuple(cfg.mean), std=tuple(cfg.std))
    elif pkg is not None:
        args.update(mean=pkg.mean, std=pkg.std)
    return resolve_data_config(args=args, model=model)


def image_normalization(model: nn.Module, cfg: ImageTowerConfig) -> tuple[list[float], list[float]]:
    """The (mean, std) the transforms use, so a saved model can record them."""
    data_cfg = _image_data_config(model, cfg)
    return [float(m) for m in data_cfg["mean"]], [float(s) for s in data_cfg["std"]]


def build_image_transforms(
    model: nn.Module,
    cfg: ImageTowerConfig,
    crop_scale: tuple[float, float] = (0.9, 1.0),
    *,
    uint8: bool = False,
) -> tuple:
    """(train, eval) transforms from PIL RGB images to normalised float tensors [3, S, S].

    train: RandomResizedCrop(scale=crop_scale), as in OpenCLIP: no flip (captions say left and
    right), no colour jitter (captions name colours). eval: resize the short side to S, centre crop
    S, crop_pct=1 as in OpenCLIP, since a caption describes the whole image.
    Mean/std are those the weights expect: from the packaged-weights table for package: specs,
    otherwise timm's pretrained config for the model name.

    uint8=True: both end at uint8 tensors [3, S, S] instead (timm's prefetcher mode), to be turned
    into the same normalised floats a batch at a time by BatchNormalize on the training device.
    """
    data_cfg = _image_data_config(model, cfg)
    train = create_transform(
        **data_cfg,
        is_training=True,
        scale=tuple(crop_scale),
        hflip=0.0,
        color_jitter=None,
        auto_augment=None,
        re_prob=0.0,
        use_prefetcher=uint8,
    )
    evaluate = create_transform(**data_cfg, is_training=False, use_prefetcher=uint8)
    return train, evaluate


class BatchNormalize:
    """uint8 images [B, 3, H, W] -> the normalised floats ToTensor + Normalize give, for a whole batch.

    Why: the loader workers share the CPU with the model. Per image, ToTensor and Normalize cost
    about as much as decoding, and float batches are 4x the bytes to collate, pass between
    processes and copy to the device; done here it is two passes over the batch on the device
    (what timm's PrefetchLoader does). Float input passes through unchanged.

    reuse=k writes the results into k buffers taken in turn, so a returned batch is overwritten by
    the k-th call after it: the caller must be done with it by then (train.py passes the number of
    micro-batches it holds at once). Why: on the CPU a fresh batch-sized tensor is fresh pages from
    the OS, each faulted in on first touch. reuse=0 allocates, and so does any other device
    (cpu_tunings.reused_normalize_buffers decides: CUDA's caching allocator already hands back
    memory it holds).
    """

    def __init__(self, mean, std, memory_format=torch.contiguous_format, reuse: int = 0):
        self.mean = torch.tensor([255.0 * m for m in mean]).view(1, -1, 1, 1)
        self.inv_std = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, -1, 1, 1)
        self.memory_format = memory_format
        self.reuse = reuse
        self._buffers: list[torch.Tensor | None] = [None] * reuse
        self._turn = 0

    def _output_for(self, images: torch.Tensor) -> torch.Tensor:
        """The float tensor to write this batch into: the next of the reused buffers, or a new one."""
        if not self.reuse or not cpu_tunings.reused_normalize_buffers(images.device):
            return torch.empty(images.shape, device=images.device, memory_format=self.memory_format)
        slot, self._turn = self._turn, (self._turn + 1) % self.reuse
        buffer = self._buffers[slot]
        if buffer is None or buffer.shape != images.shape or buffer.device != images.device:
            buffer = torch.empty(images.shape, device=images.device, memory_format=self.memory_format)
            self._buffers[slot] = buffer
        return buffer

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        if self.mean.device != images.device:
            self.mean, self.inv_std = self.mean.to(images.device), self.inv_std.to(images.device)
        # copy_ casts (and changes the layout) in one pass, into memory that is already there
        return self._output_for(images).copy_(images).sub_(self.mean).mul_(self.inv_std)


def batch_normalizer(model: nn.Module, cfg: ImageTowerConfig, reuse: int = 0) -> BatchNormalize:
    """The BatchNormalize matching build_image_transforms(model, cfg, uint8=True)."""
    mean, std = image_normalization(model, cfg)
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return BatchNormalize(mean, std, layout, reuse)
