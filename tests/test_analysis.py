"""``prockd analyze``: Chefer relevance against hand-computed and directly computed cases on a 2-block ViT,
and every figure of a run written."""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch

from prockd.classification.attention import grad_rollout, relevance_maps, vit_blocks
from prockd.cli import main


def test_grad_rollout_hand_computed_case():
    # 1 head, N = 2 tokens (class token + one patch); numbers worked out by hand:
    # block 1: (G*A)+ = [[.3, .7], [0, .4]] -> R1 = I + that = [[1.3, .7], [0, 1.4]]
    # block 2: (G*A)+ = [[1, 0], [0, 0]]   -> R2 = R1 + [[1, 0], [0, 0]] R1 = [[2.6, 1.4], [0, 1.4]]
    a1, g1 = torch.tensor([[.3, .7], [.6, .4]]), torch.tensor([[1., 1.], [0., 1.]])
    a2, g2 = torch.tensor([[.5, .5], [.5, .5]]), torch.tensor([[2., 0.], [-1., 0.]])
    roll, blocks = grad_rollout([a1[None, None], a2[None, None]], [g1[None, None], g2[None, None]], 1, (1, 1))
    assert roll.item() == pytest.approx(1.4)
    assert blocks[0].item() == pytest.approx(0.7) and blocks[1].item() == pytest.approx(0.0)
    # two heads average: a second head of zeros halves every block map
    z = torch.zeros(1, 1, 2, 2)
    roll2, blocks2 = grad_rollout([torch.cat([a1[None, None], z], 1), torch.cat([a2[None, None], z], 1)],
                                  [torch.cat([g1[None, None], z], 1), torch.cat([g2[None, None], z], 1)], 1, (1, 1))
    # block 1 cam = [[.15, .35], [0, .2]] -> R1 = [[1.15, .35], [0, 1.2]]; block 2 cam = [[.5, 0], [0, 0]]
    # -> R2 = R1 + [[.575, .175], [0, 0]] -> R2[0, 1] = .525
    assert roll2.item() == pytest.approx(0.525) and blocks2[0].item() == pytest.approx(0.35)


def _direct_attention(model, x):
    """The ViT forward written out by hand (LayerNorm, qkv, softmax, MLP), returning logits and the attention
    probabilities of each block as leaves of this graph."""
    t = model.patch_embed(x)
    t = torch.cat([model.cls_token.expand(len(x), -1, -1), t], 1) + model.pos_embed
    attns = []
    for blk in model.blocks:
        h = blk.norm1(t)
        b, n, c = h.shape
        heads = blk.attn.num_heads
        qkv = h @ blk.attn.qkv.weight.t() + blk.attn.qkv.bias
        q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(c // heads), -1)
        attns.append(a)
        o = (a @ v).transpose(1, 2).reshape(b, n, c) @ blk.attn.proj.weight.t() + blk.attn.proj.bias
        t = t + o
        t = t + blk.mlp.fc2(torch.nn.functional.gelu(blk.mlp.fc1(blk.norm2(t))))
    logits = model.head(model.norm(t)[:, 0])
    return logits, attns


def test_relevance_maps_match_a_direct_computation_on_a_2_block_vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=2, embed_dim=16, depth=2, num_heads=2,
                              in_chans=1, num_classes=5).eval()
    assert len(vit_blocks(model)) == 2 and model.blocks[0].attn.fused_attn in (True, False)
    fused_before = [b.attn.fused_attn for b in model.blocks]
    x = torch.rand(3, 1, 8, 8)
    got = relevance_maps(model, model, x, num_prefix=1, grid=(4, 4))
    assert [b.attn.fused_attn for b in model.blocks] == fused_before  # restored

    logits, attns = _direct_attention(model, x)
    torch.testing.assert_close(logits, got.logits, atol=1e-5, rtol=1e-4)
    tgt = logits.argmax(-1)
    grads = torch.autograd.grad(logits.gather(1, tgt[:, None]).sum(), attns)
    for i in range(len(x)):  # per image, with explicit loops over heads
        n = attns[0].shape[-1]
        r = torch.eye(n)
        cams = []
        for a, g in zip(attns, grads):
            cam = sum((g[i, h] * a[i, h]).clamp(min=0) for h in range(a.shape[1])) / a.shape[1]
            cams.append(cam)
            r = r + cam @ r
        torch.testing.assert_close(got.rollout[i], r[0, 1:].reshape(4, 4), atol=1e-5, rtol=1e-4)
        for b in range(2):
            torch.testing.assert_close(got.blocks[b][i], cams[b][0, 1:].reshape(4, 4), atol=1e-5, rtol=1e-4)
    assert float(got.rollout.sum()) > 0


