"""Distillation methods: one file and one class each, registered by name."""
from prockd.methods.base import METHODS, Distiller  # noqa: F401
from prockd.methods import fitnets, kd, prockd, rkd, student_only  # noqa: F401,E402  (registration)

__all__ = ["METHODS", "Distiller"]
