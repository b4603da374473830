"""The launch recipes on this CPU: `accelerate launch` with the committed 2-process config, the signal
forwarding the SLURM script relies on, and torch.compile."""

import io
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import webdataset as wds
from PIL import Image
from runs import entry

from clip_train.tracking import read_metrics

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, STEPS = 4, 6  # per process; the one-process run reads 2 x BATCH
WORDS = ["red", "green", "blue", "small", "big", "round", "square", "dark", "light", "striped"]

# Deterministic apart from the data: no dropout; a LayerNorm image tower (BatchNorm would normalise
# per process); crops of the whole image (crop scale 1, so the random aspect ratio never fits and
# timm falls back to the full picture).
EXACT = [
    "model.image.name=test_vit", "model.image.image_size=160",
    "model.text.hf_config.hidden_dropout_prob=0.0", "model.text.hf_config.attention_probs_dropout_prob=0.0",
    "data.crop_scale_min=1.0", "data.crop_scale_max=1.0",
    "data.resampled=false", "data.shard_shuffle=1", "data.sample_shuffle=1", "data.num_workers=0",
    f"train.steps={STEPS}", "train.ckpt_every=0", "eval.zeroshot=[]", "data.val_shards=",
]  # fmt: skip


def _sample(rank: int, i: int) -> dict:
    rng = torch.Generator().manual_seed(1000 * rank + i)
    pixels = torch.randint(0, 256, (3, 3, 3), generator=rng, dtype=torch.uint8)
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy()).resize((48, 48), Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    words = [WORDS[int(w)] for w in torch.randint(0, len(WORDS), (3,), generator=rng)]
    return {"__key__": f"r{rank}-{i:04d}", "png": buf.getvalue(), "txt": " ".join(words)}


def _shards(folder):
    """r0.tar / r1.tar: what each of two processes reads, in order; all.tar: the same samples with
    the two processes' step-k batches next to each other, so one process reading 2 x BATCH gets at
    step k exactly the union of their step-k batches."""
    folder.mkdir()
    per_rank = [[_sample(rank, i) for i in range(BATCH * STEPS)] for rank in (0, 1)]
    for rank in (0, 1):
        with wds.TarWriter(str(folder / f"r{rank}.tar")) as sink:
            for sample in per_rank[rank]:
                sink.write(sample)
    with wds.TarWriter(str(folder / "all.tar")) as sink:
        for step in range(STEPS):
            for rank in (0, 1):
                for sample in per_rank[rank][step * BATCH : (step + 1) * BATCH]:
                    sink.write(sample)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate(*args, faults=()) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", "launch/accelerate/cpu_2proc.yaml",
        "--main_process_port", str(_free_port()), *entry(faults), "configs/tiny.yaml", *args,
    ]  # fmt: skip


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir, "train")]


def test_two_processes_through_accelerate_launch_equal_one_process_with_the_global_batch(tmp_path):
    _shards(tmp_path / "shards")
    two = subprocess.run(
        _accelerate(f"run_dir={tmp_path / 'two'}", f"data.train_shards={tmp_path}/shards/r{{0..1}}.tar",
                    f"data.batch_size={BATCH}", *EXACT),
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, "-m", "clip_train", "train", "configs/tiny.yaml", f"run_dir={tmp_path / 'one'}",
         f"data.train_shards={tmp_path}/shards/all.tar", f"data.batch_size={2 * BATCH}", *EXACT],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    setup = read_metrics(tmp_path / "two", "setup")[0]
    assert setup["world_size"] == 2 and setup["contrastive_batch"] == 2 * BATCH
    # the same global batches, the same gradients (DDP's average of the per-process gradients of
    # the gathered loss), so the same weights and losses step after step
    assert len(_losses(tmp_path / "two")) == STEPS
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), abs=2e-5)
    assert _losses(tmp_path / "two")[-1] < _losses(tmp_path / "two")[0]  # and it learns


