"""The exponential moving average of a run's weights (train.ema), as one component of the trainer.

    ema = WeightEma.build(cfg.train.ema, unwrapped_model)  # does nothing when train.ema.decay is 0
    ...after each optimizer step that was applied:
    ema.update(unwrapped_model)

The average itself is timm's ModelEmaV3 (parameters and floating buffers, one foreach lerp), given
the count of applied updates as its step: the first update copies the weights, later ones use
train.ema.decay or, with train.ema.warmup, timm's ramp towards it. Skipped steps (non-finite, or
skipped by the fp16 GradScaler) update nothing and do not count. Every rank keeps its own copy:
DDP ranks hold identical weights after each step, so their averages are identical too.

Around it: the count and the average are registered with Accelerate and travel in the checkpoint
(the resumed average is bit for bit the uninterrupted one); meta.json records the settings, and a
resume that would change them, or start an average from a checkpoint without one, is refused
(check_ema_resume); evaluation runs on the average too ("ema/" metrics); the average is written as a
model folder of its own, model-ema/, beside each model/ (run and checkpoints).
"""

from __future__ import annotations

from pathlib import Path

import torch
from timm.utils import ModelEmaV3

from clip_train.checkpoint import ResumeError
from clip_train.config import EmaConfig

FINGERPRINT_KEY = "ema"


def ema_fingerprint(cfg: EmaConfig) -> dict:
    """What a checkpoint's EMA must share with the run resuming it ({} when off: meta.json as before)."""
    if cfg.decay == 0:
        return {}
    warmup = {"warmup_gamma": cfg.warmup_gamma, "warmup_power": cfg.warmup_power} if cfg.warmup else {}
    return {FINGERPRINT_KEY: {"decay": cfg.decay, "warmup": cfg.warmup, **warmup}}


def check_ema_resume(meta: dict, cfg: EmaConfig, ckpt: Path) -> None:
    """Refuse a resume whose EMA settings differ from the checkpoint's, in one line."""
    saved, now = meta.get(FINGERPRINT_KEY), ema_fingerprint(cfg).get(FINGERPRINT_KEY)
    if saved == now:
        return
    if saved is None:
        raise ResumeError(
            f"cannot resume from {ckpt}: it was saved without an EMA of the weights and "
            f"train.ema.decay={cfg.decay} now: resume with train.ema.decay=0, or start a new run_dir "
            "(e.g. model.init_from the checkpoint)"
        )
    if now is None:
        raise ResumeError(
            f"cannot resume from {ckpt}: it holds an EMA of the weights ({_describe(saved)}) and "
            f"train.ema.decay=0 now: set the same train.ema settings, or start a new run_dir"
        )
    raise ResumeError(
        f"cannot resume from {ckpt}: its EMA had {_describe(saved)} and this run has {_describe(now)}: "
        "use the checkpoint's train.ema settings, or start a new run_dir"
    )


def _describe(ema: dict) -> str:
    return ", ".join(f"train.ema.{key}={value}" for key, value in ema.items())


class WeightEma:
    """The average of one model's weights, or nothing (decay 0): every method is then a no-op, so
    the trainer calls them unconditionally."""

    def __init__(self, cfg: EmaConfig, average: ModelEmaV3 | None):
        self.cfg, self.average = cfg, average
        self.updates = 0  # applied optimizer steps averaged so far: timm's step for the decay

    @classmethod
    def build(cls, cfg: EmaConfig, model: torch.nn.Module) -> WeightEma:
        """The average of `model` (unwrapped, on its device) as it is now, or the no-op."""
        if cfg.decay == 0:
            return cls(cfg, None)
        average = ModelEmaV3(
            model,
            decay=cfg.decay,
            use_warmup=cfg.warmup,
            warmup_gamma=cfg.warmup_gamma,
            warmup_power=cfg.warmup_power,
        )
        return cls(cfg, average)

    @property
    def enabled(self) -> bool:
        return self.average is not None

    def decay(self) -> float:
        """The decay the next update will use."""
        return self.average.get_decay(self.updates + 1) if self.enabled else 0.0

    def update(self, model: torch.nn.Module, applied: bool = True) -> None:
        """After an optimizer step of `model` (applied: False when the step was skipped after all)."""
        if self.enabled and applied:
            self.updates += 1
            self.average.update(model, step=self.updates)

    def checkpointed(self) -> list:
        """What to register with accelerator.register_for_checkpointing (nothing when off, so that
        checkpoints of runs without EMA keep their layout and older ones still load)."""
        return [self] if self.enabled else []

    def state_dict(self) -> dict:
        return {"updates": self.updates, "weights": self.average.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.average.module.load_state_dict(state["weights"], strict=True)

    def eval_models(self) -> list[tuple[str, torch.nn.Module]]:
        """(metric prefix, model) to evaluate beside the live weights."""
        return [("ema", self.average.module)] if self.enabled and self.cfg.eval else []

    def save_model(self, folder: Path, tokenizer) -> None:
        """Write the average as a model folder (main process; the live model's format)."""
        if self.enabled:
            self.average.module.save_pretrained(folder, tokenizer)
