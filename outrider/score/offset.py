"""A reward shifted by a random per-prompt constant: the same preferences, a different scale per prompt.

``prompt_offset`` returns ``scale · z(x)`` for every response to prompt x, with z(x) a standard normal drawn from
a hash of the prompt's text and the component's `seed` (the same prompt gets the same offset in every step, run
and process). Added to a reward, it changes no comparison between two responses to the same prompt: a
Bradley–Terry reward model cannot tell the two rewards apart, and a method that only uses differences within a
prompt (GRPO's group baseline, P3O [45]) is unchanged by it, while a learned value baseline (PPO's critic) must
learn the offset of every prompt first — the toy experiment of [45] (methods sheet §4, T3).
"""

from __future__ import annotations

import hashlib
import math

from pydantic import Field

from outrider.data import Episode
from outrider.score import SCORE, ComponentConfig


class PromptOffsetConfig(ComponentConfig):
    """Options of `prompt_offset`."""

    scale: float = Field(1.0, ge=0.0, description="Standard deviation of the per-prompt offset.")
    seed: int = Field(0, description="Which offsets: the hash of (seed, prompt text) draws them.")


def standard_normal(key: str) -> float:
    """A standard normal drawn deterministically from ``key`` (Box–Muller on two uniforms from its SHA-256)."""
    digest = hashlib.sha256(key.encode()).digest()
    u1 = (int.from_bytes(digest[:8], "big") + 1) / (2**64 + 1)
    u2 = int.from_bytes(digest[8:16], "big") / 2**64
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


@SCORE.register("prompt_offset", config=PromptOffsetConfig)
def prompt_offset(episodes: list[Episode], cfg: PromptOffsetConfig) -> list[float]:
    """``scale · z(prompt)``: the prompt is the first turn's observation text."""
    return [cfg.scale * standard_normal(f"{cfg.seed}\x00{e.turns[0].observation if e.turns else ''}")
            for e in episodes]
