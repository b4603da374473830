"""Checkpoints of a run in one place: which one to resume from and whether it fits this run, saving
(every rank's data stream included), and the public model folder written beside each."""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedType

from clip_train import checkpoint
from clip_train.config import RunConfig, to_dict
from clip_train.data.pipeline import Source
from clip_train.paths import EMA_MODEL_DIR
from clip_train.train.ema import WeightEma, check_ema_resume, ema_fingerprint
from clip_train.train.state import TrainState

# Model keys added after checkpoints were already being written, with the test for "off": left out
# of the fingerprint when off, so that those checkpoints (which lack them) still resume.
_LATER_MODEL_KEYS = {
    ("image", "lora"): lambda value: value.get("rank", 0) == 0,
    ("text", "lora"): lambda value: value.get("rank", 0) == 0,
    ("image", "patch_dropout"): lambda value: value == 0,
}


def model_fingerprint(model: dict) -> dict:
    """A model config dict as a checkpoint records it (see _LATER_MODEL_KEYS)."""
    out = copy.deepcopy(model)
    for (tower, key), is_off in _LATER_MODEL_KEYS.items():
        if key in out.get(tower, {}) and is_off(out[tower][key]):
            del out[tower][key]
    return out


def run_fingerprint(cfg: RunConfig, sources: list[Source], world_size: int) -> dict:
    """What a checkpoint must share with the run that resumes it (saved as its meta.json)."""
    return {
        "model": model_fingerprint(to_dict(cfg.model)),
        # everything below decides which samples each step reads (see data_stream.py)
        "world_size": world_size,
        "batch_size": cfg.data.batch_size,
        "num_workers": cfg.data.num_workers,
        "accum_steps": cfg.train.accum_steps,
        "ckpt_every": cfg.train.ckpt_every,
        "data": [[source.name, source.shards, source.weight] for source in sources],
        "captions": [cfg.data.captions, cfg.data.caption_sampling],
        **ema_fingerprint(cfg.train.ema),  # nothing when off
    }


class CheckpointManager:
    def __init__(self, cfg: RunConfig, accelerator: Accelerator, fingerprint: dict):
        self.run_dir = Path(cfg.run_dir)
        self.keep_last = cfg.train.keep_last
        self.accelerator = accelerator
        self.fingerprint = fingerprint
        self.resume_from = checkpoint.resolve_resume(self.run_dir, cfg.train.resume)
        if self.resume_from is not None:  # refused before anything heavy is built
            meta = checkpoint.read_meta(self.resume_from)
            check_ema_resume(meta, cfg.train.ema, self.resume_from)  # before the generic data-order rules
            changed = checkpoint.check_compatible(
                meta,
                fingerprint,
                self.resume_from,
                allow_data_order_change=cfg.train.allow_resume_change,
            )
            if changed and accelerator.is_main_process:
                print(
                    f"warning: resuming from {self.resume_from} with {changed}: the data order from "
                    "here on differs from an uninterrupted run (train.allow_resume_change=true)",
                    flush=True,
                )
        self.model = self.tokenizer = self.ema = None

    def attach(self, model, tokenizer, weight_ema: WeightEma) -> None:
        """The prepared (wrapped) model and the tokenizer, which the public model folder holds, and
        the EMA of the weights, written beside it (model-ema/) when on."""
        self.model, self.tokenizer, self.ema = model, tokenizer, weight_ema

    def resume(self) -> None:
        """Load the checkpoint chosen at start-up, if any, into everything registered with Accelerate."""
        if self.resume_from is not None:
            self.accelerator.load_state(str(self.resume_from))

    def _export(self, folder: Path, state: dict | None = None) -> None:
        self.accelerator.unwrap_model(self.model).save_pretrained(folder, self.tokenizer, state_dict=state)

    def exporter(self):
        """The model-folder writer for the main process, to be made on every process: under FSDP
        each holds only its shards, and accelerator.get_state_dict gathers the full weights (a
        collective). DDP and single-process runs write the module's own."""
        if self.accelerator.distributed_type != DistributedType.FSDP:
            return self._export
        return partial(self._export, state=self.accelerator.get_state_dict(self.model))

    def save(self, state: TrainState, skip_history: list) -> None:
        """Every process: the full state at state.step, every rank's data stream included."""
        state.gather_data_state()
        state.skip_history = skip_history
        meta = {**self.fingerprint, "samples_seen": state.samples_seen}
        export = partial(self._export_with_ema, self.exporter())
        checkpoint.save(self.accelerator, self.run_dir, state.step, meta, self.keep_last, export)

    def _export_with_ema(self, export, folder: Path) -> None:
        export(folder)
        self.ema.save_model(folder.with_name(EMA_MODEL_DIR), self.tokenizer)  # nothing when off

    def export_model(self, folder: Path, with_ema: bool = False) -> None:
        """Every process: the public model folder (written by the main process), and with_ema the
        EMA's beside it."""
        exporter = self.exporter()
        if self.accelerator.is_main_process:
            (partial(self._export_with_ema, exporter) if with_ema else exporter)(folder)
