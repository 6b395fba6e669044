"""What every config shares, whatever the task: strict pydantic sections (unknown keys are errors naming the key
and the file), YAML files with ``base:`` files, ``key=value`` overrides, the method section, config files that
ship inside the package (``configs/...``)."""
from __future__ import annotations

import copy
import difflib
import inspect
import re
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

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


class CorruptionConfig(Strict):
    """A shifted test domain built from the clean test split (:func:`prockd.shifts.corrupt`)."""

    kind: Literal["fog", "contrast", "noise"]
    severity: int = Field(3, ge=1, le=5)


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (``X``, ``X | None``, ``list[X]``, ``dict[str, X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models_in(a)]


def section_keys(model: type[BaseModel] | None, loc: tuple) -> list[str] | None:
    """The keys the section at ``loc`` (a pydantic error location, list indices and dict keys included) of
    ``model`` accepts; None when it is not a known section."""
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int) or part not in model.model_fields:
            continue  # an index into a list or a key of a mapping: same section model
        found = _models_in(model.model_fields[part].annotation)
        model = found[0] if found else None
    return list(model.model_fields) if model is not None else None


def format_errors(e: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    """A pydantic error as one line of 'dotted.key': message parts (``prefix`` before every key). With the
    validated ``model``, an unknown key says which known key it is near (did you mean) and lists the section's
    keys."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if prefix:
            loc = f"{prefix}.{loc}" if loc else prefix
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            known = section_keys(model, tuple(err["loc"][:-1])) if model is not None else None
            if known:
                near = difflib.get_close_matches(str(err["loc"][-1]), known, n=3, cutoff=0.6)
                msg += (f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else "") + \
                    f" (this section's keys: {', '.join(known)}; all keys: docs/config.md)"
        parts.append(f"'{loc}': {msg}" if loc else msg)
    return "; ".join(parts)


def apply_run_overrides(data: dict, overrides: list[str]) -> dict:
    """:func:`apply_overrides`, where an override that switches ``method.name`` without setting ``method.params``
    starts the new method from its default parameters (the file's parameters belong to the file's method)."""
    overrides = list(overrides)
    old_method = (data.get("method") or {}).get("name")
    merged = apply_overrides(data, overrides)
    if (merged.get("method") or {}).get("name") != old_method and isinstance(data.get("method"), dict):
        data = copy.deepcopy(data)
        data["method"]["params"] = {}
        merged = apply_overrides(data, overrides)
    return merged


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
        raise ProckdError(f"config error in {source}: {format_errors(e, model=model)}") from None
    except ProckdError as e:
        raise ProckdError(f"config error in {source}: {e}") from None


def _field_comments(model: type[BaseModel]) -> dict[str, str]:
    """Each field's comment in ``model``'s source: the ``# ...`` at the end of its line, else the comment lines
    right above it."""
    try:
        lines = inspect.getsource(model).splitlines()
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines[1:]:
        text = line.strip()
        m = re.match(r"^([A-Za-z_]\w*)\s*:[^#]*?(?:#\s*(.*))?$", text)
        if text.startswith("#"):
            above.append(text.lstrip("#").strip())
            continue
        if m and m.group(1) in model.model_fields:
            out[m.group(1)] = m.group(2) or " ".join(above)
        above = []
    return out


def _type_name(annotation) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "")
    return re.sub(r"(?:[\w.]+\.)(\w+)", r"\1", text).replace("NoneType", "None")


def _default_text(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        return "{}" if isinstance(value, BaseModel) else f"`{value!r}`"
    return f"`{field.default!r}`"


def config_reference(roots: list[tuple[str, type[BaseModel]]]) -> str:
    """A Markdown key reference of config models (each section's keys with type, default and the comment of its
    source line), for docs/config.md; ``roots``: (title, top-level model) per task."""
    out = ["# Config keys", "",
           "Every key of an experiment config, generated from the config models (`python scripts/gen_config_docs.py`;"
           " a test checks this page is current). A key not listed is an error that names it and suggests the nearest"
           " known key.", ""]
    for title, root in roots:
        out += [f"## {title}", ""]
        seen: set = set()
        queue: list[tuple[str, type[BaseModel]]] = [("", root)]
        while queue:
            path, model = queue.pop(0)
            if model in seen and path:
                out += [f"### `{path}`", "", f"Same keys as {model.__name__} above.", ""]
                continue
            seen.add(model)
            lines, nested = key_table(model, path)
            out += [f"### `{path or '(top level)'}`" + f" — {model.__name__}", "", _first_paragraph(model), "",
                    *lines, ""]
            queue = nested + queue
    return "\n".join(out).rstrip() + "\n"


def _first_paragraph(model) -> str:
    return " ".join((inspect.getdoc(model) or "").split("\n\n")[0].split())


def key_table(model: type[BaseModel], path: str = "") -> tuple[list[str], list[tuple[str, type[BaseModel]]]]:
    """(the Markdown table of ``model``'s keys: type, default and the comment of its source line, inherited keys
    included; the nested sections to describe next)."""
    notes: dict[str, str] = {}
    for klass in reversed(model.__mro__):  # a key's comment where it is declared (a base class's, for inherited keys)
        if isinstance(klass, type) and issubclass(klass, BaseModel) and klass is not BaseModel:
            notes.update({k: v for k, v in _field_comments(klass).items() if v})
    lines, nested = ["| key | type | default | meaning |", "|---|---|---|---|"], []
    for name, field in model.model_fields.items():
        key = f"{path}.{name}" if path else name
        subs = _models_in(field.annotation)
        meaning = (notes.get(name) or (f"section, see `{key}`" if subs else "")).replace("|", "\\|")
        typ = _type_name(field.annotation).replace("|", "\\|")
        default = _default_text(field).replace("|", "\\|")
        lines.append(f"| `{name}` | `{typ}` | {default} | {meaning} |")
        nested += [(key, m) for m in subs[:1]]
    return lines, nested


def method_reference(registries: list[tuple[str, object]]) -> str:
    """The ``method.params`` keys of every registered method (``registries``: (task title, registry) pairs), each
    method's parameters with their types, defaults and comments: the rest of docs/config.md."""
    out = ["## Method parameters (`method.params`)", "",
           "Each method's own keys, generated from its parameter model; an unknown key is an error with the nearest "
           "known key. `method.name` picks the method.", ""]
    for title, registry in registries:
        for name in registry.names():
            params = registry.get(name).Params
            lines, _ = key_table(params, "method.params")
            out += [f"### {title}: `{name}` — {params.__name__}", "", _first_paragraph(params), "", *lines, ""]
    return "\n".join(out).rstrip() + "\n"
