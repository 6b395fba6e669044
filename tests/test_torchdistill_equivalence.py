"""prockd's losses equal torchdistill's (an independent implementation, PyPI) on the same inputs.

torchdistill is an optional test dependency (``make test`` installs it); these tests skip, with the
reason, only where it cannot be imported.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from prockd.classification.config import build_config
from prockd.classification.engine import build
from prockd.classification.methods.ab import ab_loss
from prockd.classification.methods.fitnets import hint_loss
from prockd.classification.methods.pkd_projector import batch_whiten, projector_loss
from prockd.classification.methods.rkd import rkd_angle, rkd_distance
from prockd.classification.methods.vid import vid_nll

# make setup installs torchdistill and leaves .venv/.torchdistill-missing only where it could not: where it was
# expected (no such file) a failed import is a failure, elsewhere a skip that names itself in the summary (-rs)
_MISSING = Path(sys.prefix) / ".torchdistill-missing"
try:
    import torchdistill.losses.mid_level as td
except ImportError as e:
    if Path(sys.prefix, ".prockd-installed").is_file() and not _MISSING.is_file():
        raise ImportError(f"torchdistill was installed by make setup but does not import ({e}): the cross-check "
                          "cannot run") from None
    pytest.skip(f"torchdistill is not installed ({e}; make setup: {_MISSING} says it could not be): no "
                "cross-check against it", allow_module_level=True)


def _io(**named):
    return {k: {"output": v} for k, v in named.items()}


def test_kd_method_equals_torchdistill_kdloss(tiny):
    raw = tiny("kd")
    raw["teacher"]["kwargs"]["num_classes"] = 5
    raw["method"]["params"] = {"shared_label_space": True, "temperature": 3.0, "alpha_ce": 0.3, "alpha_kd": 0.7}
    b = build(build_config(raw))
    x = b.task.train.images[:16].float() / 255
    y = b.task.train.labels[:16]
    z_s, losses = b.distiller(x, y)
    z_t = b.teacher.predict(x)
    ref = td.KDLoss("s", "output", "t", "output", temperature=3.0, alpha=0.3, beta=0.7)(
        _io(s=z_s), _io(t=z_t), y)
    assert torch.allclose(sum(losses.values()), ref, rtol=1e-5, atol=1e-6)


def test_fitnets_hint_equals_torchdistill_mse_wrapper(tiny):
    b = build(build_config(tiny("fitnets")))
    x = b.task.train.images[:8].float() / 255
    _, s, t = b.distiller.feature_maps(x, None)
    wrapper = td.SimpleLossWrapper(torch.nn.MSELoss(), input={"is_from_teacher": False, "module_path": "c", "io": "output"},
                                   target={"is_from_teacher": True, "module_path": "t", "io": "output"})
    assert torch.allclose(hint_loss(s, t), wrapper(_io(c=s), _io(t=t), None), rtol=1e-6)
    _, losses = b.distiller(x, b.task.train.labels[:8])
    assert torch.allclose(losses["hint"], hint_loss(s, t), rtol=1e-6)


def test_rkd_equals_torchdistill_rkdloss():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(12, 7, generator=g), torch.randn(12, 5, generator=g)
    ref = td.RKDLoss("s", "t", dist_factor=25.0, angle_factor=50.0, reduction="mean")(_io(s=s), _io(t=t))
    ours = 25.0 * rkd_distance(s, t) + 50.0 * rkd_angle(s, t)
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-6)


def test_ab_equals_torchdistill_alt_act_transfer():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 6, 3, 3, generator=g), torch.randn(4, 6, 3, 3, generator=g)
    pairs = {"p": {"student": {"io": "output", "path": "s"}, "teacher": {"io": "output", "path": "t"}, "weight": 1}}
    ref = td.AltActTransferLoss(pairs, margin=1.0, reduction="mean")(_io(s=s), _io(t=t))
    # torchdistill sums over elements and divides by the batch size; prockd averages over elements
    assert torch.allclose(ab_loss(s, t, 1.0) * s.numel() / s.shape[0], ref, rtol=1e-5)


def test_vid_equals_torchdistill_vidloss(tiny):
    b = build(build_config(tiny("vid")))
    x = b.task.train.images[:8].float() / 255
    _, mean, t = b.distiller.feature_maps(x, None)
    var = b.distiller.variance()
    pairs = {"p": {"student": {"io": "output", "path": "s"}, "teacher": {"io": "output", "path": "t"}, "weight": 1}}
    ref = td.VIDLoss(pairs)({"s": {"output": (mean, var.view(1, -1, 1, 1))}}, _io(t=t))
    assert torch.allclose(vid_nll(mean, var, t), ref, rtol=1e-5)


def test_pkd_projector_equals_torchdistill_srd():
    g = torch.Generator().manual_seed(2)
    ps, t = torch.randn(8, 6, generator=g), 2 + 3 * torch.randn(8, 6, generator=g)
    z = torch.randn(8, 5, generator=g)  # identical logits: SRD's KL term is 0, its feature term is 2x ours
    tw = batch_whiten(t)
    srd = td.SRDLoss("s", "output", "t", "output", "zs", "output", "zt", "output", exponent=4.0)
    ref = srd({"s": {"output": ps}, "zs": {"output": z}}, {"t": {"output": tw}, "zt": {"output": z}})
    assert torch.allclose(2 * projector_loss(ps, tw, 4.0), ref, rtol=1e-5, atol=1e-6)
    assert F.batch_norm(t, None, None, training=True).allclose(tw)
