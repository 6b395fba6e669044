"""Models: creation, frozen teacher, taps, paper student sizes, built-in ImageNet teacher."""
from __future__ import annotations

import pytest
import timm
import torch

from prockd.classification.config import ModelConfig
from prockd.classification.models import (
    Student,
    Teacher,
    count_params,
    create_model,
    init_student_from_teacher,
)
from prockd.errors import ProckdError
from prockd.features import FeatureRecorder, default_taps, to_tokens


@pytest.mark.parametrize("depth,expected", [(6, 43.35), (4, 29.17), (2, 15.00)])
def test_paper_vit_students(depth, expected):
    m = create_model(ModelConfig(name="vit_base_patch16_224", kwargs={"depth": depth}), 100, "student")
    assert round(count_params(m) / 1e6, 2) == expected


@pytest.mark.parametrize("depths,expected", [((2, 2, 6, 2), 110.05), ((1, 1, 1, 1), 44.02)])
def test_paper_swin_students(depths, expected):
    m = create_model(ModelConfig(name="swin_large_patch4_window7_224", kwargs={"depths": depths}), 100, "student")
    assert round(count_params(m) / 1e6, 2) == expected


def test_default_taps_per_family():
    vit = timm.create_model("vit_base_patch16_224", depth=12, pretrained=False)
    assert default_taps(vit, 3) == ["blocks.3", "blocks.7", "blocks.11"]  # blocks 4, 8, 12
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    assert default_taps(swin, 3) == ["layers.1", "layers.2", "layers.3"]
    res = timm.create_model("resnet18", pretrained=False)
    assert default_taps(res, 3) == ["layer2", "layer3", "layer4"]
    import torchvision

    tv = torchvision.models.resnet18()
    assert default_taps(tv, 2) == ["layer3", "layer4"]


def test_bad_tap_path_lists_near_matches():
    m = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(ProckdError, match=r"'layer5'.*Near matches: layer\d"):
        FeatureRecorder(m, ["layer5"], "teacher")


def test_tokens_for_vit_swin_cnn():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, pretrained=False)
    t, lay = to_tokens(vit.forward_features(torch.zeros(2, 3, 32, 32)), vit)
    assert t.shape == (2, 17, 192) and (lay.prefix, lay.h, lay.w) == (1, 4, 4)
    swin = timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1), pretrained=False)
    t, lay = to_tokens(swin.forward_features(torch.zeros(1, 3, 224, 224)), swin)
    assert t.shape == (1, 49, 768) and (lay.prefix, lay.h, lay.w) == (0, 7, 7)
    res = timm.create_model("resnet18", pretrained=False)
    t, lay = to_tokens(res.forward_features(torch.zeros(1, 3, 64, 64)), res)
    assert t.shape == (1, 4, 512) and (lay.h, lay.w) == (2, 2)


def test_teacher_is_frozen_and_has_own_transform():
    cfg = ModelConfig(name="resnet18", kwargs={"channels": [8, 16, 16, 16], "stem_width": 8}, input_size=32,
                      in_chans=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    t = Teacher(create_model(cfg, 7, "teacher"), cfg)
    t.train()
    assert not t.model.training
    assert all(not p.requires_grad for p in t.model.parameters())
    assert not any(getattr(m, "inplace", False) for m in t.model.modules())
    feats = t.extract(torch.rand(2, 1, 12, 12))  # grayscale, another size: the teacher's transform adapts
    assert feats["taps"].shape[0] == 2 and not feats["taps"].requires_grad
    assert feats["logits"].shape == (2, 7)
    x = torch.full((1, 1, 4, 4), 0.75)
    y = t.transform(x)
    assert y.shape == (1, 3, 32, 32) and torch.allclose(y, torch.ones_like(y), atol=1e-5)


def test_unknown_model_names():
    with pytest.raises(ProckdError, match="unknown timm model name 'resnet181'"):
        create_model(ModelConfig(name="resnet181"), 10, "student")
    with pytest.raises(ProckdError, match="unknown torchvision model"):
        create_model(ModelConfig(name="torchvision:resnet_xx"), 10, "teacher")


def test_init_student_from_teacher_copies_embedding_and_first_blocks():
    t = create_model(ModelConfig(name="vit_tiny_patch16_224", kwargs={"img_size": 32, "patch_size": 8,
                                                                     "depth": 4}), None, "teacher")
    s = create_model(ModelConfig(name="vit_tiny_patch16_224", kwargs={"img_size": 32, "patch_size": 8,
                                                                     "depth": 2}), 10, "student")
    n = init_student_from_teacher(s, t)
    assert n > 10
    assert torch.equal(s.patch_embed.proj.weight, t.patch_embed.proj.weight)
    assert torch.equal(s.blocks[1].mlp.fc1.weight, t.blocks[1].mlp.fc1.weight)
    assert not torch.equal(s.head.weight[:1], t.head.weight[:1, : s.head.weight.shape[1]])


def test_student_head_accepts_teacher_layouts():
    cfg = ModelConfig(name="vit_tiny_patch16_224", kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 16,
                                                           "depth": 1, "num_heads": 2}, in_chans=1)
    st = Student(create_model(cfg, 5, "student"), cfg)
    from prockd.features import Layout

    assert st.head(torch.randn(3, 9, 16), Layout(0, 3, 3)).shape == (3, 5)  # CNN-like teacher path
    assert st.head(torch.randn(3, 50, 16), Layout(1, 7, 7)).shape == (3, 5)  # ViT-like teacher path
    ccfg = ModelConfig(name="resnet18", kwargs={"channels": [8, 8, 8, 16], "stem_width": 8}, in_chans=1)
    cs = Student(create_model(ccfg, 5, "student"), ccfg)
    assert cs.head(torch.randn(3, 50, 16), Layout(1, 7, 7)).shape == (3, 5)


