"""LoRA adapters on the towers (peft), and the merge that turns an adapted model back into a plain one.

    add_lora(model)                  # model.image.lora / model.text.lora: adapters in, tower weights frozen
    state = merged_state_dict(model) # plain keys, W + scale * B @ A: what every export writes
    plain = merged_copy(model)       # a ClipModel without adapters (WiSE-FT interpolates its weights)

peft's inject_adapter_in_model wraps the targeted layers of a tower's own module (the timm model,
the transformers model) and leaves only the adapters trainable inside it; the other tower and the
head (projections, temperature, bias) keep their own settings. Only nn.Linear and nn.Conv2d layers
are targeted by the defaults: ViT blocks' attention and MLP, the pointwise convolutions of timm's
EfficientNet / MobileNet blocks (depthwise convolutions are left alone: peft's low-rank factors of
a grouped convolution are not a low-rank update of it), BERT-like attention and dense layers.
A tower with adapters keeps its BatchNorm statistics fixed as well, so that its base weights and
buffers stay exactly the ones it started from and the merged model is the adapted one.
"""

from __future__ import annotations

import copy
import dataclasses

from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from timm.layers import freeze_batch_norm_2d
from torch import nn

from clip_train.config import ConfigError, LoraConfig

ADAPTER = "default"  # peft's adapter name; one adapter per tower
REGEX_PREFIX = "re:"

# (a module name suffix that identifies the tower kind, the default targets for it)
IMAGE_DEFAULTS = (
    ("attn.qkv", ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]),  # timm ViT / DeiT / EVA-style blocks
    ("conv_pw", ["conv_pw", "conv_pwl"]),  # timm EfficientNet / MobileNet blocks: the 1x1 convolutions
)
TEXT_DEFAULTS = (
    ("attention.self.query", ["query", "key", "value", "dense"]),  # BERT, MiniLM, RoBERTa
    ("self_attn.q_proj", ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),  # CLIP text (model.arch)
)


def lora_enabled(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in model.modules())


def _adaptable_names(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n]


def default_targets(module: nn.Module, defaults: tuple, setting: str) -> list[str]:
    names = [n for n, _ in module.named_modules()]
    for marker, targets in defaults:
        if any(n == marker or n.endswith("." + marker) for n in names):
            return targets
    examples = ", ".join(_adaptable_names(module)[:6])
    raise ConfigError(
        f"{setting}.rank > 0 but {type(module).__name__} has no default LoRA targets: set "
        f"{setting}.target_modules to some of its layers (e.g. {examples})"
    )


def _peft_targets(targets: list[str]) -> str | list[str]:
    if len(targets) == 1 and targets[0].startswith(REGEX_PREFIX):
        return targets[0][len(REGEX_PREFIX) :]  # peft: one string = a regex for the full name
    return list(targets)


def inject(module: nn.Module, cfg: LoraConfig, defaults: tuple, setting: str) -> None:
    """Adapters on the module's targeted layers; every other parameter of the module is frozen."""
    targets = cfg.target_modules or default_targets(module, defaults, setting)
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=_peft_targets(targets),
        bias="none",
    )
    try:
        inject_adapter_in_model(peft_cfg, module, adapter_name=ADAPTER)
    except ValueError as e:  # no layer matched, or a matched layer peft cannot adapt
        reason = str(e).strip().splitlines()[0]
        examples = ", ".join(_adaptable_names(module)[:6])
        raise ConfigError(
            f"{setting}.target_modules={targets} does not fit {type(module).__name__} ({reason}): "
            f"choose among its Linear / Conv2d layers, e.g. {examples}"
        ) from None


def add_lora(model: nn.Module) -> None:
    """Put the configured adapters into a ClipModel's towers (in place); nothing when both ranks are 0.

    Done after the starting weights are loaded: adapters start at zero (peft's B = 0), so the adapted
    model computes exactly what the loaded one does."""
    image_cfg, text_cfg = model.cfg.image.lora, model.cfg.text.lora
    if image_cfg.rank > 0:
        visual = model.visual.towers[0] if hasattr(model.visual, "towers") else model.visual
        inject(visual, image_cfg, IMAGE_DEFAULTS, "model.image.lora")
        frozen = freeze_batch_norm_2d(visual)  # replaces BatchNorm layers inside the tower
        if frozen is not visual:  # only when the tower itself is one BatchNorm layer
            raise ConfigError("model.image.lora needs a tower with layers to adapt: set rank=0")
    if text_cfg.rank > 0:
        inject(model.text.transformer, text_cfg, TEXT_DEFAULTS, "model.text.lora")


def merged_state_dict(model: nn.Module) -> dict:
    """The model's weights with every adapter merged in (W + scale * B @ A) under the plain names
    (no base_layer, no lora_ entries): what a model without adapters loads. The model is unchanged."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            base = module.get_base_layer()
            delta = module.get_delta_weight(ADAPTER).detach()
            state[f"{name}.base_layer.weight"] = base.weight.detach() + delta.to(base.weight.dtype)
    return {
        key.replace(".base_layer.", "."): value
        for key, value in state.items()
        if ".lora_" not in key  # lora_A / lora_B (and peft's other adapter entries)
    }


def plain_state_dict(model: nn.Module) -> dict:
    """What a saved model folder holds: the merged weights when adapters are in, else the state dict."""
    return merged_state_dict(model) if lora_enabled(model) else model.state_dict()


def without_lora(cfg):
    """A ModelConfig with both towers' adapters off (what a merged model is)."""
    image = dataclasses.replace(cfg.image, lora=LoraConfig())
    return dataclasses.replace(cfg, image=image, text=dataclasses.replace(cfg.text, lora=LoraConfig()))


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of the model with the adapters merged and the wrapped layers replaced by plain ones."""
    state = merged_state_dict(model)
    plain = copy.deepcopy(model)
    wrapped = [(n, m) for n, m in plain.named_modules() if isinstance(m, LoraLayer)]
    for name, module in wrapped:
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent), child, module.get_base_layer())
    plain.load_state_dict(state)
    plain.cfg = without_lora(plain.cfg)
    return plain
