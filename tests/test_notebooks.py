"""The notebooks in notebooks/ run end to end on a tiny run, in a fresh Jupyter kernel.

Each notebook's first code cell takes its inputs from CLIP_TRAIN_NOTEBOOK_* environment variables;
here they point at a run of configs/tiny.yaml trained for a few steps on the tiny shards. The
notebooks are executed in memory with nbclient (what nbmake runs under pytest), so the files are
never written back: they stay committed without outputs, which is checked too.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from clip_train.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = ["zero_shot_demo.ipynb", "training_report.ipynb"]
LABELS = ["circle", "square", "triangle"]  # the classes of the tiny_data ImageFolder
STEPS = 4


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_are_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"clear the outputs of {name}"


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, tiny_data):
    """A finished tiny run (evaluated at steps 2 and 4), and a copy of its first two steps'
    records, as the metrics.jsonl of a run still training looks."""
    root = tmp_path_factory.mktemp("notebook_runs")
    run = root / "tiny"
    shards = tiny_data["shards"]
    cmd = [
        sys.executable, "-m", "clip_train", "train", "configs/tiny.yaml",
        f"run_dir={run}",
        f"data.train_shards={shards}/train-*.tar",
        f"data.val_shards={shards}/val-000000.tar",
        f"eval.zeroshot=[{{dataset: {tiny_data['classes']}, templates: ['a {{c}}']}}]",
        f"train.steps={STEPS}", f"train.ckpt_every={STEPS}", "train.eval_every=2", "eval.plots=false",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]

    partial = root / "partial"
    partial.mkdir()
    shutil.copy(run / "config.yaml", partial / "config.yaml")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kept = [r for r in records if r["step"] <= 2 and r["kind"] != "summary"]
    (partial / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    return run, partial


def _execute(name: str, tmp_path: Path, monkeypatch, **env: str) -> nbformat.NotebookNode:
    # A python3 kernelspec that runs this interpreter, ahead of any other on the machine (a stale
    # ~/.local/share/jupyter/kernels/python3 may point at another environment without clip_train).
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "Python 3", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the notebooks' %matplotlib inline decides
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # the kernel starts in notebooks/, as in Jupyter and under nbmake; a failing cell raises here
    client = NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    return nb


def _outputs(nb) -> list:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def _data(nb, mime: str) -> list[str]:
    return [out["data"][mime] for out in _outputs(nb) if mime in out.get("data", {})]


def _stdout(nb) -> str:
    return "".join(out.text for out in _outputs(nb) if out.output_type == "stream" and out.name == "stdout")


def _table_rows(html: str) -> list[tuple[str, str]]:
    """(first cell, the rest) of each body row of a table whose header row uses <th>."""
    return re.findall(r"<tr><td>(.*?)</td>(.*?)</tr>", html)


@pytest.mark.slow
@pytest.mark.parametrize("images", ["folder", "heldout"])
def test_zero_shot_notebook_shows_images_and_probabilities(
    images, tiny_runs, tiny_data, tmp_path, monkeypatch
):
    """IMAGES a folder (the tiny ImageFolder), or unset: the run's own held-out shards."""
    run, _ = tiny_runs
    env = {"CLIP_TRAIN_NOTEBOOK_MODEL": str(run), "CLIP_TRAIN_NOTEBOOK_LABELS": json.dumps(LABELS)}
    if images == "folder":
        env["CLIP_TRAIN_NOTEBOOK_IMAGES"] = str(tiny_data["classes"])
    nb = _execute("zero_shot_demo.ipynb", tmp_path, monkeypatch, **env)
    assert f"model: {run / 'model'}" in _stdout(nb)  # the run directory resolved as clip-eval does
    assert _data(nb, "image/png"), "no figure of the images"
    (table,) = [html for html in _data(nb, "text/html") if "zero-shot-probabilities" in html]
    assert all(f"<th>{label}</th>" in table for label in LABELS)
    rows = _table_rows(table)
    assert len(rows) == 8  # NUM_IMAGES, spread over the images
    if images == "folder":  # titled by their path: 8 of the 12, from all three class folders
        assert {title.split("/")[0] for title, _ in rows} == set(LABELS)
    else:  # titled by their caption, "a <colour> <shape>"
        assert all(re.fullmatch(rf"a \w+ ({'|'.join(LABELS)})", title) for title, _ in rows)
    for title, cells in rows:
        probs = [float(p) for p in re.findall(r"([\d.]+)%", cells)]
        assert len(probs) == len(LABELS) and sum(probs) == pytest.approx(100, abs=0.2), title
        assert f"<b>{max(probs):.1f}%</b>" in cells  # the most probable label in bold


@pytest.mark.slow
def test_training_report_notebook_plots_and_summarises_runs(tiny_runs, tmp_path, monkeypatch):
    run, partial = tiny_runs
    nb = _execute(
        "training_report.ipynb",
        tmp_path,
        monkeypatch,
        CLIP_TRAIN_NOTEBOOK_RUNS=f"{run}:{partial}",
    )
    out = _stdout(nb)
    assert f"tiny: step {STEPS} of {STEPS}, {STEPS} train records, 2 evaluations" in out
    assert f"partial: step 2 of {STEPS}, 2 train records, 1 evaluations" in out
    assert len(_data(nb, "image/png")) == 2  # the training curves, the evaluation metrics
    (table,) = [html for html in _data(nb, "text/html") if "run-summary" in html]
    assert "<th>tiny</th><th>partial</th>" in table
    rows = dict(_table_rows(table))
    assert rows["step"] == f"<td>{STEPS} / {STEPS}</td><td>2 / {STEPS}</td>"
    final = read_metrics(run, "eval")[-1]
    for key in ("shapes/acc1", "retrieval/text_retrieval_recall@1", "retrieval/image_retrieval_recall@5"):
        assert rows[key].startswith(f"<td>{final[key]:.4g}</td>")
