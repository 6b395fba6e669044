"""AB: knowledge transfer via distillation of activation boundaries.

Heo, Lee, Yun, Choi, "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden
Neurons", AAAI 2019. The student (through a conv + BN connector, pre-activation) is pushed to the
teacher's side of every neuron's activation boundary with a margin ``m``:
``L = Σ (s + m)² 1[s > -m, t ≤ 0] + (s - m)² 1[s ≤ m, t > 0]``, averaged here over elements
(the authors sum and divide by the batch size: multiply ``weight`` by ``C·h·w`` to match).
Works across label spaces. The paper uses AB as an initialisation stage; here it is a loss term
trained jointly with CE, as in the benchmark the ProC-KD paper reports ("ABLoss").
"""
from __future__ import annotations

import torch
from pydantic import Field

from prockd.classification.methods.base import METHODS, FeatureDistiller, MethodParams


class ABParams(MethodParams):
    """AB weight and margin."""

    weight: float = Field(1.0, ge=0)
    margin: float = Field(1.0, ge=0)


def ab_loss(s: torch.Tensor, t: torch.Tensor, margin: float) -> torch.Tensor:
    """Activation-boundary loss, mean over elements."""
    on = (t > 0).to(s.dtype)
    loss = (s + margin).pow(2) * ((s > -margin).to(s.dtype) * (1 - on)) + (s - margin).pow(2) * ((s <= margin).to(s.dtype) * on)
    return loss.mean()


@METHODS.register("ab")
class AB(FeatureDistiller):
    """Activation-boundary distillation on the student's last map (conv1x1 + BN connector)."""

    Params = ABParams
    connector_kind = "conv1x1_bn"
    loss_name = "ab"

    def feature_loss(self, s, t):
        """Activation-boundary loss."""
        return ab_loss(s, t, self.params.margin)
