"""The cross-task methods newer than the paper (probe-then-distil, AFT, the inverted projector), function
matching's mixtures and the unlabelled transfer set: each equation against a direct computation and an
analytic case, and the engine's handling of unlabelled images."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prockd.classification.config import build_config
from prockd.classification.data import IGNORE, build_task
from prockd.classification.engine import build, mix_batch, step_pools, train
from prockd.classification.methods.aft import aft_loss, normalised_kernel
from prockd.classification.methods.probe_distil import fit_linear_probe

D = torch.float64


def test_aft_kernel_matches_direct_sums_and_is_zero_for_matching_features():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 3, generator=g, dtype=D), torch.randn(5, 4, generator=g, dtype=D)
    rho = torch.rand(4, generator=g, dtype=D)

    def kernel(x):
        n, d = x.shape
        mu = [sum(float(x[i, j]) for i in range(n)) / n for j in range(d)]
        c = [[float(x[i, j]) - mu[j] for j in range(d)] for i in range(n)]
        nr = [sum(v * v for v in row) ** 0.5 + 1e-8 for row in c]
        return [[sum(c[i][k] * c[j][k] for k in range(d)) / (nr[i] * nr[j]) for j in range(n)] for i in range(n)]

    ks, kt = kernel(s), kernel(t * rho)
    ref = (sum((ks[i][j] - kt[i][j]) ** 2 for i in range(5) for j in range(5)) / 25 + 1e-8) ** 0.5
    assert float(aft_loss(s, t, rho)) == pytest.approx(ref, rel=1e-10)
    # analytic: the student's features are the weighted teacher features (any positive scale): loss ~ sqrt(1e-8)
    assert float(aft_loss(3.0 * t * rho, t, rho)) == pytest.approx(1e-4, rel=1e-6)
    # a kernel's diagonal is 1 (unit rows after centring)
    assert torch.allclose(normalised_kernel(s).diagonal(), torch.ones(5, dtype=D), atol=1e-7)


def test_aft_feature_weights_learn_and_stay_out_of_weight_decay(tiny):
    b = build(build_config(tiny("aft")))
    assert b.distiller.feature_logits._no_decay
    x, y = b.task.train.images[:8].float() / 255, b.task.train.labels[:8]
    _, losses = b.distiller(x, y)
    losses["aft"].backward()
    assert b.distiller.feature_logits.grad is not None and b.distiller.feature_logits.grad.abs().sum() > 0


def test_inverted_projector_projects_the_teacher_onto_the_student():
    from prockd.classification.methods.inverted_projector import inverted_projector_loss
    from prockd.classification.methods.pkd_projector import batch_whiten

    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 3, generator=g, dtype=D), torch.randn(6, 5, generator=g, dtype=D)
    w = torch.randn(3, 5, generator=g, dtype=D)
    tw = (t - t.mean(0)) / (t.var(0, unbiased=False) + 1e-5).sqrt()
    ref = sum(float(s[i, j] - (tw[i] @ w[j])) ** 2 for i in range(6) for j in range(3)) / 18
    assert float(inverted_projector_loss(s, batch_whiten(t) @ w.t())) == pytest.approx(ref, rel=1e-9)
    # analytic: a student whose features are the projected teacher's has no loss
    assert float(inverted_projector_loss(tw @ w.t(), batch_whiten(t) @ w.t())) == pytest.approx(0.0, abs=1e-9)


def test_inverted_projector_maps_teacher_width_to_student_width(tiny):
    b = build(build_config(tiny("inverted_projector")))
    lin = b.distiller.projector.net
    assert lin.in_features == sum(b.teacher.tap_widths) and lin.out_features == b.distiller.student.head_width


def test_linear_probe_fit_reaches_the_analytic_optimum_on_separable_points():
    # two classes on a line, no penalty: the fitted probe separates them perfectly
    x = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]], dtype=D)
    y = torch.tensor([0, 0, 1, 1])
    w, b = fit_linear_probe(x, y, 2, l2=0.0, iters=100)
    assert ((x @ w.t() + b).argmax(-1) == y).all()
    # with a penalty the optimum satisfies the stationarity condition grad CE + 2 l2 W = 0
    w, b = fit_linear_probe(x, y, 2, l2=0.1, iters=200)
    w.requires_grad_(True)
    loss = F.cross_entropy(x @ w.t() + b, y)
    (gw,) = torch.autograd.grad(loss, w)
    assert torch.allclose(gw + 0.2 * w.detach(), torch.zeros_like(gw), atol=1e-6)


def test_probe_distil_fits_its_probe_before_training_and_distils_its_soft_labels(tiny, tmp_path):
    raw = tiny("probe_distil")
    raw["data"]["val_fraction"] = 0.2
    cfg = build_config(raw)
    b = build(cfg)
    assert float(b.distiller.probe.weight.abs().sum()) == 0.0  # no fit before prepare
    summary = train(cfg, tmp_path / "run", built=b, log=lambda *_: None)
    assert float(b.distiller.probe.weight.abs().sum()) > 0 and not b.distiller.probe.weight.requires_grad
    # the probe is fitted on the teacher's pooled features of the labelled training set: it classifies it
    feats = b.teacher.extract(b.task.train.images.float() / 255)
    acc = (b.distiller.probe_logits(feats["taps"]).argmax(-1) == b.task.train.labels).float().mean()
    assert acc > 0.9
    # the KL term is T^2 KL(softmax(probe/T) || softmax(z_s/T)) computed directly
    x, y = b.task.train.images[:6].float() / 255, b.task.train.labels[:6]
    b.distiller.eval()
    z_s, losses = b.distiller(x, y)
    zp = b.distiller.probe_logits(b.teacher.extract(x)["taps"]).double()
    p, q = F.softmax(zp, -1), F.softmax(z_s.double(), -1)
    ref = (p * (p.log() - q.log())).sum(-1).mean().detach()
    assert float(losses["kl"].detach()) == pytest.approx(float(ref), rel=1e-4)
    # the probe's validation accuracy is logged (what the KL can transfer at most) and so is its target's entropy
    assert 0 <= summary["final"]["val/acc_probe"] <= 100 and summary["final"]["train/kl_target_entropy"] >= 0


def test_mixup_and_cutmix_mix_pairs_of_the_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 8, 8, generator=g)
    m = mix_batch(x, "mixup", torch.Generator().manual_seed(3))
    gg = torch.Generator().manual_seed(3)
    perm, lam = torch.randperm(6, generator=gg), torch.rand(6, generator=gg, dtype=torch.float64)
    for i in range(6):
        assert torch.allclose(m[i], float(lam[i]) * x[i] + (1 - float(lam[i])) * x[perm[i]], atol=1e-6)
    c = mix_batch(x, "cutmix", torch.Generator().manual_seed(3))
    for i in range(6):  # every pixel comes from image i or from its partner, the partner's in one box
        from_partner = (c[i] == x[perm[i]]) & (c[i] != x[i])
        assert torch.all((c[i] == x[i]) | (c[i] == x[perm[i]]))
        rows, cols = from_partner[0].any(1).nonzero(), from_partner[0].any(0).nonzero()
        if len(rows):
            box = from_partner[0][rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert box.all()
            area = box.numel() / 64
            assert area == pytest.approx(1 - float(lam[i]), abs=0.25)


def _unlabeled_dir(tmp_path, n=12):
    from PIL import Image

    d = tmp_path / "unlabeled" / "any"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return tmp_path / "unlabeled"


def test_unlabeled_folder_becomes_a_transfer_set_in_the_training_images_shape(tiny, tmp_path):
    raw = tiny("rkd")
    raw["data"]["unlabeled"] = {"dir": str(_unlabeled_dir(tmp_path)), "limit": 10}
    task = build_task(build_config(raw).data)
    assert task.unlabeled.images.shape == (10, *task.train.images.shape[1:])
    assert torch.all(task.unlabeled.labels == IGNORE) and task.info["unlabeled_count"] == 10


@pytest.mark.parametrize("bad, message", [({"dir": "/nonexistent/x"}, "folder not found"),
                                          ({"glyph_fonts": 3}, "is for data.name=glyphs"),
                                          ({}, "exactly one source")])
def test_unlabeled_config_errors_name_the_key(tiny, bad, message):
    from prockd.errors import ProckdError

    raw = tiny("rkd")
    raw["data"]["unlabeled"] = bad
    with pytest.raises(ProckdError, match=message):
        build_task(build_config(raw).data)


@pytest.mark.parametrize("method", ["prockd", "rkd", "refilled", "probe_distil"])
def test_unlabeled_images_reach_distillation_but_not_cross_entropy(tiny, tmp_path, method):
    raw = tiny(method)
    raw["data"]["unlabeled"] = {"dir": str(_unlabeled_dir(tmp_path)), "batch_size": 5}
    raw["train"].update(augment="affine", aug_views=2)
    cfg = build_config(raw)
    b = build(cfg)
    pools = step_pools(b.task, cfg.train)
    assert len(pools.cached) == 2 * len(b.task.train) + 2 * len(b.task.unlabeled) and pools.offset == 2 * len(b.task.train)
    lab = torch.arange(0, len(b.task.train), len(b.task.train) // 6)[:6]  # several classes
    x = torch.cat([pools.views.images[lab], pools.unlabeled.take(torch.arange(5))]).float() / 255
    y = torch.cat([pools.views.labels[lab], pools.unlabeled.labels[:5]])
    assert len(torch.unique(y[:6])) > 1
    b.distiller.eval()
    torch.manual_seed(0)
    _, mixed = b.distiller(x, y)
    torch.manual_seed(0)
    _, labelled_only = b.distiller(x[:6], y[:6])
    # CE is the labelled images' alone; the distillation terms differ (they see the unlabelled images)
    mixed, labelled_only = ({k: v.detach() for k, v in d.items()} for d in (mixed, labelled_only))
    assert float(mixed["ce"]) == pytest.approx(float(labelled_only["ce"]), rel=1e-5)
    others = [k for k in mixed if k not in ("ce", "ce_aug", "emb")]
    assert others and any(abs(float(mixed[k]) - float(labelled_only[k])) > 1e-6 for k in others)
    assert all(torch.isfinite(v) for v in mixed.values())


def test_a_run_with_unlabeled_images_and_function_matching_trains_and_resumes_the_same(tiny, tmp_path):
    raw = tiny("prockd")
    raw["method"]["params"]["function_matching"] = "cutmix"
    raw["data"]["unlabeled"] = {"dir": str(_unlabeled_dir(tmp_path)), "batch_size": 4}
    raw["train"].update(augment="affine", aug_views=2, epochs=2)
    raw["data"]["val_fraction"] = 0.2
    s = train(build_config(raw), tmp_path / "a", log=lambda *_: None)
    assert s["final"]["loss/kl"] > 0 and "val/conduit_gap" in s["final"]
    assert "train/kl_target_entropy" in s["final"]
    s2 = train(build_config(copy.deepcopy(raw)), tmp_path / "b", log=lambda *_: None)
    assert s2["final"]["val/deployed"] == s["final"]["val/deployed"]
    assert s2["final"]["loss/kl"] == pytest.approx(s["final"]["loss/kl"], rel=1e-6)


def test_unlabeled_draws_leave_the_labelled_batches_unchanged(tiny, tmp_path):
    """The unlabelled draws come from their own generator: the first step's labelled images are those of the
    run without a transfer set."""
    from prockd.classification.engine import step_batch
    from prockd.core import distributed as ddp

    raw = tiny("rkd")
    raw["train"].update(augment="affine", aug_views=2)
    plain_cfg = build_config(raw)
    raw_u = copy.deepcopy(raw)
    raw_u["data"]["unlabeled"] = {"dir": str(_unlabeled_dir(tmp_path)), "batch_size": 3}
    u_cfg = build_config(raw_u)
    outs = []
    for cfg in (plain_cfg, u_cfg):
        b = build(cfg)
        pools = step_pools(b.task, cfg.train)
        g = torch.Generator().manual_seed(5)
        x, y, idx = next(b.task.train.batches(8, torch.Generator().manual_seed(1)))
        outs.append(step_batch(b, cfg, x, y, idx, pools, None, g, torch.Generator().manual_seed(9),
                                ddp.DistInfo()))
    (xp, yp, _, _), (xu, yu, _, _) = outs
    assert torch.equal(xu[:8], xp) and torch.equal(yu[:8], yp) and torch.all(yu[8:] == IGNORE) and len(yu) == 11


def test_function_matching_feeds_mixtures_with_the_teachers_features_of_those_pixels(tiny, tmp_path):
    from prockd.classification.cache import TeacherCache
    from prockd.classification.engine import step_batch
    from prockd.core import distributed as ddp

    raw = tiny("probe_distil")
    raw["method"]["params"]["function_matching"] = "mixup"
    raw["train"].update(augment="affine", aug_views=2)
    cfg = build_config(raw)
    b = build(cfg)
    pools = step_pools(b.task, cfg.train)
    cache = TeacherCache(b.teacher, pools.cached, tmp_path / "c", "float32").prepare()
    x, y, idx = next(b.task.train.batches(6, torch.Generator().manual_seed(1)))
    xs, ys, tf, _ = step_batch(b, cfg, x, y, idx, pools, cache, torch.Generator().manual_seed(2),
                                torch.Generator().manual_seed(3), ddp.DistInfo())
    assert len(xs) == 12 and torch.all(ys[6:] == IGNORE) and torch.equal(ys[:6], y)
    live = b.teacher.extract(xs)
    for k in tf:  # the clean half from the cache, the mixtures from a live teacher on exactly those pixels
        assert torch.allclose(tf[k], live[k], atol=1e-4), k
    # the mixtures are convex combinations of two clean images of the batch
    g = torch.Generator().manual_seed(3)
    perm, lam = torch.randperm(6, generator=g), torch.rand(6, generator=g, dtype=torch.float64)
    ref = lam.float().view(-1, 1, 1, 1) * xs[:6] + (1 - lam.float().view(-1, 1, 1, 1)) * xs[:6][perm]
    assert torch.allclose(xs[6:], ref, atol=1e-6)


@pytest.mark.parametrize("cached", [True, False])
def test_student_noise_gives_the_teacher_the_clean_pixels_and_the_student_the_noisy_ones(tiny, tmp_path, cached):
    """Asymmetric views (train.student_noise): the teacher's features are those of the clean batch (mixtures
    included), the student's images are the clean ones plus the drawn Gaussian noise, clamped; 0 draws nothing;
    with student_noise_teacher "noisy" the teacher's features are those of the student's noisy copy."""
    from prockd.classification.cache import TeacherCache
    from prockd.classification.engine import step_batch
    from prockd.core import distributed as ddp

    raw = tiny("probe_distil")
    raw["method"]["params"]["function_matching"] = "mixup"
    raw["train"].update(augment="affine", aug_views=2 if cached else 0)

    def batch(noise, sees="clean", p=1.0):
        r = copy.deepcopy(raw)
        r["train"].update(student_noise=noise, student_noise_teacher=sees, student_noise_p=p)
        cfg = build_config(r)
        b = build(cfg)
        pools = step_pools(b.task, cfg.train)
        cache = TeacherCache(b.teacher, pools.cached, tmp_path / f"c{noise}", "float32").prepare() if cached else None
        x, y, idx = next(b.task.train.batches(6, torch.Generator().manual_seed(1)))
        gu = torch.Generator().manual_seed(3)
        out = step_batch(b, cfg, x, y, idx, pools, cache, torch.Generator().manual_seed(2), gu, ddp.DistInfo())
        return b, out, gu

    b, (xc, yc, tfc, _), gc = batch(0.0)
    _, (xn, yn, tfn, _), _ = batch(0.25)
    assert torch.equal(yn, yc) and len(xn) == 12
    live = b.teacher.extract(xc)  # the clean batch (views and mixtures) as the run without noise has it
    for k in live:
        assert torch.allclose(tfn[k].float(), live[k].float(), atol=1e-4), k
    if cached:
        assert tfc is not None
    # the student's copy: the same generator state after the mixtures, then one randn draw of the batch's shape
    noise = torch.randn(xc.shape, generator=gc)
    ref = (xc + 0.25 * noise).clamp(0, 1)
    assert torch.allclose(xn, ref, atol=1e-6) and not torch.equal(xn, xc)
    assert 0.2 < float((xn - xc)[(ref > 0) & (ref < 1)].std()) < 0.3
    # the symmetric control: the same noisy pixels, the teacher's features are those of the noisy copy
    _, (xs, _, tfs, _), _ = batch(0.25, "noisy")
    assert torch.equal(xs, xn)
    on_noisy = b.teacher.extract(xn)
    for k in on_noisy:
        assert torch.allclose(tfs[k].float(), on_noisy[k].float(), atol=1e-4), k
        assert not torch.allclose(tfs[k].float(), live[k].float(), atol=1e-2), k
    # student_noise_p: after the same noise draw, one uniform per image; those >= p keep their clean pixels, the
    # others are the noisy copy above; the teacher's features stay those of the clean batch
    _, (xp, _, tfp, _), _ = batch(0.25, p=0.5)
    _, _, g0 = batch(0.0)  # the generator as the noise finds it (0 draws nothing)
    torch.randn(xc.shape, generator=g0)  # replays the run's draws: the noise, then the per-image choice
    clean = torch.rand(len(xc), generator=g0) >= 0.5
    assert 0 < int(clean.sum()) < len(xc)
    assert torch.equal(xp[clean], xc[clean]) and torch.allclose(xp[~clean], ref[~clean], atol=1e-6)
    for k in live:
        assert torch.allclose(tfp[k].float(), live[k].float(), atol=1e-4), k


def test_a_comparison_column_may_set_the_recipe_of_every_method_in_it():
    from prockd.bench.compare import run_config

    spec = {"students": {"s": {"name": "wrn"}}, "data": {"name": "glyphs"},
            "settings": {"plain": {}, "noisy": {"corruptions": [], "train": {"student_noise": 0.1}}}}
    base = {"train": {"epochs": 3, "student_noise": 0.0}}
    a = run_config(spec, base, "s", "plain", "kd", {}, 0)
    n = run_config(spec, base, "s", "noisy", "kd", {}, 0)
    assert a["train"] == {"epochs": 3, "student_noise": 0.0} and "train" not in n["data"]
    assert n["train"] == {"epochs": 3, "student_noise": 0.1} and n["data"] == {"name": "glyphs", "corruptions": []}
    assert spec["settings"]["noisy"]["train"] == {"student_noise": 0.1}  # the spec is left as it was


def test_a_comparison_row_may_carry_its_own_recipe_over_the_columns():
    """A method entry's ``train`` (its screened recipe) reaches its runs only, over the column's, and is not a
    method parameter; the equal-budget weight grid scales the weights and keeps the recipe."""
    from prockd.bench.common import scaled
    from prockd.bench.compare import run_config
    from prockd.classification.methods import METHODS

    spec = {"students": {"s": {"name": "wrn"}}, "data": {"name": "glyphs"},
            "settings": {"noisy": {"train": {"student_noise": 0.1, "epochs": 4}}}}
    base = {"train": {"epochs": 3, "student_noise": 0.0}}
    row = {"weight": 3.0, "train": {"student_noise": 0.2, "student_noise_p": 0.5}}
    r = run_config(spec, base, "s", "noisy", "pkd_projector", row, 0)
    assert r["train"] == {"epochs": 4, "student_noise": 0.2, "student_noise_p": 0.5}
    assert r["method"] == {"name": "pkd_projector", "params": {"weight": 3.0}}
    assert row == {"weight": 3.0, "train": {"student_noise": 0.2, "student_noise_p": 0.5}}  # left as it was
    assert scaled(METHODS, "pkd_projector", row, 0.5) == {"weight": 1.5, "train": row["train"]}
    assert run_config(spec, base, "s", "noisy", "kd", {}, 0)["train"] == {"epochs": 4, "student_noise": 0.1}


def test_prockd_options_against_direct_computations(tiny):
    """assign_temperature, the feature channel and FA on the student's tokens, each against its equation."""
    from prockd.features import resample_tokens
    from prockd.losses import kl_div

    raw = tiny("prockd")
    raw["method"]["params"].update(assign_temperature=0.25, lambda_feat=2.0, fa_on_student=True, proto_scale=0.5)
    b = build(build_config(raw))
    with torch.no_grad():
        d = b.distiller.eval()
        # the initial prototypes are the uniform draw times proto_scale
        assert float(d.prototypes.max()) <= 0.5 and torch.equal(d.prototypes.detach(), d.prototypes_init)
        x, y = b.task.train.images[:6].float() / 255, b.task.train.labels[:6]
        taps = b.teacher.extract(x)["taps"]
        # PL's soft assignment with a temperature: softmax(L / tau) over the prototypes
        fused = d.fusion(taps)
        fh = F.normalize(fused, dim=-1)
        _, a = d.pl.aggregate(fused, d.prototypes)
        assert torch.allclose(a, torch.softmax(d.pl.assign(fh) / 0.25, dim=-1), atol=1e-6)
        torch.manual_seed(0)
        _, losses = d(x, y)
        tok, lay, _ = d.student.features(x)
        z_pro, _, _, o_pro = d.teacher_path(taps)
        t_lay = b.teacher.tap_layout
        target, _ = resample_tokens(o_pro, t_lay, (lay.h, lay.w))
        feat = ((d.feat_connector(tok[:, lay.prefix:]) - target[:, t_lay.prefix:]) ** 2).mean()
        assert float(losses["feat"]) == pytest.approx(2.0 * float(feat), rel=1e-5)
        z_fa = d.student.head(d.fa(tok, d.prototypes), lay)
        assert float(losses["ce_fa"]) == pytest.approx(float(F.cross_entropy(z_fa, y)), rel=1e-5)
        assert float(losses["kl_fa"]) == pytest.approx(float(kl_div(z_pro, z_fa, 1.0)), rel=1e-5)


