"""Fine-tuning helpers: WiSE-FT weight-space interpolation, the before/after table.

    rows = wise_ft_sweep(model, start_state, [0, 0.25, 0.5, 0.75, 1], evaluate)
    print(format_wise_table(rows, "domain/acc1", "fashion-mnist/acc1"))

    python -m clip_train finetune runs/finetune-domain          # the before/after table of a run

(The demo's domain, `python -m clip_train finetune demo-manifest`, is clip_train/demo/domain.py.)

Fine-tuning on a narrow domain raises accuracy there and erodes the zero-shot ability the starting
model had elsewhere. Averaging the two models' weights, (1 - alpha) * start + alpha * fine-tuned,
keeps much of both (Wortsman et al., "Robust fine-tuning of zero-shot models", 2022); the sweep
evaluates each alpha on the domain and on a reference task so the trade-off can be picked from a
table and a plot instead of guessed. alpha 0 is exactly the starting model, alpha 1 exactly the
fine-tuned one.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from clip_train.errors import fail


def interpolate_state(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float) -> dict:
    """(1 - alpha) * start + alpha * end for floating-point entries; other entries (step counters
    such as num_batches_tracked) are taken from `end`. Every entry of `end` must be in `start` with
    the same shape; entries only in `start` are ignored (a locked tower's frozen BatchNorm layers
    keep no counter)."""
    missing = sorted(end.keys() - start.keys())
    if missing:
        raise ValueError(f"the starting weights lack {len(missing)} entries of the model, e.g. {missing[:3]}")
    mixed = {}
    for key, value in end.items():
        if value.shape != start[key].shape:
            raise ValueError(f"{key}: shape {tuple(start[key].shape)} at the start, {tuple(value.shape)} now")
        if value.is_floating_point():
            # exact endpoints: no rounding from a blend at alpha 0 or 1
            if alpha == 0:
                mixed[key] = start[key].to(value)
            elif alpha == 1:
                mixed[key] = value.clone()
            else:
                mixed[key] = torch.lerp(start[key].to(value), value, alpha)
        else:
            mixed[key] = value.clone()
    return mixed


def wise_ft_sweep(
    model: nn.Module,
    start_state: dict[str, torch.Tensor],
    alphas: list[float],
    evaluate: Callable[[float], dict[str, float]],
) -> list[dict]:
    """Evaluate the model at each alpha; returns one row per alpha ({"alpha": a, **metrics}).
    The model holds its fine-tuned weights again afterwards."""
    end_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = []
    try:
        for alpha in alphas:
            model.load_state_dict(interpolate_state(start_state, end_state, alpha))
            rows.append({"alpha": alpha, **evaluate(alpha)})
    finally:
        model.load_state_dict(end_state)
    return rows


def default_metrics(rows: list[dict]) -> tuple[str, str]:
    """The domain and reference metrics of the plot when the config names none: the top-1 of the
    first two zero-shot tasks, in the order they ran (else the first two metrics)."""
    keys = [k for k in rows[0] if k != "alpha"]
    candidates = list(dict.fromkeys([k for k in keys if k.endswith("/acc1")] + keys))
    return candidates[0], (candidates[1:] or candidates)[0]


def format_wise_table(rows: list[dict], domain: str, reference: str) -> str:
    width = max(len(domain), len(reference), 10)
    lines = [f"  {'alpha':>6}  {domain:>{width}}  {reference:>{width}}"]
    for row in rows:
        lines.append(
            f"  {row['alpha']:>6.2f}  {row.get(domain, float('nan')):>{width}.4f}  "
            f"{row.get(reference, float('nan')):>{width}.4f}"
        )
    return "\n".join(lines)


def write_wise(rows: list[dict], out_dir: str | Path, domain: str, reference: str, plot: bool = True) -> Path:
    """wise.json (every metric per alpha) and, with plot, wise.png (domain vs reference)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "wise.json"
    path.write_text(
        json.dumps({"domain_metric": domain, "reference_metric": reference, "rows": rows}, indent=1)
    )
    if plot:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4))
        xs, ys = [r.get(reference) for r in rows], [r.get(domain) for r in rows]
        ax.plot(xs, ys, "o-")
        for row, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(f"{row['alpha']:g}", (x, y), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel(reference)
        ax.set_ylabel(domain)
        ax.set_title("WiSE-FT: alpha from the start model (0) to the fine-tuned one (1)", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "wise.png", dpi=100)
        plt.close(fig)
    return path


def format_before_after(wise: dict) -> str:
    """Every metric (rows) at each alpha (columns): alpha 0 is before fine-tuning, 1 after."""
    rows = wise["rows"]
    metrics = [k for k in rows[0] if k != "alpha" and not k.endswith(("/num_images", "/seconds"))]
    first = [wise["domain_metric"], wise["reference_metric"]]
    metrics = list(dict.fromkeys([m for m in first if m in metrics] + metrics))
    width = max(len(m) for m in metrics)
    labels = [
        "before" if r["alpha"] == 0 else "after" if r["alpha"] == 1 else f"a={r['alpha']:g}" for r in rows
    ]
    lines = [f"  {'metric':<{width}}" + "".join(f"{label:>9}" for label in labels)]
    for metric in metrics:
        lines.append(f"  {metric:<{width}}" + "".join(f"{r.get(metric, float('nan')):>9.4f}" for r in rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m clip_train finetune RUN`: the before/after table of a run's WiSE-FT sweep."""
    parser = argparse.ArgumentParser(
        prog="python -m clip_train finetune", description="Print the before/after table of a fine-tuning run."
    )
    parser.add_argument("target", help="a run directory (or `demo-manifest --help`: the demo's domain CSV)")
    args = parser.parse_args(argv)
    results = Path(args.target) / "results.json"
    wise = json.loads(results.read_text()).get("wise") if results.is_file() else None
    if not wise:
        missing = FileNotFoundError(f"{results} holds no WiSE-FT results: run with finetune.wise_alphas set")
        return fail(parser.prog, missing)
    print(f"before (alpha 0) and after (alpha 1) fine-tuning, {args.target}:\n{format_before_after(wise)}")
    return 0
