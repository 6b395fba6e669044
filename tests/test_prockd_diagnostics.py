"""ProC-KD's mechanism diagnostics and its presets, against direct computations."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from prockd.classification.config import build_config, load_config
from prockd.classification.engine import build, train
from prockd.classification.methods.prockd import PRESETS, ProCKDParams
from prockd.errors import ProckdError
from prockd.prototypes import entropy, prototype_usage

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_entropy_and_usage_match_direct_computation():
    a = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], [[0.2, 0.3, 0.5], [0.995, 0.0, 0.005]]])
    direct = []
    for row in a.reshape(-1, 3).tolist():
        direct.append(-sum(p * math.log(p) for p in row if p > 0))
    assert entropy(a).item() == pytest.approx(sum(direct) / len(direct), abs=1e-6)
    assert entropy(torch.full((4, 8), 1 / 8)).item() == pytest.approx(math.log(8), abs=1e-6)  # uniform: log K
    mass = a.reshape(-1, 3).mean(0)  # [0.67375, 0.2, 0.12625]: all three above 1 %
    assert prototype_usage(a).item() == int((mass >= 0.01).sum()) == 3
    assert prototype_usage(torch.tensor([[0.995, 0.005, 0.0]])).item() == 1


def test_paper_preset_and_explicit_keys_win():
    p = ProCKDParams(preset="paper")
    assert (p.num_prototypes, p.variant, p.proto_init, p.resolved_output()) == (72, "A", "uniform", "aug")
    assert ProCKDParams(preset="paper", num_prototypes=8).num_prototypes == 8
    assert set(PRESETS["paper"]) <= set(ProCKDParams.model_fields)
    with pytest.raises(Exception, match="preset"):
        ProCKDParams(preset="nope")


def test_sphere_prototypes_have_unit_norm(tiny):
    raw = tiny()
    raw["method"]["params"]["proto_init"] = "sphere"
    d = build(build_config(raw)).distiller
    assert torch.allclose(d.prototypes.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert d.epoch_stats()["proto_drift"] == 0.0


@pytest.mark.parametrize("variant", ["A", "B"])
def test_run_logs_the_mechanism_per_epoch(tiny, tmp_path, variant):
    raw = tiny()
    raw["data"]["val_fraction"] = 0.25
    raw["method"]["params"]["variant"] = variant
    summary = train(build_config(raw), tmp_path / "run", log=lambda m: None)
    rec = summary["final"]
    # variant A trains FA on the teacher path only: z_aug on the student's tokens exists at validation
    student_fa = ("train/ce_aug", "train/acc_aug", "train/fa_entropy_student") if variant == "B" else ()
    for k in ("train/ce_pro", "train/acc_pro", "train/ce_s", "train/assign_entropy", "train/protos_used",
              "train/fa_entropy_pro", "diag/proto_drift", "diag/proto_norm", "val/ce_pro", "val/acc_pro",
              "val/acc_aug", "val/acc_s", "val/fa_entropy_student", "val/deployed") + student_fa:
        assert k in rec, k
    assert 0 < rec["diag/proto_drift"] < 1 and 1 <= rec["train/protos_used"] <= 4
    assert 0 <= rec["train/assign_entropy"] <= math.log(4) + 1e-6
    assert summary["selected"]["epoch"] in range(1, 4) and "test/deployed" in summary["selected"]  # counted from 1


@pytest.mark.parametrize("name", ["glyphs_lower.yaml", "glyphs_teacher.yaml", "glyphs_lower_transfer.yaml"])
def test_glyph_configs_validate(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.data.name == "glyphs"
    if name == "glyphs_lower_transfer.yaml":
        from prockd.classification.methods import method_params

        _, params = method_params(cfg)
        assert params.model_dump() == ProCKDParams(preset="transfer").model_dump()
        assert cfg.data.unlabeled.glyph_fonts == 40


def test_transfer_preset_is_the_paper_preset_plus_function_matching():
    """transfer = paper + function matching, with the loss weights the tables used it with (a preset carries its
    weights); the default preset is robust_calibrated, `none` the paper's."""
    paper, transfer = ProCKDParams(preset="paper").model_dump(), ProCKDParams(preset="transfer").model_dump()
    diff = {k for k in paper if paper[k] != transfer[k]}
    assert diff == {"preset", "function_matching", "lambda_kl", "lambda_emb"} and transfer["function_matching"] == "cutmix"
    assert (paper["lambda_kl"], paper["lambda_emb"], transfer["lambda_kl"], transfer["lambda_emb"]) == (1, 1, 3, 3)
    assert ProCKDParams().model_dump() == ProCKDParams(preset="robust_calibrated").model_dump()
    none = ProCKDParams(preset="none")
    same = {k for k in paper if k not in ("preset", "deploy_output")}
    assert {k: none.model_dump()[k] for k in same} == {k: paper[k] for k in same}
    assert none.resolved_output() == "aug" == paper["deploy_output"]  # "auto" is the paper's z_aug
    assert paper["function_matching"] == "none" and paper["lambda_feat"] == 0 and not paper["fa_on_student"]
    assert paper["assign_temperature"] == 1.0 and paper["proto_scale"] == 1.0  # the paper's PL, unchanged


