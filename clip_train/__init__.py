"""clip_train: contrastive image-text pretraining (CLIP) on webdataset shards with Accelerate.

    model, preprocess, tokenizer = clip_train.load("runs/demo")     # clip_train/inference.py
    classifier = clip_train.ZeroShotClassifier(model, tokenizer, ["cat", "dog"])

Both are imported on first use, so that `import clip_train` (and the console scripts' config
errors) never wait for torch.
"""

__version__ = "0.1.0"

_LAZY = {"load": "clip_train.inference", "ZeroShotClassifier": "clip_train.evaluate.zeroshot"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clip_train' has no attribute {name!r}")
