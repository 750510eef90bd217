"""The reward-hacking monitor: the proxy reward being optimised and a gold reward beside it, per step.

A proxy (a learned reward model, a process reward summed over steps) can rise while the quality it stands for
stalls or falls [42, 51]; the monitor makes that visible in the run's own metrics. Listed after the components
it watches, it reads each episode's weighted trajectory rewards so far (the proxy: the components named in
``proxy``, or all of them) and the env's own reward (the gold: the verifier's value, whatever its weight in the
recipe, 0 included), gives every episode 0, and logs once per step over the step's scored episodes:

- ``monitor/proxy`` and ``monitor/gold``: their means;
- ``monitor/correlation``: Pearson's ``ρ = cov(proxy, gold) / (σ_proxy σ_gold)`` (0 when either is constant);
- ``monitor/length``: the mean response length in action tokens.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from outrider.data import Episode
from outrider.registry import BuildContext, Piece
from outrider.score import SCORE, ComponentConfig


class MonitorConfig(ComponentConfig):
    """Options of the `hacking_monitor` component."""

    proxy: list[str] | None = Field(None, description="Names of the score components whose weighted trajectory "
                                                      "rewards, summed, are the proxy; null: every trajectory-level "
                                                      "component listed before the monitor.")


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson's correlation of two equal-length samples; 0 when either has no spread (or fewer than 2 points)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(a) < 2:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 1e-12 else 0.0


@SCORE.register("hacking_monitor", config=MonitorConfig)
class HackingMonitor(Piece):
    """Logs proxy, gold (the env's reward), their correlation and length per step; scores every episode 0."""

    cfg: MonitorConfig

    def __init__(self, cfg: MonitorConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        self.proxy: list[float] = []
        self.gold: list[float] = []
        self.length: list[float] = []

    def __call__(self, episodes: list[Episode]) -> list[float]:
        for e in episodes:
            own = e.rewards["trajectory"]
            names = self.cfg.proxy if self.cfg.proxy is not None else [k for k in own if k != self.name]
            self.proxy.append(float(sum(own.get(k, 0.0) for k in names)))
            self.gold.append(float(sum(t.reward for t in e.turns)))
            self.length.append(float(e.num_action_tokens))
        return [0.0] * len(episodes)

    def step_metrics(self) -> dict[str, float]:
        if not self.proxy:
            return {}
        out = {"monitor/proxy": float(np.mean(self.proxy)), "monitor/gold": float(np.mean(self.gold)),
               "monitor/correlation": pearson(self.proxy, self.gold), "monitor/length": float(np.mean(self.length))}
        self.proxy, self.gold, self.length = [], [], []
        return out
