"""Where a saved model is: the one answer to "which model folder does this path mean?".

A user may point at any of three things, and every loader (clip-eval, clip-export,
model.init_from, clip_train.load) reads them the same way:

    runs/demo/                                  a run directory: its model/ (written when training
                                                ends), else its newest complete checkpoint's model/
    runs/demo/checkpoints/step-000000300/       a checkpoint: its model/, only if COMPLETE is there
    runs/demo/model/                            a model folder: config.json + model.safetensors
    runs/demo/model-ema/                        the same for the EMA of the weights (train.ema), what
                                                weights="ema" picks in a run or a checkpoint

    folder = resolve_model_folder("runs/demo")  # -> runs/demo/model

A checkpoint without its COMPLETE marker was cut off mid-save (checkpoint.py writes the marker last):
given directly it is refused, and a run directory's scan skips it for the newest complete one.
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_DIR = "model"
EMA_MODEL_DIR = "model-ema"  # beside model/ when train.ema is on: the EMA of the weights
WEIGHTS_DIRS = {"live": MODEL_DIR, "ema": EMA_MODEL_DIR}
RUN_CONFIG_NAME = "config.yaml"
COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{9})$")
# also the partial saves (.tmp-step-...) and hand-named copies (step-300): a checkpoint all the same
_CHECKPOINT_NAME = re.compile(r"^(\.tmp-)?step-\d+$")
_PASS = f"pass a model folder ({CONFIG_NAME} + {WEIGHTS_NAME}), a checkpoint or a run directory"


class NoModelError(FileNotFoundError):
    """A path that holds no model to load (or only an incomplete checkpoint's), with the fix."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None.

    The `latest` pointer is a convenience; the folder scan decides, so a pointer left stale by a
    kill between rename and pointer update cannot send a resume to an older or missing folder.
    """
    found = complete_checkpoints(checkpoint_root(run_dir))
    return found[-1] if found else None


def is_model_folder(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def _is_checkpoint(path: Path) -> bool:
    return (
        bool(_CHECKPOINT_NAME.match(path.name))
        or (path / COMPLETE).is_file()
        or (path / "meta.json").is_file()
    )


def _incomplete(path: Path, where: str) -> NoModelError:
    return NoModelError(
        f"{where} is a checkpoint without its {COMPLETE} marker (its save was cut off): pass its run "
        "directory (for the newest complete checkpoint) or a complete checkpoint"
    )


def resolve_model_folder(path: str | Path, setting: str = "", weights: str = "live") -> Path:
    """The model folder to load for a run directory, a checkpoint or a model folder (see the module
    docstring). setting names where the path came from in the error ("model.init_from"). weights
    "ema": a run's or checkpoint's EMA of the weights (model-ema/, written when train.ema is on)."""
    path = Path(path)
    where = f"{setting}={path}" if setting else str(path)
    sub = WEIGHTS_DIRS[weights]
    if not path.exists():
        raise NoModelError(f"{where} holds no saved model (it does not exist): {_PASS}")
    if is_model_folder(path):
        parent = path.parent
        if (
            path.name in WEIGHTS_DIRS.values()
            and _is_checkpoint(parent)
            and not (parent / COMPLETE).is_file()
        ):
            raise _incomplete(parent, where)
        if weights == "ema" and path.name != EMA_MODEL_DIR:
            raise NoModelError(
                f"{where} is a model folder of its own: for its EMA weights pass the run directory, a "
                f"checkpoint or its {EMA_MODEL_DIR}/ folder"
            )
        return path
    if _is_checkpoint(path):
        if not (path / COMPLETE).is_file():
            raise _incomplete(path, where)
        if not is_model_folder(path / sub):
            raise NoModelError(
                f"{where} is a checkpoint without a saved model ({sub}/{CONFIG_NAME} + "
                f"{WEIGHTS_NAME}): pass its run directory or another checkpoint{_ema_hint(weights)}"
            )
        return path / sub
    if is_model_folder(path / sub):
        return path / sub
    for checkpoint in reversed(complete_checkpoints(checkpoint_root(path))):
        if is_model_folder(checkpoint / sub):
            return checkpoint / sub
    if checkpoint_root(path).is_dir():
        raise NoModelError(
            f"{where} holds no saved model: it has no {sub}/ and no complete checkpoint with one "
            f"(a checkpoint is complete once {COMPLETE} is written): train it further or {_PASS}"
            f"{_ema_hint(weights)}"
        )
    raise NoModelError(f"{where} holds no saved model: {_PASS}{_ema_hint(weights)}")


def _ema_hint(weights: str) -> str:
    return " (EMA weights are saved by runs with train.ema.decay > 0)" if weights == "ema" else ""


def run_dir_of(path: str | Path) -> Path | None:
    """The run directory that path is, or is a checkpoint of (with its config.yaml); None for a
    model folder or anything else. The run's config comes with a run or a checkpoint only: a model
    folder stands alone, even one inside a run."""
    path = Path(path)
    if (path / RUN_CONFIG_NAME).is_file():
        return path
    run_dir = path.parent.parent  # <run>/checkpoints/<checkpoint>
    if _is_checkpoint(path) and path.parent.name == "checkpoints" and (run_dir / RUN_CONFIG_NAME).is_file():
        return run_dir
    return None
