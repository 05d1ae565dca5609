"""What every settings section shares."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

MAX_MICROS = 10**15  # one billion dollars: far above any sane budget, far below int64 overflow


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