@pytest.mark.parametrize("variant", ["A", "B"])
def test_logit_adjustment_is_menon_et_als_ce_on_the_teacher_path(tiny, variant):
    """ce_aug with logit_adjust τ equals λ_aug · CE(z_pro + τ log π, y) (variant B: plus CE(z_aug + τ log π, y)),
    π the class frequencies given by set_class_counts, computed here directly; τ = 0 is the paper's CE."""
    import torch.nn.functional as F

    raw = tiny()
    raw["method"]["params"].update(variant=variant, logit_adjust=0.7, lambda_aug=1.3)
    b = build(build_config(raw))
    d = b.distiller
    counts = torch.tensor([40, 20, 10, 5, 1])
    d.set_class_counts(counts)
    lp = torch.log(counts.double() / counts.sum())
    assert torch.allclose(d.log_prior, (lp - lp.mean()).float())  # centred: a softmax ignores a constant
    assert d.tail.tolist() == [False, False, False, False, True]  # the rarest third (5 // 3 = 1 class)
    d.eval()
    pick = torch.arange(0, len(b.task.train), 7)  # every class, class 4 (the tail) included
    x = b.task.train.take(pick).float() / 255
    y = b.task.train.labels[pick]
    assert bool((y == 4).any())
    torch.manual_seed(0)
    _, losses = d(x, y)
    with torch.no_grad():
        tok, lay, _ = d.student.features(x)
        z_pro = d.teacher_path(d.teacher_features(x, None)["taps"].to(tok.dtype))[0]
        prior = torch.log(counts.float() / counts.sum())
        direct = F.cross_entropy(z_pro + 0.7 * prior, y)
        if variant == "B":
            direct = direct + F.cross_entropy(d.student.head(d.fa(tok, d.prototypes), lay) + 0.7 * prior, y)
    assert losses["ce_aug"].item() == pytest.approx(1.3 * float(direct), rel=1e-5)
    stats = d.diagnostics(x, y)
    live = d.teacher_path(d.teacher.extract_heldout(x, ("taps",))["taps"])[0]
    assert stats["tail_acc_pro"] == pytest.approx(100 * float((live.argmax(-1) == y)[y == 4].float().mean()))
    d.set_class_counts(torch.tensor([5, 5, 5, 5, 5]))  # balanced: no tail
    assert not d.tail.any() and "tail_acc_pro" not in d.diagnostics(x, y)


def test_logit_adjustment_of_prockds_student_ce(tiny):
    """logit_adjust adjusts ProC-KD's student CE too (one key for every CE of the method); the key it replaced is an
    error that says so."""
    import torch.nn.functional as F

    raw = tiny()
    raw["method"]["params"].update(logit_adjust=0.5)
    b = build(build_config(raw))
    counts = torch.tensor([40, 20, 10, 5, 1])
    b.distiller.set_class_counts(counts)
    b.distiller.eval()
    pick = torch.arange(0, len(b.task.train), 7)
    x, y = b.task.train.take(pick).float() / 255, b.task.train.labels[pick]
    z_s, losses = b.distiller(x, y)
    direct = F.cross_entropy(z_s.detach() + 0.5 * torch.log(counts.float() / counts.sum()), y)
    assert losses["ce"].item() == pytest.approx(float(direct), rel=1e-5)
    raw["method"]["params"].update(logit_adjust_student=0.5)
    with pytest.raises(ProckdError, match="logit_adjust_student was folded into logit_adjust"):
        build(build_config(raw))


