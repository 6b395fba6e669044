"""ProC-KD modules (Li et al., "Prototype-guided cross-task knowledge distillation", FITEE 2025).

- :class:`TapFusion`: ``F = ReLU(Linear_{sum C_t -> C}(concat[T_1..T_m]))`` (teacher width -> student width).
- :class:`PrototypeLearning` (PL, training only): NetVLAD-style residual aggregation on the prototypes,
  paper eq. 1, and ``O_pro = f(concat[F, V_r W_p + b_p])``, eq. 2.
- :class:`FeatureAugmentation` (FA, deployed): ``A = softmax(F_e P_1^T)``, eq. 3, and
  ``O_aug = ReLU(Phi(concat[F_e, A P_1]) + F_r)``, eq. 4.
- :class:`EmbeddingDistill`: MSE between the student's and the teacher's embedding-layer outputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from prockd.features import Layout, resample_tokens


def _mlp2(c: int) -> nn.Sequential:
    """1x1 conv (2C -> C) -> ReLU -> 1x1 conv (C -> C) -> ReLU, as per-token linears."""
    return nn.Sequential(nn.Linear(2 * c, c), nn.ReLU(), nn.Linear(c, c), nn.ReLU())


def token_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each distribution along the last axis."""
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the distributions along the last axis."""
    return token_entropy(p).mean()


def prototype_usage(a: torch.Tensor, threshold: float = 0.01) -> torch.Tensor:
    """Number of prototypes that receive at least ``threshold`` of the total assignment mass of ``a`` (``... x K``)."""
    mass = a.reshape(-1, a.shape[-1]).float().mean(0)
    return (mass >= threshold).sum()


def mean_prob_logits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Log of the mean of the two softmax distributions (the "avg" output of plain and augmented heads)."""
    return (a.softmax(-1) + b.softmax(-1)).log() - math.log(2.0)


class TapFusion(nn.Module):
    """Fuse m teacher taps (already on one grid, concatenated): ``ReLU(Linear(concat))`` to width C."""

    def __init__(self, in_width: int, width: int):
        super().__init__()
        self.proj = nn.Linear(in_width, width)

    def forward(self, taps: torch.Tensor) -> torch.Tensor:
        """``B x N x sum(C_t)`` -> ``B x N x C``."""
        return F.relu(self.proj(taps))


