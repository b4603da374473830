"""Using a trained model: one call for the model, its evaluation preprocessing and its tokenizer.

    model, preprocess, tokenizer = clip_train.load("runs/demo")   # run dir, checkpoint or model folder
    images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
    with torch.inference_mode():
        probs = (100 * model.encode_image(images) @ model.encode_text(tokenizer(texts)).T).softmax(-1)

What OpenCLIP's create_model_from_pretrained + get_tokenizer give, from the folders clip-train
writes; nothing is downloaded, and the model needs neither its original packages nor the run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from clip_train.models.clip import ClipModel, load_tokenizer
from clip_train.models.transforms import build_image_transforms
from clip_train.paths import resolve_model_folder


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[ClipModel, Callable, Callable]:
    """(model in eval mode on `device`, PIL image -> normalised tensor [3, H, W], list[str] ->
    token ids [B, L]) of the model that `path` means: a model folder, a complete checkpoint, or a
    run directory (its model/, else its newest complete checkpoint's); see clip_train/paths.py."""
    folder = resolve_model_folder(path)
    model = ClipModel.from_pretrained(folder)
    _, preprocess = build_image_transforms(model.visual, model.cfg.image)
    return model.to(device).eval(), preprocess, load_tokenizer(folder)