@pytest.mark.parametrize("space", ["adjusted", "raw"])
def test_prockds_kl_under_logit_adjustment_is_taken_where_kl_space_says(tiny, space):
    """With logit_adjust τ the KL towards z_pro is λ_kl · KL(softmax(z_pro + τ log π) ‖ softmax(z_s + τ log π))
    (``adjusted``, the soft-label form of the adjusted CE) or on the raw logits (``raw``): checked directly."""
    import torch.nn.functional as F

    raw = tiny()
    raw["method"]["params"].update(logit_adjust=0.8, lambda_kl=1.7, kl_space=space)
    d = build(build_config(raw)).distiller
    counts = torch.tensor([40, 20, 10, 5, 1])
    d.set_class_counts(counts)
    d.eval()
    b = build(build_config(tiny()))
    x, y = b.task.train.take(torch.arange(0, 60, 3)).float() / 255, b.task.train.labels[torch.arange(0, 60, 3)]
    z_s, losses = d(x, y)
    with torch.no_grad():
        tok, _, _ = d.student.features(x)
        z_pro = d.teacher_path(d.teacher_features(x, None)["taps"].to(tok.dtype))[0]
        shift = 0.8 * torch.log(counts.float() / counts.sum()) if space == "adjusted" else torch.zeros(5)
        p_t = F.softmax(z_pro + shift, -1)
        direct = (p_t * (p_t.log() - F.log_softmax(z_s + shift, -1))).sum(-1).mean()
    assert losses["kl"].item() == pytest.approx(1.7 * float(direct), rel=1e-4)


def test_transfer_lt_is_bit_identical_to_transfer_on_a_balanced_set(tiny, tmp_path):
    """``preset: transfer_lt`` = ``transfer`` + logit_adjust 1 (adjusted KL); on a balanced training set the centred
    log-prior is exactly zero, so the two runs end with the same floats."""
    assert PRESETS["transfer_lt"] == {**PRESETS["transfer"], "logit_adjust": 1.0, "kl_space": "adjusted"}
    out = {}
    for preset in ("transfer", "transfer_lt"):
        raw = tiny()
        raw["method"]["params"] = {"preset": preset, "num_prototypes": 4}
        raw["train"]["epochs"] = 2
        out[preset] = train(build_config(raw), tmp_path / preset, log=lambda m: None)["final"]
    assert out["transfer"]["test/deployed"] == out["transfer_lt"]["test/deployed"]
    assert out["transfer"]["loss/kl"] == out["transfer_lt"]["loss/kl"]
    d = build(build_config(tiny())).distiller
    d.set_class_counts(torch.tensor([9, 9, 9, 9, 9]))
    assert bool((d.log_prior == 0).all())


def test_robust_preset_is_transfer_lt_with_its_training_views(tiny, tmp_path):
    """``preset: robust`` = ``transfer_lt`` + noise of std 0.2 on half of the student's images: a run ends with the
    same floats as ``transfer_lt`` under ``train.student_noise: 0.2, student_noise_p: 0.5`` and not with those of
    ``transfer_lt`` alone; the method's noise and the recipe's together are an error naming both keys; the Python
    API's module draws the same views as prockd train."""
    from prockd.errors import ProckdError

    assert PRESETS["robust"] == {**PRESETS["transfer_lt"], "student_noise": 0.2, "student_noise_p": 0.5}
    out = {}
    for name, params, recipe in (("robust", {"preset": "robust"}, {}),
                                 ("recipe", {"preset": "transfer_lt"}, {"student_noise": 0.2, "student_noise_p": 0.5}),
                                 ("plain", {"preset": "transfer_lt"}, {})):
        raw = tiny()
        raw["method"]["params"] = {**params, "num_prototypes": 4}
        raw["train"].update(epochs=2, **recipe)
        out[name] = train(build_config(raw), tmp_path / name, log=lambda m: None)["final"]
    assert out["robust"]["loss/kl"] == out["recipe"]["loss/kl"] != out["plain"]["loss/kl"]
    assert out["robust"]["test/deployed"] == out["recipe"]["test/deployed"]
    raw = tiny()
    raw["method"]["params"] = {"preset": "robust", "num_prototypes": 4}
    raw["train"]["student_noise"] = 0.1
    with pytest.raises(ProckdError, match="method.params.student_noise.*train.student_noise"):
        build(build_config(raw))


