"""Attention relevance maps of ViTs (paper Fig. 4) by Chefer, Gur and Wolf, "Generic attention-model
explainability for interpreting bi-modal and encoder-decoder transformers", ICCV 2021: gradient-weighted
attention rollout.

For block ``b`` with attention probabilities ``A_b`` (``B x H x N x N``) and their gradient ``∇A_b`` for the
target logit, ``Ā_b = mean_heads((∇A_b ⊙ A_b)^+)``; the rollout is ``R = I; R ← R + Ā_b R`` over the blocks
in order and the map is the class-token row of ``R`` over the patch tokens (the mean row for ViTs without a
class token). A single block's map is the class-token row of ``Ā_b``: the paper shows those of the second and
the last block.

The maps are read from timm ViTs (``model.blocks[i].attn``) with the fused attention kernel switched off
for the pass (no attention probabilities exist to hook otherwise) and a hook on ``attn.attn_drop``, whose
input is the softmaxed attention.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from prockd.errors import ProckdError


def vit_blocks(model: nn.Module) -> list[nn.Module] | None:
    """The transformer blocks of a timm ViT-like model (each with ``attn.attn_drop``), or None."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        return None
    for b in blocks:
        attn = getattr(b, "attn", None)
        if attn is None or not hasattr(attn, "attn_drop") or not hasattr(attn, "fused_attn"):
            return None
    return list(blocks)


@contextlib.contextmanager
def capture_attention(model: nn.Module):
    """Within the context, every forward of ``model`` appends each block's attention probabilities
    (``B x H x N x N``, gradients retained) to the yielded list; fused attention is off and restored after."""
    blocks = vit_blocks(model)
    if blocks is None:
        raise ProckdError(f"{type(model).__name__} is not a ViT with timm attention blocks: attention maps "
                          "need model.blocks[i].attn")
    store: list[torch.Tensor] = []

    def hook(_mod, _inp, out):
        if out.requires_grad:
            out.retain_grad()
        store.append(out)

    fused = [b.attn.fused_attn for b in blocks]
    handles = [b.attn.attn_drop.register_forward_hook(hook) for b in blocks]
    try:
        for b in blocks:
            b.attn.fused_attn = False
        yield store
    finally:
        for b, f in zip(blocks, fused):
            b.attn.fused_attn = f
        for h in handles:
            h.remove()


@dataclass
class RelevanceMaps:
    """Chefer maps of a batch: ``rollout`` ``B x h x w``, ``blocks[i]`` ``B x h x w`` (block ``i``'s own map),
    the explained class per image and the logits."""

    rollout: torch.Tensor
    blocks: list[torch.Tensor]
    target: torch.Tensor
    logits: torch.Tensor


def grad_rollout(attns: list[torch.Tensor], grads: list[torch.Tensor], num_prefix: int,
                 grid: tuple[int, int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Gradient-weighted rollout (Chefer et al., ICCV 2021) from per-block attention and gradients.

    Returns (rollout map ``B x h x w``, per-block maps ``[B x h x w]``)."""
    cams = [(g * a).clamp(min=0).mean(1) for a, g in zip(attns, grads)]  # B x N x N each
    b, n, _ = cams[0].shape
    r = torch.eye(n, dtype=cams[0].dtype, device=cams[0].device).expand(b, n, n).clone()
    for c in cams:
        r = r + torch.bmm(c, r)

    def row(m: torch.Tensor) -> torch.Tensor:
        v = m[:, 0, num_prefix:] if num_prefix > 0 else m.mean(1)
        return v.reshape(b, *grid)

    return row(r), [row(c) for c in cams]


def relevance_maps(forward, model: nn.Module, images: torch.Tensor, num_prefix: int, grid: tuple[int, int],
                   target: torch.Tensor | None = None) -> RelevanceMaps:
    """Chefer gradient-weighted maps of the ViT ``model`` inside ``forward`` (images -> logits; e.g. a deployed
    student with FA, or a teacher with its transform) for ``target`` (default: the predicted class)."""
    was = model.training
    model.eval()
    x = images.detach().clone().float().requires_grad_(True)  # frozen weights still need a graph to the maps
    try:
        with torch.enable_grad(), capture_attention(model) as store:
            logits = forward(x)
            tgt = logits.argmax(-1) if target is None else target.to(logits.device)
            if len(store) == 0:
                raise ProckdError("the forward pass ran no attention block of the model")
            logits.gather(1, tgt[:, None]).sum().backward()
        attns = [a.detach() for a in store]
        grads = [a.grad if a.grad is not None else torch.zeros_like(a) for a in store]
    finally:
        model.train(was)
    roll, blocks = grad_rollout(attns, grads, num_prefix, grid)
    return RelevanceMaps(roll, blocks, tgt.detach(), logits.detach())


def student_maps(dep, images: torch.Tensor, target: torch.Tensor | None = None) -> RelevanceMaps:
    """Maps of a deployed student (its ViT backbone; FA and prototypes included in the explained forward)."""
    lay = dep.student.layout
    return relevance_maps(dep, dep.student.model, images, dep.student.num_prefix, (lay.h, lay.w), target)


def teacher_maps(teacher, images: torch.Tensor) -> RelevanceMaps:
    """Maps of a ViT teacher for its own predicted class (its own label space)."""
    from prockd.features import to_tokens

    with torch.no_grad():
        f = teacher.model.forward_features(teacher.transform(images[:1]))
        teacher.recorder.pop()
    _, lay = to_tokens(f, teacher.model)

    def fwd(x):
        out = teacher.model(teacher.transform(x))
        teacher.recorder.pop()
        return out

    return relevance_maps(fwd, teacher.model, images, lay.prefix, (lay.h, lay.w))
