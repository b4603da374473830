"""Whether each CPU-only tuning applies: one function per tuning, given the device the work runs on.

    if cpu_tunings.mask_dropout(x.device): ...   # true on a CPU only

Each tuning computes the same function in a way that suits a CPU: its caches, its page faults, its
oneDNN kernels. On a GPU the plain path is the one its libraries are built for (fused kernels, a
caching allocator, batches big enough to fill the device), so every function here is true for the
device type "cpu" only and false for any other, including device types this code has never seen.
The sites that use them: models/dropout.py, models/transforms.py, evaluate/encode.py. What each
buys and why it is off elsewhere: docs/performance.md.
"""

from __future__ import annotations

import torch

# Images per image-tower call in inference when small_image_chunks is on and eval.image_chunk is 0
CPU_IMAGE_CHUNK = 8


def _is_cpu(device: torch.device) -> bool:
    return device.type == "cpu"


def mask_dropout(device: torch.device) -> bool:
    """MaskDropout draws its keep-mask as torch.rand >= p instead of torch's dropout (bernoulli_).

    Why on a CPU: there torch's dropout draws the mask with bernoulli_, which costs more per element
    than a uniform draw and a compare, and training's text tower draws a mask over every activation of
    every layer. On a GPU F.dropout is one fused kernel, drawn on the device.
    """
    return _is_cpu(device)


def reused_normalize_buffers(device: torch.device) -> bool:
    """BatchNormalize(reuse=k) writes its float batches into k buffers taken in turn, not new tensors.

    Why on a CPU: a new batch-sized tensor is new pages from the operating system, each one faulted in
    and zeroed on first touch before the normalisation writes it; a buffer already written is mapped.
    On a GPU the caching allocator already hands back memory it holds.
    """
    return _is_cpu(device)


def traced_eval_tower(device: torch.device) -> bool:
    """Evaluation runs the image tower as a TorchScript trace, frozen and optimised for inference
    (evaluate/encode.py: InferenceTowers; also needs eval.jit_image_tower and fp32).

    Why on a CPU: freezing folds BatchNorm into the convolutions, one pass over the activations less
    per layer, and optimize_for_inference picks oneDNN's CPU kernels. On a GPU the eager tower
    already runs cuDNN's kernels, and the trade was measured on a CPU only.
    """
    return _is_cpu(device)


def small_image_chunks(device: torch.device) -> bool:
    """Inference feeds the image tower CPU_IMAGE_CHUNK images per call whatever the loader's batch,
    when eval.image_chunk is 0 (evaluate/encode.py: image_chunk_size; evaluation and the train
    feature cache).

    Why on a CPU: a few images' activations stay in the cores' caches between layers and those of a
    batch of 64-128 do not, so a convolutional tower would wait on memory. A GPU needs the whole
    batch to keep its cores busy.
    """
    return _is_cpu(device)


ALL_TUNINGS = (mask_dropout, reused_normalize_buffers, traced_eval_tower, small_image_chunks)
