"""Training FLOPs of a ClipModel per image-text pair, and model FLOPs utilisation (MFU).

    flops = count_training_flops(model)     # once, at startup: a TrainingFlops breakdown
    flops.per_sample                        # forward + backward FLOPs of one pair
    FlopMetrics(flops.per_sample, world_size=1, peak_flops=312e12)(samples_per_s)
    # -> {"flops_per_sample": ..., "mfu": ...} ("mfu" only when peak_flops > 0)

What is counted: torch's FlopCounterMode runs one pair through the model and then the backward
that training needs, and counts every matmul, convolution and attention (2 FLOPs per
multiply-add). It is split at the tower outputs into three parts:

- image: the timm tower's forward, plus its backward when any of its parameters trains. A locked
  tower (model.image.lock, unlocked_groups 0) is forward only; a partly unlocked one gets the
  backward of its unlocked top groups, which is what autograd runs.
- text: the transformer at the full context_length (a caption with no padding), forward plus the
  backward of its trainable layers. This is the model as configured: TextTower drops columns that
  are padding in the whole batch, so the text work really done per step is usually less, which
  makes the MFU from these figures an upper bound for the text part.
- head: the two projections, forward and backward (they always train).

Backward FLOPs are measured, not assumed to be 2x the forward: autograd computes weight
gradients only for trainable parameters and input gradients only where something below needs
them, so for a fully trainable tower the backward comes out just under twice its forward (its
first layer gets no input gradient), and for a locked one it is zero. Formulas are torch's, but
for three kernels (CUSTOM_FORMULAS): the CPU attention kernel, which torch has none for, and
its backward (counted as its 4 matmuls, without the kernel's recomputation of the scores), and
the convolution backward, whose torch formula ignores groups (a depthwise convolution's
backward came out 33x its forward instead of 2x). Not counted: the loss (its
logit matrix costs 2 x batch x embed_dim per pair and direction, which grows with the batch, not
the model), normalisation, activations and other element-wise work, the optimizer, recomputation
(gradient checkpointing, or the extra no-grad forward of contrastive accumulation), and the savings
of train.cache_image_features (a cached locked tower is still counted as one forward per pair).
These are model FLOPs in the sense of MFU (PaLM, Chowdhery et al. 2022): what the model needs,
not what the hardware happened to execute.

The count runs in eval mode (dropout off: FLOP counts do not depend on it), except for patch
dropout (model.image.patch_dropout), whose dropped tokens a training step never computes, with the
RNG state
restored and gradients returned rather than accumulated, so it leaves the model, its BatchNorm
statistics, its .grad fields and the random streams exactly as they were.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from timm.layers import PatchDropout
from torch.utils.flop_counter import FlopCounterMode

from clip_train.models.clip import ClipModel

aten = torch.ops.aten


def _attention_flops(query, key, value) -> int:
    """softmax(Q K^T) V for [batch, heads, seq, dim] shapes: two batched matmuls."""
    b, h, s_q, d_q = query
    s_k, d_v = key[-2], value[-1]
    return 2 * b * h * s_q * s_k * d_q + 2 * b * h * s_q * s_k * d_v


def _cpu_flash_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(query, key, value)


def _cpu_flash_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    # dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q: twice the forward. (The kernel also
    # recomputes Q K^T, which torch's formulas for the CUDA kernels count; a recomputation is not
    # a model FLOP, and the math path of attention, which a mask can select, has none.)
    return 2 * _attention_flops(query, key, value)


def _conv_flops(x, w, out, transposed: bool) -> int:
    """2 x multiply-adds of a convolution; w is [c_out, c_in / groups, *kernel], so groups count."""
    spatial = (x if transposed else out)[2:]
    return 2 * x[0] * math.prod(spatial) * math.prod(w)


def _conv_backward(grad_out, x, w, bias, stride, padding, dilation, transposed, output_padding, groups,
                   output_mask, out_shape=None, **kwargs) -> int:  # fmt: skip
    # The input gradient (a transposed convolution) and the weight gradient each take as many
    # multiply-adds as the forward, and are computed only when asked for (output_mask). torch's
    # own formula ignores groups here, which counts a depthwise backward `groups` times over.
    return _conv_flops(x, w, grad_out, transposed) * (int(output_mask[0]) + int(output_mask[1]))


# torch's counter has formulas for the CUDA attention kernels but not for the CPU one that
# F.scaled_dot_product_attention dispatches to on a CPU (timm's ViTs, BERT): without them the
# attention of every CPU count would be silently left out. The count runs where the model is
# built, which is the CPU for train.py (before Accelerate moves it).
CUSTOM_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward,
    aten.convolution_backward: _conv_backward,
}


@dataclass
class TrainingFlops:
    """FLOPs of one image-text pair through a training step, by part."""

    image_forward: int
    image_backward: int
    text_forward: int
    text_backward: int
    head_forward: int
    head_backward: int

    @property
    def forward(self) -> int:
        return self.image_forward + self.text_forward + self.head_forward

    @property
    def backward(self) -> int:
        return self.image_backward + self.text_backward + self.head_backward

    @property
    def per_sample(self) -> int:
        return self.forward + self.backward

    def as_dict(self) -> dict:
        totals = {"forward": self.forward, "backward": self.backward, "per_sample": self.per_sample}
        return {**asdict(self), **totals}


def _counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=CUSTOM_FORMULAS)


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _backward(output: torch.Tensor, grad: torch.Tensor | None, inputs: list[torch.Tensor]):
    """(FLOPs, gradients) of d output / d inputs, returned rather than accumulated into .grad."""
    inputs = [x for x in inputs if x.requires_grad]
    if not inputs or not output.requires_grad:
        return 0, [None] * len(inputs)
    with _counter() as counter:
        grads = torch.autograd.grad(output, inputs, grad_outputs=grad, allow_unused=True)
    return counter.get_total_flops(), grads


def count_training_flops(model: ClipModel) -> TrainingFlops:
    """Measure the training FLOPs of one image-text pair (see the module docstring)."""
    device = next(model.parameters()).device
    size = model.cfg.image.image_size
    images = torch.zeros(1, 3, size, size, device=device)
    pad = model.text.pad_token_id
    vocab = model.text.transformer.get_input_embeddings().num_embeddings
    tokens = torch.full((1, model.cfg.text.context_length), (pad + 1) % vocab, device=device)
    was_training = model.training
    model.eval()
    for module in model.modules():
        if isinstance(module, PatchDropout):  # the tokens it drops are work a training step never does
            module.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
            with _counter() as counter:
                image_features = model.image_tower_features(images)
            image_forward = counter.get_total_flops()
            with _counter() as counter:
                text_features = model.text(tokens)
            text_forward = counter.get_total_flops()
            # The head on the towers' outputs cut loose from them, so that its backward, and each
            # tower's, is counted on its own: the same operations as one joint backward.
            image_in = image_features.detach().requires_grad_(image_features.requires_grad)
            text_in = text_features.detach().requires_grad_(text_features.requires_grad)
            with _counter() as counter:
                image_emb = model.image_features_to_embedding(image_in)
                text_emb = model.text_features_to_embedding(text_in)
            head_forward = counter.get_total_flops()
            # A scalar of both embeddings and the temperature: its gradient reaches every trainable
            # parameter along the same paths as the contrastive loss's would.
            score = (image_emb * text_emb).sum() * model.logit_scale.exp()
            head_params = _trainable(model.image_proj) + _trainable(model.text_proj)
            head_backward, grads = _backward(score, None, [image_in, text_in, *head_params])
            feature_grads = dict(zip([x for x in (image_in, text_in) if x.requires_grad], grads))
            image_backward, _ = _backward(
                image_features, feature_grads.get(image_in), _trainable(model.visual)
            )
            text_backward, _ = _backward(text_features, feature_grads.get(text_in), _trainable(model.text))
    finally:
        model.train(was_training)
    return TrainingFlops(
        image_forward=image_forward,
        image_backward=image_backward,
        text_forward=text_forward,
        text_backward=text_backward,
        head_forward=head_forward,
        head_backward=head_backward,
    )


@dataclass
class FlopMetrics:
    """The train record's FLOP fields for a throughput: flops_per_sample always, and mfu (achieved
    model FLOP/s per device / peak_flops, the peak of ONE device) when peak_flops is known (> 0).

        flop_metrics = FlopMetrics(count_training_flops(model).per_sample, world_size, peak_flops)
        flop_metrics(samples_per_s)   # samples/s of all processes together -> dict
    """

    flops_per_sample: int
    world_size: int = 1
    peak_flops: float = 0.0

    def __call__(self, samples_per_s: float) -> dict:
        out: dict = {"flops_per_sample": self.flops_per_sample}
        if self.peak_flops > 0:
            per_device = samples_per_s / max(self.world_size, 1)
            out["mfu"] = self.flops_per_sample * per_device / self.peak_flops
        return out
