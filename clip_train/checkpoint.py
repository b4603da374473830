"""Atomic checkpoints around accelerate's save_state, and finding the latest complete one.

Layout of <run_dir>/checkpoints/:
    step-000000200/            accelerate state (model, optimizer, scheduler, scaler, RNG, train state)
        model/                 the public model: config.json + model.safetensors (+ tokenizer)
        meta.json              step, world size, config fingerprint
        COMPLETE               written last, before the rename: only folders with it are ever loaded
    latest                     text file naming the newest complete folder
    .tmp-step-000000200/       a save in progress (or one killed mid-way; removed by the next save)

accelerate's own save_state writes in place and prunes before saving, so a kill mid-save can leave
no loadable checkpoint at all; here the old ones are pruned only once the new one is complete.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

from clip_train.atomic import publish_folder, replace_text, write_synced

# the layout's reading side (which folders are complete, the newest one) is paths.py's, for the loaders
from clip_train.paths import COMPLETE, checkpoint_root, complete_checkpoints, find_latest


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed from, with the reason and the fix."""


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def save(
    accelerator,
    run_dir: str | Path,
    step: int,
    meta: dict[str, Any],
    keep_last: int,
    export_model=None,
) -> Path:
    """Save the full training state for `step`; every process must call this.

    export_model(folder) writes the public model (main process only) into the checkpoint. A write
    that fails on any process (a full disk, say) removes the partial save and raises
    CheckpointWriteError on every process; the previous checkpoint stays the latest.
    """
    root = checkpoint_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".tmp-*"):  # saves that were killed mid-way
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    failure = _attempt(lambda: accelerator.save_state(str(tmp)))
    failed = _failed_anywhere(failure, accelerator)  # every process calls both, in this order
    if accelerator.is_main_process and not failed:
        failure = _attempt(lambda: _finish(tmp, step, meta, export_model))
    if _failed_anywhere(failure, accelerator) or failed:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(_write_failure_message(tmp, root, failure))
    if accelerator.is_main_process:
        # the same step saved again (e.g. after resuming from an older one) replaces the old folder
        publish_folder(tmp, final, replace=True)
        replace_text(root / "latest", final.name)
        prune(root, keep_last)
    accelerator.wait_for_everyone()
    return final


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a failing file system); nothing of it is left."""


def _finish(tmp: Path, step: int, meta: dict[str, Any], export_model) -> None:
    if export_model is not None:
        export_model(tmp / "model")
    write_synced(tmp / "meta.json", json.dumps({"step": step, **meta}, indent=1))
    write_synced(tmp / COMPLETE, "")


def _attempt(write) -> BaseException | None:
    # torch's zip writer reports a full disk as RuntimeError ("unexpected pos ..."), not OSError
    try:
        write()
    except (OSError, RuntimeError) as error:
        return error
    return None


def _failed_anywhere(failure: BaseException | None, accelerator) -> bool:
    """Whether the write failed on any process (a collective every process calls, in order)."""
    import torch

    failed = torch.tensor([0.0 if failure is None else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(failed)
    return bool(failed.item())


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


def _write_failure_message(tmp: Path, root: Path, failure: BaseException | None) -> str:
    previous = find_latest(root.parent)
    # a checkpoint needs about what the previous one took; without one, what this one had written
    needed = _folder_bytes(previous) if previous else 0
    free = shutil.disk_usage(root).free
    if failure is None:
        cause = "another process failed to write its part"
    elif isinstance(failure, OSError) and failure.errno == errno.ENOSPC or free < needed:
        cause = "no space left on device"
    else:
        cause = str(failure).strip().splitlines()[-1] if str(failure).strip() else type(failure).__name__
    kept = f"{previous.name} stays the latest" if previous else "there is no earlier checkpoint"
    size = f"about {needed:,} bytes needed, {free:,} free" if needed else f"{free:,} bytes free"
    return (
        f"could not write checkpoint {tmp.parent / tmp.name.removeprefix('.tmp-')}: {cause} ({size}): "
        f"free space or move run_dir, then run again to resume ({kept}; the partial save was removed)"
    )


def prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def read_meta(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "meta.json").read_text())


def resolve_resume(run_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from for train.resume = auto | none | <path>, or None to start fresh."""
    if resume == "none":
        if find_latest(run_dir) is not None:
            raise ResumeError(
                f"{run_dir} already holds checkpoints and train.resume=none: "
                "use a new run_dir or set train.resume=auto"
            )
        return None
    if resume == "auto":
        return find_latest(run_dir)
    path = Path(resume)
    if (path / COMPLETE).is_file():
        return path
    latest = find_latest(path)  # a run directory was given
    if latest is not None:
        return latest
    raise ResumeError(f"train.resume={resume} is not a complete checkpoint or a run directory with one")


def check_compatible(
    meta: dict[str, Any], expected: dict[str, Any], ckpt: Path, *, allow_data_order_change: bool = False
) -> str:
    """Refuse a resume whose model or data layout differs from the checkpoint's.

    A different model is always refused. A different data layout (world size, batch size, loader
    workers, ...: every key but "model") only changes which samples come next; with
    `allow_data_order_change` it is accepted and described in the returned text ("" if nothing
    changed), for the caller to warn about.
    """
    changes = []
    for key, value in expected.items():
        if key not in meta or meta[key] == value:
            continue
        if key == "model" or not allow_data_order_change:
            fix = "use the same setting or a new run_dir"
            if key != "model":
                fix += " (or train.allow_resume_change=true to accept a different data order)"
            raise ResumeError(f"cannot resume from {ckpt}: {_difference(key, meta[key], value)}; {fix}")
        changes.append(f"{key} {meta[key]!r} -> {value!r}")
    return ", ".join(changes)


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flatten(item, f"{prefix}.{key}"))
    return flat


def _difference(key: str, was: Any, now: Any) -> str:
    """ "world_size was 2 there and is 1 now", or for a nested setting (the model) only the keys that
    differ: "model.embed_dim: 32 there, 16 now"."""
    if not (isinstance(was, dict) and isinstance(now, dict)):
        return f"{key} was {was!r} there and is {now!r} now"
    before, after = _flatten(was, key), _flatten(now, key)
    missing = object()
    changed = [
        k for k in sorted(before.keys() | after.keys()) if before.get(k, missing) != after.get(k, missing)
    ]
    shown = ", ".join(
        f"{k}: {before.get(k, 'unset')!r} there, {after.get(k, 'unset')!r} now" for k in changed[:5]
    )
    return shown + (f" (and {len(changed) - 5} more)" if len(changed) > 5 else "")
