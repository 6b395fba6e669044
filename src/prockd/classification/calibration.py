"""How good a KL target is beyond its accuracy: negative log-likelihood, mean confidence and expected calibration
error (Guo, Pleiss, Sun, Weinberger, "On calibration of modern neural networks", ICML 2017) of a method's
teacher-side classifier (:meth:`Distiller.kl_target`) on held-out images (docs/research/method-log.md, "The KL target's
calibration")."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prockd.classification.data import ArrayDataset
from prockd.classification.methods.base import Distiller


def calibration(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict[str, float]:
    """Top-1 accuracy (%), NLL (nats), mean max-probability (%) and ECE (%, ``bins`` equal-width confidence bins:
    ``Σ_b |B_b| / n · |acc(B_b) - conf(B_b)|``) of ``logits`` (``N x C``) against ``labels``."""
    logits, labels = logits.detach().double(), labels.long()
    prob = F.softmax(logits, -1)
    conf, pred = prob.max(-1)
    right = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    which = torch.bucketize(conf, edges[1:-1], right=True)  # bin b holds (edges[b], edges[b + 1]]
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.double().mean() * (right[m].mean() - conf[m].mean()).abs()
    return {"acc": float(right.mean() * 100), "nll": float(F.cross_entropy(logits, labels)),
            "confidence": float(conf.mean() * 100), "ece": float(ece * 100)}


@torch.no_grad()
def kl_target_calibration(distiller: Distiller, ds: ArrayDataset, batch_size: int = 256,
                          bins: int = 15) -> dict[str, float] | None:
    """:func:`calibration` of ``distiller``'s KL target on ``ds`` (None for a method without one)."""
    distiller.eval()
    out, ys = [], []
    for x, y, _ in ds.batches(batch_size):
        z = distiller.kl_target(x)
        if z is None:
            return None
        out.append(z.float().cpu())
        ys.append(y)
    return calibration(torch.cat(out), torch.cat(ys), bins)
