"""What the scoring forwards return: the model's outputs once per computed position, and where each sits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RowOutputs:
    """Logits (and last hidden states) of every position the forward computed, one row each, and `index` [B, T]:
    the row that holds position t of sequence b. A shared prefix's positions, computed once, are read by all of
    its group's sequences; padding positions read some row (their values are never used). Vocab-sized work
    downstream (log-softmax, entropy) then runs once per computed position, not once per (sequence, position)."""

    logits: Tensor  # [M, V]
    hidden: Tensor | None  # [M, H], when asked for
    index: Tensor  # [B, T] long, rows of `logits`

    @classmethod
    def dense(cls, logits: Tensor, hidden: Tensor | None) -> "RowOutputs":
        """Outputs laid out [B, T, ·] as the plain forward gives them: row b·T + t is (b, t)."""
        B, T = logits.shape[:2]
        index = torch.arange(B * T, device=logits.device).view(B, T)
        return cls(logits.reshape(B * T, -1), None if hidden is None else hidden.reshape(B * T, -1), index)