def _sample_images():
    from sklearn.datasets import load_sample_images

    imgs = load_sample_images().images  # china.jpg (a temple), flower.jpg
    return torch.stack([torch.from_numpy(i.copy()).permute(2, 0, 1).float() / 255 for i in imgs])


def test_builtin_imagenet_teacher_predicts_sensibly():
    from timm.data import ImageNetInfo

    cfg = ModelConfig(name="builtin:efficientnet_lite0", pretrained=True)
    t = Teacher(create_model(cfg, None, "teacher"), cfg)
    x = torch.nn.functional.interpolate(_sample_images(), size=(224, 224), mode="bilinear", antialias=True)
    probs = t.predict(x).softmax(-1)
    info = ImageNetInfo()
    top5 = [[info.index_to_description(int(i)) for i in p.topk(5).indices] for p in probs]
    temple = {"palace", "monastery", "church, church building", "pagoda, pagoda tree", "bell cote, bell cot",
              "dome", "stupa, tope", "cinema, movie theater, movie theatre, movie house, picture palace",
              "boathouse", "mosque", "castle", "planetarium", "triumphal arch", "suspension bridge", "lakeside, lakeshore"}
    flower = {"daisy", "pot, flowerpot", "bee", "hip, rose hip, rosehip", "vase", "ant, emmet, pismire",
              "cardoon", "fly", "sulphur butterfly, sulfur butterfly", "lycaenid, lycaenid butterfly",
              "ringlet, ringlet butterfly", "admiral", "hair slide", "sea anemone, anemone", "hummingbird",
              "bell pepper", "strawberry", "pinwheel"}
    assert set(top5[0]) & temple, top5[0]
    assert set(top5[1]) & flower, top5[1]
    assert top5[0][0] in temple and top5[1][0] == "daisy", (top5[0][0], top5[1][0])
    assert probs[0].max() > 0.2 and probs[1].max() > 0.1


def _vit_teacher_file(tmp_path, depth: int = 4) -> tuple[dict, torch.nn.Module]:
    """A ViT teacher of ``depth`` blocks saved as a checkpoint, and its model config."""
    cfg = {"name": "vit_tiny_patch16_224", "in_chans": 1, "input_size": 8, "mean": [0.3], "std": [0.4],
           "kwargs": {"img_size": 8, "patch_size": 2, "embed_dim": 16, "depth": depth, "num_heads": 2,
                      "mlp_ratio": 2.0, "num_classes": 7}}
    torch.manual_seed(3)
    model = create_model(ModelConfig(**cfg), None, "teacher")
    torch.save(model.state_dict(), tmp_path / "vit_teacher.pt")
    return dict(cfg, checkpoint=str(tmp_path / "vit_teacher.pt")), model


@pytest.mark.parametrize("method", ["student_only", "finetune_distil"])
def test_init_from_teacher_for_every_method_copies_the_pretrained_teacher(tiny, tmp_path, method):
    """student.init_from_teacher works whatever the method (student-only has no teacher of its own) and copies the
    pre-trained teacher the config names, also where the method distils a fine-tuned copy of it (every row of a
    comparison starts from the same student)."""
    from prockd.classification.config import build_config
    from prockd.classification.engine import build

    t_cfg, t_model = _vit_teacher_file(tmp_path)
    student = {k: v for k, v in t_cfg.items() if k != "checkpoint"}
    student = dict(student, kwargs={k: v for k, v in student["kwargs"].items() if k != "num_classes"} | {"depth": 2},
                   init_from_teacher=True)
    raw = tiny(method, teacher=t_cfg, student=student)
    if method == "finetune_distil":
        raw["teacher"]["finetune"] = {"epochs": 1, "batch_size": 16}
        raw["data"]["val_fraction"] = 0.2
    b = build(build_config(raw, "test"), log=lambda *_: None)
    s = b.distiller.student.model
    assert torch.equal(s.patch_embed.proj.weight, t_model.patch_embed.proj.weight)
    assert torch.equal(s.blocks[1].attn.qkv.weight, t_model.blocks[1].attn.qkv.weight)
    assert "copied from the teacher" in b.weights["student"]


def test_init_from_teacher_without_a_teacher_section_says_what_to_add(tiny):
    from prockd.classification.config import build_config
    from prockd.classification.engine import build

    raw = tiny("student_only", student=dict(tiny()["student"], init_from_teacher=True))
    raw.pop("teacher")
    with pytest.raises(ProckdError, match="no teacher section"):
        build(build_config(raw, "test"), log=lambda *_: None)
