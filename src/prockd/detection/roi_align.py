"""Multi-scale RoIAlign as one sparse matrix product: the box head's RoI pooling, faster on CPU.

torchvision's ``MultiScaleRoIAlign`` (Mask R-CNN's RoIAlign, He et al., ICCV 2017, on an FPN: Lin et al., CVPR
2017) calls its ``roi_align`` kernel once per pyramid level; on CPU that kernel's backward recomputes the bilinear
weights for every channel and adds them one value at a time (measured on the embedded student, one thread: about
a third of a training step). Every RoIAlign output value is a fixed weighted sum of at most
``4 * sampling_ratio**2`` input values, so the whole pooling of all levels is ``M @ X``: ``X`` the pyramid's
levels flattened to rows of channels and stacked, ``M`` a sparse (CSR) matrix of the bilinear weights, built once
per call from the boxes. Its backward is ``M.T @ grad`` (autograd's own). The weights are those of ``roi_align``
with ``aligned=False`` and a fixed ``sampling_ratio`` (torchvision's Faster R-CNN pooler): a sample outside
``[-1, size]`` is zero, a sample within is clamped to the map, the RoI is at least one cell wide; the level of
each box is torchvision's ``LevelMapper``. Tested against ``torchvision.ops.roi_align`` (forward and gradients,
tiny, border and out-of-map boxes): the same values up to float order (1e-10 in float64).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _filter_input, _setup_scales


def _axis(p: Tensor, size: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One axis of RoIAlign's bilinear samples ``p`` on maps of ``size`` cells (a per-RoI column, broadcast over
    the samples), as torchvision's ``bilinear_interpolate``: (low index, high index, low weight, high weight,
    inside mask)."""
    inside = (p >= -1.0) & (p <= size)
    p = p.clamp(min=0)
    lo = torch.minimum(p.floor().long(), size - 1)
    hi = torch.minimum(lo + 1, size - 1)
    p = torch.where(lo >= size - 1, lo.to(p.dtype), p)
    frac = p - lo
    return lo, hi, 1 - frac, frac, inside


def roi_align_matrix(rois: Tensor, levels: Tensor, shapes: list[tuple[int, int, int]], scales: list[float],
                     output_size: tuple[int, int], sampling_ratio: int) -> Tensor:
    """The sparse CSR matrix ``M`` (``R * ph * pw`` rows, one column per cell of every level's map, levels stacked
    in order, images within a level in batch order) with ``M @ X`` = RoIAlign of ``rois`` (``[image, x1, y1, x2,
    y2]`` in image pixels), each on its level ``levels[i]`` of ``shapes`` (``(images, height, width)`` per level)
    at that level's ``scales`` entry. Columns within a row are sorted and distinct (CSR's invariants)."""
    ph, pw = output_size
    g = sampling_ratio
    r = rois.shape[0]
    dev, dt = rois.device, rois.dtype
    n_cells = [n * h * w for n, h, w in shapes]
    offsets = torch.tensor([0] + n_cells[:-1], device=dev).cumsum(0)
    heights = torch.tensor([h for _, h, _ in shapes], device=dev)
    widths = torch.tensor([w for _, _, w in shapes], device=dev)
    scale = torch.tensor(scales, device=dev, dtype=dt)[levels]
    h_r, w_r = heights[levels], widths[levels]
    x1, y1, x2, y2 = (rois[:, 1:] * scale[:, None]).unbind(1)
    rw, rh = (x2 - x1).clamp(min=1.0), (y2 - y1).clamp(min=1.0)
    # sample k of a row of bins lies at (k + 0.5) / (bins * g) of the RoI
    sx = (torch.arange(pw * g, device=dev, dtype=dt) + 0.5) / (pw * g)
    sy = (torch.arange(ph * g, device=dev, dtype=dt) + 0.5) / (ph * g)
    px, py = x1[:, None] + rw[:, None] * sx, y1[:, None] + rh[:, None] * sy
    # per-RoI map sizes: the clamps take tensors (levels differ in size)
    xl, xh, wxl, wxh, vx = _axis(px, w_r[:, None])
    yl, yh, wyl, wyh, vy = _axis(py, h_r[:, None])
    yi = torch.stack([yl, yh], -1).view(r, ph, 1, g, 2, 1, 1)
    wy = (torch.stack([wyl, wyh], -1) * vy[..., None]).view(r, ph, 1, g, 2, 1, 1)
    xi = torch.stack([xl, xh], -1).view(r, 1, pw, 1, 1, g, 2)
    wx = (torch.stack([wxl, wxh], -1) * vx[..., None]).view(r, 1, pw, 1, 1, g, 2)
    base = (offsets[levels] + rois[:, 0].long() * h_r * w_r).view(r, 1, 1, 1, 1, 1, 1)
    col = base + yi * w_r.view(r, 1, 1, 1, 1, 1, 1) + xi  # (r, ph, pw, g, 2, g, 2): one row per bin
    w = wy * wx / (g * g)
    rows, k = r * ph * pw, 4 * g * g
    shape = (r, ph, pw, g, 2, g, 2)
    col, order = col.expand(shape).reshape(rows, k).sort(dim=1)
    w = w.expand(shape).reshape(rows, k).gather(1, order)
    # merge repeated cells of a row (neighbouring samples in one cell, clamped corners): sorted keys -> runs
    total = sum(n_cells)
    key = (torch.arange(rows, device=dev).view(rows, 1) * total + col).view(-1)
    ukey, inv = torch.unique_consecutive(key, return_inverse=True)
    uw = torch.zeros(ukey.numel(), device=dev, dtype=dt).index_add_(0, inv, w.reshape(-1))
    urow = torch.div(ukey, total, rounding_mode="floor")
    crow = torch.zeros(rows + 1, device=dev, dtype=torch.long)
    crow[1:] = torch.bincount(urow, minlength=rows).cumsum(0)
    with warnings.catch_warnings():  # "CSR support is in beta": the product and its gradient are tested here
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, ukey - urow * total, uw, (rows, total), check_invariants=False)


