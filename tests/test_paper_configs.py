"""The paper's protocols as runnable configs: Table 4 (WRN, same task) and Table 1 (ViT-B / Swin-L).

Every config is loaded as shipped (with its ``base:`` files), its models are built without weights and
one training step runs on a few images this test writes in the dataset's own layout.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prockd.classification.config import load_config
from prockd.classification.engine import build
from prockd.classification.models import count_params
from prockd.classification.wrn import WRN_BUILTINS
from prockd.cli import main
from prockd.core.loop import make_optimizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100) -> Path:
    """A CIFAR-100 python-pickle directory with random images, every class present."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        obj = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "fine_labels": [i % 100 for i in range(n)],
               "coarse_labels": [0] * n}
        with open(d / split, "wb") as f:
            pickle.dump(obj, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, f)
    return root


def write_officehome(root: Path, classes=("Alarm_Clock", "Bike", "Calculator"), per_class: int = 2) -> Path:
    """Office-Home-shaped ImageFolders: one folder per domain, one sub-folder per class, JPEG files."""
    rng = np.random.default_rng(1)
    for domain in ("Real_World", "Art", "Clipart", "Product"):
        for c in classes:
            (root / domain / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / domain / c / f"{i:05d}.jpg")
    return root


def one_step(b) -> dict:
    """One optimiser step of the built run on 2 training images; returns the losses."""
    opt = make_optimizer(b.distiller.learnable_parameters(), b.cfg.train)
    x = b.task.train.images[:2].float().div(255)
    y = b.task.train.labels[:2]
    b.distiller.train()
    _, losses = b.distiller(x, y)
    loss = sum(losses.values())
    assert torch.isfinite(loss), losses
    before = [p.detach().clone() for p in b.distiller.student.parameters()]
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert any(not torch.equal(p0, p) for p0, p in zip(before, b.distiller.student.parameters()))
    return losses


def test_wrn_parameter_counts():
    counts = {n: count_params(WRN_BUILTINS[n](num_classes=100)) for n in ("wrn_40_2", "wrn_40_1", "wrn_16_2", "wrn_16_1")}
    # the CIFAR WRNs of the paper's Table 4 (2.26 M, 0.57 M, 0.70 M, 0.18 M)
    assert counts == {"wrn_40_2": 2_255_156, "wrn_40_1": 569_780, "wrn_16_2": 703_284, "wrn_16_1": 180_916}
    x = torch.zeros(2, 3, 32, 32)
    m = WRN_BUILTINS["wrn_16_1"](num_classes=7)
    assert m(x).shape == (2, 7) and m.forward_features(x).shape == (2, 64, 8, 8)


TABLE4_METHODS = ["kd", "dkd", "fitnets", "vid", "rkd", "refilled", "prockd"]


@pytest.fixture(scope="module")
def table4_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("table4")
    write_cifar100(root / "cifar")
    teacher = root / "teacher.pt"
    torch.save({"model": WRN_BUILTINS["wrn_40_2"](num_classes=100).state_dict()}, teacher)
    return root, teacher


@pytest.mark.parametrize("student", ["wrn_40_1", "wrn_16_2", "wrn_16_1"])
@pytest.mark.parametrize("method", TABLE4_METHODS)
def test_table4_configs_build_and_step(table4_env, method, student):
    root, teacher = table4_env
    cfg = load_config(CONFIGS / "table4" / f"{method}.yaml",
                      [f"data.root={root / 'cifar'}", f"teacher.checkpoint={teacher}", f"student.name=builtin:{student}"])
    assert cfg.train.optimizer == "sgd" and cfg.train.schedule == "step" and cfg.train.milestones == [100, 140, 180]
    b = build(cfg)
    assert b.task.num_classes == 100 and b.teacher.num_outputs == 100
    b.distiller.set_epoch(cfg.train.epochs - 1, cfg.train.epochs)
    one_step(b)


def test_table4_teacher_then_student_through_the_cli(table4_env, tmp_path, capsys):
    root, _ = table4_env
    data = f"data.root={root / 'cifar'}"
    assert main(["pretrain-teacher", "--config", str(CONFIGS / "table4" / "teacher.yaml"), "--out",
                 str(tmp_path / "t"), data, "train.epochs=1", "train.progress=false"]) == 0
    assert (tmp_path / "t" / "teacher.pt").is_file()
    assert main(["train", "--config", str(CONFIGS / "table4" / "prockd.yaml"), "--out", str(tmp_path / "s"), data,
                 f"teacher.checkpoint={tmp_path / 't' / 'teacher.pt'}", "student.name=builtin:wrn_16_1",
                 "train.epochs=1", "train.progress=false", f"cache.dir={tmp_path / 'cache'}"]) == 0
    assert (tmp_path / "s" / "student.pt").is_file()


TABLE1 = [f"{t}-{d}" for t in ("vit_b", "swin_l") for d in ("cifar100", "lt_cifar100", "officehome")]


@pytest.fixture(scope="module")
def table1_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("table1")
    write_cifar100(root / "cifar", n_train=1000, n_test=100)
    write_officehome(root / "OfficeHome")
    return root, {}