def _fusion_grad(d, x, y, tf):
    """The KL term's gradient on the teacher path's first layer (fusion), which only z_pro reaches."""
    d.zero_grad()
    _, losses = d(x, y, teacher_feats=tf)
    losses["kl"].backward()
    g = d.fusion.proj.weight.grad
    return losses["kl"].detach(), (torch.zeros_like(d.fusion.proj.weight) if g is None else g.clone())


def _twins(tiny, key: str, on, off, rows: int, **params):
    """Two ProC-KD distillers with the same weights (eval mode), ``key`` set to ``on`` and to ``off``, and ``rows``
    training images of several classes with their labels."""
    raw = tiny()
    raw["method"]["params"].update(params, **{key: on})
    d = build(build_config(raw)).distiller
    raw["method"]["params"][key] = off
    other = build(build_config(raw)).distiller
    other.load_state_dict(d.state_dict())
    d.eval(), other.eval()
    b = build(build_config(tiny()))
    idx = torch.arange(0, 4 * rows, 4)
    return d, other, b.task.train.take(idx).float() / 255, b.task.train.labels[idx].clone()


def test_cotrain_unlabeled_lets_the_kl_train_the_teacher_path_on_unlabelled_rows_only(tiny):
    """``cotrain_unlabeled``: the KL towards z_pro keeps its value, and its gradient reaches the teacher path from the
    unlabelled rows alone (not labelled ones, not function matching's mixtures): checked against the gradient of
    λ_kl · (1/B) Σ_{unlabelled r} KL(z_pro,r ‖ z_s,r) computed directly; without the key that gradient is zero."""
    import torch.nn.functional as F

    from prockd.classification.data import IGNORE, MIXTURE_KEY

    d, off, x, y = _twins(tiny, "cotrain_unlabeled", True, False, 12, lambda_kl=1.7, lambda_emb=0.0)
    y[4:] = IGNORE  # rows 4-11 without a label; 8-11 marked as mixtures
    tf = {**d.teacher_features(x, None), MIXTURE_KEY: torch.arange(12) >= 8}
    kl_on, g_on = _fusion_grad(d, x, y, tf)
    kl_off, g_off = _fusion_grad(off, x, y, tf)
    assert kl_on.item() == pytest.approx(kl_off.item(), rel=1e-6)
    assert float(g_off.abs().max()) == 0.0 and float(g_on.abs().max()) > 0
    d.zero_grad()
    tok, lay, _ = d.student.features(x)
    z_s = d.student.head(tok, lay).detach()
    z_pro = d.teacher_path(tf["taps"].to(tok.dtype))[0]
    p_t = F.softmax(z_pro[4:8], -1)
    direct = 1.7 * (p_t * (p_t.log() - F.log_softmax(z_s[4:8], -1))).sum(-1).sum() / 12
    direct.backward()
    assert torch.allclose(g_on, d.fusion.proj.weight.grad, rtol=1e-4, atol=1e-7)
    assert d.unlabeled_rows(y, tf).tolist() == [False] * 4 + [True] * 4 + [False] * 4
    assert d.unlabeled_rows(y, None).tolist() == [False] * 4 + [True] * 8  # no mixtures: every IGNORE row


def test_cotrain_unlabeled_is_bit_identical_without_an_unlabelled_set(tiny, tmp_path):
    """On a labelled-only set (function matching's mixtures included) ``cotrain_unlabeled`` changes nothing: the two
    runs end with the same floats; ``with_mixtures`` marks the mixtures only for a method that reads the marks."""
    from prockd.classification.data import MIXTURE_KEY
    from prockd.classification.engine import with_mixtures

    assert not any(p.get("cotrain_unlabeled") for p in PRESETS.values())  # an option, in no preset (no test gain)
    out = {}
    for on in (False, True):
        raw = tiny()
        raw["method"]["params"] = {"preset": "transfer", "num_prototypes": 4, "cotrain_unlabeled": on}
        raw["train"]["epochs"] = 2
        out[on] = train(build_config(raw), tmp_path / str(on), log=lambda m: None)["final"]
    assert out[False]["test/deployed"] == out[True]["test/deployed"]
    assert out[False]["loss/kl"] == out[True]["loss/kl"]
    for on in (False, True):
        raw = tiny()
        raw["method"]["params"] = {"preset": "transfer", "num_prototypes": 4, "cotrain_unlabeled": on}
        d = build(build_config(raw)).distiller
        x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
        _, y2, tf = with_mixtures(d, x, y, None, torch.Generator().manual_seed(0))
        assert len(y2) == 12
        if on:
            assert tf[MIXTURE_KEY].tolist() == [False] * 6 + [True] * 6
        else:
            assert tf is None


