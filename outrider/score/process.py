"""A process reward over a response's steps, and the shapings that keep it from being hacked [42, 51].

`process_reward` splits the response into steps at a delimiter (`score/shaping.segment_delimiter`), scores each
step with a step scorer, shapes the step rewards and returns their sum as the episode's value:

- ``sum``: ``Σ_k r_k`` — every step that scores above 0 adds reward, so writing more (valid-looking) steps pays:
  the hacking Gao et al. [42] find with PRM rewards summed over steps;
- ``clip`` [42]: ``Σ_k min(r_k − η, 0)`` — each step at most 0, so more steps never add reward;
- ``delta`` [42]: ``Σ_k (r_k − r_{k+1}) + r_K = r_1`` — the sum telescopes to the first step's score;
- ``par`` [51]: ``(1/K)·Σ_j σ(R − R_ref,j)`` with ``R = Σ_k r_k`` and ``R_ref,j`` the summed process rewards of K
  reference responses sampled from the initial policy: bounded in (0, 1), 0.5 at the references' level and flat far
  above them. The paper scores references per prompt; here they are the first K responses the piece scores (the
  initial policy's samples, pooled over prompts), kept in checkpoints.

The step scorer ``valid_equations`` is a rule-based PRM: a step scores 1 when it is an addition ``a+b=c`` with
``a + b = c``, else 0. Like a learned PRM it judges each step on its own, not whether it belongs to the solution,
so a policy can earn reward with correct but useless equations (stepsum's long traces, ``3+5=8,8+2=10,#10``).
The step scorer ``learned`` is a PRM trained from step labels (`score.step_rm`, ``outrider rm train`` on a
``{prompt, response, step_labels}`` file): a step scores ``p_k = σ(z_k)``, the PRM's probability that it is right,
read at its last token (steps without tokens are not scored); its time per step is logged as
``time/score/process_reward_s``.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from outrider.data import Episode
from outrider.errors import OutriderError
from outrider.registry import BuildContext, Piece
from outrider.score import SCORE, ComponentConfig
from outrider.score.shaping import clip_steps, delta_steps, par, segment_delimiter

_EQUATION = re.compile(r"\s*(\d+)\s*\+\s*(\d+)\s*=\s*(\d+)\s*")


def valid_equation_scores(text: str, delimiter: str = ",") -> list[float]:
    """The `valid_equations` PRM: 1 for each step (split at `delimiter`, the delimiter itself ignored) that is a
    true addition ``a+b=c``, else 0."""
    scores = []
    for s, e in segment_delimiter(text, delimiter):
        step = text[s:e]
        if step.endswith(delimiter):
            step = step[: -len(delimiter)]
        m = _EQUATION.fullmatch(step)
        scores.append(float(m is not None and int(m.group(1)) + int(m.group(2)) == int(m.group(3))))
    return scores


class ProcessRewardConfig(ComponentConfig):
    """Options of the `process_reward` component."""

    prm: Literal["valid_equations", "learned"] = Field(
        "valid_equations", description="Step scorer: valid_equations, 1 for a true addition a+b=c, else 0; learned, "
                                       "a step PRM's probability that the step is right (`model`).")
    model: Optional[str] = Field(None, description="prm learned: directory of a PRM trained from step labels "
                                                   "(outrider rm train on {prompt, response, step_labels}); same "
                                                   "tokenizer and delimiter as this component.")
    batch_size: int = Field(64, ge=1, description="prm learned: responses per forward of the PRM.")
    delimiter: str = Field(",", min_length=1, description="Text that ends a step (stepsum's `,`).")
    shaping: Literal["sum", "clip", "delta", "par"] = Field(
        "sum", description="sum: Σ r_k (pays for more steps); clip: Σ min(r_k − eta, 0) [42]; delta: Σ (r_k − "
                           "r_{k+1}) + r_K = r_1 [42]; par: mean σ(Σ r_k − R_ref) over reference rewards [51].")
    eta: float = Field(1.0, description="Clip's threshold η: a step scoring η or more gives 0, below it r − η.")
    references: int = Field(64, ge=1, description="par: how many of the first responses scored (the initial "
                                                  "policy's) are kept as reference rewards.")

    @model_validator(mode="after")
    def _check_model(self) -> "ProcessRewardConfig":
        if self.prm == "learned" and not self.model:
            raise ValueError("model: prm learned needs the directory of a step PRM (outrider rm train on step labels)")
        return self


@SCORE.register("process_reward", config=ProcessRewardConfig)
class ProcessReward(Piece):
    """Per-step process reward, shaped by sum / Clip / Delta [42] or PAR [51]; the PAR references are its state."""

    def __init__(self, cfg: ProcessRewardConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        self.reference: list[float] = []
        self._steps: list[int] = []
        self._valid: list[float] = []
        self.seconds = 0.0
        self.scorer = None
        if cfg.prm == "learned":
            from outrider.score.step_rm import StepScorer

            where = f"{build.where}.model" if build is not None and build.where else "process_reward.model"
            self.scorer = StepScorer(cfg.model, where, build.policy if build is not None else None)
            if self.scorer.delimiter != cfg.delimiter:
                raise OutriderError(f"{where}: the PRM was trained on steps ending in {self.scorer.delimiter!r}, "
                                    f"this component's delimiter is {cfg.delimiter!r}")

    def per_step(self, episodes: list[Episode]) -> list[list[float]]:
        """Each response's step scores."""
        if self.scorer is None:
            return [valid_equation_scores(e.response, self.cfg.delimiter) for e in episodes]
        prompts = [e.turns[0].observation if e.turns else "" for e in episodes]
        return self.scorer(prompts, [e.response for e in episodes], self.cfg.batch_size)

    def __call__(self, episodes: list[Episode]) -> list[float]:
        cfg: ProcessRewardConfig = self.cfg
        t0 = time.perf_counter()
        per_step = self.per_step(episodes)
        self.seconds += time.perf_counter() - t0
        self._steps += [len(r) for r in per_step]
        self._valid += [sum(r) for r in per_step]
        if cfg.shaping == "clip":
            return [sum(clip_steps(r, cfg.eta)) for r in per_step]
        if cfg.shaping == "delta":
            return [sum(delta_steps(r)) for r in per_step]
        totals = [sum(r) for r in per_step]
        if cfg.shaping == "sum":
            return totals
        if len(self.reference) < cfg.references:
            self.reference += totals[: cfg.references - len(self.reference)]
        return [par(t, self.reference) for t in totals]

    def step_metrics(self) -> dict[str, float]:
        """Mean steps per response and mean raw (unshaped, unweighted) step score of the step's responses."""
        n = max(len(self._steps), 1)
        out = {"process_reward/steps": sum(self._steps) / n, "process_reward/raw": sum(self._valid) / n}
        if self.scorer is not None:
            out["time/score/process_reward_s"] = self.seconds
        self._steps, self._valid, self.seconds = [], [], 0.0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"reference": list(self.reference)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = [float(x) for x in state.get("reference", [])]
