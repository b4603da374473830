"""Which model folder a path means (clip_train/paths.py): one answer for clip-eval, clip-export,
model.init_from and clip_train.load."""

import pytest

from clip_train.paths import NoModelError, resolve_model_folder, run_dir_of


def _model(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def _checkpoint(run, step, complete=True):
    ckpt = run / "checkpoints" / f"step-{step:09d}"
    _model(ckpt / "model")
    if complete:
        (ckpt / "COMPLETE").write_text("")
    return ckpt


def test_a_run_directory_means_its_model_else_its_newest_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}")
    _checkpoint(run, 2)
    _checkpoint(run, 4)
    _checkpoint(run, 6, complete=False)  # cut off mid-save: never chosen
    (run / "checkpoints" / "latest").write_text("step-000000006")  # a stale pointer does not decide
    assert resolve_model_folder(run) == run / "checkpoints" / "step-000000004" / "model"
    _model(run / "model")  # written when training ends: it wins
    assert resolve_model_folder(run) == run / "model"
    assert run_dir_of(run) == run


def test_a_checkpoint_needs_its_completion_marker_given_directly_or_through_its_model(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}")
    done, cut = _checkpoint(run, 2), _checkpoint(run, 4, complete=False)
    assert resolve_model_folder(done) == done / "model"
    assert run_dir_of(done) == run  # its run's config comes with it
    for path in (cut, cut / "model"):
        with pytest.raises(NoModelError, match="without its COMPLETE marker"):
            resolve_model_folder(path, setting="model.init_from")


def test_a_model_folder_stands_alone_and_nothing_else_is_a_model(tmp_path):
    folder = _model(tmp_path / "exported")
    assert resolve_model_folder(folder) == folder and run_dir_of(folder) is None
    with pytest.raises(
        NoModelError, match=r"model.init_from=.*missing holds no saved model \(it does not exist\)"
    ):
        resolve_model_folder(tmp_path / "missing", setting="model.init_from")
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(NoModelError, match="no complete checkpoint with one"):
        resolve_model_folder(tmp_path / "empty_run")
    (tmp_path / "other").mkdir()
    with pytest.raises(NoModelError, match="pass a model folder"):
        resolve_model_folder(tmp_path / "other")
