"""Detection distillers, one file each, registered in :data:`DET_METHODS` (names as on the classification
side where the method is the same: ``cwd``, ``mgd``, ``fbkd``, ``pkd_pearson``, ``ssim_kd``, ``prockd``; plus
``fgd`` and ``skd_zhang_ma``, the SKD the paper's tables cite)."""
from prockd.detection.methods import (  # noqa: F401
                                      cwd,
                                      fbkd,
                                      fgd,
                                      mgd,
                                      pkd,
                                      prockd,
                                      roi_kd,
                                      skd_zhang_ma,
                                      ssim_kd,
                                      student_only,
)
from prockd.detection.methods.base import DET_METHODS, DetDistiller  # noqa: F401
