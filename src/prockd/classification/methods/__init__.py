"""Distillation methods: one file and one class each, registered by name."""
from prockd.classification.methods import (  # noqa: F401,E402
    ab,
    aft,
    attention_probe,
    cwd,
    dkd,
    fbkd,
    finetune_distil,
    fitnets,
    inverted_projector,
    kd,
    mgd,  # noqa: F401,E402
    ofd,
    pkd_pearson,
    pkd_projector,
    probe_distil,
    prockd,
    refilled,
    rkd,
    ssim_kd,
    student_only,  # noqa: F401,E402  (registration)
    vid,
)
from prockd.classification.methods.base import METHODS, Distiller  # noqa: F401
from prockd.core.registry import method_params as _validated


def method_params(cfg):
    """The classification run's method class and validated ``Params`` (:func:`prockd.core.registry.method_params`)."""
    return _validated(METHODS, cfg)


__all__ = ["METHODS", "Distiller", "method_params"]