def test_a_logit_adjusted_probe_is_the_plain_probe_with_its_bias_shifted():
    """With its bias free and unpenalised, CE(x W + b + o, y) is minimised by the plain fit's W and b − o: the
    logit-adjusted probe (probe_distil with ``logit_adjust``) checked against that direct consequence."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=g)
    y = torch.cat([torch.zeros(80), torch.ones(30), torch.full((10,), 2)]).long()
    x[y == 1] += 1.0
    x[y == 2] -= 1.0
    o = 0.8 * torch.log(torch.tensor([80.0, 30.0, 10.0]) / 120)
    w0, b0 = fit_linear_probe(x, y, 3, l2=0.05, iters=300)
    w1, b1 = fit_linear_probe(x, y, 3, l2=0.05, iters=300, offset=o)
    assert torch.allclose(w1, w0, atol=1e-5)
    assert torch.allclose(b1 - b1.mean(), (b0 - o.double()) - (b0 - o.double()).mean(), atol=1e-5)


def test_a_run_scores_its_chosen_checkpoint_on_the_shifted_copies_of_its_validation_split(tiny):
    """``selected["val_fog3/deployed"]``: the deployed student.pt on the fog copy of the validation images, against
    a direct computation from the file and :func:`prockd.shifts.corrupt`; no test set enters it."""
    from prockd.api import load_student
    from prockd.core.config import CorruptionConfig
    from prockd.shifts import corrupt

    raw = tiny("student_only")
    raw["data"].update(val_fraction=0.25, corruptions=[{"kind": "fog", "severity": 4}])
    cfg = build_config(raw)
    summary = train(cfg)
    sel = summary["selected"]
    val = build_task(cfg.data).val
    x = corrupt(val.images, CorruptionConfig(kind="fog", severity=4)).float() / 255
    assert not torch.equal(x, val.images.float() / 255)
    pred = load_student(f"{cfg.out}/student.pt").logits(x).argmax(-1)
    ref = 100.0 * int((torch.from_numpy(pred) == val.labels).sum()) / len(val)
    assert sel["val_fog4/deployed"] == pytest.approx(ref, abs=1e-9) and 0 < ref < 100
    assert "test_fog4/deployed" in sel and not any(k.startswith("val_fog4") for k in summary["final"])


def test_probe_distils_its_probe_sharpened_by_the_kl_target_temperature(tiny):
    """probe-then-distil with ``kl_target_temperature`` τ_t: the KL is weight · T² KL(softmax(probe / (τ_t T)) ‖
    softmax(z_s / T)), computed here directly; the CE is unchanged and ``kl_target`` is probe / τ_t."""
    raw = tiny("probe_distil")
    raw["method"]["params"].update(kl_target_temperature=0.7, temperature=2.0, weight=1.5)
    b = build(build_config(raw))
    d = b.distiller
    feats = {"taps": b.teacher.extract(b.task.train.images.float() / 255, ("taps",))["taps"]}
    d.prepare(lambda: feats, labelled=lambda: (feats, b.task.train.labels))
    d.eval()
    x, y = b.task.train.images[:9].float() / 255, b.task.train.labels[:9]
    with torch.no_grad():
        z_s, losses = d(x, y)
        zp = d.probe_logits(b.teacher.extract(x)["taps"]).double()
        p = F.softmax(zp / (0.7 * 2.0), -1)
        ref = 4.0 * (p * (p.log() - F.log_softmax(z_s.double() / 2.0, -1))).sum(-1).mean()
        assert torch.allclose(d.kl_target(x).double(), zp / 0.7, atol=1e-5)
    assert float(losses["kl"]) == pytest.approx(1.5 * float(ref), rel=1e-4)
    assert float(losses["ce"]) == pytest.approx(float(F.cross_entropy(z_s, y)), rel=1e-5)
