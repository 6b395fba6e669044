"""prockd: prototype-guided cross-task knowledge distillation (ProC-KD).

Li, Li, Wu, Han, "Prototype-guided cross-task knowledge distillation",
Frontiers of Information Technology & Electronic Engineering 26(6), 2025 (arXiv:2212.13180).
"""
from prockd.errors import ProckdError

__version__ = "0.1.0"
__all__ = ["ProckdError", "__version__"]
