"""ProC-KD: prototype-guided cross-task knowledge distillation.

Li, Li, Wu, Han, "Prototype-guided cross-task knowledge distillation", Frontiers of Information
Technology & Electronic Engineering 26(6):912-929, 2025 (arXiv:2212.13180).

Loss (classification; every weight configurable):
``L = CE(z_s, y) + λ_aug CE(z_aug, y) + λ_kl T² KL(softmax(z_aug/T) ‖ softmax(z_s/T)) + λ_emb L_emb``.

- Variant A (authors' code): in training FA runs on the PL output ``O_pro`` (teacher path) and the
  student's own head gives ``z_aug``; at test FA runs on the student's last tokens.
- Variant B (paper wording): FA runs on the student's tokens in training too (``z_aug``), and the PL
  prototypes are trained on the teacher path through FA and the head (``z_pro``, CE with weight
  λ_aug), with the KL term pulling ``z_aug`` towards ``z_pro``.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from prockd.methods.base import METHODS, Distiller
from prockd.modules import (EmbeddingDistill, FeatureAugmentation, PrototypeLearning, TapFusion,
                            mean_prob_logits)


class ProCKDParams(BaseModel):
    """ProC-KD hyper-parameters (method.md: fixed parts are not parameters; these are defaults)."""

    model_config = ConfigDict(extra="forbid")
    num_prototypes: int = Field(24, ge=1)
    variant: Literal["A", "B"] = "B"  # measured better and steadier than A on the embedded benchmark
    lambda_aug: float = Field(1.0, ge=0)
    lambda_kl: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    lambda_emb: float = Field(1.0, ge=0)
    detach_kl_target: bool = True
    # uniform [0, 1) as in the authors' code; normal N(0, 0.02²); kmeans: k-means centres of the fused,
    # L2-normalised teacher tokens of the first training images (with the initial fusion layer)
    proto_init: Literal["uniform", "normal", "kmeans"] = "uniform"
    fa_scale: bool = False
    # what the deployed student predicts: the plain head (z_s), FA on its tokens (z_aug) or their average;
    # "auto": z_aug for variant B (FA is trained on the student's tokens), z_s for variant A (FA is trained
    # on the teacher path only and measured several points worse on the student's tokens)
    deploy_output: Literal["auto", "plain", "aug", "avg"] = "auto"

    def resolved_output(self) -> str:
        """The deploy output with "auto" resolved."""
        if self.deploy_output != "auto":
            return self.deploy_output
        return "aug" if self.variant == "B" else "plain"


def kl_div(p_logits: torch.Tensor, q_logits: torch.Tensor, t: float) -> torch.Tensor:
    """``T² · KL(softmax(p/T) ‖ softmax(q/T))`` averaged over the batch."""
    logp = F.log_softmax(p_logits / t, dim=-1)
    logq = F.log_softmax(q_logits / t, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).mean() * t * t


@METHODS.register("prockd")
class ProCKD(Distiller):
    """ProC-KD distiller: prototypes P (K x C), PL (training only), FA (deployed), embedding distillation."""

    Params = ProCKDParams
    uses_student_embed = True

    def __init__(self, student, teacher, params: ProCKDParams, num_classes: int):
        super().__init__(student, teacher, params, num_classes)
        c = student.width
        k = params.num_prototypes
        init = torch.rand(k, c) if params.proto_init == "uniform" else torch.randn(k, c) * 0.02
        self.prototypes = nn.Parameter(init)
        self.fusion = TapFusion(sum(teacher.tap_widths), c)
        self.pl = PrototypeLearning(c, k)
        self.fa = FeatureAugmentation(c, scale=params.fa_scale)
        self.emb = None
        if params.lambda_emb > 0 and teacher.embed_path and student.embed_path:
            self.emb = EmbeddingDistill(student.embed_width, teacher.embed_width)

    @torch.no_grad()
    def prepare(self, teacher_feats, seed: int = 0) -> None:
        """Data-dependent initialisation: k-means prototypes when ``proto_init == "kmeans"``."""
        if self.params.proto_init != "kmeans":
            return
        from sklearn.cluster import KMeans

        fh = F.normalize(self.fusion(teacher_feats()["taps"].to(self.prototypes.device)), dim=-1)
        x = fh.reshape(-1, fh.shape[-1]).double().cpu().numpy()
        km = KMeans(self.params.num_prototypes, n_init=3, random_state=seed).fit(x)
        self.prototypes.copy_(torch.from_numpy(km.cluster_centers_).to(self.prototypes))

    def forward(self, images, targets, teacher_feats=None):
        """(z_s, {"ce", "ce_aug", "kl", "emb"}); see the module docstring for the two variants."""
        p = self.params
        tok, lay, emb = self.student.features(images)
        z_s = self.student.head(tok, lay)
        tf = self.teacher_features(images, teacher_feats)
        t_lay = self.teacher.tap_layout
        o_pro = self.pl(self.fusion(tf["taps"].to(tok.dtype)), self.prototypes)
        z_pro = self.student.head(self.fa(o_pro, self.prototypes), t_lay)
        losses = {"ce": F.cross_entropy(z_s, targets)}
        if p.variant == "A":
            z_aug = z_pro
            losses["ce_aug"] = p.lambda_aug * F.cross_entropy(z_aug, targets)
            target = z_aug
        else:
            z_aug = self.student.head(self.fa(tok, self.prototypes), lay)
            losses["ce_aug"] = p.lambda_aug * (F.cross_entropy(z_aug, targets) + F.cross_entropy(z_pro, targets))
            target = z_pro
        if p.lambda_kl > 0:
            if p.detach_kl_target:
                target = target.detach()
            student_side = z_s if p.variant == "A" else z_aug
            losses["kl"] = p.lambda_kl * kl_div(target, student_side, p.temperature)
        if self.emb is not None:
            losses["emb"] = p.lambda_emb * self.emb(emb, self.student.embed_layout, tf["embed"],
                                                    self.teacher.embed_layout)
        return z_s, losses

    @torch.no_grad()
    def predict(self, images):
        """Logits of the plain head (z_s), of FA on the student's tokens (z_aug), their average, deployed."""
        tok, lay, _ = self.student.features(images)
        plain = self.student.head(tok, lay)
        aug = self.student.head(self.fa(tok, self.prototypes), lay)
        out = {"plain": plain, "aug": aug, "avg": mean_prob_logits(plain, aug)}
        out["deployed"] = out[self.params.resolved_output()]
        return out

    def export(self):
        """Deployable student: backbone + FA + prototypes (no PL, no fusion, no teacher)."""
        from prockd.deploy import DeployedStudent

        return DeployedStudent(self.student, self.fa, self.prototypes, self.params.resolved_output())
