"""The RL-step benchmark's task and model, shared by `throughput.py` and `profile_step.py`.

The quickstart's setting: the tiny char-level model (0.54M parameters) warm-started for 45 SFT steps on
reasoning-gym's spell_backward (3-6 letter words), then GRPO on train words with an exact-match reward. A
warm-started model, not a freshly initialised one: a random model never produces a right answer, so every reward
is 0 and every advantage is 0, an RL step that no real run takes (and one where outrider would skip all training,
see `update.skip_zero_advantage`). Here the rewards vary within some groups and not within others, as in real runs.
"""

from __future__ import annotations

from pathlib import Path

from outrider.policy.model import Policy

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
PROMPTS = 256


def warm_started_model(model_dir: str | Path) -> tuple[list[str], list[str]]:
    """Build and warm-start the quickstart's policy from `recipes/quickstart.yaml` (its task, model and
    `policy.warm_start`), save it to `model_dir`; return the RL prompts (train problems, never the warm start's
    demonstrations) and their answers."""
    from outrider.policy.sft import warm_start
    from outrider.recipe import load_recipe
    from outrider.trainer import build_policy, build_task

    recipe = load_recipe(QUICKSTART)
    task = build_task(recipe)
    policy = build_policy(recipe, value_head=False)
    warm_start(policy, task, recipe.policy.warm_start)
    policy.save(model_dir)
    problems = [task.problem("train", i) for i in range(PROMPTS)]
    return [task.prompt(p) for p in problems], [task.demonstration_text(p) for p in problems]


def trl_prompts(model_dir: str | Path, prompts: list[str]) -> list[str]:
    """The prompts with the tokenizer's BOS text in front: TRL tokenises without special tokens, outrider starts
    every sequence with BOS, and this gives both the same token ids."""
    policy = Policy.load(model_dir)
    bos = policy.tokenizer.bos_token if policy.bos_id is not None else ""
    return [bos + p for p in prompts]