def sparse_multiscale_roi_align(features: list[Tensor], boxes: list[Tensor], output_size: tuple[int, int],
                                sampling_ratio: int, scales: list[float], mapper) -> Tensor:
    """RoIAlign of ``boxes`` (one ``[N, 4]`` tensor per image) on the level ``mapper`` assigns each, as
    :func:`torchvision.ops.poolers._multiscale_roi_align` returns it (``[R, C, ph, pw]``, boxes in image order)."""
    counts = [len(b) for b in boxes]
    c = features[0].shape[1]
    ph, pw = output_size
    if sum(counts) == 0:
        return features[0].new_zeros((0, c, ph, pw))
    idx = torch.cat([torch.full((n,), i, dtype=boxes[0].dtype, device=boxes[0].device)
                     for i, n in enumerate(counts)])
    rois = torch.cat([idx[:, None], torch.cat(boxes)], dim=1)
    levels = mapper(boxes) if len(features) > 1 else torch.zeros(len(rois), dtype=torch.long, device=rois.device)
    shapes = [(f.shape[0], f.shape[2], f.shape[3]) for f in features]
    m = roi_align_matrix(rois, levels.long(), shapes, list(scales), (ph, pw), sampling_ratio).to(features[0].dtype)
    x = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, c) for f in features])
    return (m @ x).view(len(rois), ph, pw, c).permute(0, 3, 1, 2)


class SparseMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (same arguments, levels, scales and values) computed by
    :func:`sparse_multiscale_roi_align` on float32 / float64 CPU tensors; on other devices and types, with an
    adaptive ``sampling_ratio`` (<= 0) and in an ONNX export, torchvision's own kernels."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """Pool ``boxes`` (per image, image pixels) from the feature maps ``x``: ``[R, C, ph, pw]``."""
        x_filtered = _filter_input(x, self.featmap_names)
        if x_filtered[0].device.type != "cpu" or x_filtered[0].dtype not in (torch.float32, torch.float64) \
                or self.sampling_ratio <= 0 or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(x_filtered, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        return sparse_multiscale_roi_align(x_filtered, boxes, tuple(self.output_size), self.sampling_ratio,
                                           self.scales, self.map_levels)
