"""Model-agnostic feature capture: forward hooks on dotted module paths, token layouts, resampling.

Every captured feature is brought to a token map ``B x N x C`` with a :class:`Layout` that says how
many prefix (CLS-like) tokens lead and which ``h x w`` grid the rest form, so that ViT token blocks,
Swin NHWC stages and CNN NCHW stages are handled by one code path.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from prockd.errors import ProckdError


@dataclass(frozen=True)
class Layout:
    """Token layout: ``prefix`` leading tokens, then an ``h x w`` grid in row-major order."""

    prefix: int
    h: int
    w: int

    @property
    def n(self) -> int:
        """Total number of tokens."""
        return self.prefix + self.h * self.w


def resolve_module(model: nn.Module, path: str, what: str = "model") -> nn.Module:
    """Return the submodule at dotted ``path``; a missing path is a ProckdError listing near matches."""
    modules = dict(model.named_modules())
    if path in modules:
        return modules[path]
    near = difflib.get_close_matches(path, [n for n in modules if n], n=5, cutoff=0.5)
    hint = f" Near matches: {', '.join(near)}." if near else ""
    raise ProckdError(f"tap path '{path}' does not exist in the {what} ({type(model).__name__}).{hint}")


class FeatureRecorder:
    """Records the outputs of the modules at ``paths`` during a forward pass (forward hooks).

    ``path:input`` records the module's input instead (e.g. ``layer3.1.act2:input``: pre-ReLU features).
    """

    def __init__(self, model: nn.Module, paths: list[str], what: str = "model"):
        self.paths = list(paths)
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        for p in self.paths:
            name, _, io = p.partition(":")
            if io not in ("", "output", "input"):
                raise ProckdError(f"tap '{p}': the suffix after ':' must be 'input' or 'output'")
            mod = resolve_module(model, name, what)
            self._handles.append(mod.register_forward_hook(self._hook(p, io == "input")))

    def _hook(self, path: str, use_input: bool):
        def fn(_mod, inp, out):
            out = inp if use_input else out
            if isinstance(out, (tuple, list)):
                out = out[0]
            self.outputs[path] = out
        return fn

    def pop(self) -> dict[str, torch.Tensor]:
        """Return and clear the recorded outputs; every path must have fired."""
        missing = [p for p in self.paths if p not in self.outputs]
        if missing:
            raise ProckdError(f"tap(s) {missing} produced no output in the forward pass; choose modules that run")
        out, self.outputs = self.outputs, {}
        return out

    def remove(self) -> None:
        """Remove all hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def is_channels_last_model(model: nn.Module) -> bool:
    """True for models whose 4-D features are NHWC (timm Swin-style)."""
    return "swin" in type(model).__name__.lower()


def to_tokens(t: torch.Tensor, model: nn.Module, name: str = "feature") -> tuple[torch.Tensor, Layout]:
    """Convert a captured feature to ``B x N x C`` tokens and its Layout."""
    if t.ndim == 3:
        prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        n = t.shape[1] - prefix
        s = int(round(math.sqrt(n)))
        if s * s != n:
            raise ProckdError(
                f"{name}: {t.shape[1]} tokens with {prefix} prefix tokens do not form a square grid")
        return t, Layout(prefix, s, s)
    if t.ndim == 4:
        if is_channels_last_model(model):
            b, h, w, c = t.shape
            return t.reshape(b, h * w, c), Layout(0, h, w)
        b, c, h, w = t.shape
        return t.flatten(2).transpose(1, 2), Layout(0, h, w)
    raise ProckdError(f"{name}: expected a 3-D token or 4-D map tensor, got shape {tuple(t.shape)}")


def tokens_to_map(tokens: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Grid tokens (prefix dropped) as a ``B x C x h x w`` map."""
    b, _, c = tokens.shape
    return tokens[:, layout.prefix:].transpose(1, 2).reshape(b, c, layout.h, layout.w)


def resample_tokens(tokens: torch.Tensor, layout: Layout, size: tuple[int, int]) -> tuple[torch.Tensor, Layout]:
    """Resample the grid part of ``tokens`` to ``size`` (area pooling down, bilinear up); prefix kept."""
    h, w = size
    if (layout.h, layout.w) == (h, w):
        return tokens, layout
    m = tokens_to_map(tokens, layout)
    if h <= layout.h and w <= layout.w:
        m = F.adaptive_avg_pool2d(m, (h, w))
    else:
        m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
    grid = m.flatten(2).transpose(1, 2)
    out = torch.cat([tokens[:, : layout.prefix], grid], dim=1) if layout.prefix else grid
    return out, Layout(layout.prefix, h, w)


def disable_inplace(model: nn.Module) -> int:
    """Set ``inplace=False`` on every module that has it, so hooks never see overwritten tensors."""
    n = 0
    for m in model.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
            n += 1
    return n


def default_taps(model: nn.Module, m: int) -> list[str]:
    """Sensible default taps: ``m`` evenly spaced blocks (ViT), the last ``m`` stages (Swin, CNNs)."""
    names = dict(model.named_modules())
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential) and hasattr(model, "num_prefix_tokens"):  # ViT / DeiT
        d = len(blocks)
        idx = sorted({max(0, round(d * (k + 1) / m) - 1) for k in range(m)})
        return [f"blocks.{i}" for i in idx]
    if is_channels_last_model(model) and "layers" in names:  # Swin
        n = len(model.layers)
        return [f"layers.{i}" for i in range(max(0, n - m), n)]
    info = getattr(model, "feature_info", None)  # timm CNNs: a FeatureInfo or a list of dicts
    if info is not None:
        mods = info.module_name() if hasattr(info, "module_name") else [d.get("module") for d in info]
        mods = [n.replace("_", ".") if n not in names and n.replace("_", ".") in names else n for n in mods]
        mods = [n for n in mods if n in names]
        if mods:
            return mods[-m:]
    for stage_names in (["layer1", "layer2", "layer3", "layer4"],):  # torchvision ResNets
        if all(s in names for s in stage_names):
            return stage_names[-m:]
    feats = getattr(model, "features", None)  # torchvision MobileNet / EfficientNet / VGG
    if isinstance(feats, nn.Sequential):
        n = len(feats)
        idx = sorted({max(0, round(n * (k + 1) / (m + 1)) - 1) for k in range(m)})
        return [f"features.{i}" for i in idx]
    raise ProckdError(f"no default taps known for {type(model).__name__}; set 'taps' to module paths")


def default_embed_tap(model: nn.Module) -> str:
    """The embedding layer: ViT after position embedding, Swin patch embedding, CNN stem."""
    names = dict(model.named_modules())
    cands = ["maxpool", "patch_embed", "bn1", "features.0", "stem"]
    if hasattr(model, "num_prefix_tokens") and "norm_pre" in names:
        cands.insert(0, "norm_pre")
    for cand in cands:
        if cand in names:
            return cand
    raise ProckdError(f"no default embedding tap known for {type(model).__name__}; set 'embed_tap'")
