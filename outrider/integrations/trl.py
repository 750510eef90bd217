"""outrider's score pieces as TRL `GRPOTrainer` reward functions, and outrider envs through TRL's
`environment_factory` hook (TRL >= 1.0 with transformers >= 5.2).

    from trl import GRPOTrainer
    from outrider.integrations.trl import reward_func

    trainer = GRPOTrainer(model=..., train_dataset=ds,  # ds has "prompt" and "answer" columns
                          reward_funcs=[reward_func({"name": "numeric_match"}),
                                        reward_func({"name": "format", "pattern": r".*<answer>.*</answer>.*"},
                                                    weight=0.5)])

Each TRL call becomes a batch of one-turn episodes (observation: the prompt, action: the completion, info: the
parsed answer, the reference from the dataset's ``answer`` column and every other column), scored by the piece
through outrider's own `compose`, so its failure options (``on_error``, ``on_nonfinite``) hold as in a recipe.
Completions of one prompt form one group (group-level pieces see them together). The returned float per
completion is ``weight × value`` summed over levels (a step- or token-level piece's values are summed).
"""

from __future__ import annotations

from typing import Any, Callable

from outrider.data import Episode, Turn
from outrider.envs.single_turn import ANSWER_TAG
from outrider.errors import OutriderError
from outrider.integrations import require

ENV_REWARDED = ("verifier", "verifier_steps")  # read the env's rewards, which a TRL completion does not have


def _text(message: Any) -> str:
    """A plain completion, or the last message's content of a conversational one."""
    if isinstance(message, list):
        return str(message[-1].get("content", "")) if message else ""
    return str(message)


def parse_answer(response: str, answer_format: str) -> str | None:
    """outrider's single-turn parsing: the whole response (plain) or the last <answer>...</answer> (tagged)."""
    if answer_format == "tagged":
        found = ANSWER_TAG.findall(response)
        return found[-1].strip() if found else None
    return response.strip()


def to_episodes(prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None,
                answer_format: str, reference: str, columns: dict[str, list[Any]]) -> list[Episode]:
    """One single-turn episode per completion; completions of the same prompt share a group."""
    groups: dict[str, int] = {}
    episodes = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        prompt_text, action = _text(prompt), _text(completion)
        answer = parse_answer(action, answer_format)
        info = {k: v[i] for k, v in columns.items() if isinstance(v, (list, tuple)) and len(v) == len(prompts)}
        info.update(answer=answer, reference=str(columns.get(reference, [""] * len(prompts))[i]),
                    invalid=answer is None)
        ids = list(completion_ids[i]) if completion_ids is not None else []
        turn = Turn(observation=prompt_text, observation_ids=[], action=action, action_ids=ids, info=info,
                    finish_reason="stop")
        group = groups.setdefault(prompt_text, len(groups))
        episodes.append(Episode(group_id=group, seed=group, turns=[turn], done=True))
    return episodes


def reward_func(section: dict[str, Any] | str, weight: float = 1.0, answer_format: str = "plain",
                reference: str = "answer") -> Callable[..., list[float]]:
    """A TRL reward function from an outrider score section (``{"name": ..., **options}`` as in a recipe's
    ``score`` list, or just the name). ``answer_format``: how answers are parsed (``plain`` or ``tagged``);
    ``reference``: the dataset column holding the reference answer."""
    from outrider.score import SCORE, Component, compose

    section = {"name": section} if isinstance(section, str) else dict(section)
    weight = float(section.pop("weight", weight))
    if answer_format not in ("plain", "tagged"):
        raise OutriderError(f"answer_format: '{answer_format}' is not one of plain, tagged")
    if section.get("name") in ENV_REWARDED:
        raise OutriderError(f"score '{section['name']}': reads the env's rewards, which TRL completions have none "
                            "of; use exact_match or numeric_match with the dataset's answer column, or a python piece")
    piece = SCORE.create(section, where="trl.reward_funcs")
    if piece.needs.packed:
        raise OutriderError(f"score '{section['name']}': scores outrider's packed batch (hidden states, log-probs); "
                            "only episode-level pieces can be TRL reward functions")
    component = Component(piece.name, piece, weight, "trl.reward_funcs")

    def score(prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None,
              **columns: Any) -> list[float]:
        episodes = to_episodes(prompts, completions, completion_ids, answer_format, reference, columns)
        compose(episodes, [component])
        component.end_step()  # per-call failure counts, and max_failed_steps, as per step in a run
        return [e.total_reward() for e in episodes]

    score.__name__ = f"outrider_{piece.name}"  # TRL logs each reward function under its name
    return score


def trl_version() -> str:
    return require("trl", "trl").__version__


def environment_factory(task: dict[str, Any], split: str = "train") -> type:
    """An outrider task as TRL's ``environment_factory`` (``GRPOTrainer(environment_factory=...)``): a class whose
    ``reset(**row)`` resets an env of the task's SPLIT at the row's ``seed`` column (0 if absent) and returns the
    observation (TRL appends it to the prompt's last user message), whose one tool ``act(action)`` steps the env,
    and whose ``get_reward()`` is the env's reward summed over the episode (TRL's environment-owned reward).
    TASK is a recipe's ``task`` section. The model must call the tool through its chat template's tool calls."""
    from outrider.envs import ENVS
    from outrider.envs.base import close_env

    if split not in ("train", "eval"):
        raise OutriderError(f"split: '{split}' is not one of train, eval")
    entry, cfg = ENVS.build(dict(task), "task")
    built = entry.fn(cfg)

    class OutriderEnvironment:
        def __init__(self) -> None:
            self.env = built.make_env(split)
            self.reward, self.done, self.turns = 0.0, False, 0

        def reset(self, **row: Any) -> str:
            self.reward, self.done, self.turns = 0.0, False, 0
            return self.env.reset(int(row.get("seed", 0)))

        def act(self, action: str) -> str:
            """Take one action in the environment and return what it says back.

            Args:
                action: The action's text: a command, or the final answer.
            """
            if self.done:
                return "The episode is over."
            observation, reward, done, _ = self.env.step(action)
            self.reward, self.done, self.turns = self.reward + float(reward), bool(done), self.turns + 1
            return observation or ("The episode is over." if done else "")

        def get_reward(self) -> float:
            return self.reward

        def __del__(self) -> None:
            try:
                close_env(self.env)
            except Exception:  # an env's close at interpreter exit must not print a traceback
                pass

    OutriderEnvironment.__name__ = OutriderEnvironment.__qualname__ = f"outrider_{task.get('name', 'env')}"
    return OutriderEnvironment