@pytest.mark.parametrize("variant", ["A", "B"])
def test_teacher_path_label_smoothing_matches_a_direct_computation(tiny, variant):
    """``pro_label_smoothing`` ε: the teacher path's CE is ``-(1/n) Σ_r [(1 - ε) log p_r(y_r) + (ε / C) Σ_c
    log p_r(c)]`` over the labelled rows (computed here from z_pro directly), unlabelled rows left out; the student's
    CE keeps hard labels; ε = 0 is the hard CE of before."""
    import torch.nn.functional as F

    from prockd.classification.data import IGNORE

    d, hard, x, y = _twins(tiny, "pro_label_smoothing", 0.25, 0.0, 10, variant=variant, lambda_aug=1.3)
    y[7:] = IGNORE
    with torch.no_grad():
        _, ls = d(x, y)
        _, lh = hard(x, y)
        tok, lay, _ = d.student.features(x)
        z_pro = d.teacher_path(d.teacher_features(x, None)["taps"].to(tok.dtype))[0]
        logp = F.log_softmax(z_pro[:7].float(), -1)
        smooth = -(0.75 * logp.gather(1, y[:7, None]).squeeze(1) + 0.25 * logp.mean(-1)).mean()
        hard_pro = -logp.gather(1, y[:7, None]).mean()
        extra = 0.0
        if variant == "B":  # B's ce_aug also holds the hard CE of head(FA(student tokens))
            z_aug = d.student.head(d.fa(tok, d.prototypes), lay)
            extra = F.cross_entropy(z_aug.float(), y)
    assert ls["ce_aug"].item() == pytest.approx(1.3 * (smooth + extra).item(), rel=1e-5)
    assert lh["ce_aug"].item() == pytest.approx(1.3 * (hard_pro + extra).item(), rel=1e-5)
    assert ls["ce"].item() == pytest.approx(lh["ce"].item(), rel=1e-6)  # the student's CE: hard labels either way


def _lt_twins_and_kl_inputs(tiny, key: str, on, off, **params):
    """:func:`_twins` on a 40:20:10:5:1 class prior (``logit_adjust`` 0.8, λ_kl 1.7, T 1.5) and, without grad, both
    twins' losses with the student's logits, ``z_pro`` computed directly from the teacher path, and ``0.8 log π``."""
    d, other, x, y = _twins(tiny, key, on, off, 10, lambda_kl=1.7, temperature=1.5, logit_adjust=0.8, **params)
    counts = torch.tensor([40, 20, 10, 5, 1])
    d.set_class_counts(counts), other.set_class_counts(counts)
    with torch.no_grad():
        z_s, on_losses = d(x, y)
        _, off_losses = other(x, y)
        tok, _, _ = d.student.features(x)
        z_pro = d.teacher_path(d.teacher_features(x, None)["taps"].to(tok.dtype))[0].float()
    return d, x, z_s.float(), z_pro, 0.8 * torch.log(counts.float() / counts.sum()), on_losses, off_losses


