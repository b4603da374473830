"""Faults as clusters deliver them, tried from outside on real runs: signals to the whole job,
bad data mixed into real shards, full disks, settings out of range."""

import os
import signal
import time

import pytest
from runs import REPO, losses, run_train, start_in_own_group, train_command, wait_for_line, wait_until_handled

from clip_train.tracking import read_metrics

pytestmark = pytest.mark.slow
NO_EVAL = ["eval.zeroshot=[]", "data.val_shards="]


@pytest.mark.parametrize("num_workers, target", [(0, "process"), (2, "process"), (2, "group")])
def test_sigterm_checkpoints_at_the_next_step_and_the_resumed_run_continues_the_same_losses(
    tmp_path, tiny_data, num_workers, target
):
    # "group": every process of the job gets it (timeout, systemd, Kubernetes, scancel), loader
    # workers included; they must leave it to the main process instead of dying of it
    settings = ["train.steps=30", "train.ckpt_every=20", *NO_EVAL, f"data.num_workers={num_workers}"]
    straight = run_train(tmp_path / "straight", tiny_data, *settings)
    assert straight.returncode == 0, straight.stderr[-2000:]

    cmd = train_command(tmp_path / "run", tiny_data, *settings)
    proc = start_in_own_group(cmd)
    wait_for_line(proc, "[train 3]")  # training runs: preempt
    if target == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    start = time.time()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]  # the requeue code
    assert time.time() - start < 60
    assert "Traceback" not in err and "killed by signal" not in err
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    stopped_at = int(latest.removeprefix("step-"))
    assert 3 <= stopped_at < 20  # inside the first checkpoint segment, at a step boundary
    assert err.strip().splitlines()[-1] == (
        f"clip-train: stopped at step {stopped_at} after a preemption signal (checkpointed): "
        "run again to resume"
    )
    record = read_metrics(tmp_path / "run", "preempted")[0]
    assert (record["step"], record["signal"]) == (stopped_at, "SIGTERM")

    import subprocess

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # the loader dropped the used samples undecoded instead of reading batches again
    assert f"skipping {stopped_at * 8} samples" in resumed.stdout
    want, got = losses(tmp_path / "straight"), losses(tmp_path / "run")
    after = range(stopped_at + 1, 31)
    assert [got[s] for s in after] == pytest.approx([want[s] for s in after], abs=1e-6)


def test_sigterm_to_the_group_during_start_up_exits_75_and_the_run_resumes(tmp_path, tiny_data):
    cmd = train_command(tmp_path / "run", tiny_data, "train.steps=4", *NO_EVAL, "data.num_workers=2")
    proc = start_in_own_group(cmd)
    wait_until_handled(proc.pid)  # clip-train has installed its handler: torch is still loading
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    assert err.strip().splitlines() == [
        "clip-train: stopped at step 0 after a preemption signal (before its first step): run again to resume"
    ]
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing to save
    again = run_train(tmp_path / "run", tiny_data, "train.steps=4", *NO_EVAL, "data.num_workers=2")
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4]


def _heavily_corrupted_shard(path, n=400, good_every=20):
    """A real shard where most images are junk bytes (a broken crawl), a few are fine."""
    import io

    import webdataset as wds
    from PIL import Image

    good = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(good, "JPEG")
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            image = good.getvalue() if i % good_every == 0 else b"\xff\xd8 not a jpeg" * 8
            sink.write({"__key__": f"heavy{i:05d}", "jpg": image, "txt": "a red square"})


def test_a_heavily_corrupted_shard_stops_the_run_however_short_its_segments_and_many_its_workers(
    tmp_path, tiny_data
):
    # Per worker and per checkpoint segment, each loader sees far fewer than the window's 1,000
    # samples: only the run-wide rolling window can see that most samples are bad.
    heavy = tmp_path / "heavy-000000.tar"
    _heavily_corrupted_shard(heavy)
    shards = f"{tiny_data['shards']}/train-000001.tar::{heavy}"
    settings = [f"data.train_shards={shards}", "data.num_workers=2", "data.batch_size=16", *NO_EVAL]
    proc = run_train(tmp_path / "run", tiny_data, *settings, "train.steps=60", "train.ckpt_every=4")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()[-1:]  # after the first few skips' warnings
    assert lines[0].startswith("clip-train: error: ") and "clip_train." not in lines[0]  # no class path
    assert "samples read were bad (limit data.max_skip_frac=1.0%); by reason: undecodable_image" in lines[0]
    assert f"worst shards: {heavy} (" in lines[0]
    assert "fix or drop those shards, or raise data.max_skip_frac" in lines[0]
    train = read_metrics(tmp_path / "run", "train")
    assert train and train[-1]["step"] < 60  # it stopped early


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=0", "data.batch_size=0 is out of range: it must be at least 1"),
        ("data.num_workers=-1", "data.num_workers=-1 is out of range: it must be at least 0"),
        ("train.steps=-5", "train.steps=-5 is out of range: it must be at least 1"),
    ],
)
def test_out_of_range_settings_fail_in_one_line_and_write_nothing(tmp_path, tiny_data, override, message):
    proc = run_train(tmp_path / "run", tiny_data, override)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"clip-train: error: {message}"]
    assert not (tmp_path / "run").exists()


def test_a_run_dir_that_is_a_file_fails_in_one_line(tmp_path, tiny_data):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for run_dir, message in [
        (afile, f"run_dir={afile} is a file, not a directory: choose another run_dir"),
        (
            afile / "sub",
            f"run_dir={afile / 'sub'} lies below {afile}, which is a file: choose another run_dir",
        ),
    ]:
        proc = run_train(run_dir, tiny_data)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [f"clip-train: error: {message}"]
    assert afile.read_text() == "not a folder"


@pytest.fixture
def small_disk(tmp_path):
    """A real 7 MB file system (tmpfs): room for two checkpoints of the tiny model, not three."""
    import subprocess

    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:  # not root, or no mount rights: test_checkpoint injects the error instead
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_during_a_save_is_one_line_and_the_previous_checkpoint_resumes_exactly(
    tmp_path, tiny_data, small_disk
):
    import subprocess

    settings = ["train.steps=8", "train.ckpt_every=2", "train.keep_last=3", *NO_EVAL]
    straight = run_train(tmp_path / "straight", tiny_data, *settings)
    assert straight.returncode == 0, straight.stderr[-2000:]

    run_dir = small_disk / "run"
    full = run_train(run_dir, tiny_data, *settings)
    assert full.returncode == 2, full.stderr[-2000:]
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1, full.stderr[-2000:]
    ckpts = run_dir / "checkpoints"
    assert lines[0].startswith(f"clip-train: error: could not write checkpoint {ckpts}/step-000000006: ")
    assert "no space left on device (about " in lines[0] and " bytes needed, " in lines[0]
    assert "step-000000004 stays the latest; the partial save was removed" in lines[0]
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000000002", "step-000000004"]
    assert (ckpts / "latest").read_text() == "step-000000004"

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    resumed = run_train(run_dir, tiny_data, *settings)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want, got = losses(tmp_path / "straight"), losses(run_dir)
    assert [got[s] for s in range(5, 9)] == pytest.approx([want[s] for s in range(5, 9)], abs=1e-6)
