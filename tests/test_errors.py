"""The one-line error of every command (clip_train/errors.py)."""

from clip_train.errors import fail, one_line


def test_a_worker_traceback_becomes_its_last_line_without_the_class_path():
    worker = ValueError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n'
        "clip_train.data.DataError: shards/a.tar: no such file: check data.train_shards"
    )
    assert one_line(worker) == "shards/a.tar: no such file: check data.train_shards"


def test_a_plain_error_keeps_its_first_line_and_fail_prints_it_with_exit_code_2(capsys):
    assert one_line(ValueError("")) == "ValueError"
    assert fail("clip-data", FileNotFoundError("shards/ does not exist: pass --out\ndetails")) == 2
    assert capsys.readouterr().err == "clip-data: error: shards/ does not exist: pass --out\n"
