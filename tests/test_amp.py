"""Mixed precision (bf16 and fp16 autocast on CPU), channels_last and torch.compile through every method."""
from __future__ import annotations

import pytest
import torch

from prockd.classification.config import build_config
from prockd.classification.engine import build, train
from prockd.classification.methods import METHODS
from prockd.core.loop import autocast

ALL = sorted(METHODS.names())


def _raw(tiny, method):
    raw = tiny(method)
    if method in ("kd", "dkd"):
        raw["teacher"]["kwargs"]["num_classes"] = 5
        raw["method"]["params"] = {"shared_label_space": True}
    if method == "finetune_distil":  # stage 1 chooses the fine-tuned teacher on a validation split
        raw["data"]["val_fraction"] = 0.2
        raw["teacher"]["finetune"] = {"epochs": 1}
    return raw


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("method", ALL)
def test_every_method_under_autocast_with_live_teacher(tiny, method, amp):
    b = build(build_config(_raw(tiny, method)))
    x = b.task.train.images[:8].float() / 255
    y = b.task.train.labels[:8]
    b.distiller.train()
    b.distiller.set_epoch(2, 3)
    with autocast(torch.device("cpu"), amp):
        z, losses = b.distiller(x, y)
        loss = sum(losses.values())
    assert torch.isfinite(loss), losses
    loss.backward()
    grads = [p.grad for p in b.distiller.learnable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in b.distiller.parameters())  # master weights stay fp32
    with autocast(torch.device("cpu"), amp):
        preds = b.distiller.predict(x)
    assert all(torch.isfinite(v).all() for v in preds.values())


@pytest.mark.parametrize("method", ["prockd", "ofd", "vid"])
def test_bf16_training_from_the_cache(tiny, tmp_path, method):
    raw = tiny(method)
    raw["train"]["amp"] = "bf16"
    s = train(build_config(raw), tmp_path / "run", log=lambda m: None)
    assert all(v == v for k, v in s["final"].items() if k.startswith("loss/"))  # no NaN


def test_channels_last_cnn_student_and_teacher(tiny, tmp_path):
    from tests.conftest import TINY_CNN

    student = {k: v for k, v in TINY_CNN.items() if k not in ("taps", "fusion_size")}
    student["kwargs"] = {k: v for k, v in TINY_CNN["kwargs"].items() if k != "num_classes"}
    student["channels_last"] = True
    raw = tiny("fitnets", student=student)
    raw["teacher"]["channels_last"] = True
    b = build(build_config(raw))
    conv = b.distiller.student.model.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    ref = build(build_config(tiny("fitnets", student={**student, "channels_last": False})))
    x = b.task.train.images[:4].float() / 255
    y = b.task.train.labels[:4]
    b.distiller.eval()
    ref.distiller.eval()
    with torch.no_grad():
        za, la = b.distiller(x, y)
        zb, lb = ref.distiller(x, y)
    assert torch.allclose(za, zb, atol=1e-5) and torch.allclose(la["hint"], lb["hint"], atol=1e-5)


def test_compile_option_trains_and_keeps_state_dict_keys(tiny, tmp_path):
    raw = tiny("prockd")
    raw["train"].update(compile=True, compile_backend="eager", epochs=1)
    b = build(build_config(raw))
    keys = set(b.distiller.state_dict())
    assert not any("_orig_mod" in k for k in keys)
    s = train(build_config(raw), tmp_path / "run", built=b, log=lambda m: None)
    assert s["final"]["loss/ce"] == s["final"]["loss/ce"]


@pytest.mark.parametrize("method", ALL)
def test_every_methods_ce_is_logit_adjusted_by_one_key(tiny, method):
    """``method.params.logit_adjust: τ`` is every method's: its "ce" term is CE(z_s + τ log π, y) (Menon et al., ICLR
    2021), π the class frequencies given by set_class_counts, computed here directly (the long tail's fair budget)."""
    import torch.nn.functional as F

    raw = _raw(tiny, method)
    raw["method"]["params"]["logit_adjust"] = 0.6
    d = build(build_config(raw)).distiller
    counts = torch.tensor([30, 10, 5, 2, 1])
    d.set_class_counts(counts)
    d.eval()
    d.set_epoch(2, 3)  # ReFilled's second stage (its stage-1 CE is weighted)
    b = build(build_config(_raw(tiny, method)))
    x, y = b.task.train.images[:12].float() / 255, b.task.train.labels[:12]
    z, losses = d(x, y)
    direct = F.cross_entropy(z.detach().float() + 0.6 * torch.log(counts.float() / counts.sum()), y)
    assert losses["ce"].item() == pytest.approx(getattr(d.params, "alpha_ce", 1.0) * float(direct), rel=1e-5)
