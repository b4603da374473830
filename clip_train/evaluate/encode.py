"""Embeddings for evaluation, split across processes and cached where the model has not changed.

Each rank encodes items rank, rank + W, ... (distributed.shard_indices) and the rows are gathered
back into the dataset's order, so every rank ends up with the same full embedding matrix and the
metrics are those of one process. Encoding runs under torch.inference_mode with the training
precision (autocast) and returns fp32, L2-normalised rows.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from PIL import Image

from clip_train import distributed
from clip_train.evaluate.metrics import classifier_weights
from clip_train.models import cpu_tunings


@dataclass
class EvalContext:
    device: torch.device
    precision: str  # bf16 | fp16 | fp32
    batch_size: int
    jit_image_tower: bool = True  # eval.jit_image_tower: see InferenceTowers
    image_chunk: int = 0  # eval.image_chunk: see image_chunk_size

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def image_chunk_size(device: torch.device, configured: int = 0) -> int:
    """Images per image-tower forward in inference (evaluation and the train feature cache);
    0 = the device's default: cpu_tunings.CPU_IMAGE_CHUNK where cpu_tunings.small_image_chunks
    (a CPU: a few images' activations stay in the cores' caches), else no chunking (a GPU wants
    the whole batch)."""
    if configured > 0:
        return configured
    return cpu_tunings.CPU_IMAGE_CHUNK if cpu_tunings.small_image_chunks(device) else 1 << 30


def in_chunks(
    forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, chunk: int
) -> torch.Tensor:
    """forward(images), called on at most `chunk` images at a time. Per image the same result (the
    towers are in eval mode: no batch statistics), to float rounding."""
    if len(images) <= chunk:
        return forward(images)
    return torch.cat([forward(images[start : start + chunk]) for start in range(0, len(images), chunk)])


def encode_images(
    model, load_image: Callable[[int], Image.Image], count: int, transform, ctx: EvalContext, features=False
) -> torch.Tensor:
    """[count, d] embeddings of images 0..count-1 (load_image(i) -> PIL), all ranks contributing.
    features=True: the image tower's outputs instead (before projection; for linear probes)."""
    mine = list(distributed.shard_indices(count))
    parts = []
    with torch.inference_mode():
        for start in range(0, len(mine), ctx.batch_size):
            batch = torch.stack([transform(load_image(i)) for i in mine[start : start + ctx.batch_size]])
            batch = batch.to(ctx.device)
            with ctx.autocast():
                tower = INFERENCE_TOWERS.get(model, batch, ctx)
                tower_out = in_chunks(tower, batch, image_chunk_size(ctx.device, ctx.image_chunk))
                out = tower_out if features else model.image_features_to_embedding(tower_out)
            parts.append(out.float().cpu())
    if not parts:  # more ranks than images: this rank still takes part in the gather
        parts = [torch.empty(0, model.visual.num_features if features else model.output_dim)]
    return distributed.gather_in_order(torch.cat(parts).to(ctx.device), count).cpu()


def encode_texts(model, tokenizer, texts: Sequence[str], ctx: EvalContext) -> torch.Tensor:
    """[len(texts), d] embeddings, all ranks contributing."""
    mine = [texts[i] for i in distributed.shard_indices(len(texts))]
    parts = []
    with torch.inference_mode():
        for start in range(0, len(mine), ctx.batch_size):
            tokens = tokenizer(mine[start : start + ctx.batch_size]).to(ctx.device)
            with ctx.autocast():
                parts.append(model.encode_text(tokens).float().cpu())
    if not parts:
        parts = [torch.empty(0, model.output_dim)]
    return distributed.gather_in_order(torch.cat(parts).to(ctx.device), len(texts)).cpu()


class InferenceTowers:
    """Per model version, an inference-only image tower: traced by TorchScript, frozen and
    optimised for inference, which folds BatchNorm into the convolutions and (on CPU) picks oneDNN
    kernels. Same weights, same function to fp32 rounding (~1e-6 relative); what it buys:
    docs/performance.md.

    Used in fp32 on the CPU only: tracing under autocast would bake one precision's casts in, and
    the gain is the CPU's (oneDNN kernels, measured there), not a GPU's, whose eager tower already
    runs cuDNN's; so like the other CPU tunings it switches itself off elsewhere
    (cpu_tunings.traced_eval_tower decides). A tower that cannot be traced (data-dependent control
    flow) is used as it is. Rebuilt when the weights change, held weakly by model like the
    classifier cache.
    """

    def __init__(self):
        self._store: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, model, example: torch.Tensor, ctx: EvalContext) -> Callable[[torch.Tensor], torch.Tensor]:
        wanted = ctx.jit_image_tower and ctx.precision == "fp32"  # see above: fp32 only
        if not wanted or not cpu_tunings.traced_eval_tower(ctx.device):
            return model.image_tower_features
        version = _parameters_version(model)
        cached = self._store.get(model)
        if cached is not None and cached[0] == version:
            return cached[1]
        tower = model.image_tower_features
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings about shapes used as constants
                layout = torch.channels_last if model.cfg.image.channels_last else torch.contiguous_format
                traced = torch.jit.trace(model.visual.eval(), example[:2].contiguous(memory_format=layout))
                frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
            tower = partial(_run_frozen, frozen, layout)
        except Exception:  # noqa: BLE001 - any tracing failure: the eager tower is always correct
            pass
        self._store[model] = (version, tower)
        return tower


def _run_frozen(frozen, layout, images: torch.Tensor) -> torch.Tensor:
    return frozen(images.contiguous(memory_format=layout))


INFERENCE_TOWERS = InferenceTowers()


def _parameters_version(model) -> int:
    # Every in-place update of a parameter (optimizer step, load_state_dict, clamp) bumps its
    # version counter, so an unchanged sum means unchanged weights.
    return sum(p._version for p in model.parameters())


class ClassifierCache:
    """Zero-shot class embeddings per (model, weights version, class names, templates).

    Held weakly by model, so a cache never keeps a model alive. During training the weights change
    between evaluations and the classifier is rebuilt; clip-eval tasks sharing a dataset's classes
    and templates, and repeated evaluations of one model, reuse it.
    """

    def __init__(self):
        self._store: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.hits = 0

    def get(self, model, tokenizer, classnames: Sequence[str], templates: Sequence[str], ctx: EvalContext):
        """[C, d] class embeddings: renormalised mean over templates of normalised prompt embeddings."""
        key = (_parameters_version(model), tuple(classnames), tuple(templates), ctx.precision)
        per_model = self._store.setdefault(model, {})
        if key in per_model:
            self.hits += 1
            return per_model[key]
        prompts = [template.format(c=name) for name in classnames for template in templates]
        prompt_emb = encode_texts(model, tokenizer, prompts, ctx)
        weights = classifier_weights(prompt_emb.view(len(classnames), len(templates), -1))
        per_model.clear()  # older versions of this model's weights will not come back
        per_model[key] = weights
        return weights


CLASSIFIER_CACHE = ClassifierCache()