def test_a_preempted_two_process_run_resumes_each_ranks_own_data_stream(tmp_path):
    # Rank 0's shard has an undecodable image at position 2 and rank 1's none, so after the same
    # steps their streams stand at different raw positions; each must resume at its own.
    folder = tmp_path / "shards"
    folder.mkdir()
    for rank in (0, 1):
        samples = [_sample(rank, i) for i in range(BATCH * STEPS + 1)]
        if rank == 0:
            samples[1]["png"] = b"not a png"
        with wds.TarWriter(str(folder / f"r{rank}.tar")) as sink:
            for sample in samples:
                sink.write(sample)
    settings = [f"data.train_shards={folder}/r{{0..1}}.tar", f"data.batch_size={BATCH}", *EXACT]

    def launch(run_dir, faults=()):
        return subprocess.run(
            _accelerate(f"run_dir={run_dir}", *settings, faults=faults),
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO,
        )

    straight = launch(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert read_metrics(tmp_path / "straight", "train")[-1]["data/skipped/undecodable_image"] == 1

    # the preemption warning reaches rank 1 only, as it starts step 3
    stopped = launch(tmp_path / "run", faults=("--signal-at", "3:1"))
    assert stopped.returncode != 0
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    assert latest == "step-000000003", stopped.stderr[-3000:]
    resumed = launch(tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # rank 0 had read one raw sample more than rank 1; both continue with the batches they would have had
    want, got = _losses(tmp_path / "straight"), _losses(tmp_path / "run")
    assert len(got) == STEPS and got[3:] == pytest.approx(want[3:], abs=1e-6)
    assert got[:3] == pytest.approx(want[:3], abs=1e-6)


def test_the_launcher_forwards_usr1_when_told_to_and_every_rank_checkpoints(tmp_path, tiny_data):
    shards = tiny_data["shards"]
    env = {**os.environ, "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}  # as slurm.sbatch
    cmd = _accelerate(
        f"run_dir={tmp_path / 'run'}", f"data.train_shards={shards}/train-*.tar", "train.steps=200",
        "train.ckpt_every=100", "eval.zeroshot=[]", "data.val_shards=", "train.log_every=1",
    )  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
        start_new_session=True,
    )
    for line in proc.stdout:  # training runs: signal the launcher only, as SLURM's srun would
        if line.startswith("[train 3]"):
            proc.send_signal(signal.SIGUSR1)
            break
    start = time.time()
    _, err = proc.communicate(timeout=300)
    assert time.time() - start < 120
    assert proc.returncode != 0  # the launcher reports its own code, not the ranks' 75
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    stopped_at = int(latest.removeprefix("step-"))
    assert 3 <= stopped_at < 100, err[-2000:]  # a preemption checkpoint, not a scheduled one
    assert read_metrics(tmp_path / "run", "preempted")[0]["step"] == stopped_at


def test_a_compiled_run_trains_like_an_eager_one_and_saves_plain_weights(tmp_path, tiny_data):
    from safetensors.torch import load_file

    from clip_train.models.clip import ClipModel

    shards = tiny_data["shards"]
    common = [
        f"data.train_shards={shards}/train-*.tar",
        "eval.zeroshot=[]",
        "data.val_shards=",
        "train.steps=3",
        # dropout draws its masks differently once traced: without it the two runs compute the same
        "model.text.hf_config.hidden_dropout_prob=0.0",
        "model.text.hf_config.attention_probs_dropout_prob=0.0",
    ]

    def train(name, *extra):
        cmd = [sys.executable, "-m", "clip_train", "train", "configs/tiny.yaml", f"run_dir={tmp_path / name}"]
        proc = subprocess.run([*cmd, *common, *extra], capture_output=True, text=True, timeout=600, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]

    train("eager")
    train("compiled", "train.compile=true", "train.compile_backend=aot_eager")
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), abs=1e-4)
    for folder in (tmp_path / "compiled" / "model", tmp_path / "compiled" / "checkpoints" / "step-000000003"):
        weights = folder / "model.safetensors"
        assert not [k for k in load_file(str(weights)) if "_orig_mod" in k]
    model = ClipModel.from_pretrained(tmp_path / "compiled" / "model")  # strict: every key fits
    eager = ClipModel.from_pretrained(tmp_path / "eager" / "model")
    tokens = torch.randint(1, 100, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens), eager.encode_text(tokens), atol=1e-4)
