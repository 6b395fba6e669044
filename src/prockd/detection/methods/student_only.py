"""The student detector trained alone (no teacher): the tables' "Student model" row."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from prockd.detection.methods.base import DET_METHODS, DetDistiller


class NoDetParams(BaseModel):
    """No parameters."""

    model_config = ConfigDict(extra="forbid")


@DET_METHODS.register("student_only")
class DetStudentOnly(DetDistiller):
    """Faster R-CNN losses only."""

    Params = NoDetParams
    needs_teacher = False
    main_weights = ()
