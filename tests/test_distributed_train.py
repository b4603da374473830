"""The trainer under two processes (gloo on the CPU), launched with torchrun as users launch it."""

import json
import os
import socket
import subprocess
import sys

import pytest

from clip_train.config import OptimConfig
from clip_train.optim import lr_factor
from clip_train.tracking import read_metrics

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_process_run_trains_checkpoints_and_refuses_a_different_world_size(tmp_path, tiny_data):
    shards = tiny_data["shards"]
    args = [
        "-m", "clip_train", "train", "configs/tiny.yaml", f"run_dir={tmp_path / 'run'}",
        f"data.train_shards={shards}/train-*.tar", f"data.val_shards={shards}/val-000000.tar",
        # the exact large-batch machinery under DDP: tiled loss over the gather, GradCache + no_sync
        "loss.impl=tiled", "loss.block_size=5", "train.accum_steps=2",
    ]  # fmt: skip
    # torchrun sets RANK/WORLD_SIZE; Accelerate then runs DDP over gloo on the CPU
    proc = subprocess.run(
        _torchrun(_free_port(), *args), capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = read_metrics(tmp_path / "run", "train")
    assert [r["step"] for r in train] == list(range(1, 9))  # one writer: the main process
    assert train[-1]["samples_seen"] == 8 * 8 * 2 * 2  # steps x micro-batch x micro-batches x processes
    setup = read_metrics(tmp_path / "run", "setup")[0]
    assert (setup["loss_impl"], setup["world_size"], setup["contrastive_batch"]) == ("tiled", 2, 32)
    # the schedule advances once per optimizer step, however many processes there are
    schedule = OptimConfig(lr=1e-3, warmup_steps=2)
    assert [r["lr"] for r in train] == pytest.approx([1e-3 * lr_factor(s, 8, schedule) for s in range(1, 9)])
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step-000000008" / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()

    # one process cannot continue a two-process run's data stream: refused, one line, exit 2
    more = subprocess.run(
        [sys.executable, *args, "train.steps=12"], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert more.returncode == 2
    assert "world_size was 2 there and is 1 now" in more.stderr


def _torchrun(port: int, *command: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        *command,
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_to_a_two_process_job_checkpoints_both_ranks_and_resumes_the_same_losses(tmp_path, tiny_data):
    import signal

    from runs import losses, start_in_own_group, wait_for_line

    shards = tiny_data["shards"]
    train = [
        "-m", "clip_train", "train", "configs/tiny.yaml", f"data.train_shards={shards}/train-*.tar",
        "train.steps=16", "train.ckpt_every=12", "data.num_workers=2", "eval.zeroshot=[]",
    ]  # fmt: skip
    straight = subprocess.run(
        _torchrun(_free_port(), *train, f"run_dir={tmp_path / 'straight'}"),
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]

    # Each rank's own exit code, written by a shell around it (torchrun reports its own: it raises
    # on the signal). The shell ignores the signal itself; clip-train installs its own handler.
    codes = tmp_path / "codes"
    codes.mkdir()
    wrapped = 'trap "" TERM; "$0" "$@"; echo $? > "$CODES/rank-$RANK"'
    run = [*train, f"run_dir={tmp_path / 'run'}"]
    job = start_in_own_group(
        _torchrun(_free_port(), "--no-python", "bash", "-c", wrapped, sys.executable, *run),
        env={**os.environ, "CODES": str(codes)},
    )
    wait_for_line(job, "[train 3]")
    os.killpg(job.pid, signal.SIGTERM)  # the launcher and everything below it, loader workers too
    _, err = job.communicate(timeout=300)
    assert sorted(p.name for p in codes.iterdir()) == ["rank-0", "rank-1"], err[-3000:]
    assert [(codes / f"rank-{r}").read_text().strip() for r in (0, 1)] == ["75", "75"], err[-3000:]
    assert "killed by signal" not in err
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    stopped_at = int(latest.removeprefix("step-"))
    assert 3 <= stopped_at < 12
    meta = json.loads((tmp_path / "run" / "checkpoints" / latest / "meta.json").read_text())
    assert meta["world_size"] == 2

    resumed = subprocess.run(
        _torchrun(_free_port(), *run), capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = losses(tmp_path / "straight"), losses(tmp_path / "run")
    after = range(stopped_at + 1, 17)
    assert [got[s] for s in after] == pytest.approx([want[s] for s in after], abs=1e-6)
