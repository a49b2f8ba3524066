"""Config loading: YAML file -> dotted overrides -> stages -> typed `RunConfig` -> validate.

Data flow position: the first stage of every command. Errors are `ConfigError` with one line that
names the key, so the CLI can exit 2 before any rank starts. A misspelled key gets the nearest
valid one; a key written in the wrong section gets the section it belongs to (`train.lr` ->
`optim.lr`). A recipe (a config with `stages:`) becomes one RunConfig per stage: each stage
entry names itself and overrides whole or partial sections; everything else is inherited from
the top level; stage k trains into `train.output_dir/<name>/` from stage k-1's final weights.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from tfx.config.schema import RunConfig
from tfx.errors import ConfigError

STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
RENAMED = {"train.stage": "train.freeze", "train.dist_timeout_s": "dist.timeout_s"}


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # "" for a config without stages
    cfg: RunConfig


def read_yaml(path: str | Path) -> dict:
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
    return raw


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                check_paths: bool = True) -> list[Stage]:
    """Every stage of the config at `path` (one unnamed stage when it has no `stages:`)."""
    raw = read_yaml(path)
    for item in overrides:
        apply_override(raw, item)
    stages = raw.pop("stages", None)
    if stages is None:
        cfg = build(RunConfig, raw, prefix="").validate()
        if check_paths:
            check_data_paths(cfg)
        return [Stage("", cfg)]
    return resolve_stages(raw, stages, check_paths)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                check_paths: bool = True) -> RunConfig:
    """The RunConfig of a config without stages (a recipe: ConfigError naming the stages)."""
    stages = load_recipe(path, overrides, check_paths)
    if len(stages) > 1 or stages[0].name:
        raise ConfigError(f"{path} is a recipe with stages {', '.join(s.name for s in stages)}; "
                          f"use a stage's own folder (train.output_dir/<stage>) here")
    return stages[0].cfg


def resolve_stages(base: dict, stages: Any, check_paths: bool) -> list[Stage]:
    if not isinstance(stages, list) or not stages:
        raise ConfigError("stages: expected a non-empty list of {name, sections to override}")
    out, names = [], []
    root = Path(base.get("train", {}).get("output_dir", "runs"))
    for i, entry in enumerate(stages):
        where = f"stages[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"{where}: each stage is a mapping with a name and sections")
        name = entry["name"]
        if not STAGE_NAME.match(name) or name in names:
            raise ConfigError(f"{where}.name: {name!r} must be unique, of letters, digits, - "
                              f"and _ (it names the stage's folder)")
        if "model" in entry:
            raise ConfigError(f"{where}.model: every stage trains the same model (the weights "
                              f"carry over); set it at the top level")
        raw = copy.deepcopy(base)
        for section, values in entry.items():
            if section == "name":
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"{where}.{section}: expected a mapping of keys")
            raw[section] = _merge(raw.get(section, {}), values)
        raw.setdefault("train", {})["output_dir"] = str(root / name)
        if i > 0:
            if raw["train"].get("init_from") not in (None, base.get("train", {})
                                                      .get("init_from")):
                raise ConfigError(f"{where}.train.init_from: a later stage starts from the "
                                  f"stage before it; set init_from on the first stage only")
            raw["train"]["init_from"] = str(root / names[-1])
        try:
            cfg = build(RunConfig, raw, prefix="").validate()
        except ConfigError as e:
            raise ConfigError(f"{where} ({name}): {e}") from None
        if i + 1 < len(stages) and not cfg.checkpoint.save_at_end:
            raise ConfigError(f"{where}.checkpoint.save_at_end: stage {name} must save at its "
                              f"end: the next stage starts from those weights")
        if check_paths:
            check_data_paths(cfg)
        out.append(Stage(name, cfg))
        names.append(name)
    return out


def _merge(a: Any, b: Any) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        return {**a, **{k: _merge(a.get(k), v) for k, v in b.items()}}
    return copy.deepcopy(b)


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in the nested dict; the value is parsed as YAML (`[16,36]`, `3e-4`).
    `stages.NAME.section.key=value` sets a key of one stage of a recipe."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value, e.g. optim.lr=3e-4")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node = raw
    if parts[0] == "stages" and len(parts) > 2:
        stage = next((s for s in raw.get("stages") or [] if isinstance(s, dict)
                      and s.get("name") == parts[1]), None)
        if stage is None:
            raise ConfigError(f"override {key}: no stage named {parts[1]!r}")
        node, parts = stage, parts[2:]
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        out += _all_keys(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) \
            else [prefix + f.name]
    return out


def unknown_key_hint(key: str, prefix: str, fields) -> str:
    """`; it is optim.lr` for a key of another section, else the nearest key of this one."""
    if f"{prefix}{key}" in RENAMED:
        return f"; it is {RENAMED[prefix + key]} now"
    elsewhere = [k for k in _all_keys(RunConfig) if k.rsplit(".", 1)[-1] == key
                 and k != f"{prefix}{key}"]
    if elsewhere:
        return f"; it is {' or '.join(elsewhere)} now" if len(elsewhere) < 3 else \
            f"; did you mean one of {', '.join(elsewhere)}?"
    near = difflib.get_close_matches(str(key), fields, n=1)
    return f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys: {', '.join(fields)}"


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key{unknown_key_hint(key, prefix, fields)}")
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
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
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
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
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
    from tfx.model.families import vision_family

    vision_file = vision_family(cfg.model.vision.family).weights == "file"  # a state dict
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
