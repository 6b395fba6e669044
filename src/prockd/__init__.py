"""prockd: prototype-guided cross-task knowledge distillation (ProC-KD).

Li, Li, Wu, Han, "Prototype-guided cross-task knowledge distillation",
Frontiers of Information Technology & Electronic Engineering 26(6), 2025 (arXiv:2212.13180).

The Python API (docs/python.md): :func:`train`, :func:`build_distiller`, :func:`load_student`, :func:`compare`, :func:`evaluate`, :func:`export`,
:func:`init_config`, :func:`init_detection_config`
(from :mod:`prockd.api`, imported on first use so that ``import prockd`` and the CLI start fast).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prockd.errors import ProckdError

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load on first use
    from prockd.api import (DistillerModule, build_distiller, compare, evaluate, export, init_config,
                            init_detection_config, load_student, train)

__version__ = "0.1.0"
__all__ = ["DistillerModule", "ProckdError", "__version__", "build_distiller", "compare", "evaluate", "export",
           "init_config", "init_detection_config", "load_student", "train"]

_API = {"DistillerModule", "build_distiller", "compare", "evaluate", "export", "init_config", "init_detection_config",
        "load_student", "train"}


def __getattr__(name: str) -> Any:
    """The API's functions, imported from :mod:`prockd.api` on first use (torch and timm load then)."""
    if name in _API:
        from prockd import api

        return getattr(api, name)
    raise AttributeError(f"module 'prockd' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API)
