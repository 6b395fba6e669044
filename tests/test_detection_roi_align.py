"""The sparse-product multi-scale RoIAlign against torchvision's kernels (an independent computation)."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from prockd.detection.config import DetectorConfig
from prockd.detection.models import build_detector
from prockd.detection.roi_align import SparseMultiScaleRoIAlign, roi_align_matrix

NAMES = ["0", "1", "2", "3"]


def _pyramid(seed: int, n: int = 3, c: int = 8, h: int = 480, w: int = 640) -> OrderedDict:
    """A 4-level pyramid (strides 4..32) of an ``n``-image batch of ``h`` x ``w`` images, and a pool level."""
    g = torch.Generator().manual_seed(seed)
    feats = OrderedDict((k, torch.randn(n, c, h // 4 >> i, w // 4 >> i, generator=g, dtype=torch.float64,
                                        requires_grad=True)) for i, k in enumerate(NAMES))
    feats["pool"] = torch.randn(n, c, 2, 2, generator=g, dtype=torch.float64)
    return feats


def _boxes(seed: int, counts=(7, 0, 60), h: int = 480, w: int = 640) -> list[torch.Tensor]:
    """Boxes of every size (sub-cell to the whole image, every FPN level), some partly outside the image."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([w + 20.0, h + 20.0]) - 20
        wh = torch.rand(n, 2, generator=g, dtype=torch.float64) ** 3 * torch.tensor([1.2 * w, 1.2 * h]) + 0.1
        out.append(torch.cat([xy, xy + wh], 1))
    out[0][:3] = torch.tensor([[0.0, 0.0, 0.5, 0.5], [w - 1.0, h - 1.0, w + 0.0, h + 0.0], [0.0, 0.0, w, h]],
                              dtype=torch.float64)
    return out


@pytest.mark.parametrize("output_size,sampling_ratio", [(7, 2), ((5, 3), 1), (4, 3)])
def test_sparse_roi_align_equals_torchvision_values_and_gradients(output_size, sampling_ratio):
    feats, boxes = _pyramid(0), _boxes(1)
    shapes = [(480, 640)] * 3
    ref = MultiScaleRoIAlign(NAMES, output_size, sampling_ratio)
    new = SparseMultiScaleRoIAlign(NAMES, output_size, sampling_ratio)
    a, b = ref(feats, boxes, shapes), new(feats, boxes, shapes)
    assert a.shape == b.shape == (67, 8, *((output_size,) * 2 if isinstance(output_size, int) else output_size))
    levels = new.map_levels(boxes)
    assert set(levels.tolist()) == {0, 1, 2, 3}  # every level pooled
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(a)
    ga = torch.autograd.grad(a, [feats[k] for k in NAMES], grad)
    gb = torch.autograd.grad(b, [feats[k] for k in NAMES], grad)
    for x, y in zip(gb, ga):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_the_bilinear_matrix_keeps_csr_invariants_and_zeroes_samples_off_the_map():
    """Columns sorted and distinct within each row (torch's CSR invariants, checked); a bin whose samples lie on
    the map averages them (weights summing to one); samples beyond the map's edge (+1 cell) count zero."""
    rois = torch.tensor([[0, 2.0, 3.0, 9.0, 7.5], [1, 0.0, 0.0, 0.4, 0.4], [0, 28.0, 28.0, 31.0, 31.0],
                         [1, 30.0, 30.0, 31.9, 31.9]])  # the last: a 1-cell RoI from 7.5, half of it past 8
    m = roi_align_matrix(rois, torch.tensor([0, 0, 0, 0]), [(2, 8, 8)], [0.25], (2, 2), 2)
    torch.sparse_csr_tensor(m.crow_indices(), m.col_indices(), m.values(), m.shape, check_invariants=True)
    sums = torch.zeros(m.shape[0]).index_add_(
        0, torch.repeat_interleave(torch.arange(m.shape[0]), m.crow_indices().diff()), m.values())
    torch.testing.assert_close(sums, torch.tensor([1.0] * 12 + [1.0, 0.0, 0.0, 0.0]))
    assert m.shape == (16, 2 * 8 * 8)


def test_no_boxes_and_adaptive_sampling_fall_back_cleanly():
    feats = _pyramid(2)
    empty = [torch.zeros(0, 4, dtype=torch.float64)] * 3
    out = SparseMultiScaleRoIAlign(NAMES, 7, 2)(feats, empty, [(480, 640)] * 3)
    assert out.shape == (0, 8, 7, 7)
    boxes = _boxes(3)
    adaptive = SparseMultiScaleRoIAlign(NAMES, 7, -1)(feats, boxes, [(480, 640)] * 3)  # torchvision's kernel
    torch.testing.assert_close(adaptive, MultiScaleRoIAlign(NAMES, 7, -1)(feats, boxes, [(480, 640)] * 3))


def test_detectors_use_the_sparse_pooler_by_default_and_detect_alike():
    """``roi_align: auto`` (the default) and ``torchvision`` build the same detector; with the same weights their
    detections agree (float order aside)."""
    cfg = DetectorConfig(backbone="builtin:mobilenet_v2", fpn_channels=16, representation_size=32, min_size=[96],
                         max_size=96, anchor_sizes=[8, 16, 32, 64, 128])
    auto = build_detector(cfg, 3)
    tv = build_detector(cfg.model_copy(update={"roi_align": "torchvision"}), 3)
    assert type(auto.roi_heads.box_roi_pool) is SparseMultiScaleRoIAlign
    assert type(tv.roi_heads.box_roi_pool) is MultiScaleRoIAlign
    tv.load_state_dict(auto.state_dict())
    assert auto.state_dict().keys() == tv.state_dict().keys()
    auto.eval(), tv.eval()
    torch.manual_seed(0)
    images = [torch.rand(3, 96, 96) for _ in range(2)]
    with torch.no_grad():
        feats = auto.backbone(auto.transform(images)[0].tensors)
        props = [torch.tensor([[4.0, 5.0, 40.0, 60.0], [10.0, 10.0, 90.0, 90.0]])] * 2
        pa = auto.roi_heads.box_roi_pool(feats, props, [(96, 96)] * 2)
        pt = tv.roi_heads.box_roi_pool(feats, props, [(96, 96)] * 2)
        da, dt = auto(images), tv(images)
    torch.testing.assert_close(pa, pt, rtol=1e-4, atol=1e-5)
    for x, y in zip(da, dt):
        torch.testing.assert_close(x["scores"], y["scores"], rtol=1e-3, atol=1e-4)
