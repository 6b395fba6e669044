"""The one place that maps a task name to its pieces: its config, and its side of every command
(:mod:`prockd.commands.classification`, :mod:`prockd.commands.detection`)."""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import yaml
from pydantic import BaseModel

from prockd.classification.config import build_config, load_config
from prockd.core.config import apply_run_overrides, read_config_file

from prockd.detection.config import build_det_config
from prockd.errors import ProckdError

# each task's side of the commands, imported when a command needs it (torch and the models load then): loading
# and validating a config stays light, so a bad config is reported at once
TASKS: dict[str, str] = {"classification": "prockd.commands.classification", "detection": "prockd.commands.detection"}


def task_name(cfg: BaseModel | dict) -> str:
    """``detection`` for a config (object or raw dict) with ``task: detection``, else ``classification``."""
    value = cfg.get("task") if isinstance(cfg, dict) else getattr(cfg, "task", None)
    return value or "classification"


def commands(task: str) -> ModuleType:
    """The task's side of the commands."""
    if task not in TASKS:
        raise ProckdError(f"unknown task '{task}' (known: {', '.join(TASKS)})")
    return importlib.import_module(TASKS[task])


def build_any_config(data: dict, source: str = "<dict>"):
    """A raw config dict (overrides applied) validated as its task's experiment config; errors name ``source``."""
    if task_name(data) == "detection":
        return build_det_config(data, source)
    return build_config(data, source)


def load_any_config(path: str | Path, overrides: list[str] = ()):
    """A classification :class:`~prockd.classification.config.ExperimentConfig` or, for files with ``task:
    detection``, a :class:`~prockd.detection.config.DetExperimentConfig` (same ``base:`` files and overrides)."""
    try:
        data = apply_run_overrides(read_config_file(path), list(overrides))
        if task_name(data) == "detection":
            return build_det_config(data, str(path))
        return load_config(path, overrides)
    except ProckdError as e:
        if not overrides:
            raise
        try:  # the file alone is valid: the command line's overrides are what is wrong, and the error names them
            load_any_config(path, ())
        except ProckdError:
            raise e from None
        keys = [o for o in overrides if o.split("=", 1)[0] in str(e)] or list(overrides)
        said = str(e).removeprefix(f"config error in {path}: ")
        raise ProckdError(f"config error in the override{'s' if len(keys) > 1 else ''} "
                          f"{', '.join(repr(k) for k in keys)} (on {path}): {said}") from None


def run_task(run: Path) -> str:
    """The task of a finished run directory (from its ``config.yaml``)."""
    cfg_file = Path(run) / "config.yaml"
    data = yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else None
    return task_name(data or {})