@pytest.mark.parametrize("name", TABLE1)
def test_table1_configs_build_without_weights_and_step(table1_env, name):
    root, teachers = table1_env
    oh = root / "OfficeHome"
    ov = ["teacher.pretrained=false", "train.amp=none", f"cache.dir={root / 'cache'}"]
    ov += ([f"data.root={root / 'cifar'}"] if "cifar" in name else
           [f"data.train_dir={oh / 'Real_World'}", "data.image_size=64",
            f"data.test_dirs={{art: {oh / 'Art'}, clipart: {oh / 'Clipart'}, product: {oh / 'Product'}}}"])
    cfg = load_config(CONFIGS / "table1" / f"{name}.yaml", ov)
    t = cfg.train
    assert (t.batch_size, t.lr, t.weight_decay, t.warmup_epochs, t.schedule) == (64, 5e-4, 0.05, 5, "cosine")
    assert cfg.student.input_size == cfg.teacher.input_size == 224
    family, data = name.split("-")
    if family == "swin_l" and data != "cifar100":
        # the Swin-L pair's build and step are swin_l-cifar100's, this data's are vit_b's: the config is that
        # pair with that data (building the 110 M student again would only repeat them, at 20 s each)
        pair = load_config(CONFIGS / "table1" / "swin_l-cifar100.yaml", ov[:2] + [f"data.root={root / 'cifar'}"])
        same_data = load_config(CONFIGS / "table1" / f"vit_b-{data}.yaml", ov)
        assert (cfg.teacher, cfg.student, cfg.train) == (pair.teacher, pair.student, pair.train)
        assert cfg.data == same_data.data and cfg.method.name == "prockd"
        return
    teacher = teachers.get(family)
    b = build(cfg, teacher=teacher)
    teachers[family] = b.teacher  # the 86 M / 197 M teacher is built once per family
    if name.endswith("lt_cifar100"):
        assert cfg.data.imbalance == 100 and len(b.task.train) < 1000
    if name.endswith("officehome"):
        assert set(b.task.tests) == {"art", "clipart", "product"}
    expected = {"vit_b": 43.35e6, "swin_l": 110.05e6}[family] - (100 - b.task.num_classes) * b.distiller.student.head_width
    assert abs(count_params(b.distiller.student.model) - expected) < 0.01e6
    losses = one_step(b)
    assert {"ce", "ce_aug", "kl", "emb"} <= set(losses)


def test_config_base_files_merge_and_errors(tmp_path):
    from prockd.errors import ProckdError

    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrain: {lr: 0.5}\n")
    (tmp_path / "b.yaml").write_text("student: {name: resnet18}\ntrain: {lr: 0.1, epochs: 7}\n"
                                     "method: {name: student_only}\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert (cfg.train.lr, cfg.train.epochs, cfg.student.name) == (0.5, 7, "resnet18")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ProckdError, match="'base' files include each other"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ProckdError, match=r"config file not found: .*missing.yaml \(base of .*c.yaml\)"):
        load_config(tmp_path / "c.yaml")


def test_switching_method_on_the_command_line_starts_from_its_defaults(table4_env):
    root, teacher = table4_env
    cfg = load_config(CONFIGS / "table4" / "prockd.yaml", ["method.name=ofd"])
    assert cfg.method.name == "ofd" and cfg.method.params == {}
    cfg = load_config(CONFIGS / "table4" / "prockd.yaml", ["method.name=ofd", "method.params.weight=2"])
    assert cfg.method.params == {"weight": 2}


@pytest.mark.skipif(__import__("prockd.classification.data", fromlist=["x"]).find_fashion_mnist(None) is None,
                    reason="Fashion-MNIST is not installed (make data)")
def test_table4_protocol_at_small_scale_on_the_embedded_data(tmp_path, capsys):
    import yaml

    from prockd.bench.compare import load_spec, run_compare

    small = ["data.labels_per_class=12", "data.test_limit=60", "train.epochs=1", "train.progress=false"]
    assert main(["pretrain-teacher", "--config", str(CONFIGS / "table4" / "fmnist_teacher.yaml"), "--out",
                 str(tmp_path / "teacher"), *small]) == 0
    spec = load_spec(CONFIGS / "table4" / "fmnist_compare.yaml", {"seeds": 1, "workers": 1})
    assert set(spec["methods"]) == {"student_only", "kd", "dkd", "fitnets", "vid", "rkd", "refilled", "prockd"}
    spec["methods"] = {m: spec["methods"][m] for m in ("student_only", "kd", "prockd")}
    spec["students"] = {"wrn_16_1": spec["students"]["wrn_16_1"]}
    spec["data"].update(labels_per_class=8, test_limit=60)
    spec["base"]["teacher"]["checkpoint"] = str(tmp_path / "teacher" / "teacher.pt")
    spec["base"]["train"].update(epochs=1, milestones=[])
    spec["base"]["cache"]["dir"] = str(tmp_path / "cache")
    res = run_compare(tmp_path / "cmp", yaml.safe_load(yaml.safe_dump(spec, sort_keys=False)))
    cells = res["settings"]["standard"]["wrn_16_1"]
    assert set(cells) == {"student_only", "kd", "prockd"} and all(c["seeds"] == [0] for c in cells.values())
    probe = res["settings"]["standard"]["probe"]  # same task: the probes still run, on the student's training set
    assert probe["train_images"] >= 5 * 8 and 20 < probe["teacher"] <= 100 and 20 < probe["pixels"] <= 100
