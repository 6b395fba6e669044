"""SKD as the ProC-KD paper cites it: Zhang & Ma, "Structured Knowledge Distillation for Accurate and
Efficient Object Detection", TPAMI 2023 — the journal version of their ICLR 2021 attention-guided + non-local
distillation (not the SSIM-based method of de Rijk et al. 2022, which is ``ssim_kd``).

The losses are those of :mod:`.fbkd` with the paper's equations (``recipe: paper``): masks
``HW softmax((G^S_s + G^S_t)/T)`` and ``C softmax((G^C_s + G^C_t)/T)``, the attention loss between the
attentions themselves (no adaptation layers), the masked feature loss and the non-local loss, weights
7e-5 / 4e-3 / 4e-3 / 7e-5, T 0.5. The two names differ only in these recipe details: one method family.
"""
from __future__ import annotations

from typing import Literal

from prockd.detection.methods.base import DET_METHODS
from prockd.detection.methods.fbkd import DetFBKD, DetFBKDParams


class DetSKDParams(DetFBKDParams):
    """The journal paper's equations by default."""

    recipe: Literal["mmrazor", "paper"] = "paper"


@DET_METHODS.register("skd_zhang_ma")
class DetSKDZhangMa(DetFBKD):
    """Structured KD (attention-guided + non-local) of Zhang & Ma 2023."""

    Params = DetSKDParams
    prefix = "skd"
