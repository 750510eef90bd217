"""Your own reward from a recipe: ``score: [{name: python, function: "my_rewards:judge"}]``.

Two forms (option ``batch``):

- per episode (the default): ``judge(prompt: str, response: str, info: dict, **kwargs) -> float`` — ``prompt`` is
  the episode's first observation (the task's question), ``response`` all of its action text, ``info`` the last
  turn's env info (``answer``: the parsed answer, ``reference``, ``success``, …) plus ``env_reward`` (the env's
  rewards summed over turns) and ``episode`` (the whole `Episode`, for multi-turn details). With ``level: step``
  it returns one float per turn, with ``level: token`` one per action token.
- over the batch (``batch: true``): ``judge(episodes: list[Episode], **kwargs) -> list`` with one value per
  episode at its level, for rewards that compare episodes (a group's rank, a pairwise judge).

``kwargs`` from the recipe are passed on every call. The function is imported when the recipe is loaded (its
module importable, or a ``.py`` file in the working directory), so a typo is one line before anything runs. It
runs under the same isolation as every component (`outrider.score`): an episode whose call raises is scored
``on_error``, a NaN/inf ``on_nonfinite``; both are counted per step. Its rewards and metrics are named after the
function (``reward/judge``, ``score/judge/errors``).
"""

from __future__ import annotations

from typing import Any, Callable

from pydantic import Field, field_validator

from outrider.data import Episode
from outrider.registry import BuildContext, Level, Needs, Piece, load_object
from outrider.score import SCORE, ComponentConfig, ScoreFailure


def _function(spec: str) -> Callable[..., Any]:
    fn = load_object(spec)
    if not callable(fn):
        raise ValueError(f"'{spec}' is not callable (it is {type(fn).__name__} {fn!r:.40})")
    return fn


class PythonConfig(ComponentConfig):
    function: str = Field(..., description="'module:function' of your reward (the module importable, or a .py file "
                                           "in the working directory), e.g. my_rewards:judge.")
    level: Level = Field("trajectory", description="What the function returns per episode: trajectory (a float), "
                                                   "step (a float per turn) or token (a float per action token).")
    batch: bool = Field(False, description="false: judge(prompt, response, info, **kwargs) per episode; true: "
                                           "judge(episodes, **kwargs) once over the batch, one value per episode.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed on every call.")

    @field_validator("function")
    @classmethod
    def _loads(cls, v: str) -> str:
        _function(v)
        return v


def episode_arguments(episode: Episode) -> tuple[str, str, dict[str, Any]]:
    """``(prompt, response, info)`` of the per-episode form (see the module docstring)."""
    last = episode.turns[-1].info if episode.turns else {}
    info = {**last, "env_reward": sum(t.reward for t in episode.turns), "episode": episode}
    return (episode.turns[0].observation if episode.turns else ""), episode.response, info


@SCORE.register("python", config=PythonConfig)
class PythonFunction(Piece):
    """Your own reward function, named as 'module:function' (per episode, or over the batch with batch: true)."""

    cfg: PythonConfig

    def __init__(self, cfg: PythonConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        self.fn = _function(cfg.function)

    @property
    def name(self) -> str:
        return self.cfg.function.rsplit(".", 1)[-1].rsplit(":", 1)[-1]

    @property
    def needs(self) -> Needs:
        return Needs(level=self.cfg.level)

    def __call__(self, episodes: list[Episode]) -> list[Any]:
        if self.cfg.batch:
            return self.fn(episodes, **self.cfg.kwargs)
        out: list[Any] = []
        for episode in episodes:
            try:
                out.append(self.fn(*episode_arguments(episode), **self.cfg.kwargs))
            except Exception as e:  # noqa: BLE001  (scored and counted by compose, like any component's failure)
                out.append(ScoreFailure(e))
        return out
