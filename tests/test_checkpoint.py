import pytest
import torch
from accelerate import Accelerator

from clip_train import checkpoint


@pytest.fixture
def accel_model():
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def _step(model, optimizer):
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_save_is_complete_points_latest_and_prunes_after(tmp_path, accel_model):
    accelerator, model, optimizer = accel_model
    for step in (1, 2, 3):
        _step(model, optimizer)
        checkpoint.save(accelerator, tmp_path, step, {"world_size": 1}, keep_last=2)
    root = checkpoint.checkpoint_root(tmp_path)
    kept = [p.name for p in checkpoint.complete_checkpoints(root)]
    assert kept == ["step-000000002", "step-000000003"]
    assert (root / "latest").read_text() == "step-000000003"
    assert checkpoint.read_meta(root / "step-000000003") == {"step": 3, "world_size": 1}
    assert not list(root.glob(".tmp-*"))


def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path, accel_model):
    accelerator, model, optimizer = accel_model
    _step(model, optimizer)
    checkpoint.save(accelerator, tmp_path, 1, {}, keep_last=1)
    saved_weight = model.weight.detach().clone()
    _step(model, optimizer)

    def dies(folder):
        raise KeyboardInterrupt("killed while exporting")

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(accelerator, tmp_path, 2, {}, keep_last=1, export_model=dies)
    root = checkpoint.checkpoint_root(tmp_path)
    assert (root / ".tmp-step-000000002").is_dir()  # the half-written save is there...
    assert checkpoint.find_latest(tmp_path) == root / "step-000000001"  # ...and never chosen
    assert checkpoint.resolve_resume(tmp_path, "auto") == root / "step-000000001"
    accelerator.load_state(str(root / "step-000000001"))
    assert torch.equal(model.weight, saved_weight)
    # the next save clears the leftover and completes
    checkpoint.save(accelerator, tmp_path, 2, {}, keep_last=1)
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step-000000002"]
    assert not (root / ".tmp-step-000000002").exists()


def test_a_folder_without_complete_marker_is_ignored(tmp_path):
    root = checkpoint.checkpoint_root(tmp_path)
    (root / "step-000000009").mkdir(parents=True)
    assert checkpoint.find_latest(tmp_path) is None
    assert checkpoint.resolve_resume(tmp_path, "auto") is None


def test_resume_none_refuses_a_run_dir_with_checkpoints(tmp_path, accel_model):
    accelerator, _, _ = accel_model
    checkpoint.save(accelerator, tmp_path, 1, {}, keep_last=1)
    with pytest.raises(checkpoint.ResumeError, match="train.resume=none"):
        checkpoint.resolve_resume(tmp_path, "none")
    with pytest.raises(checkpoint.ResumeError, match="not a complete checkpoint"):
        checkpoint.resolve_resume(tmp_path, str(tmp_path / "elsewhere"))


def test_incompatible_resume_is_refused_with_the_setting_named(tmp_path):
    with pytest.raises(checkpoint.ResumeError, match="world_size was 2 there and is 1 now"):
        checkpoint.check_compatible({"world_size": 2}, {"world_size": 1}, tmp_path)
    checkpoint.check_compatible({"world_size": 1}, {"world_size": 1}, tmp_path)


def test_a_resume_with_another_model_names_only_the_keys_that_differ(tmp_path):
    saved = {
        "model": {
            "embed_dim": 32,
            "image": {"name": "test_vit", "image_size": 64},
            "text": {"pooling": "mean"},
        }
    }
    now = {
        "model": {
            "embed_dim": 16,
            "image": {"name": "test_vit", "image_size": 64},
            "text": {"pooling": "cls"},
        }
    }
    with pytest.raises(checkpoint.ResumeError) as info:
        checkpoint.check_compatible(saved, now, tmp_path)
    assert str(info.value) == (
        f"cannot resume from {tmp_path}: model.embed_dim: 32 there, 16 now, "
        "model.text.pooling: 'mean' there, 'cls' now; use the same setting or a new run_dir"
    )


def test_a_write_error_during_a_save_is_named_and_removes_the_partial_save(tmp_path, accel_model):
    import errno

    accelerator, model, optimizer = accel_model
    _step(model, optimizer)
    checkpoint.save(accelerator, tmp_path, 1, {}, keep_last=2)

    def disk_full(folder):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))

    with pytest.raises(checkpoint.CheckpointWriteError) as info:
        checkpoint.save(accelerator, tmp_path, 2, {}, keep_last=2, export_model=disk_full)
    root = checkpoint.checkpoint_root(tmp_path)
    message = str(info.value)
    assert message.startswith(
        f"could not write checkpoint {root}/step-000000002: no space left on device (about "
    )
    assert "bytes needed, " in message and "step-000000001 stays the latest" in message
    assert not list(root.glob(".tmp-*"))  # the partial save is gone
    assert checkpoint.find_latest(tmp_path) == root / "step-000000001"
    assert (root / "latest").read_text() == "step-000000001"
