"""Where metrics go: <run_dir>/metrics.jsonl always, a console line, and wandb when asked for.

metrics.jsonl is the record that tests and benchmarks read: one JSON object per line, each with
"step" and a "kind" ("train", "eval", "summary"). Only the main process writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from clip_train.config import LogConfig

log = logging.getLogger("clip_train")


def wandb_wanted(cfg: LogConfig) -> bool:
    # WANDB_MODE=offline|online|disabled in the environment turns wandb on (or off) without a config
    # change, which is how cluster jobs and CI usually set it.
    mode = os.environ.get("WANDB_MODE", "")
    if mode == "disabled":
        return False
    return cfg.wandb or bool(mode)


class MetricsLogger:
    def __init__(self, run_dir: str | Path, cfg: LogConfig, config_dict: dict, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb_run = None
        self.progress = None  # a tqdm bar while training on a terminal (start_progress)
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a killed run keeps its lines
        if wandb_wanted(cfg):
            self.wandb_run = _init_wandb(Path(run_dir), cfg, config_dict)

    def start_progress(self, total: int, initial: int) -> None:
        """A progress bar with loss and samples/s when stdout is a terminal; cluster logs (not a
        terminal) keep the plain lines only, which a bar's carriage returns would garble."""
        if self.enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.progress = tqdm(
                total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stdout
            )

    def advance(self, loss, samples_per_s: float) -> None:
        if self.progress is not None:
            self.progress.set_postfix(
                loss=f"{float(loss):.4f}", samples_s=f"{samples_per_s:.1f}", refresh=False
            )
            self.progress.update(1)

    def log(self, kind: str, step: int, metrics: dict[str, Any], console: bool = True) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        if console:
            shown = "  ".join(
                f"{k} {_short(v)}" for k, v in metrics.items() if not isinstance(v, (dict, list))
            )
            line = f"[{kind} {step}] {shown}"
            if self.progress is not None:
                self.progress.write(line)  # above the bar, which then redraws
            else:
                print(line, file=sys.stdout, flush=True)
        if self.wandb_run is not None:
            flat = {
                f"{kind}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"
            }
            self.wandb_run.log(flat, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _init_wandb(run_dir: Path, cfg: LogConfig, config_dict: dict):
    import wandb  # imported only when used: it is slow to import

    # Keep the wandb run id in the run directory so a resumed job continues the same wandb run.
    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    return wandb.init(
        project=cfg.wandb_project,
        name=cfg.run_name or run_dir.name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=config_dict,
    )


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]
