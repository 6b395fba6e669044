"""Fine-tune, then distil (Vemulapalli et al., ICML 2024): stage 1 (``teacher.finetune``) and ``finetune_distil``, and
the checkpoints a user's workflow hands from one run to the next (a run's ``student.pt`` / ``best.pt`` /
``teacher.pt``, a classifier of another class count)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from prockd.classification.config import ModelConfig, build_config
from prockd.classification.engine import build, train
from prockd.classification.models import create_model
from prockd.core.checkpoint import classifier_keys, read_state_dict
from prockd.errors import ProckdError
from tests.conftest import kill_after


def _ft_config(tiny, method="finetune_distil", **ft) -> dict:
    raw = tiny(method)
    raw["data"].update(val_fraction=0.2, labels_per_class=25)
    raw["train"].update(num_threads=1)
    raw["teacher"]["finetune"] = {"epochs": 2, **ft}
    return raw


def _net(raw: dict) -> dict:
    return {k: v for k, v in raw["teacher"].items() if k != "finetune"}


def _teacher_file(tmp_path: Path, raw: dict) -> Path:
    """The tiny teacher's random weights as a checkpoint file (a teacher with weights of its own)."""
    torch.manual_seed(123)
    model = create_model(ModelConfig(**_net(raw)), None, "teacher")
    path = tmp_path / "teacher_weights.pt"
    torch.save(model.state_dict(), path)
    return path


