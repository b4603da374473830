"""A zero-shot classifier from class names and prompt templates, OpenCLIP's protocol: each class is
the renormalised mean of its prompts' normalised text embeddings; logits are 100 x cosine.

    model, preprocess, tokenizer = clip_train.load("runs/demo")
    classifier = ZeroShotClassifier(model, tokenizer, ["cat", "dog"], templates=["a photo of a {c}."])
    probs = classifier.probabilities([Image.open("cat.png").convert("RGB")], preprocess)   # [1, 2]

clip-eval's zero-shot tasks (runner.py) and notebooks/zero_shot_demo.ipynb use this class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from clip_train.evaluate import encode
from clip_train.evaluate.encode import EvalContext, encode_images
from clip_train.evaluate.prompts import load_templates

ZERO_SHOT_LOGIT_SCALE = 100.0  # fixed, as in CLIP / OpenCLIP / CLIP_benchmark zero-shot evaluation


class ZeroShotClassifier:
    """Class embeddings [C, d] built once (and cached per model weights, see ClassifierCache).

    templates: a list of templates with `{c}`, a shipped set's name ("openai_imagenet", ...) or a
    file with one template per line. ctx: where and how to encode (device, precision, batch size);
    by default the model's device, fp32, 64 at a time.
    """

    def __init__(
        self,
        model,
        tokenizer,
        classnames: Sequence[str],
        templates: Sequence[str] | str = "default",
        *,
        ctx: EvalContext | None = None,
    ):
        self.model = model
        self.classnames = list(classnames)
        self.templates = load_templates(templates)
        self.ctx = ctx or EvalContext(next(model.parameters()).device, "fp32", batch_size=64)
        # looked up on the module: benchmarks/eval.py swaps in a timed cache
        self.weights = encode.CLASSIFIER_CACHE.get(
            model, tokenizer, self.classnames, self.templates, self.ctx
        )

    def logits(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """[N, C] logits of L2-normalised image embeddings [N, d]."""
        return ZERO_SHOT_LOGIT_SCALE * image_embeddings.to(self.weights.device) @ self.weights.T

    def probabilities(self, images: Sequence[Image.Image], preprocess) -> torch.Tensor:
        """[N, C] class probabilities of RGB images, each transformed by preprocess."""
        embeddings = encode_images(self.model, lambda i: images[i], len(images), preprocess, self.ctx)
        return self.logits(embeddings).softmax(dim=-1)

    def classify(self, images: Sequence[Image.Image], preprocess) -> list[str]:
        """The most likely class name of each image."""
        return [self.classnames[i] for i in self.probabilities(images, preprocess).argmax(dim=-1).tolist()]
