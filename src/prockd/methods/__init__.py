"""Distillation methods: one file and one class each, registered by name."""
from prockd.methods.base import METHODS, Distiller  # noqa: F401
from prockd.methods import (ab, attention_probe, cwd, dkd, fbkd, fitnets, kd, mgd, ofd, pkd_pearson,  # noqa: F401,E402
                            pkd_projector, prockd, refilled, rkd, ssim_kd, student_only, vid)  # noqa: F401,E402  (registration)

__all__ = ["METHODS", "Distiller"]
