"""Probe-then-distil: a linear probe on the frozen teacher's features, trained on the student's labels, then
KL from the probe to the student.

Marrie, Arbel, Mairal, Larlus, "Good practices for task-specific distillation of large pretrained visual
models", TMLR 2024: the teacher is first adapted to the student's task (here, as the teacher stays frozen,
by a linear probe on its pooled taps, as in their probing variant), then the student is trained with
``L = CE(z_s, y) + λ T² KL(softmax(probe(t) / T) ‖ softmax(z_s / T))``. The probe is fitted once before
training (full-batch L-BFGS on the standardised pooled features of every labelled training view,
L2-regularised, deterministic) and frozen; the KL then runs on every image the step sees, unlabelled ones
and function-matching mixtures included, where the probe says more than the labels.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from prockd.classification.methods.base import METHODS, Distiller, FittedKLParams
from prockd.connectors import pooled
from prockd.prototypes import entropy


class ProbeDistilParams(FittedKLParams):
    """KL weight, temperature and the probe's fit."""

    weight: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    probe_l2: float = Field(1e-3, ge=0)  # L2 penalty of the probe's weights (on standardised features)
    probe_iters: int = Field(200, ge=1)  # L-BFGS iterations of the full-batch fit
    # function matching (Beyer et al., CVPR 2022): the KL also on mixup / cutmix mixtures of the batch's images
    function_matching: Literal["none", "mixup", "cutmix"] = "none"


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
                     iters: int, offset: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight ``K x D``, bias ``K``) minimising ``CE(x W^T + b + offset, y) + l2 · ||W||²`` by full-batch L-BFGS
    (float64, zero start: deterministic); ``offset`` (``K``): the logit adjustment ``τ log π`` (0: the plain CE)."""
    x, y = x.double(), y.long()
    offset = torch.as_tensor(offset, dtype=torch.float64)
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.t() + b + offset, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


@METHODS.register("probe_distil")
class ProbeDistil(Distiller):
    """Linear probe on the teacher's pooled taps (fitted on the labelled views), KL from it to the student."""

    Params = ProbeDistilParams
    teacher_keys = ("taps",)

    def __init__(self, student, teacher, params, num_classes):
        super().__init__(student, teacher, params, num_classes)
        d = sum(teacher.tap_widths)
        self.probe = nn.Linear(d, num_classes)
        nn.init.zeros_(self.probe.weight)
        nn.init.zeros_(self.probe.bias)
        self.probe.requires_grad_(False)  # fitted in prepare(), then frozen (kept in the state for resumes)
        self.register_buffer("feat_mean", torch.zeros(d))
        self.register_buffer("feat_std", torch.ones(d))
        self._stats: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def prepare(self, teacher_feats, seed: int = 0, labelled=None) -> None:
        """Fit the probe on the standardised pooled teacher features of every labelled training item (with
        ``logit_adjust``, by the logit-adjusted CE: the probe, the KL's target, estimates balanced posteriors)."""
        feats, labels = labelled()
        t = pooled(feats["taps"].float(), self.teacher.tap_layout).cpu()
        mean, std = t.mean(0), t.std(0).clamp_min(1e-6)
        adj = self.logit_adjustment(torch.float64)
        w, b = fit_linear_probe((t - mean) / std, labels.cpu(), self.num_classes, self.params.probe_l2,
                                self.params.probe_iters, adj.cpu() if torch.is_tensor(adj) else adj)
        dev = self.probe.weight.device
        self.feat_mean.copy_(mean.to(dev))
        self.feat_std.copy_(std.to(dev))
        self.probe.weight.copy_(w.float().to(dev))
        self.probe.bias.copy_(b.float().to(dev))

    def probe_logits(self, taps: torch.Tensor) -> torch.Tensor:
        """The probe's logits for teacher taps ``B x N x sum(C_t)``."""
        t = pooled(taps.float(), self.teacher.tap_layout)
        return self.probe((t - self.feat_mean) / self.feat_std)

    def forward(self, images, targets, teacher_feats=None):
        """(z_s, {"ce", "kl"})."""
        z_s = self.student(images)
        z_p = self.probe_logits(self.teacher_features(images, teacher_feats)["taps"])
        with torch.no_grad():
            sharp = self.kl_target_logits(z_p)
            self._stats = {"kl_target_entropy": entropy(F.softmax(sharp / self.params.temperature, -1))}
        return z_s, {"ce": self.ce(z_s, targets),
                     "kl": self.params.weight * self.fitted_kl(z_p, z_s.float(), self.params.temperature)}

    def step_stats(self) -> dict[str, float]:
        """Entropy of the probe's soft labels on the last batch (the conduit's informativeness)."""
        return {k: float(v) for k, v in self._stats.items()}

    @torch.no_grad()
    def kl_target(self, images):
        """The probe's logits on held-out images (live teacher), divided by ``kl_target_temperature`` as the KL
        sees them."""
        return self.kl_target_logits(self.probe_logits(self.teacher.extract_heldout(images, ("taps",))["taps"]))

    @torch.no_grad()
    def diagnostics(self, images, targets):
        """The probe's accuracy on held-out images (live teacher): what the KL can transfer at most."""
        z_p = self.kl_target(images)
        return {"acc_probe": float((z_p.argmax(-1) == targets).float().mean() * 100)}
