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

WARM_START = {"steps": 45, "batch_size": 64, "lr": 3.0e-3}  # recipes/quickstart.yaml's policy.warm_start
PROMPTS = 256


def warm_started_model(model_dir: str | Path, seed: int = 0) -> tuple[list[str], list[str]]:
    """Warm-start `Policy.tiny()` as the quickstart does, save it to `model_dir`; return the RL prompts (train
    problems, never the warm start's demonstrations) and their answers."""
    from outrider.policy.sft import WarmStartConfig, warm_start
    from outrider.recipe import parse_recipe
    from outrider.trainer import build_task

    recipe = parse_recipe({
        "task": {"name": "reasoning_gym", "dataset": "spell_backward",
                 "config": {"min_word_len": 3, "max_word_len": 6}, "template": "{metadata[word]} ->"},
        "policy": {"model": "tiny"}, "train": {"steps": 1, "seed": seed}})
    task = build_task(recipe)
    policy = Policy.tiny(seed=seed)
    warm_start(policy, task, WarmStartConfig(**WARM_START))
    policy.save(model_dir)
    problems = [task.problem("train", i) for i in range(PROMPTS)]
    return [task.prompt(p) for p in problems], [task.demonstration_text(p) for p in problems]


def trl_prompts(model_dir: str | Path, prompts: list[str]) -> list[str]:
    """The prompts with the tokenizer's BOS text in front: TRL tokenises without special tokens, outrider starts
    every sequence with BOS, and this gives both the same token ids."""
    policy = Policy.load(model_dir)
    bos = policy.tokenizer.bos_token if policy.bos_id is not None else ""
    return [bos + p for p in prompts]
