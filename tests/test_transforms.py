"""Image transforms and the batch normalisation of uint8 images (no network)."""

import pickle

import pytest
import torch
from PIL import Image
from torchvision.transforms import ColorJitter, RandomHorizontalFlip

from clip_train.config import ImageTowerConfig
from clip_train.models.image_tower import build_image_tower
from clip_train.models.transforms import batch_normalizer, build_image_transforms


def _image_cfg(**kw) -> ImageTowerConfig:
    kw.setdefault("name", "test_efficientnet")
    kw.setdefault("image_size", 64)
    return ImageTowerConfig(**kw)


def test_image_transforms_shapes_and_normalisation():
    model = build_image_tower(_image_cfg())
    train, evaluate = build_image_transforms(model, _image_cfg(), crop_scale=(0.9, 1.0))
    white = Image.new("RGB", (97, 61), (255, 255, 255))
    for tf in (train, evaluate):
        x = tf(white)
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    # test_efficientnet's own pretrained config: ImageNet mean/std
    expected = (1 - 0.485) / 0.229
    assert evaluate(white)[0].mean().item() == pytest.approx(expected, abs=1e-4)
    # no flip, no colour jitter: captions name sides and colours
    assert not any(isinstance(t, (RandomHorizontalFlip, ColorJitter)) for t in train.transforms)
    pickle.dumps((train, evaluate))  # they run in DataLoader workers


def test_uint8_transforms_then_batch_normalize_equal_the_float_transforms():
    # the training loader's workers stop at uint8; BatchNormalize finishes the job on the batch
    model = build_image_tower(_image_cfg())
    cfg = _image_cfg(channels_last=True)
    _, float_eval = build_image_transforms(model, cfg)
    train_u8, eval_u8 = build_image_transforms(model, cfg, uint8=True)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 70, 90, 3), dtype=torch.uint8, generator=generator).numpy()
    images = [Image.fromarray(p) for p in pixels]
    assert train_u8(images[0]).dtype == torch.uint8 and train_u8(images[0]).shape == (3, 64, 64)
    batch = torch.stack([eval_u8(im) for im in images])
    assert batch.dtype == torch.uint8
    normalized = batch_normalizer(model, cfg)(batch)
    expected = torch.stack([float_eval(im) for im in images])
    assert normalized.dtype == torch.float32
    assert torch.allclose(normalized, expected, atol=1e-5)
    assert normalized.is_contiguous(memory_format=torch.channels_last)  # the layout the tower wants
    assert batch_normalizer(model, cfg)(expected) is expected  # float batches pass through
    pickle.dumps((train_u8, eval_u8))
    # reuse=2: two buffers taken in turn, each result as good as a fresh one
    reusing = batch_normalizer(model, cfg, reuse=2)
    first, second, third = reusing(batch), reusing(batch.flip(0)), reusing(batch)
    assert torch.allclose(first, expected, atol=1e-5) and torch.allclose(second, expected.flip(0), atol=1e-5)
    assert third.data_ptr() == first.data_ptr() != second.data_ptr()
    assert third.is_contiguous(memory_format=torch.channels_last)
    assert reusing(batch[:1]).shape == (1, 3, 64, 64)  # another batch shape gets its own buffer


def test_image_transforms_use_package_weights_normalisation():
    # the EfficientNet-Lite0 package weights were trained on (x - 0.5) / 0.5, not ImageNet mean/std
    cfg = _image_cfg(name="tf_efficientnet_lite0", pretrained="package:efficientnet-lite0")
    model = build_image_tower(_image_cfg(name="tf_efficientnet_lite0"))  # no weights needed here
    _, evaluate = build_image_transforms(model, cfg)
    x = evaluate(Image.new("RGB", (80, 80), (255, 255, 255)))
    assert torch.allclose(x, torch.ones_like(x))
