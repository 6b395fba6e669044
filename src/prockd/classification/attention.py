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
import torch.nn.functional as F

from prockd.errors import ProckdError
from prockd.features import to_tokens


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
    with torch.no_grad():
        f = teacher.model.forward_features(teacher.transform(images[:1]))
        teacher.recorder.pop()
    _, lay = to_tokens(f, teacher.model)

    def fwd(x):
        out = teacher.model(teacher.transform(x))
        teacher.recorder.pop()
        return out

    return relevance_maps(fwd, teacher.model, images, lay.prefix, (lay.h, lay.w))


# ------------------------------------------------------------------------------------------------ LRP variant
# Chefer, Gur and Wolf, "Transformer interpretability beyond attention visualization", CVPR 2021: relevance
# R_A of every block's attention by LRP (z+ on linear layers, gradient x input on the two products of the
# attention, relevance split and conserved at residual additions, LayerNorm / softmax / GELU passed through),
# weighted by the attention gradient: rollout of ``mean_heads((∇A ⊙ R_A)^+) + I`` (class-token row); a block's
# own map is ``mean_heads(R_A^+)`` (the CVPR code's second_layer / last_layer).

def _safe_div(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """``a / b`` with ``b`` pushed away from 0 by ``eps`` (keeping its sign) and 0 where ``b`` is 0."""
    den = torch.where(b >= 0, b + eps, b - eps)
    return a / den * (b != 0).to(a.dtype)


def lrp_linear(r: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """z+ rule (alpha 1, beta 0) through ``x @ wᵀ``: positive contributions (w+ x+ and w- x-) share ``r``."""
    pw, nw = w.clamp(min=0), w.clamp(max=0)
    px, nx = x.clamp(min=0), x.clamp(max=0)
    s = _safe_div(r, px @ pw.t() + nx @ nw.t())
    return px * (s @ pw) + nx * (s @ nw)


def lrp_matmul(r: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient x input on both operands of ``a @ b`` (each gets the whole of ``r``; callers halve)."""
    s = _safe_div(r, a @ b)
    return a * (s @ b.transpose(-1, -2)), b * (a.transpose(-1, -2) @ s)


def lrp_add(r: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance of ``a + b``: gradient x input, then rescaled per image so that the two parts sum to the
    relevance of the output, shared in proportion to their absolute totals."""
    s = _safe_div(r, a + b)
    ra, rb = a * s, b * s
    dims = tuple(range(1, r.ndim))
    sa, sb, tot = ra.sum(dims, keepdim=True), rb.sum(dims, keepdim=True), r.sum(dims, keepdim=True)
    share = sa.abs() + sb.abs()
    return ra * _safe_div(_safe_div(sa.abs(), share) * tot, sa), rb * _safe_div(_safe_div(sb.abs(), share) * tot, sb)


def _check_plain_vit(model: nn.Module) -> None:
    for i, blk in enumerate(model.blocks):
        for name in ("ls1", "ls2", "drop_path1", "drop_path2"):
            if not isinstance(getattr(blk, name, nn.Identity()), nn.Identity):
                raise ProckdError(f"LRP attention maps support plain ViT blocks; block {i} has {name} = "
                                  f"{type(getattr(blk, name)).__name__} (use --attention grad-rollout)")
        at = blk.attn
        for name in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(at, name, nn.Identity()), nn.Identity):
                raise ProckdError(f"LRP attention maps: block {i} attention has {name} (use --attention grad-rollout)")
        if getattr(at, "gate", None) is not None:
            raise ProckdError(f"LRP attention maps: block {i} attention is gated (use --attention grad-rollout)")


def _trace_blocks(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """The ViT's blocks written out op by op on transformed images, keeping every tensor LRP reads."""
    t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    recs = []
    for blk in model.blocks:
        at = blk.attn
        n1 = blk.norm1(t)
        b, n, c = n1.shape
        h = at.num_heads
        q, k, v = F.linear(n1, at.qkv.weight, at.qkv.bias).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        qs = q * at.scale
        a = (qs @ k.transpose(-2, -1)).softmax(-1)
        of = (a @ v).transpose(1, 2).reshape(b, n, c)
        t1 = t + F.linear(of, at.proj.weight, at.proj.bias)
        n2 = blk.norm2(t1)
        g = blk.mlp.norm(blk.mlp.act(blk.mlp.fc1(n2)))
        m = blk.mlp.fc2(g)
        recs.append({"x": t, "po": t1 - t, "n1": n1, "qs": qs, "k": k, "v": v, "A": a, "of": of, "t1": t1,
                     "n2": n2, "g": g, "m": m})
        t = t1 + m
    return t, recs


def _block_relprop(blk: nn.Module, rec: dict, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(relevance at the block's input, relevance R_A at its attention probabilities)."""
    r_res, r_mlp = lrp_add(r, rec["t1"], rec["m"])
    r_mlp = lrp_linear(r_mlp, rec["g"], blk.mlp.fc2.weight)
    r_mlp = lrp_linear(r_mlp, rec["n2"], blk.mlp.fc1.weight)  # GELU and norm2 pass relevance through
    r = r_res + r_mlp
    r_res, r_att = lrp_add(r, rec["x"], rec["po"])
    b, n, c = r_att.shape
    h = blk.attn.num_heads
    r_att = lrp_linear(r_att, rec["of"], blk.attn.proj.weight).reshape(b, n, h, c // h).transpose(1, 2)
    r_a, r_v = lrp_matmul(r_att, rec["A"], rec["v"])
    r_a, r_v = r_a / 2, r_v / 2
    r_q, r_kt = lrp_matmul(r_a, rec["qs"], rec["k"].transpose(-2, -1))  # softmax passes relevance through
    r_qkv = torch.stack([r_q / 2, r_kt.transpose(-2, -1) / 2, r_v]).permute(1, 3, 0, 2, 4).reshape(b, n, 3 * c)
    return r_res + lrp_linear(r_qkv, rec["n1"], blk.attn.qkv.weight), r_a


def lrp_maps(dep, images: torch.Tensor, target: torch.Tensor | None = None) -> RelevanceMaps:
    """Chefer et al. (CVPR 2021) LRP relevance maps of a deployed ViT student.

    The head (and FA with its prototypes, when deployed) is one layer for the relevance: z+ on the classifier for a
    plain class-token head, gradient x input from the logit to the tokens otherwise (normalised to a total of 1)."""
    model = dep.student.model
    if vit_blocks(model) is None or not hasattr(model, "_pos_embed"):
        raise ProckdError(f"{type(model).__name__} is not a timm VisionTransformer: LRP maps need one")
    _check_plain_vit(model)
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = dep.student.transform(images.detach().float())
            t, recs = _trace_blocks(model, x)
            tok_raw = model.norm(t)
            tok, lay = to_tokens(tok_raw, model)
            logits = dep.logits_from_tokens(tok, lay)
            with torch.no_grad():
                ref = dep(images)
            if not torch.allclose(logits, ref, atol=1e-4, rtol=1e-3):
                raise ProckdError("LRP: the ViT written out op by op does not reproduce the model's logits "
                                  f"(max diff {float((logits - ref).abs().max()):.2e}); use --attention grad-rollout")
            tgt = logits.argmax(-1) if target is None else target
            z = logits.gather(1, tgt[:, None]).sum()
            attns = [r["A"] for r in recs]
            grads = torch.autograd.grad(z, attns + [tok_raw], retain_graph=True)
            with torch.no_grad():
                a_grads, tok_grad = grads[:-1], grads[-1]
                plain_head = (dep.output == "plain" and getattr(model, "global_pool", None) == "token"
                              and isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity)
                              and isinstance(model.head, nn.Linear))
                if plain_head:
                    onehot = torch.nn.functional.one_hot(tgt, logits.shape[-1]).to(tok_raw.dtype)
                    r = torch.zeros_like(tok_raw)
                    r[:, 0] = lrp_linear(onehot, tok_raw[:, 0], model.head.weight)
                else:
                    r = tok_raw * tok_grad
                    r = r / r.sum((1, 2), keepdim=True).abs().clamp_min(1e-12)
                r_as = []
                for blk, rec in zip(reversed(model.blocks), reversed(recs)):  # final norm passes relevance through
                    r, r_a = _block_relprop(blk, {k: v.detach() for k, v in rec.items()}, r)
                    r_as.append(r_a)
                r_as = r_as[::-1]
    finally:
        model.train(was)
    grid = (lay.h, lay.w)
    roll, _ = grad_rollout(r_as, list(a_grads), dep.student.num_prefix, grid)
    p = dep.student.num_prefix
    blocks = [(ra.clamp(min=0).mean(1)[:, 0, p:] if p > 0 else ra.clamp(min=0).mean(1).mean(1)).reshape(len(images), *grid)
              for ra in r_as]
    return RelevanceMaps(roll.detach(), [b.detach() for b in blocks], tgt.detach(), logits.detach())
