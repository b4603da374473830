import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clip_train.config import ConfigError, RunConfig, load_config, save_config

REQUIRED = ["run_dir=/tmp/x", "data.train_shards=/tmp/shards"]


def test_yaml_files_merge_in_order_then_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("run_dir: r\ndata:\n  train_shards: s\n  batch_size: 32\noptim:\n  lr: 0.1\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text("optim:\n  lr: 0.01\n  weight_decay: 0.0\n")
    cfg = load_config([base, exp], ["optim.lr=1e-4", "eval.zeroshot=[{dataset: fashion-mnist, limit: 5}]"])
    assert isinstance(cfg, RunConfig)
    assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0.0
    assert cfg.data.batch_size == 32 and cfg.data.num_workers == 2  # untouched default
    assert cfg.eval.zeroshot[0].limit == 5 and cfg.eval.zeroshot[0].templates == []  # = the dataset's set


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config([], REQUIRED + ["model.text.hf_config={model_type: bert, hidden_size: 8}"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config([tmp_path / "config.yaml"]) == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown config key optim.lrr: did you mean optim.lr?"),
        ("lr=1", "unknown config key lr: did you mean optim.lr?"),
        ("optim.lr=fast", "optim.lr='fast' has the wrong type: expected float"),
        ("train.steps=1.5", "train.steps=1.5 has the wrong type: expected int"),
        ("data.resampled=maybe", "data.resampled='maybe' has the wrong type: expected bool"),
        ("train.precision=bf61", "did you mean bf16?"),
        ("eval.zeroshot=[{dataset: a, limt: 3}]", "unknown config key eval.zeroshot[0].limt: did you mean"),
        ("optim", "override 'optim' is not key=value"),
        ("loss.impl=tile", "did you mean tiled?"),
        ("loss.kind=sigmoid", "loss.kind='sigmoid'"),
        ("train.accum_steps=0", "train.accum_steps=0 is out of range: it must be at least 1"),
        ("loss.block_size=0", "loss.block_size=0 is out of range: it must be at least 1"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config([], REQUIRED + [override])
    assert message in str(err.value)


def test_missing_required_value_is_named():
    with pytest.raises(ConfigError, match="missing required config value data.train_shards"):
        load_config([], ["run_dir=x"])


def test_a_typo_is_reported_before_a_missing_value():
    with pytest.raises(ConfigError, match="did you mean run_dir"):
        load_config([], ["rundir=x"])


def test_missing_or_broken_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([bad])


def test_cli_exits_2_with_one_line_before_loading_anything(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run_dir: r\ndata:\n  train_shards: s\n")
    proc = subprocess.run(
        [sys.executable, "-m", "clip_train", "train", str(cfg), "optim.lrr=1e-4"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "clip-train: error: unknown config key optim.lrr: did you mean optim.lr?"
    ]
    assert "torch" not in proc.stdout


def test_temperature_and_bias_start_from_the_chosen_losses_convention():
    clip = load_config([], REQUIRED)
    assert (
        clip.model.init_logit_scale == pytest.approx(math.log(1 / 0.07))
        and clip.model.init_logit_bias is None
    )
    siglip = load_config([], REQUIRED + ["loss.kind=siglip"])
    assert (
        siglip.model.init_logit_scale == pytest.approx(math.log(10)) and siglip.model.init_logit_bias == -10.0
    )
    mine = load_config(
        [], REQUIRED + ["loss.kind=siglip", "model.init_logit_bias=-5", "model.init_logit_scale=1"]
    )
    assert mine.model.init_logit_scale == 1.0 and mine.model.init_logit_bias == -5.0


# Keys without a range, each for a reason: the log temperature and bias may be any real number.
UNBOUNDED = {"model.init_logit_scale", "model.init_logit_bias"}


def _numeric_fields(schema, prefix=""):
    import dataclasses
    import typing

    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, prefix + f.name + ".")
            continue
        origin_args = typing.get_args(tp)
        if typing.get_origin(tp) is list and origin_args and dataclasses.is_dataclass(origin_args[0]):
            yield from _numeric_fields(origin_args[0], prefix + f.name + "[].")
        elif tp in (int, float) or (typing.get_origin(tp) is not list and set(origin_args) & {int, float}):
            yield prefix + f.name, f


def test_every_numeric_setting_has_a_range_unless_it_is_listed_as_unbounded():
    # scalars: lists of numbers (image mean/std, WiSE-FT alphas) have no single range
    missing = [
        key for key, f in _numeric_fields(RunConfig) if "range" not in f.metadata and key not in UNBOUNDED
    ]
    assert not missing, f"give these keys a _range(...) in config/schema.py: {missing}"


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=0", "data.batch_size=0 is out of range: it must be at least 1"),
        ("data.num_workers=-1", "data.num_workers=-1 is out of range: it must be at least 0"),
        ("train.steps=-5", "train.steps=-5 is out of range: it must be at least 1"),
        ("optim.beta2=1", "optim.beta2=1.0 is out of range: it must be in [0, 1)"),
        ("optim.eps=0", "optim.eps=0.0 is out of range: it must be above 0"),
        ("data.max_skip_frac=1.5", "data.max_skip_frac=1.5 is out of range: it must be in [0, 1]"),
        ("optim.lr=nan", "optim.lr=nan is out of range"),
        ("optim.layer_decay=0", "optim.layer_decay=0.0 is out of range: it must be in (0, 1]"),
        ("eval.zeroshot=[{dataset: x, limit: -1}]", "eval.zeroshot[0].limit=-1 is out of range"),
        ("data.crop_scale_min=0.95", "data.crop_scale_min=0.95 is above data.crop_scale_max=0.9"),
    ],
)
def test_out_of_range_values_name_the_key_and_the_range(override, message):
    extra = ["data.crop_scale_max=0.9"] if "crop_scale_min" in override else []
    with pytest.raises(ConfigError) as err:
        load_config([], REQUIRED + extra + [override])
    assert message in str(err.value)


def test_a_run_dir_that_is_a_file_or_below_one_is_refused(tmp_path):
    from clip_train.config import check_run_dir

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=f"run_dir={afile} is a file, not a directory"):
        check_run_dir(afile)
    with pytest.raises(ConfigError, match=f"lies below {afile}, which is a file"):
        check_run_dir(afile / "sub" / "run")
    check_run_dir(tmp_path / "new" / "run")  # not there yet: made later
    assert not (tmp_path / "new").exists()


def test_a_saved_run_config_with_removed_features_off_still_loads_and_on_is_refused(tmp_path):
    # run directories saved before model.label_prior, data.gray_invert_prob and
    # train.cache_image_views were removed record them, at their "off" values unless used
    base = {"run_dir": str(tmp_path / "run"), "data": {"train_shards": "x.tar"}}
    saved = tmp_path / "config.yaml"
    off = {
        "model": {"label_prior": {"weight": 0.0, "top_k": 10}},
        "data": {"train_shards": "x.tar", "gray_invert_prob": 0.0},
        "train": {"cache_image_views": 1},
    }
    saved.write_text(yaml.safe_dump({**base, **off}))
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    cfg = load_config([tiny, saved])
    assert cfg.data.train_shards == "x.tar"
    refused = {
        "model.label_prior.weight=0.5": "model.label_prior=",
        "data.gray_invert_prob=0.3": "data.gray_invert_prob=0.3",
        "train.cache_image_views=4": "train.cache_image_views=4",
    }
    for override, named in refused.items():
        with pytest.raises(ConfigError, match=re.escape(named) + ".*no longer has this feature"):
            load_config([tiny, saved], [override])
