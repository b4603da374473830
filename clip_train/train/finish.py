"""What a run does after its last step besides the final export: the WiSE-FT sweep, and the
console table of its results."""

from __future__ import annotations

import math
from pathlib import Path

from safetensors.torch import load_file

from clip_train.config import ConfigError, RunConfig
from clip_train.evaluate.runner import run_evaluation
from clip_train.finetune import default_metrics, format_wise_table, wise_ft_sweep, write_wise
from clip_train.models.lora import lora_enabled, merged_copy


def run_wise_ft(model, start_dir: Path, cfg: RunConfig, tokenizer, transform, accelerator, run_dir: Path):
    """Evaluate (1 - a) * start + a * end for each a of finetune.wise_alphas; print the table,
    write eval/wise/wise.json and wise.png; return {"domain_metric", "reference_metric", "rows"}."""
    start_state = load_file(str(Path(start_dir) / "model.safetensors"))
    if lora_enabled(model):  # interpolate the merged weights: the start model has no adapters
        model = merged_copy(model)
    out = run_dir / "eval" / "wise"

    def evaluate_at(alpha: float) -> dict:
        name = f"alpha-{alpha:g}"
        return run_evaluation(
            model, tokenizer, transform, cfg.eval, cfg.data.val_shards, accelerator.device,
            cfg.train.precision, out_dir=out / name, model_name=f"{run_dir.name}-wise-{name}",
            val_captions=cfg.data.captions,
        )  # fmt: skip

    rows = wise_ft_sweep(model, start_state, cfg.finetune.wise_alphas, evaluate_at)
    domain, reference = default_metrics(rows)
    domain = cfg.finetune.domain_metric or domain
    reference = cfg.finetune.reference_metric or reference
    for metric in (domain, reference):
        if metric not in rows[0]:
            choices = ", ".join(k for k in rows[0] if k != "alpha")
            raise ConfigError(
                f"finetune metric {metric!r} is not among the evaluation's metrics: choose from {choices}"
            )
    if accelerator.is_main_process:
        write_wise(rows, out, domain, reference, plot=cfg.eval.plots)
        accelerator.print(
            f"WiSE-FT (alpha 0 = start, 1 = fine-tuned):\n{format_wise_table(rows, domain, reference)}"
        )
    return {"domain_metric": domain, "reference_metric": reference, "rows": rows}


def format_results(metrics: dict) -> str:
    """A small table of the headline metrics for the console."""
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, float) and not math.isnan(v)]
    width = max((len(k) for k, _ in rows), default=10)
    return "\n".join(f"  {k:<{width}}  {v:.4f}" for k, v in rows)
