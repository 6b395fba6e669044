"""Distiller interface: losses, gradient flow, ViT and CNN taps, variants, export."""
from __future__ import annotations

import copy

import pytest
import torch

from prockd.classification.config import build_config
from prockd.classification.deploy import load_deployed
from prockd.classification.engine import build
from prockd.classification.methods import METHODS
from tests.conftest import TINY_CNN, TINY_VIT

VIT_TEACHER = {**TINY_VIT, "input_size": 16, "kwargs": {**TINY_VIT["kwargs"], "img_size": 16, "patch_size": 4,
                                                         "embed_dim": 24, "depth": 3}}
CNN_STUDENT = {**TINY_CNN, "input_size": 8, "taps": None, "fusion_size": None,
               "kwargs": {"channels": [8, 8, 16, 16], "stem_width": 8}}


def _batch(n=6):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("teacher,student", [(TINY_CNN, TINY_VIT), (VIT_TEACHER, TINY_VIT),
                                             (TINY_CNN, CNN_STUDENT), (VIT_TEACHER, CNN_STUDENT)])
@pytest.mark.parametrize("variant", ["A", "B"])
def test_gradients_reach_student_and_modules_never_teacher(tiny, teacher, student, variant):
    raw = tiny(teacher=copy.deepcopy(teacher), student=copy.deepcopy(student))
    raw["method"]["params"]["variant"] = variant
    b = build(build_config(raw))
    d = b.distiller
    x, y = _batch()
    logits, losses = d(x, y)
    assert logits.shape == (6, 5)
    assert set(losses) == {"ce", "ce_aug", "kl", "emb"}
    sum(losses.values()).backward()
    assert d.prototypes.grad is not None and d.prototypes.grad.abs().sum() > 0
    for name, mod in [("fusion", d.fusion), ("pl", d.pl), ("fa", d.fa), ("emb", d.emb), ("student", d.student)]:
        grads = [p.grad for p in mod.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is None and not p.requires_grad for p in b.teacher.parameters())
    names = {n for n, _ in d.named_parameters()}
    assert not any(n.startswith("teacher") for n in names)
    learn = {id(p) for p in d.learnable_parameters()}
    assert id(d.prototypes) in learn and not any(id(p) in learn for p in b.teacher.parameters())


def test_student_only_and_registry(tiny):
    assert {"prockd", "student_only"} <= set(METHODS.names())
    b = build(build_config(tiny("student_only")))
    assert b.teacher is None
    logits, losses = b.distiller(*_batch())
    assert set(losses) == {"ce"} and logits.shape == (6, 5)


def test_lambda_zero_drops_terms(tiny):
    raw = tiny()
    raw["method"]["params"].update(lambda_kl=0.0, lambda_emb=0.0)
    d = build(build_config(raw)).distiller
    _, losses = d(*_batch())
    assert set(losses) == {"ce", "ce_aug"} and d.emb is None


@pytest.mark.parametrize("output", ["plain", "aug", "avg"])
def test_export_predicts_alone_and_reloads(tiny, tmp_path, output):
    raw = tiny()
    raw["method"]["params"]["deploy_output"] = output
    b = build(build_config(raw))
    d = b.distiller.eval()
    x, _ = _batch()
    dep = d.export()
    names = [n for n, _ in dep.named_parameters()] + [n for n, _ in dep.named_buffers()]
    assert not any(n.startswith(("pl.", "fusion.", "emb.")) for n in names)
    assert any(n.startswith("fa.") for n in names) and "prototypes" in names
    ref = d.predict(x)["deployed"]
    assert torch.allclose(dep(x), ref, atol=1e-5)
    dep.save(tmp_path / "s.pt", 5, ["a", "b", "c", "d", "e"])
    again = load_deployed(tmp_path / "s.pt")
    assert torch.allclose(again(x), ref, atol=1e-5)
    assert again.class_names == ["a", "b", "c", "d", "e"]
    # the export does not hold on to the training hooks: the live student still records its embedding
    d.student.features(x)
    assert d.student.recorder.outputs or d.student.embed_path is not None


def test_kmeans_prototype_init_matches_sklearn(tiny):
    from sklearn.cluster import KMeans

    raw = tiny()
    raw["method"]["params"]["proto_init"] = "kmeans"
    b = build(build_config(raw))
    d = b.distiller
    x = b.task.train.images[:32].float() / 255
    feats = b.teacher.extract(x)
    d.prepare(lambda: feats, seed=3)
    fh = torch.nn.functional.normalize(torch.relu(feats["taps"] @ d.fusion.proj.weight.t() + d.fusion.proj.bias), dim=-1)
    ref = KMeans(4, n_init=3, random_state=3).fit(fh.detach().reshape(-1, fh.shape[-1]).double().numpy()).cluster_centers_
    assert torch.allclose(d.prototypes.detach().double(), torch.from_numpy(ref), atol=1e-5)
