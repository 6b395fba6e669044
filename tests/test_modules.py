"""Each ProC-KD equation against a direct loop implementation (method.md; paper eqs. 1-4)."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from prockd.features import Layout
from prockd.losses import kl_div
from prockd.prototypes import (
    EmbeddingDistill,
    FeatureAugmentation,
    PrototypeLearning,
    TapFusion,
)

torch.manual_seed(0)


def _loop_aggregate(pl, fused, protos):
    b, n, c = fused.shape
    k = protos.shape[0]
    out = torch.zeros(b, k * c, dtype=torch.float64)
    for bi in range(b):
        fh = [fused[bi, j] / fused[bi, j].norm().clamp_min(1e-12) for j in range(n)]
        logits = [pl.assign.weight @ fh[j] + pl.assign.bias for j in range(n)]
        a = [torch.exp(l_) / torch.exp(l_).sum() for l_ in logits]  # softmax over the K prototypes
        vs = []
        for i in range(k):
            v = sum(a[j][i] * (fh[j] - protos[i]) for j in range(n))  # eq. 1
            vs.append(v / v.norm().clamp_min(1e-12))  # intra-normalisation
        flat = torch.cat(vs)
        out[bi] = flat / flat.norm().clamp_min(1e-12)
    return out


def test_pl_aggregation_matches_loop():
    pl = PrototypeLearning(6, 4).double()
    fused = torch.randn(3, 7, 6, dtype=torch.float64)
    protos = torch.rand(4, 6, dtype=torch.float64)
    vr, a = pl.aggregate(fused, protos)
    assert torch.allclose(vr, _loop_aggregate(pl, fused, protos), atol=1e-10)
    assert torch.allclose(a.sum(-1), torch.ones(3, 7, dtype=torch.float64))


def test_pl_output_matches_loop():
    pl = PrototypeLearning(5, 3).double()
    fused = torch.randn(2, 4, 5, dtype=torch.float64)
    protos = torch.rand(3, 5, dtype=torch.float64)
    out = pl(fused, protos)
    vr = _loop_aggregate(pl, fused, protos)
    for b in range(2):
        g = pl.proj.weight @ vr[b] + pl.proj.bias  # V_r W_p + b_p
        for j in range(4):
            ref = pl.f(torch.cat([fused[b, j], g]))  # eq. 2: f(concat[F, g])
            assert torch.allclose(out[b, j], ref, atol=1e-10)


def test_pl_segments_match_separate_calls():
    # each segment of tokens aggregated and given its own global term, as if passed alone (detection: FPN levels)
    pl = PrototypeLearning(5, 3).double()
    fused = torch.randn(2, 9, 5, dtype=torch.float64)
    protos = torch.rand(3, 5, dtype=torch.float64)
    segs = [4, 1, 4]
    out, a = pl.forward_with_assignment(fused, protos, segs)
    vr, _ = pl.aggregate_segments(fused, protos, segs)
    for i, (x, ref_x) in enumerate(zip(out.split(segs, 1), fused.split(segs, 1))):
        assert torch.allclose(x, pl(ref_x, protos), atol=1e-10)
        assert torch.allclose(vr[:, i], _loop_aggregate(pl, ref_x, protos), atol=1e-10)
    assert torch.allclose(a.sum(-1), torch.ones(2, 9, dtype=torch.float64))


def test_fa_matches_loop():
    fa = FeatureAugmentation(5).double()
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    protos = torch.rand(3, 5, dtype=torch.float64)
    out = fa(x, protos)
    e = fa.encoder
    p1 = [e.weight @ protos[i] + e.bias for i in range(3)]
    for b in range(2):
        for j in range(6):
            fe = e.weight @ x[b, j] + e.bias
            logits = torch.stack([fe @ p for p in p1])
            a = torch.exp(logits) / torch.exp(logits).sum()  # eq. 3
            ctx = sum(a[i] * p1[i] for i in range(3))
            ref = torch.relu(fa.phi(torch.cat([fe, ctx])) + x[b, j])  # eq. 4
            assert torch.allclose(out[b, j], ref, atol=1e-10)


def test_fa_scaled_attention():
    fa = FeatureAugmentation(4, scale=True).double()
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    p = torch.rand(2, 4, dtype=torch.float64)
    fe, p1, a = fa.attention(x, p)
    assert torch.allclose(a, torch.softmax(fe @ p1.t() / 2.0, -1))


def test_fusion_and_kl_direct():
    fu = TapFusion(6, 3)
    t = torch.randn(2, 4, 6)
    assert torch.allclose(fu(t), torch.clamp(t @ fu.proj.weight.t() + fu.proj.bias, min=0), atol=1e-6)
    p, q = torch.randn(4, 5), torch.randn(4, 5)
    for temp in (1.0, 4.0):
        ps, qs = torch.softmax(p / temp, -1), torch.softmax(q / temp, -1)
        ref = sum(float((ps[b] * (ps[b] / qs[b]).log()).sum()) for b in range(4)) / 4 * temp * temp
        assert abs(float(kl_div(p, q, temp)) - ref) < 1e-5
    assert float(kl_div(p, p, 2.0)) < 1e-6  # analytic: identical distributions


def test_embedding_distill_direct_and_zero():
    ed = EmbeddingDistill(3, 2)
    s = torch.randn(2, 1 + 4, 3)  # one prefix token, 2x2 grid
    t = torch.randn(2, 16, 2)  # 4x4 teacher map
    loss = ed(s, Layout(1, 2, 2), t, Layout(0, 4, 4))
    tm = t.transpose(1, 2).reshape(2, 2, 4, 4)
    pooled = torch.stack([tm[..., i * 2:(i + 1) * 2, j * 2:(j + 1) * 2].mean((-1, -2))
                          for i in range(2) for j in range(2)], dim=-1).transpose(1, 2)
    ref = ((s[:, 1:] @ ed.proj.weight.t() + ed.proj.bias - pooled) ** 2).mean()
    assert torch.allclose(loss, ref, atol=1e-6)
    with torch.no_grad():
        ed.proj.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
        ed.proj.bias.zero_()
    same = s[:, 1:, :2]
    assert float(ed(s, Layout(1, 2, 2), same, Layout(0, 2, 2)).detach()) < 1e-12  # analytic zero


class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor):
                self.max = max(self.max, o.numel())
        return out


def test_pl_never_materialises_bkcn():
    b, n, c, k = 4, 50, 32, 16
    pl = PrototypeLearning(c, k)
    fused = torch.randn(b, n, c, requires_grad=True)
    protos = torch.rand(k, c, requires_grad=True)
    with _MaxNumel() as m:
        pl(fused, protos).sum().backward()
    assert m.max < b * k * c * n / 4, m.max  # largest tensor is far below B*K*C*N
