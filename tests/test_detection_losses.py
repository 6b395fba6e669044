"""Detection distillation losses against direct computations and analytic cases."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from prockd.detection.methods.fbkd import (
    DetFBKDParams,
    NonLocal2d,
    fbkd_level_losses,
    pooled_attention,
)
from prockd.detection.methods.fgd import (
    DetFGDParams,
    GcBlock,
    fgd_attention,
    fgd_level_loss,
    fgd_masks,
)
from prockd.detection.methods.mgd import mgd_sum_loss
from prockd.detection.methods.ssim_kd import minmax
from prockd.losses import cwd_loss


def test_cwd_level_loss_is_tau2_kl_over_n_c():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    tau = 2.0
    total = 0.0
    for n in range(2):
        for c in range(3):
            p = torch.softmax(t[n, c].flatten() / tau, 0)
            q = torch.softmax(s[n, c].flatten() / tau, 0)
            total += float((p * (p.log() - q.log())).sum())
    assert math.isclose(float(cwd_loss(s, t, tau)), tau * tau * total / 6, rel_tol=1e-5)


def test_mgd_sum_loss_direct():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    direct = sum(float(((a[i] - b[i]) ** 2).sum()) for i in range(3)) / 3
    assert math.isclose(float(mgd_sum_loss(a, b)), direct, rel_tol=1e-6)


def test_fgd_masks_hand_computed():
    # one 8x8 image padded to 8x8, a 4x4 grid (stride 2); a box (2, 2)-(6, 4) covers cells x 1..3, y 1..2
    fg, bg = fgd_masks([torch.tensor([[2.0, 2.0, 6.0, 4.0]])], (8, 8), (4, 4))
    expect = torch.zeros(4, 4)
    expect[1:3, 1:4] = 1.0 / (2 * 3)
    assert torch.allclose(fg[0], expect)
    assert torch.allclose(bg[0], (expect == 0).float() / 10)
    # overlapping boxes keep the larger value (the smaller box)
    fg2, _ = fgd_masks([torch.tensor([[0.0, 0.0, 8.0, 8.0], [2.0, 2.0, 4.0, 4.0]])], (8, 8), (4, 4))
    assert math.isclose(float(fg2[0, 1, 1]), 1.0 / 4) and math.isclose(float(fg2[0, 0, 0]), 1.0 / 16)


def test_fgd_masks_match_cell_by_cell_definition():
    # random boxes (overlapping, touching the border, one image without boxes), cell by cell: a cell of box
    # [floor(x0 w / W), ceil(x1 w / W)] x [floor(y0 h / H), ceil(y1 h / H)] (clamped) holds max 1 / area
    g = torch.Generator().manual_seed(3)
    boxes = []
    for m in (5, 0, 3):
        xy = torch.rand(m, 2, generator=g) * 40
        boxes.append(torch.cat([xy, (xy + torch.rand(m, 2, generator=g) * 30).clamp(max=48)], 1))
    for hw in ((6, 8), (3, 4), (12, 16)):
        fg, bg = fgd_masks(boxes, (36, 48), hw)
        h, w = hw
        for i, b in enumerate(boxes):
            ref = torch.zeros(h, w)
            for x0, y0, x1, y1 in b.tolist():
                c0, c1 = min(max(math.floor(x0 / 48 * w), 0), w - 1), min(max(math.ceil(x1 / 48 * w), 0), w - 1)
                r0, r1 = min(max(math.floor(y0 / 36 * h), 0), h - 1), min(max(math.ceil(y1 / 36 * h), 0), h - 1)
                for r in range(r0, r1 + 1):
                    for c in range(c0, c1 + 1):
                        ref[r, c] = max(float(ref[r, c]), 1.0 / ((r1 - r0 + 1) * (c1 - c0 + 1)))
            assert torch.allclose(fg[i], ref)
            off = (ref == 0).float()
            assert torch.allclose(bg[i], off / off.sum() if off.sum() > 0 else off)


def test_fgd_attention_of_a_constant_map_is_uniform_one():
    sp, ch = fgd_attention(torch.full((2, 3, 4, 5), -0.7), 0.5)
    assert torch.allclose(sp, torch.ones_like(sp)) and torch.allclose(ch, torch.ones_like(ch))


def test_fgd_level_loss_against_loops():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    fg, bg = fgd_masks([torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.tensor([[4.0, 4.0, 8.0, 8.0]])],
                       (8, 8), (4, 4))
    p = DetFGDParams(alpha=1.0, beta=1.0, gamma=1.0, lambda_global=1.0, temperature=0.5)
    gc_s, gc_t = GcBlock(3), GcBlock(3)
    out = fgd_level_loss(s, t, fg, bg, gc_s, gc_t, p)
    sp_t, ch_t = fgd_attention(t, 0.5)
    sp_s, ch_s = fgd_attention(s, 0.5)
    fg_d = bg_d = 0.0
    for n in range(2):
        for c in range(3):
            for i in range(4):
                for j in range(4):
                    d = float((s[n, c, i, j] - t[n, c, i, j]) ** 2 * sp_t[n, i, j] * ch_t[n, c])
                    fg_d += d * float(fg[n, i, j])
                    bg_d += d * float(bg[n, i, j])
    assert math.isclose(float(out["fg"]), fg_d / 2, rel_tol=1e-5)
    assert math.isclose(float(out["bg"]), bg_d / 2, rel_tol=1e-5)
    att = (float((ch_s - ch_t).abs().sum()) + float((sp_s - sp_t).abs().sum())) / 2
    assert math.isclose(float(out["att"]), att, rel_tol=1e-5)
    # GcBlocks start as the identity (zero-initialised last conv): the global term is the plain L2 / N
    assert math.isclose(float(out["global"].detach()), float(((s - t) ** 2).sum()) / 2, rel_tol=1e-5)


def test_gcblock_context_is_attention_pooling():
    g = torch.Generator().manual_seed(3)
    blk = GcBlock(4)
    torch.nn.init.normal_(blk.add[-1].weight)
    x = torch.randn(1, 4, 3, 3, generator=g)
    w = torch.softmax(blk.mask(x).flatten(), 0)
    ctx = (x.flatten(2)[0] * w).sum(-1).view(1, 4, 1, 1)
    assert torch.allclose(blk(x), x + blk.add(ctx), atol=1e-6)


def test_fbkd_paper_recipe_analytic_case():
    # constant |features|: every attention and mask is 1, the non-local blocks start as the identity, so
    # feat = sqrt(sum (T - S)^2), attention terms 0, non-local = the same root-sum-square
    s = torch.full((2, 4, 3, 3), 0.5)
    t = -torch.full((2, 4, 3, 3), 0.5)
    p = DetFBKDParams(recipe="paper", alpha=1, gamma_channel=1, gamma_spatial=1, beta=1)
    mod = torch.nn.ModuleDict({"nl_s": NonLocal2d(4), "nl_t": NonLocal2d(4)})
    out = fbkd_level_losses(s, t, mod, p)
    rss = math.sqrt(float(((t - s) ** 2).sum()))
    assert math.isclose(float(out["feat"]), rss, rel_tol=1e-5)
    assert float(out["att_channel"]) < 1e-6 and float(out["att_spatial"]) < 1e-6
    assert math.isclose(out["nonlocal"].item(), rss, rel_tol=1e-5)


def test_fbkd_masks_and_attention_against_direct_formula():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(1, 3, 2, 2, generator=g), torch.randn(1, 3, 2, 2, generator=g)
    temp = 0.5
    p = DetFBKDParams(recipe="paper", alpha=1, gamma_channel=1, gamma_spatial=1, beta=0)
    mod = torch.nn.ModuleDict({"nl_s": NonLocal2d(3), "nl_t": NonLocal2d(3)})
    out = fbkd_level_losses(s, t, mod, p)
    gs = lambda f: f.abs().mean(1)[0].flatten()  # noqa: E731
    gc = lambda f: f.abs().mean((2, 3))[0]  # noqa: E731
    ms = 4 * torch.softmax((gs(s) + gs(t)) / temp, 0)
    mc = 3 * torch.softmax((gc(s) + gc(t)) / temp, 0)
    total = 0.0
    for c in range(3):
        for k in range(4):
            total += float((t[0, c].flatten()[k] - s[0, c].flatten()[k]) ** 2 * ms[k] * mc[c])
    assert math.isclose(float(out["feat"]), math.sqrt(total), rel_tol=1e-5)
    a_s = lambda f: 4 * torch.softmax(gs(f) / temp, 0)  # noqa: E731
    a_c = lambda f: 3 * torch.softmax(gc(f) / temp, 0)  # noqa: E731
    assert math.isclose(float(out["att_spatial"]), float((a_s(s) - a_s(t)).abs().sum()), rel_tol=1e-5)
    assert math.isclose(float(out["att_channel"]), float((a_c(s) - a_c(t)).abs().sum()), rel_tol=1e-5)
    assert torch.allclose(pooled_attention(s, temp)["as"].flatten(), a_s(s), atol=1e-6)


def test_non_local_block_direct():
    g = torch.Generator().manual_seed(5)
    blk = NonLocal2d(4)
    torch.nn.init.normal_(blk.out.weight)
    x = torch.randn(1, 4, 4, 4, generator=g)
    q = blk.theta(x).flatten(2)[0].t()
    kv = F.max_pool2d(x, 2)
    k, v = blk.phi(kv).flatten(2)[0], blk.g(kv).flatten(2)[0].t()
    y = torch.softmax(q @ k, -1) @ v
    expect = x + blk.out(y.t().reshape(1, 2, 4, 4))
    assert torch.allclose(blk(x), expect, atol=1e-5)


def test_ssim_kd_minmax_and_identity():
    from prockd.losses import ssim

    f = torch.randn(2, 3, 8, 8)
    m = minmax(f)
    assert torch.allclose(m.flatten(1).min(1).values, torch.zeros(2)) and torch.allclose(m.flatten(1).max(1).values, torch.ones(2))
    assert math.isclose(float(ssim(m, m, 11, 1.5, 1e-4, 9e-4)), 1.0, rel_tol=1e-5)
