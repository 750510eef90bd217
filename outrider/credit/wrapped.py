"""Options shared by credit pieces that reshape another piece's advantages (``ppl_position``, ``xrpo_sharpen``):
the wrapped ``base`` piece, named as ``{name, ...options}`` or a bare name, which must need no value head."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from outrider.credit import CREDIT, CreditConfig
from outrider.errors import OutriderError


class WrappedCreditConfig(CreditConfig):
    piece: ClassVar[str] = "this piece"  # named in the error for a base with a value head

    base: dict[str, Any] = Field(default_factory=lambda: {"name": "grpo"},
                                 description="The credit piece whose advantages are reshaped: {name, ...options} "
                                             "(any registered piece that needs no value head).")

    @field_validator("base", mode="before")
    @classmethod
    def _name_shorthand(cls, v: object) -> object:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _base_exists(self) -> "WrappedCreditConfig":
        entry, _ = CREDIT.build(self.base, "credit.base")  # raises OutriderError with the valid names
        if entry.needs.values:
            raise OutriderError(f"credit.base: '{entry.name}' needs a value head, which {self.piece} does not "
                                "request; use a critic-free base (grpo, dr_grpo, rloo, ...)")
        return self
