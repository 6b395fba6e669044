"""Distillation methods: one file and one class each, registered by name."""
from prockd.methods.base import METHODS, Distiller  # noqa: F401
from prockd.methods import (ab, aft, attention_probe, cwd, dkd, fbkd, fitnets, inverted_projector, kd,  # noqa: F401,E402
                            mgd, ofd, pkd_pearson, pkd_projector, probe_distil, prockd, refilled, rkd, ssim_kd,  # noqa: F401,E402
                            student_only, vid)  # noqa: F401,E402  (registration)


def method_params(cfg):
    """The classification run's method class and validated ``Params`` (:func:`prockd.registry.method_params`)."""
    from prockd.registry import method_params as _validated

    return _validated(METHODS, cfg)


__all__ = ["METHODS", "Distiller", "method_params"]