def test_analyze_writes_every_figure(tiny, tmp_path, capsys):
    import yaml

    runs = []
    for method in ("prockd", "student_only"):
        cfg = tmp_path / f"{method}.yaml"
        cfg.write_text(yaml.safe_dump(tiny(method)))
        run = tmp_path / method
        assert main(["train", "--config", str(cfg), "--out", str(run), "train.epochs=2"]) == 0
        runs.append(run)
    out = tmp_path / "fig"
    capsys.readouterr()
    assert main(["analyze", "--run", str(runs[0]), "--compare", str(runs[1]), "--out", str(out), "--images", "3"]) == 0
    assert main(["analyze", "--run", str(runs[0]), "--out", str(tmp_path / "lrp"), "--attention", "lrp"]) == 0
    assert json.loads((tmp_path / "lrp" / "analysis.json").read_text())["attention"]["method"] == "lrp"
    for name in ("attention.png", "prototypes_0.png", "features_tsne.png", "index.html", "analysis.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 1000, name
    page = (out / "index.html").read_text()
    for png in ("attention.png", "prototypes_0.png", "features_tsne.png"):
        assert f"src='{png}'" in page
    summary = json.loads((out / "analysis.json").read_text())
    assert set(summary["attention"]["runs"]) == {"prockd (seed 0)", "student_only (seed 0)"}
    assert summary["attention"]["runs"]["prockd (seed 0)"]["blocks"] == 2
    p = summary["prototypes"]["prockd (seed 0)"]
    assert p["prototypes"] == 4 and p["drift"] > 0
    f = summary["features"]["runs"]["prockd (seed 0)"]
    assert -1 <= f["silhouette_cosine"] <= 1 and 0 <= f["knn5_accuracy"] <= 100
    # what a run cannot show is named on the console with the reason: student-only alone has no prototypes
    capsys.readouterr()
    assert main(["analyze", "--run", str(runs[1]), "--out", str(tmp_path / "plain")]) == 0
    printed = capsys.readouterr().out
    assert "analyze: Fig. 5 skipped: no ProC-KD run among the runs given" in printed
    # a run that has not finished is refused with its path
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text((runs[0] / "config.yaml").read_text())
    assert main(["analyze", "--run", str(tmp_path / "unfinished")]) == 2
    assert "student.pt" in capsys.readouterr().err


def test_lrp_rules_hand_computed():
    from prockd.classification.attention import lrp_add, lrp_linear, lrp_matmul

    # z+ through W = [[1, -1], [2, 3]] at x = [1, -2]: positive contributions z = [1 + 2, 2] = [3, 2];
    # relevance [1, .5] -> s = [1/3, 1/4]; input 0 gets 1 * (1/3 * 1 + 1/4 * 2), input 1 gets -2 * (1/3 * -1)
    r = lrp_linear(torch.tensor([[1.0, 0.5]]), torch.tensor([[1.0, -2.0]]), torch.tensor([[1.0, -1.0], [2.0, 3.0]]))
    torch.testing.assert_close(r, torch.tensor([[1 / 3 + 0.5, 2 / 3]]))
    assert float(r.sum()) == pytest.approx(1.5)  # conserved
    # a + b with a = [1, 2], b = [3, -2], relevance [2, 1]: the second sum is 0 (its relevance is dropped), the
    # first splits .5 / 1.5; rescaled to the total 3 in proportion |.5| : |1.5|
    ra, rb = lrp_add(torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -2.0]]))
    torch.testing.assert_close(ra, torch.tensor([[0.75, 0.0]]))
    torch.testing.assert_close(rb, torch.tensor([[2.25, 0.0]]))
    # [1, 2] @ [[3], [4]] = 11 carrying 22: each operand gets all of it, by its share of the products
    pa, pb = lrp_matmul(torch.tensor([[22.0]]), torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]]))
    torch.testing.assert_close(pa, torch.tensor([[6.0, 16.0]]))
    torch.testing.assert_close(pb, torch.tensor([[6.0], [16.0]]))


def test_lrp_maps_on_a_deployed_2_block_vit(tiny, tmp_path):
    from prockd.classification.attention import _block_relprop, _trace_blocks, lrp_maps
    from prockd.classification.config import build_config
    from prockd.classification.engine import build

    b = build(build_config(tiny(), "test"))
    for output in ("aug", "plain"):
        dep = b.distiller.export().eval()
        dep.output = output
        x = torch.rand(3, 1, 8, 8)
        maps = lrp_maps(dep, x)
        assert maps.rollout.shape == (3, 4, 4) and len(maps.blocks) == 2
        assert (maps.rollout >= 0).all() and (maps.blocks[1] >= 0).all() and float(maps.rollout.sum()) > 0
        with torch.no_grad():
            torch.testing.assert_close(maps.logits, dep(x))
    # relevance is conserved through a whole block (z+, halved products, conserving additions)
    model = dep.student.model
    with torch.no_grad():
        t, recs = _trace_blocks(model, dep.student.transform(x))
        r_out = torch.rand_like(t)
        r_in, r_a = _block_relprop(model.blocks[1], recs[1], r_out)
    torch.testing.assert_close(r_in.sum((1, 2)), r_out.sum((1, 2)), rtol=2e-3, atol=1e-4)
    assert r_a.shape == recs[1]["A"].shape
