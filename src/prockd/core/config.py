"""What every config shares, whatever the task: strict pydantic sections (unknown keys are errors naming the key
and the file), YAML files with ``base:`` files, ``key=value`` overrides, the method section, config files that
ship inside the package (``configs/...``)."""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prockd.errors import ProckdError


class Strict(BaseModel):
    """A config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class MethodConfig(Strict):
    """A distillation method by registry name, with its own validated parameters."""

    name: str = "prockd"
    params: dict[str, Any] = Field(default_factory=dict)


def format_errors(e: ValidationError, prefix: str = "") -> str:
    """A pydantic error as one line of 'dotted.key': message parts (``prefix`` before every key)."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if prefix:
            loc = f"{prefix}.{loc}" if loc else prefix
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"'{loc}': {msg}" if loc else msg)
    return "; ".join(parts)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` (value read as YAML) into (path, value)."""
    if "=" not in text:
        raise ProckdError(f"override '{text}' is not of the form key=value (e.g. train.lr=0.001)")
    key, raw = text.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ProckdError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ProckdError(f"override '{text}': value is not valid YAML ({e.problem})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with dotted ``key=value`` overrides applied."""
    data = copy.deepcopy(data)
    for ov in overrides:
        path, value = parse_override(ov)
        node = data
        for p in path[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ProckdError(f"override '{ov}': '{p}' is not a section")
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return data


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base`` (mappings recursively; anything else replaced)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def packaged_configs() -> Path:
    """The folder of the configs that ship inside the package (the embedded benchmarks', the paper's)."""
    return Path(str(resources.files("prockd") / "configs"))


def resolve_config_path(path: str | Path) -> Path:
    """``path`` itself when it is a file; a relative ``configs/...`` path that is not a file here names the
    packaged config of that name (so the documented commands work from any folder and from an installed
    wheel)."""
    p = Path(path)
    if p.is_file() or p.is_absolute() or not p.parts or p.parts[0] != "configs":
        return p
    packaged = packaged_configs().joinpath(*p.parts[1:])
    return packaged if packaged.is_file() else p


def read_config_file(path: str | Path, _seen: tuple = ()) -> dict:
    """A YAML config as a dict, with its ``base:`` file(s) (relative to it) merged in first; ``configs/...``
    paths fall back to the packaged configs (:func:`resolve_config_path`)."""
    p = resolve_config_path(path) if not _seen else Path(path)
    if not p.is_file():
        raise ProckdError(f"config file not found: {p}" + (f" (base of {_seen[-1]})" if _seen else ""))
    if p.resolve() in _seen:
        raise ProckdError(f"config file {p}: 'base' files include each other ({' -> '.join(map(str, _seen))})")
    try:
        loaded = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ProckdError(f"config file {p} is not readable YAML: {e}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ProckdError(f"config file {p} must hold a mapping at top level, not {type(loaded).__name__}")
    bases = loaded.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ProckdError(f"config file {p}: 'base' must be a file name or a list of file names")
    data: dict = {}
    for b in bases:
        data = deep_merge(data, read_config_file(p.parent / b, _seen + (p.resolve(),)))
    return deep_merge(data, loaded)


def dump_config(cfg: BaseModel) -> str:
    """The fully resolved config as YAML."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def validate(model: type[BaseModel], data: dict, source: str = "<dict>"):
    """``model(**data)`` (a task's experiment config); errors name ``source`` and the offending keys."""
    try:
        return model(**data)
    except ValidationError as e:
        raise ProckdError(f"config error in {source}: {format_errors(e)}") from None
    except ProckdError as e:
        raise ProckdError(f"config error in {source}: {e}") from None