class PrototypeLearning(nn.Module):
    """PL module: soft-assigns normalised teacher tokens to K prototypes and aggregates residuals.

    ``V_i = sum_j a_ji (F̂_j - p_i)`` is computed as ``Aᵀ F̂ - (sum_j a_ji) p_i`` (one einsum), so no
    ``B x K x C x N`` tensor is ever built.
    """

    def __init__(self, width: int, num_prototypes: int, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature  # of the soft assignment, softmax(L / τ) (the paper: τ = 1)
        self.assign = nn.Linear(width, num_prototypes)  # W_a, b_a (1x1 conv C -> K)
        self.proj = nn.Linear(num_prototypes * width, width)  # W_p, b_p
        self.f = _mlp2(width)

    def aggregate(self, fused: torch.Tensor, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (V_r ``B x K*C``, assignment ``B x N x K``) for fused tokens ``B x N x C``."""
        vr, a = self.aggregate_segments(fused, prototypes)
        return vr[:, 0], a

    def aggregate_segments(self, fused: torch.Tensor, prototypes: torch.Tensor,
                           segments: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(V_r ``B x S x K*C``, assignment ``B x N x K``): eq. 1 on each of ``S`` consecutive token segments of
        ``fused`` (lengths ``segments``, summing to N; default one segment), as separate calls would give.

        The per-token parts (normalisation, assignment logits, softmax) run once on all tokens; only the
        residual sums are per segment (detection: the FPN levels of one image, aggregated level by level).
        """
        fh = F.normalize(fused, dim=-1)
        logits = self.assign(fh)
        a = torch.softmax(logits / self.temperature if self.temperature != 1.0 else logits, dim=-1)
        segments = segments or [fh.shape[1]]
        vs = []
        for fs, as_ in zip(fh.split(segments, 1), a.split(segments, 1)):
            v = torch.einsum("bnk,bnc->bkc", as_, fs) - as_.sum(1).unsqueeze(-1) * prototypes.unsqueeze(0)
            vs.append(F.normalize(F.normalize(v, dim=-1).flatten(1), dim=-1))
        return torch.stack(vs, 1), a

    def forward(self, fused: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """``O_pro = f(concat[F, V_r W_p + b_p])`` with the global term broadcast to every token.

        The first layer of ``f`` on ``concat[F, g]`` (eq. 2) is computed as ``W_F F + (W_g g + b)``, its weight split
        into the columns that multiply ``F`` and those that multiply ``g``: the global half once per image instead of
        once per token, and no ``B x N x 2C`` concatenation. tests/test_modules.py checks it against ``f(concat[F,
        g])`` token by token.
        """
        return self.forward_with_assignment(fused, prototypes)[0]

    def forward_with_assignment(self, fused: torch.Tensor, prototypes: torch.Tensor,
                                segments: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(``O_pro``, soft assignment ``B x N x K``); with ``segments``, each segment of tokens gets its own
        global term (eq. 1 on that segment), as if each were passed alone."""
        vr, a = self.aggregate_segments(fused, prototypes, segments)
        first, c = self.f[0], fused.shape[-1]
        # W_p (K*C x C: 14 M parameters at ViT-B's width with K = 24) multiplies one row per image: under autocast the
        # casts of its weights to bf16 and of their gradient back cost more than the product itself, so it runs in the
        # parameters' own dtype (paper scale, bf16, batch 4, one CPU thread: the casts were 49 of the 288 ms ProC-KD
        # added to a step; docs/research/vit.md, "PL / FA at the paper's scale")
        with torch.autocast(vr.device.type, enabled=False):
            gv = self.proj(vr.to(self.proj.weight.dtype))
        g = F.linear(gv, first.weight[:, c:], first.bias)  # B x S x C
        if g.shape[1] > 1:
            g = g.repeat_interleave(torch.tensor(segments, device=g.device), dim=1)
        h = F.linear(fused, first.weight[:, :c]) + g
        return self.f[3](self.f[2](self.f[1](h))), a


class FeatureAugmentation(nn.Module):
    """FA module, kept in the deployed student: prototype attention on tokens with a shared encoder E."""

    def __init__(self, width: int, scale: bool = False):
        super().__init__()
        self.encoder = nn.Linear(width, width)  # E, shared by tokens and prototypes
        self.phi = _mlp2(width)
        self.scale = scale

    def attention(self, x: torch.Tensor, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(F_e, P_1, A) with ``A = softmax(F_e P_1ᵀ)`` over the K prototypes."""
        fe = self.encoder(x)
        p1 = self.encoder(prototypes)
        logits = fe @ p1.t()
        if self.scale:
            logits = logits / math.sqrt(fe.shape[-1])
        return fe, p1, torch.softmax(logits, dim=-1)

    def forward(self, x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """``O_aug = ReLU(Phi(concat[F_e, A P_1]) + F_r)``, residual ``F_r = x``.

        Phi's first layer on ``concat[F_e, A P_1]`` is computed as ``W_e F_e + A (P_1 W_pᵀ) + b``: the
        prototype half is projected once per step (K rows) instead of once per token.
        """
        return self.forward_with_attention(x, prototypes)[0]

    def forward_with_attention(self, x: torch.Tensor, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``O_aug``, attention ``A`` ``B x N x K``)."""
        fe, p1, a = self.attention(x, prototypes)
        first, c = self.phi[0], fe.shape[-1]
        h = F.linear(fe, first.weight[:, :c], first.bias) + a @ F.linear(p1, first.weight[:, c:])
        return F.relu(self.phi[3](self.phi[2](self.phi[1](h))) + x), a


class EmbeddingDistill(nn.Module):
    """Embedding-layer distillation: MSE(proj(student embedding), teacher embedding on the student grid).

    The teacher's map is area-pooled (or bilinearly upsampled) to the student's grid; a per-token linear
    (1x1 conv) projects the student's width to the teacher's. Prefix tokens are not compared.
    """

    def __init__(self, student_width: int, teacher_width: int):
        super().__init__()
        self.proj = nn.Linear(student_width, teacher_width)

    def forward(self, s: torch.Tensor, s_layout: Layout, t: torch.Tensor, t_layout: Layout) -> torch.Tensor:
        """Mean squared error over grid tokens and channels."""
        t, _ = resample_tokens(t, t_layout, (s_layout.h, s_layout.w))
        return F.mse_loss(self.proj(s[:, s_layout.prefix:]), t[:, t_layout.prefix:].to(s.dtype))
