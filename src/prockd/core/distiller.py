"""The distiller contract both tasks' methods share (as mmrazor's distillers: one module holding the student,
the method's own trainable modules and its losses, with the frozen teacher outside the module tree).

:class:`prockd.classification.methods.base.Distiller` and :class:`prockd.detection.methods.base.DetDistiller`
derive from :class:`DistillerBase`; the training loop (:func:`prockd.core.loop.run_training`) talks to this
interface only.
"""
from __future__ import annotations

from typing import ClassVar

import torch.nn as nn
from pydantic import BaseModel


class DistillerBase(nn.Module):
    """One distillation method: the student, the method's modules, its losses; the teacher is held outside the
    module tree (never in ``state_dict`` nor :meth:`learnable_parameters`)."""

    name: ClassVar[str]  # set by the registry
    Params: ClassVar[type[BaseModel]]  # the method's validated ``method.params``
    needs_teacher: ClassVar[bool] = True
    # the loss weights a tuning budget scales (``prockd bench compare --tune``): every method gets the same
    # number of configurations, each multiplying these together by one factor
    main_weights: ClassVar[tuple[str, ...]] = ("weight",)
    # the state-dict prefixes of what the deployed model is made of (None: the whole distiller): ``best.pt``, the
    # checkpoint selected on validation, keeps only these (training-only modules such as ProC-KD's PL are not
    # deployed, and the run's last.pt keeps them for resume)
    deployed_prefixes: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, student: nn.Module, teacher, params: BaseModel, num_classes: int):
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # outside the module tree
        self.params = params
        self.num_classes = num_classes
        self.epoch = 0
        self.total_epochs = 1

    def set_epoch(self, epoch: int, total_epochs: int | None = None) -> None:
        """Called by the loop before every epoch (multi-stage methods switch stages here)."""
        self.epoch = epoch
        if total_epochs is not None:
            self.total_epochs = total_epochs

    def step_stats(self) -> dict[str, float]:
        """Diagnostics of the last training forward (averaged over the epoch by the loop, logged as
        ``train/<name>``); default: none."""
        return {}

    def epoch_stats(self) -> dict[str, float]:
        """Diagnostics of the method's state after an epoch (logged as ``diag/<name>``); default: none."""
        return {}

    def learnable_parameters(self) -> list[nn.Parameter]:
        """Everything the optimiser updates: the student and the method's own modules."""
        return [p for p in self.parameters() if p.requires_grad]

    def deployed_state(self) -> dict:
        """The state dict restricted to :attr:`deployed_prefixes` (what evaluation and export read)."""
        sd = self.state_dict()
        if self.deployed_prefixes is None:
            return sd
        return {k: v for k, v in sd.items() if k.startswith(self.deployed_prefixes)}

    def load_deployed_state(self, state: dict) -> None:
        """Load a :meth:`deployed_state` (or a full state dict); a deployed tensor missing or a key unknown is an
        error."""
        if self.deployed_prefixes is None:
            self.load_state_dict(state)
            return
        missing, unexpected = self.load_state_dict(state, strict=False)
        bad = [k for k in missing if k.startswith(self.deployed_prefixes)] + list(unexpected)
        if bad:
            raise RuntimeError(f"the checkpoint does not fit the model: {bad[:3]}{'...' if len(bad) > 3 else ''}")

    def export(self) -> nn.Module:
        """The deployable model (no teacher, no training-only modules)."""
        raise NotImplementedError
