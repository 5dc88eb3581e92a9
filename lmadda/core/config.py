"""The base of every config lmadda validates: unknown keys are refused, so a typo is an error, not a default."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
