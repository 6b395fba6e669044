"""Every baseline loss against a direct computation of its equation and an analytic case."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prockd.classification.methods.ab import ab_loss
from prockd.classification.methods.attention_probe import probe_attention
from prockd.classification.methods.dkd import dkd_terms
from prockd.classification.methods.fbkd import fbkd_losses
from prockd.classification.methods.ofd import ofd_loss, ofd_margin
from prockd.classification.methods.pkd_projector import batch_whiten, projector_loss
from prockd.classification.methods.refilled import centre_soft_labels, relation_kl
from prockd.classification.methods.vid import vid_nll
from prockd.features import Layout
from prockd.losses import cwd_loss, kl_div, mgd_mask, pearson_loss, ssim

D = torch.float64


def _maps(seed=0, shape=(2, 3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=D), torch.randn(*shape, generator=g, dtype=D)


def test_ab_matches_elementwise_definition_and_is_zero_beyond_margin():
    s, t = _maps(1)
    m = 0.7
    ref = 0.0
    for v_s, v_t in zip(s.flatten().tolist(), t.flatten().tolist()):
        if v_t <= 0 and v_s > -m:
            ref += (v_s + m) ** 2
        elif v_t > 0 and v_s <= m:
            ref += (v_s - m) ** 2
    assert float(ab_loss(s, t, m)) == pytest.approx(ref / s.numel(), rel=1e-12)
    # every student neuron on the teacher's side, beyond the margin: no loss
    assert float(ab_loss(torch.where(t > 0, m + 1.0, -m - 1.0), t, m)) == 0.0


def test_ofd_margin_and_partial_l2_direct():
    s, t = _maps(2)
    marg = ofd_margin(t)
    for c in range(t.shape[1]):
        neg = [v for v in t[:, c].flatten().tolist() if v < 0]
        assert float(marg[c]) == pytest.approx(sum(neg) / len(neg), rel=1e-12)
    ref = 0.0
    for b, c, i, j in itertools.product(*map(range, s.shape)):
        tgt = max(float(t[b, c, i, j]), float(marg[c]))
        v = float(s[b, c, i, j])
        if not (v <= tgt and tgt <= 0):
            ref += (v - tgt) ** 2
    assert float(ofd_loss(s, t, marg)) == pytest.approx(ref / s.numel(), rel=1e-12)
    # analytic: the student equal to the margin-ReLU target, or anywhere below a negative target
    target = torch.maximum(t, marg.view(1, -1, 1, 1))
    assert float(ofd_loss(target, t, marg)) == 0.0
    assert float(ofd_loss(torch.full_like(t, -50.0), torch.full_like(t, -1.0), torch.full((3,), -1.0, dtype=D))) == 0.0


def test_fbkd_direct_and_zero_for_identical_maps():
    s, t = _maps(3, (2, 3, 2, 3))
    tau = 0.5
    b, c, h, w = s.shape

    def att(f):
        a = f.abs().numpy()
        sp = np.zeros((b, h, w))
        ch = np.zeros((b, c))
        for k in range(b):
            e = np.exp(a[k].mean(0) / tau)
            sp[k] = h * w * e / e.sum()
            e = np.exp(a[k].mean((1, 2)) / tau)
            ch[k] = c * e / e.sum()
        return sp, ch

    sp_t, ch_t = att(t)
    sp_s, ch_s = att(s)
    diff = (t - s).numpy() ** 2
    feat = np.mean([diff[k, ci, i, j] * sp_t[k, i, j] * ch_t[k, ci]
                    for k, ci, i, j in itertools.product(range(b), range(c), range(h), range(w))])
    attn = np.abs(sp_t - sp_s).mean() + np.abs(ch_t - ch_s).mean()
    f, a = fbkd_losses(s, t, tau)
    assert float(f) == pytest.approx(feat, rel=1e-10) and float(a) == pytest.approx(attn, rel=1e-10)
    f, a = fbkd_losses(t, t, tau)
    assert float(f) == 0.0 and float(a) == 0.0


def test_pearson_is_one_minus_mean_channel_correlation_and_affine_invariant():
    s, t = _maps(4, (3, 4, 3, 3))
    r = [np.corrcoef(s[:, c].flatten().numpy(), t[:, c].flatten().numpy())[0, 1] for c in range(4)]
    assert float(pearson_loss(s, t)) == pytest.approx(1 - np.mean(r), abs=1e-5)
    scale = torch.tensor([2.0, 0.5, 3.0, 7.0], dtype=D).view(1, -1, 1, 1)
    assert float(pearson_loss(scale * t + 4.0, t)) < 1e-6


def test_cwd_direct_and_zero_for_identical_maps():
    s, t = _maps(5)
    tau = 4.0
    ref = 0.0
    for b, c in itertools.product(range(2), range(3)):
        ps = np.exp(s[b, c].flatten().numpy() / tau)
        pt = np.exp(t[b, c].flatten().numpy() / tau)
        ps, pt = ps / ps.sum(), pt / pt.sum()
        ref += (pt * np.log(pt / ps)).sum()
    assert float(cwd_loss(s, t, tau)) == pytest.approx(tau ** 2 * ref / 6, rel=1e-10)
    assert abs(float(cwd_loss(t, t, tau))) < 1e-12


def test_mgd_mask_ratio_and_shared_over_channels():
    torch.manual_seed(0)
    s = torch.ones(64, 5, 8, 8)
    m = mgd_mask(s, 0.65)
    assert m.shape == (64, 1, 8, 8) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(1 - m.mean()) - 0.65) < 0.02
    assert float(mgd_mask(s, 0.0).min()) == 1.0


def _ssim_direct(s, t, k, sigma, c1, c2):
    x = np.arange(k) - (k - 1) / 2
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    vals = []
    for b, c in itertools.product(range(s.shape[0]), range(s.shape[1])):
        a, bb = s[b, c].numpy(), t[b, c].numpy()
        for i in range(a.shape[0] - k + 1):
            for j in range(a.shape[1] - k + 1):
                pa, pb = a[i:i + k, j:j + k], bb[i:i + k, j:j + k]
                ma, mb = (win * pa).sum(), (win * pb).sum()
                va, vb = (win * (pa - ma) ** 2).sum(), (win * (pb - mb) ** 2).sum()
                cov = (win * (pa - ma) * (pb - mb)).sum()
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_windowed_statistics_and_is_one_for_identical_maps():
    s, t = _maps(6, (2, 2, 6, 7))
    assert float(ssim(s, t, 3, 1.5, 1e-4, 9e-4)) == pytest.approx(_ssim_direct(s, t, 3, 1.5, 1e-4, 9e-4), rel=1e-9)
    # the window shrinks to a map smaller than it
    assert float(ssim(s, t, 11, 1.5, 1e-4, 9e-4)) == pytest.approx(_ssim_direct(s, t, 6, 1.5, 1e-4, 9e-4), rel=1e-9)
    assert float(ssim(t, t)) == pytest.approx(1.0, abs=1e-12)


def test_vid_is_gaussian_negative_log_likelihood():
    mean, t = _maps(7)
    var = torch.tensor([0.5, 2.0, 3.0], dtype=D)
    nll = -torch.distributions.Normal(mean, var.sqrt().view(1, -1, 1, 1)).log_prob(t).mean()
    assert float(vid_nll(mean, var, t)) == pytest.approx(float(nll) - 0.5 * math.log(2 * math.pi), rel=1e-12)


def test_dkd_terms_direct_and_kd_decomposition():
    g = torch.Generator().manual_seed(8)
    zs, zt = torch.randn(4, 6, generator=g, dtype=D), torch.randn(4, 6, generator=g, dtype=D)
    y = torch.tensor([0, 3, 5, 3])
    T = 2.0
    tckd, nckd = dkd_terms(zs, zt, y, T)
    ref_t, ref_n = 0.0, 0.0
    for i in range(4):
        ps, pt = F.softmax(zs[i] / T, -1).numpy(), F.softmax(zt[i] / T, -1).numpy()
        bs, bt = np.array([ps[y[i]], 1 - ps[y[i]]]), np.array([pt[y[i]], 1 - pt[y[i]]])
        ref_t += (bt * np.log(bt / bs)).sum()
        keep = [k for k in range(6) if k != y[i]]
        qs, qt = ps[keep] / ps[keep].sum(), pt[keep] / pt[keep].sum()
        ref_n += (qt * np.log(qt / qs)).sum()
    assert float(tckd) == pytest.approx(T * T * ref_t / 4, rel=1e-9)
    assert float(nckd) == pytest.approx(T * T * ref_n / 4, rel=1e-9)
    # the paper's identity, per sample: KD = TCKD + (1 - p_t^target) NCKD
    for i in range(4):
        a, b = dkd_terms(zs[i:i + 1], zt[i:i + 1], y[i:i + 1], T)
        p_gt = float(F.softmax(zt[i] / T, -1)[y[i]])
        assert float(kl_div(zt[i:i + 1], zs[i:i + 1], T)) == pytest.approx(float(a) + (1 - p_gt) * float(b), rel=1e-9)


def test_projector_loss_direct_and_batch_whitening():
    g = torch.Generator().manual_seed(9)
    ps, t = torch.randn(5, 4, generator=g, dtype=D), torch.randn(5, 4, generator=g, dtype=D) * 3 + 2
    bn = torch.nn.BatchNorm1d(4, affine=False).double().train()
    tw = batch_whiten(t)
    assert torch.allclose(tw, bn(t), atol=1e-12)
    ref = math.log(sum(abs(a - b) ** 4 for a, b in zip(ps.flatten().tolist(), tw.flatten().tolist())))
    assert float(projector_loss(ps, tw, 4.0)) == pytest.approx(ref, rel=1e-12)


def test_probe_attention_direct_with_and_without_class_token():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 5, 3, generator=g, dtype=D)  # 1 class token + 2x2 grid
    a = probe_attention(x, Layout(1, 2, 2), tau=2.0)
    for b in range(2):
        logits = [float(x[b, 0] @ x[b, j]) / (math.sqrt(3) * 2.0) for j in range(1, 5)]
        e = np.exp(logits)
        assert np.allclose(a[b].numpy(), e / e.sum(), atol=1e-12)
    a0 = probe_attention(x[:, 1:], Layout(0, 2, 2))
    for b in range(2):
        q = x[b, 1:].mean(0)
        e = np.exp([float(q @ x[b, j]) / math.sqrt(3) for j in range(1, 5)])
        assert np.allclose(a0[b].numpy(), e / e.sum(), atol=1e-12)


def test_relation_kl_direct_and_scale_invariant():
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(5, 3, generator=g, dtype=D), torch.randn(5, 4, generator=g, dtype=D)
    tau = 0.5

    def probs(e):
        e = F.normalize(e, dim=-1).numpy()
        out = np.zeros((5, 5))
        for i in range(5):
            w = np.array([np.exp(-((e[i] - e[j]) ** 2).sum() / tau) if j != i else 0.0 for j in range(5)])
            out[i] = w / w.sum()
        return out

    ps, pt = probs(s), probs(t)
    ref = np.mean([sum(pt[i, j] * np.log(pt[i, j] / ps[i, j]) for j in range(5) if j != i) for i in range(5)])
    assert float(relation_kl(s, t, tau)) == pytest.approx(ref, rel=1e-9)
    assert abs(float(relation_kl(3.0 * t, t, tau))) < 1e-12


def test_centre_soft_labels_direct():
    g = torch.Generator().manual_seed(12)
    t = torch.randn(6, 3, generator=g, dtype=D)
    y = torch.tensor([4, 1, 4, 1, 2, 4])
    classes, q = centre_soft_labels(t, y, 0.5)
    assert classes.tolist() == [1, 2, 4]
    tn = F.normalize(t, dim=-1)
    centres = [tn[y == c].mean(0) for c in (1, 2, 4)]
    for i in range(6):
        e = np.exp([-float(((tn[i] - m) ** 2).sum()) / 0.5 for m in centres])
        assert np.allclose(q[i].numpy(), e / e.sum(), atol=1e-12)
