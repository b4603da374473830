import json

import pytest

from clip_train.config import LogConfig
from clip_train.tracking import MetricsLogger, read_metrics, wandb_wanted


def test_metrics_jsonl_is_written_line_by_line(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, LogConfig(), {}, enabled=True)
    logger.log("train", 1, {"loss": 2.5, "lr": 1e-3, "grad_norm": float("nan")})
    # readable before close: a killed run keeps what it logged
    assert read_metrics(tmp_path, "train") == [
        {"kind": "train", "step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": "nan"}
    ]
    logger.log("eval", 1, {"acc1": 0.5}, console=False)
    logger.close()
    assert [r["kind"] for r in read_metrics(tmp_path)] == ["train", "eval"]
    assert "[train 1] loss 2.5" in capsys.readouterr().out


def test_only_the_main_process_writes(tmp_path):
    logger = MetricsLogger(tmp_path, LogConfig(), {}, enabled=False)
    logger.log("train", 1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_wandb_mode_environment_switches_wandb(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert not wandb_wanted(LogConfig())
    assert wandb_wanted(LogConfig(wandb=True))
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_wanted(LogConfig())
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert not wandb_wanted(LogConfig(wandb=True))


@pytest.mark.slow
def test_wandb_offline_needs_no_server(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(tmp_path, LogConfig(), {"optim": {"lr": 1e-3}}, enabled=True)
    logger.log("train", 1, {"loss": 2.0}, console=False)
    logger.log("train", 2, {"loss": 1.5}, console=False)
    logger.close()
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["loss"] == 1.5


def test_a_progress_bar_on_a_terminal_and_plain_lines_otherwise(tmp_path, monkeypatch):
    import io

    from clip_train.config import LogConfig
    from clip_train.tracking import MetricsLogger

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stdout, want_bar in ((io.StringIO(), False), (Terminal(), True)):
        monkeypatch.setattr("sys.stdout", stdout)
        logger = MetricsLogger(tmp_path / str(want_bar), LogConfig(), {}, enabled=True)
        logger.start_progress(total=4, initial=1)  # resumed at step 1
        for step in (2, 3):
            logger.advance(1.5, 40.0)
            logger.log("train", step, {"loss": 1.5})
        logger.close()
        text = stdout.getvalue()
        assert "[train 3] loss 1.5" in text
        assert ("3/4" in text and "samples_s=40.0" in text) == want_bar


def test_a_disabled_logger_of_another_rank_accepts_every_call(tmp_path):
    from clip_train.config import LogConfig
    from clip_train.tracking import MetricsLogger

    logger = MetricsLogger(tmp_path / "rank1", LogConfig(), {}, enabled=False)
    logger.start_progress(total=3, initial=0)
    logger.advance(1.0, 2.0)
    logger.log("train", 1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "rank1").exists()
