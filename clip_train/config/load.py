"""Loading a run configuration: YAML files merged in order, then `a.b=v` overrides.

    cfg = load_config(["configs/demo.yaml"], ["optim.lr=1e-4", "train.steps=200"])

The files and overrides become one nested dict, which is then checked against the schema field by
field, so every error can name the dotted key that caused it: an unknown key (with the closest
valid key as a suggestion), a value of the wrong type, out of range or not among the choices, a
missing required value. validate.py then checks the rules between keys, once. The command-line
entry points turn a ConfigError into a one-line message and exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from clip_train.config.schema import LOSS_INIT, MISSING, ConfigError, RunConfig
from clip_train.config.validate import validate


def load_config(paths: list[str | Path] = (), overrides: list[str] = (), schema: type = RunConfig):
    merged: dict[str, Any] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist: check the path")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {path}{where} is not valid YAML: fix the syntax") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
        _deep_merge(merged, data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value: write e.g. optim.lr=1e-4")
        _deep_merge(merged, _nest(key.strip().split("."), _parse_scalar(raw)))
    if schema is RunConfig:
        _drop_removed_keys(merged)
    cfg = build_dataclass(schema, merged, prefix="")
    # Required values are checked after the whole tree, so that a typo is reported as a typo
    # rather than as the required value it failed to set.
    _require_all(cfg, prefix="")
    if isinstance(cfg, RunConfig):
        fill_loss_defaults(cfg)
        validate(cfg)
    return cfg


# Keys of features removed for measuring no gain (2026-12-04), with the value that meant "off".
# Run directories saved before then record them: at "off" they are dropped, so those runs still
# evaluate, export and resume; anything else is refused, since the run depended on the feature.
REMOVED_KEYS = {
    ("model", "label_prior"): lambda value: not (value or {}).get("weight", 0),
    ("data", "gray_invert_prob"): lambda value: value == 0,
    ("train", "cache_image_views"): lambda value: value == 1,
}


def _drop_removed_keys(merged: dict) -> None:
    for (section, key), is_off in REMOVED_KEYS.items():
        part = merged.get(section)
        if not isinstance(part, dict) or key not in part:
            continue
        value = part.pop(key)
        if not is_off(value):
            raise ConfigError(
                f"{section}.{key}={value!r}: clip_train no longer has this feature (removed for measuring "
                "no gain): delete the key, or use a clip_train from before 2026-12-04 for this run"
            )


def fill_loss_defaults(cfg: RunConfig) -> None:
    """Fill model.init_logit_scale / init_logit_bias left empty with the chosen loss's values."""
    scale, bias = LOSS_INIT[cfg.loss.kind]
    if cfg.model.init_logit_scale is None:
        cfg.model.init_logit_scale = scale
    if cfg.model.init_logit_bias is None:
        cfg.model.init_logit_bias = bias


def _require_all(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            _require_all(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _require_all(item, f"{key}[{i}].")
        elif value == MISSING:
            raise ConfigError(f"missing required config value {key}: set it in a YAML file or as {key}=...")


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _nest(keys: list[str], value: Any) -> dict:
    for key in reversed(keys):
        value = {key: value}
    return value


def _deep_merge(base: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def all_keys(schema: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, for suggestions and documentation."""
    keys = []
    for f in dataclasses.fields(schema):
        tp = _resolved_types(schema)[f.name]
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, prefix + f.name + "."))
    return keys


def _suggest(bad_key: str, schema: type, prefix: str) -> str:
    local = [f.name for f in dataclasses.fields(schema)]
    close = difflib.get_close_matches(bad_key.split(".")[-1], local, n=1, cutoff=0.5)
    if close:
        return f"did you mean {prefix}{close[0]}?"
    # a key put at the wrong level: match its last part against every key's last part
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in all_keys()}
    close = difflib.get_close_matches(bad_key, list(by_leaf), n=1, cutoff=0.75)
    if close:
        return f"did you mean {by_leaf[close[0]]}?"
    return "valid keys here: " + ", ".join(prefix + k for k in local)


_TYPE_CACHE: dict[type, dict[str, Any]] = {}


def _resolved_types(schema: type) -> dict[str, Any]:
    if schema not in _TYPE_CACHE:
        _TYPE_CACHE[schema] = typing.get_type_hints(schema)
    return _TYPE_CACHE[schema]


def build_dataclass(schema: type, data: Any, prefix: str = ""):
    """A schema dataclass from a plain dict, with the same checks and messages as load_config."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(schema)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key {prefix}{key}: {_suggest(str(key), schema, prefix)}")
    kwargs = {}
    types_ = _resolved_types(schema)
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        if f.name in data:
            value = _check(types_[f.name], data[f.name], key)
        elif dataclasses.is_dataclass(types_[f.name]):
            value = build_dataclass(types_[f.name], {}, key + ".")
        else:
            value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        _check_range(f, value, key)
        choices = f.metadata.get("choices")
        if choices and value not in choices and value != MISSING:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"{key}={value!r} is not allowed: {hint}choose one of {', '.join(choices)}")
        kwargs[f.name] = value
    return schema(**kwargs)


def _check_range(f: dataclasses.Field, value: Any, key: str) -> None:
    if "range" not in f.metadata or value is None or value == MISSING:
        return
    low, high, above, below = f.metadata["range"]
    inside = not (isinstance(value, float) and math.isnan(value))
    inside = inside and (low is None or (value > low if above else value >= low))
    inside = inside and (high is None or (value < high if below else value <= high))
    if inside:
        return
    if low is not None and high is not None:
        allowed = f"in {'(' if above else '['}{low}, {high}{')' if below else ']'}"
    elif low is not None:
        allowed = f"above {low}" if above else f"at least {low}"
    else:
        allowed = f"below {high}" if below else f"at most {high}"
    raise ConfigError(f"{key}={value!r} is out of range: it must be {allowed}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _check(tp: Any, value: Any, key: str) -> Any:
    """Return value converted to tp, or raise ConfigError naming key and the expected type."""
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value if value is not None else {}, key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(arg, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {tp}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a list")
        return [_check(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    if value == MISSING:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}={value!r} has the wrong type: expected {_type_name(tp)}")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