def _cli(cfg_path: Path, out: Path, steps: int) -> subprocess.CompletedProcess:
    env = kill_after(steps)
    return subprocess.run([sys.executable, "-m", "prockd.cli", "train", "--config", str(cfg_path), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)


def test_finetune_distil_killed_in_either_stage_resumes_to_identical_metrics(tiny, tmp_path):
    """`prockd train` with finetune_distil killed (SIGKILL) in stage 1, then again in stage 2, resumed: the fine-tuned
    teacher and the final metrics are those of an uninterrupted run (the reference trains in this process, one thread
    like the killed processes). The log states the fine-tuned teacher's validation accuracy before stage 2."""
    raw = _ft_config(tiny)
    ref = copy.deepcopy(raw)
    ref["teacher"]["finetune"]["dir"] = str(tmp_path / "ft_ref")
    a = train(build_config(ref), tmp_path / "ref", log=lambda m: None)
    raw["teacher"]["finetune"]["dir"] = str(tmp_path / "ft_res")
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    # 100 labelled images / batch 16 = 7 steps per epoch. Stage 1 (2 epochs, 14 steps): killed after its 10th step,
    # in its second epoch. The next process resumes stage 1 from epoch 1's checkpoint and takes its 7 remaining steps,
    # then stage 2 (3 epochs) is killed after the process's 17th step: stage 2's 10th, in its second epoch
    first = _cli(cfg_path, tmp_path / "res", 10)
    assert first.returncode == -9, first.stderr
    stage1 = next((tmp_path / "ft_res").iterdir())
    assert (stage1 / "checkpoints" / "last.pt").is_file() and not (stage1 / "finetune.json").exists()
    assert not (tmp_path / "res" / "checkpoints" / "last.pt").exists()
    second = _cli(cfg_path, tmp_path / "res", 17)
    assert second.returncode == -9, second.stderr
    assert "resumed from" in second.stdout + second.stderr
    assert (stage1 / "finetune.json").is_file() and not (stage1 / "checkpoints").exists()
    assert (tmp_path / "res" / "checkpoints" / "last.pt").is_file() and not (tmp_path / "res" / "final.json").exists()
    logs = []
    b = train(build_config(raw), tmp_path / "res", log=logs.append)
    assert any("resumed from" in m for m in logs), logs
    said = next(m for m in logs if "fine-tuned teacher read from" in m)
    assert "validation top-1" in said and f"{a['finetune']['val_top1']:.2f} %" in said
    fa = {k: v for k, v in a["final"].items() if k not in ("time_s", "wall_s")}
    fb = {k: v for k, v in b["final"].items() if k not in ("time_s", "wall_s")}
    assert fa == fb and a["selected"] == b["selected"]
    ta = torch.load(next((tmp_path / "ft_ref").iterdir()) / "teacher.pt", weights_only=True)["model"]
    tb = torch.load(stage1 / "teacher.pt", weights_only=True)["model"]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a["finetune"]["val_top1"] == b["finetune"]["val_top1"] and b["finetune"]["reused"]


def test_a_comparison_s_seeds_share_one_finetune_that_starts_from_the_teacher(tiny, tmp_path):
    """Seeds 0 and 1 of a run with a teacher of its own weights share one fine-tune (one cache entry, read by the
    second); ``per_seed`` gives each seed its own. With every layer but the classifier frozen, the fine-tuned teacher's
    parameters are the teacher's own, exactly, and only its new head differs: stage 1 starts from the teacher."""
    raw = _ft_config(tiny, freeze=["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"])
    raw["teacher"].update(checkpoint=str(_teacher_file(tmp_path, raw)), pretrained=None)
    logs = []
    s0 = train(build_config(raw), tmp_path / "s0", log=logs.append)
    s1 = train(build_config(dict(copy.deepcopy(raw), seed=1)), tmp_path / "s1", log=logs.append)
    assert not s0["finetune"]["reused"] and s1["finetune"]["reused"] and s0["finetune"]["key"] == s1["finetune"]["key"]
    assert len(list((tmp_path / "finetuned").iterdir())) == 1  # one fine-tune
    assert any("parameter tensors frozen" in m for m in logs)
    own = torch.load(raw["teacher"]["checkpoint"], weights_only=True)
    tuned = torch.load(Path(s0["finetune"]["dir"]) / "teacher.pt", weights_only=True)["model"]
    params = {n for n, _ in create_model(ModelConfig(**_net(raw)), None, "teacher").named_parameters()}
    head = {"fc.weight", "fc.bias"}
    assert all(torch.equal(own[k], tuned[k]) for k in params - head)
    assert tuned["fc.weight"].shape == (5, 16) and own["fc.weight"].shape == (4, 16)
    per = copy.deepcopy(raw)
    per["teacher"]["finetune"]["per_seed"] = True
    p0 = train(build_config(per), tmp_path / "p0", log=lambda m: None)
    p1 = train(build_config(dict(copy.deepcopy(per), seed=1)), tmp_path / "p1", log=lambda m: None)
    # seed 0's own fine-tune is the shared one (the same seed, data and recipe: the same content); seed 1 gets another
    assert p0["finetune"]["key"] == s0["finetune"]["key"] and p1["finetune"]["key"] != s0["finetune"]["key"]
    assert p1["finetune"]["seed"] == 1 and not p1["finetune"]["reused"]


def test_finetune_distil_loss_is_hinton_kd_towards_the_finetuned_teacher(tiny, tmp_path):
    """finetune_distil's loss against a direct computation: α_ce CE(z_s, y) + α_kd T² KL(softmax(z_t / T) ‖
    softmax(z_s / T)) with z_t the fine-tuned teacher's logits (the task's classes); the KL covers unlabelled rows."""
    raw = _ft_config(tiny)
    raw["method"]["params"] = {"alpha_ce": 0.7, "alpha_kd": 2.5, "temperature": 3.0}
    b = build(build_config(raw), log=lambda m: None)
    assert b.teacher.num_outputs == 5 and b.finetune is not None
    x = b.task.train.take(torch.arange(8)).float().div(255)
    y = b.task.train.labels[:8].clone()
    y[6:] = -100  # two unlabelled rows
    b.distiller.train()
    z_s, losses = b.distiller(x, y)
    z_t = b.teacher.model(b.teacher.transform(x)).detach()
    p_t = F.softmax(z_t / 3.0, -1)
    kl = (p_t * (F.log_softmax(z_t / 3.0, -1) - F.log_softmax(z_s.detach() / 3.0, -1))).sum(-1).mean() * 9.0
    assert losses["kd"].item() == pytest.approx(2.5 * kl.item(), rel=1e-5)
    assert losses["ce"].item() == pytest.approx(0.7 * F.cross_entropy(z_s[:6].detach(), y[:6]).item(), rel=1e-5)


def test_any_distiller_distils_the_finetuned_teacher(tiny, tmp_path):
    """`teacher.finetune` under ProC-KD: the run's frozen teacher is the fine-tuned one (its weights' digest in the
    checkpoints, features cached under another key than the pre-trained teacher's), and the teacher's own-task
    accuracy is not measured with a head it no longer has."""
    raw = _ft_config(tiny, "prockd")
    raw["method"]["params"] = {"num_prototypes": 4}
    raw["train"]["keep_state"] = True
    logs = []
    s = train(build_config(raw), tmp_path / "ft", log=logs.append)
    assert s["finetune"] is not None and s["teacher_images"]["cached"] > 0
    plain = copy.deepcopy(raw)
    del plain["teacher"]["finetune"]
    p = train(build_config(plain), tmp_path / "plain", log=lambda m: None)
    assert p["finetune"] is None
    assert len(list((tmp_path / "cache").iterdir())) == 2  # two teachers, two feature caches
    last = torch.load(tmp_path / "ft" / "checkpoints" / "last.pt", weights_only=False)  # kept: train.keep_state
    tuned = torch.load(Path(s["finetune"]["dir"]) / "teacher.pt", weights_only=True)["model"]
    from prockd.classification.cache import tensor_digest
    assert last["teacher"]["digest"] == tensor_digest(tuned)
    assert "fine-tuned on the task's labelled set" in last["teacher"]["source"]


def test_finetune_needs_a_validation_split_and_known_layers(tiny):
    raw = _ft_config(tiny)
    raw["data"].pop("val_fraction")
    with pytest.raises(ProckdError, match="validation split"):
        build(build_config(raw), log=lambda m: None)
    raw = _ft_config(tiny, freeze=["layer9"])
    with pytest.raises(ProckdError, match="'layer9' names no parameter.*did you mean layer4"):
        build(build_config(raw), log=lambda m: None)


def test_finetune_distil_refuses_a_teacher_head_of_another_task(tiny):
    """finetune_distil built around a teacher that kept its own head (another label space) is one clear error."""
    from prockd.classification.methods.finetune_distil import FinetuneDistil, FinetuneDistilParams
    raw = tiny("student_only")
    b = build(build_config(raw))
    teacher = build(build_config(tiny("fitnets"))).teacher
    with pytest.raises(ProckdError, match="its head has 4 classes, the task 5"):
        FinetuneDistil(b.distiller.student, teacher, FinetuneDistilParams(), 5)


# ---- checkpoints that follow a user's workflow ---------------------------------------------------------------------

def test_a_run_s_student_pt_best_pt_and_teacher_pt_are_checkpoints(tiny, tmp_path):
    """A run's deployed ``student.pt``, its ``checkpoints/best.pt`` and a ``teacher.pt`` load as another run's
    ``teacher.checkpoint``: the teacher keeps the file's own head (5 classes, without kwargs.num_classes), its
    weights are the run's student network exactly, and a distillation run trains from it."""
    raw = tiny("student_only")
    raw["student"] = {**copy.deepcopy(raw["teacher"]), "kwargs": {"channels": [8, 16, 16, 16], "stem_width": 8}}
    raw["data"].update(val_fraction=0.2, labels_per_class=25)  # student.pt is then best.pt's checkpoint
    first = tmp_path / "first"
    train(build_config(raw), first, log=lambda m: None)
    net = {k.removeprefix("student.model."): v for k, v in
           torch.load(first / "student.pt", weights_only=True)["state_dict"].items()}
    torch.save({"model": net}, tmp_path / "teacher.pt")
    for f in (first / "student.pt", first / "checkpoints" / "best.pt", tmp_path / "teacher.pt"):
        state = read_state_dict(f, "teacher")
        assert state.keys() == net.keys() and all(torch.equal(state[k], net[k]) for k in net), f
        tcfg = {k: v for k, v in raw["student"].items() if k != "pretrained"}
        model = create_model(ModelConfig(**tcfg, checkpoint=str(f)), None, "teacher")
        assert model.fc.out_features == 5
        assert all(torch.equal(model.state_dict()[k], net[k]) for k in net)
    nxt = tiny("fitnets")
    nxt["teacher"] = {**{k: v for k, v in raw["student"].items() if k != "pretrained"},
                      "checkpoint": str(first / "student.pt"), "taps": ["layer1", "layer2"], "fusion_size": [2, 2]}
    nxt["train"]["epochs"] = 1
    logs = []
    train(build_config(nxt), tmp_path / "second", log=logs.append)
    assert any(m.startswith("teacher weights: checkpoint") and "student.pt" in m for m in logs)


@pytest.mark.parametrize("name,kwargs", [
    ("resnet18", {"channels": [8, 16, 16, 16], "stem_width": 8}),  # timm
    ("torchvision:resnet18", {}),
    ("builtin:wrn_16_1", {}),
])
def test_a_checkpoint_with_another_class_count_starts_a_new_head(tmp_path, name, kwargs):
    """A checkpoint whose classifier has 7 classes loads into a model of 3 classes: every other tensor is the file's,
    the head keeps its new initialisation, and one note names the head's tensors and both counts. A checkpoint of
    another architecture stays one line naming the counts and the first differing tensors."""
    cfg = ModelConfig(name=name, kwargs=kwargs, pretrained=False)
    torch.manual_seed(0)
    src = create_model(cfg, 7, "student")
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    torch.manual_seed(1)
    fresh_head = {k: v for k, v in create_model(cfg, 3, "student").state_dict().items()}
    notes = []
    torch.manual_seed(1)
    model = create_model(ModelConfig(name=name, kwargs=kwargs, checkpoint=str(path)), 3, "student", notes)
    head = classifier_keys(model)
    assert head and len(notes) == 1 and "\n" not in notes[0]
    assert "7 classes" in notes[0] and "3" in notes[0] and all(k in notes[0] for k in head)
    sd, own = model.state_dict(), src.state_dict()
    assert all(torch.equal(sd[k], own[k]) for k in sd if k not in head)
    assert all(torch.equal(sd[k], fresh_head[k]) for k in head)
    other = ModelConfig(name="builtin:wrn_16_1" if name != "builtin:wrn_16_1" else "resnet18",
                        kwargs={} if name != "builtin:wrn_16_1" else {"channels": [8, 16, 16, 16], "stem_width": 8},
                        checkpoint=str(path))
    with pytest.raises(ProckdError) as e:
        create_model(other, 3, "student")
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 700 and "w.pth does not fit the model" in msg
    assert "missing" in msg or "another shape" in msg


def test_build_distiller_distils_a_finetuned_teacher_file(tiny, tmp_path):
    """From Python: `prockd.train` runs both stages; `build_distiller("finetune_distil", ...)` takes a teacher already
    fine-tuned (the stage-1 cache's teacher.pt: the file's own 5-class head is kept) and trains as stage 2 does."""
    import prockd

    raw = _ft_config(tiny)
    s = json.loads((prockd.train(build_config(raw), tmp_path / "run") / "final.json").read_text())
    tuned = Path(s["finetune"]["dir"]) / "teacher.pt"
    teacher = {**{k: v for k, v in _net(raw).items() if k != "pretrained"}, "checkpoint": str(tuned)}
    teacher["kwargs"] = {k: v for k, v in teacher["kwargs"].items() if k != "num_classes"}
    module = prockd.build_distiller("finetune_distil", teacher=teacher, student=raw["student"], num_classes=5,
                                    alpha_kd=2.0)
    x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, -100])
    module.train()
    _, losses = module(x, y)
    assert set(losses) == {"ce", "kd"} and all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ProckdError, match="its head has 4 classes, the task 5"):
        prockd.build_distiller("finetune_distil", teacher=_net(raw), student=raw["student"], num_classes=5)
