"""Config loading: YAML file -> dotted overrides -> typed `RunConfig` -> validate -> YAML out.

Data flow position: the first stage of every command. Errors are `ConfigError` with one line that
names the key, so the CLI can exit 2 before any rank starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from tfx.config.schema import RunConfig
from tfx.errors import ConfigError


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                check_paths: bool = True) -> RunConfig:
    """Read `path`, apply `key=value` overrides, build and validate a RunConfig."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        apply_override(raw, item)
    cfg = build(RunConfig, raw, prefix="").validate()
    if check_paths:
        check_data_paths(cfg)
    return cfg


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in the nested dict; the value is parsed as YAML (`[16,36]`, `3e-4`)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value, e.g. train.lr=3e-4")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else \
                f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: required key is missing")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{key}: got {value!r}")
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
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
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{key}: unsupported field type {tp}")
    raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")


def check_data_paths(cfg: RunConfig) -> None:
    """Fail at load time when shards or the tokenizer are missing."""
    from tfx.data.shards import expand_shards

    expand_shards(cfg.data.train, key="data.train")
    if cfg.data.eval is not None:
        expand_shards(cfg.data.eval, key="data.eval")
    tok = Path(cfg.data.tokenizer)
    if not tok.exists():
        raise ConfigError(f"data.tokenizer: {tok} not found (run `tfx data synth` for the demo)")
    vision_file = cfg.model.vision.family == "efficientnet"  # a state dict, not a folder
    for key, p, want_file in (("model.vision.path", cfg.model.vision.path, vision_file),
                              ("model.llm.path", cfg.model.llm.path, False)):
        if p is not None and not (Path(p).is_file() if want_file else Path(p).is_dir()):
            raise ConfigError(f"{key}: {p} is not a {'file' if want_file else 'folder'}"
                              f"{' (tfx backbones --out models)' if 'models/' in p else ''}")


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) for YAML/JSON."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_hash(cfg: RunConfig) -> str:
    """Hash of the model-defining sections; a checkpoint from another model config is refused."""
    model = json.dumps(to_dict(cfg.model), sort_keys=True)
    return hashlib.sha256(model.encode()).hexdigest()[:16]