def _direct_kl(target_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> float:
    """``T² KL(softmax(target / T) ‖ softmax(student / T))``, batch mean, computed directly."""
    import torch.nn.functional as F

    p_t = F.softmax(target_logits / temperature, -1)
    log_s = F.log_softmax(student_logits / temperature, -1)
    return float(temperature ** 2 * (p_t * (p_t.log() - log_s)).sum(-1).mean())


@pytest.mark.parametrize("space", ["adjusted", "raw"])
def test_kl_target_temperature_sharpens_z_pro_on_the_target_side_only(tiny, space):
    """``kl_target_temperature`` τ_t: the KL is λ_kl · T² KL(softmax((z_pro / τ_t + s) / T) ‖ softmax((z_s + s) / T))
    with s = τ log π under ``kl_space: adjusted`` (0 otherwise), computed here directly; the CEs and the student side
    are unchanged; ``kl_target`` returns z_pro / τ_t (what the KL distils) with the same argmax."""
    d, x, z_s, z_pro, s, sharp, base = _lt_twins_and_kl_inputs(tiny, "kl_target_temperature", 0.2, 1.0,
                                                                 kl_space=space)
    s = s if space == "adjusted" else torch.zeros(5)
    direct = _direct_kl(z_pro / 0.2 + s, z_s + s, 1.5)
    with torch.no_grad():
        target = d.kl_target(x)
        live = d.teacher_path(d.teacher.extract_heldout(x, ("taps",))["taps"].float())[0]
    assert sharp["kl"].item() == pytest.approx(1.7 * float(direct), rel=1e-3)  # a small KL: float32 rounding
    assert abs(sharp["kl"].item() - base["kl"].item()) > base["kl"].item()  # untrained logits: sharpen hard to tell
    for key in ("ce", "ce_aug"):
        assert sharp[key].item() == pytest.approx(base[key].item(), rel=1e-6)
    assert torch.allclose(target, live / 0.2, atol=1e-5) and torch.equal(target.argmax(-1), live.argmax(-1))
    with pytest.raises(Exception, match="kl_target_temperature"):
        build(build_config({**tiny(), "method": {"name": "prockd", "params": {"kl_target_temperature": 0}}}))


def test_robust_calibrated_preset_is_robust_with_the_calibrated_kl_target(tiny, tmp_path):
    """``preset: robust_calibrated`` = ``robust`` + ``pro_label_smoothing`` 0.1 + ``kl_target_temperature`` 0.8 (the
    bench specs' ``prockd@robust_ls0.1_tt0.8`` rows): the resolved parameters are those keys, a run ends with the same
    floats as ``robust`` with the two keys written out and not with those of ``robust`` alone; a key beside the preset
    wins."""
    assert PRESETS["robust_calibrated"] == {**PRESETS["robust"], "pro_label_smoothing": 0.1,
                                            "kl_target_temperature": 0.8}
    resolved = ProCKDParams(preset="robust_calibrated")
    assert (resolved.pro_label_smoothing, resolved.kl_target_temperature) == (0.1, 0.8)
    assert (resolved.student_noise, resolved.student_noise_p, resolved.logit_adjust) == (0.2, 0.5, 1.0)
    assert ProCKDParams(preset="robust_calibrated", kl_target_temperature=1.0).kl_target_temperature == 1.0
    out = {}
    for name, params in (("preset", {"preset": "robust_calibrated"}),
                         ("keys", {"preset": "robust", "pro_label_smoothing": 0.1, "kl_target_temperature": 0.8}),
                         ("robust", {"preset": "robust"})):
        raw = tiny()
        raw["method"]["params"] = {**params, "num_prototypes": 4}
        raw["train"].update(epochs=2)
        out[name] = train(build_config(raw), tmp_path / name, log=lambda m: None)["final"]
    assert out["preset"] == {**out["keys"], "time_s": out["preset"]["time_s"], "wall_s": out["preset"]["wall_s"]}
    assert out["preset"]["loss/kl"] != out["robust"]["loss/kl"]


def test_kl_target_temperature_space_adjusted_sharpens_the_adjusted_logits(tiny, tmp_path):
    """``kl_target_temperature_space: adjusted``: the KL is λ_kl · T² KL(softmax((z_pro + s) / (τ_t T)) ‖
    softmax((z_s + s) / T)) with s = τ log π (computed here directly) instead of softmax((z_pro / τ_t + s) / T); on a
    balanced set (s centred to zeros) a run is bit-identical to the raw form."""
    _, _, z_s, z_pro, s, adj, base = _lt_twins_and_kl_inputs(tiny, "kl_target_temperature_space", "adjusted", "raw",
                                                             kl_space="adjusted", kl_target_temperature=0.4)
    direct = _direct_kl((z_pro + s) / 0.4, z_s + s, 1.5)
    direct_raw = _direct_kl(z_pro / 0.4 + s, z_s + s, 1.5)
    assert adj["kl"].item() == pytest.approx(1.7 * float(direct), rel=1e-3)
    assert base["kl"].item() == pytest.approx(1.7 * float(direct_raw), rel=1e-3)
    assert abs(adj["kl"].item() - base["kl"].item()) > 1e-3 * base["kl"].item()
    out = {}
    for space in ("adjusted", "raw"):
        raw = tiny()
        raw["method"]["params"] = {"preset": "robust_calibrated", "num_prototypes": 4,
                                   "kl_target_temperature_space": space}
        raw["train"].update(epochs=2)
        out[space] = train(build_config(raw), tmp_path / space, log=lambda m: None)["final"]
    out["raw"]["time_s"], out["raw"]["wall_s"] = out["adjusted"]["time_s"], out["adjusted"]["wall_s"]
    assert out["adjusted"] == out["raw"]  # the tiny digits set is balanced
