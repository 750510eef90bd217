"""Offline steps: learning from stored data, with no sampling. `pairs` runs the learner's terms on stored
preference pairs (DPO and its family through ``update.terms``)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from pydantic import Field

from outrider.data import Episode, Turn, pack
from outrider.errors import OutriderError
from outrider.jsonl import json_objects
from outrider.loops import LOOPS, Run
from outrider.registry import BuildContext, Piece, PieceConfig
from outrider.update.learner import learner_step, prepare

PAIR_KEYS = ("prompt", "chosen", "rejected")


class PairsConfig(PieceConfig):
    """Options of the `pairs` loop."""

    path: str | None = Field(None, description="JSONL file of {\"prompt\", \"chosen\", \"rejected\"} lines "
                                                "(texts). null: pairs made from the task's demonstrations of "
                                                "single-turn train problems (chosen: a problem's demonstration; "
                                                "rejected: the next problem's answer).")
    task_pairs: int = Field(512, ge=1, description="How many pairs to make from the task when path is null.")
    pairs_per_step: int = Field(16, ge=1, description="Pairs per step (each a group of two rows).")


TASK_PAIR_SEED = 10**7  # train problems from here on (RL draws random ones; the warm start uses 1e8 on)


def task_pairs(task: Any, n: int, where: str) -> list[tuple[str, str, str]]:
    """Pairs from `n + 1` consecutive train problems' demonstrations: problem i's answer over problem i+1's."""
    demos = task.demonstrations(list(range(TASK_PAIR_SEED, TASK_PAIR_SEED + n + 1)))
    if any(len(d.turns) != 1 for d in demos):
        raise OutriderError(f"{where}.path: pairs from the task need single-turn demonstrations; give a pairs file")
    pairs = [(a.turns[0][0], a.turns[0][1], b.turns[0][1]) for a, b in zip(demos, demos[1:])]
    return [p for p in pairs if p[1] != p[2]]


def read_pairs(path: str, where: str) -> list[tuple[str, str, str]]:
    """The file's pairs; a missing file or a line that is not a pair is one error naming the line."""
    pairs = []
    for n, row in json_objects(path, f"{where}.path"):
        if not all(isinstance(row.get(k), str) for k in PAIR_KEYS):
            raise OutriderError(f"{path}:{n}: expected an object with string fields {', '.join(PAIR_KEYS)}")
        pairs.append((row["prompt"], row["chosen"], row["rejected"]))
    if not pairs:
        raise OutriderError(f"{where}.path: '{path}' holds no pairs")
    return pairs


@LOOPS.register("pairs", config=PairsConfig)
class PairsStep(Piece):
    """Offline preference optimisation on stored pairs, no rollout. The pairs come from a file or are made from the
    task's demonstrations; each step takes ``pairs_per_step`` pairs (in a
    seeded order reshuffled every pass over the file), packs each pair's chosen and rejected responses as a group of
    two rows (``origin: offline``, ``preference`` chosen/rejected), computes the reference log-probs, and runs the
    learner, whose pairwise terms (e.g. ``update.terms: [dpo]``, with ``update.loss: none``) do the learning.
    Responses are trained like demonstrations: every token and an EOS after it."""

    cfg: PairsConfig

    def __init__(self, cfg: PairsConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        where = build.where if build else "loop"
        if cfg.path is None:
            if build is None or build.task is None:
                raise OutriderError(f"{where}.path: no pairs file, and no task to make pairs from")
            self.pairs = task_pairs(build.task, cfg.task_pairs, where)
        else:
            self.pairs = read_pairs(cfg.path, where)
        self.seed = build.seed if build else 0
        recipe = build.recipe if build else None
        if recipe is not None and not recipe.update.terms:
            # the policy-gradient loss sees zero advantages here: only update.terms can learn from pairs
            raise OutriderError("loop pairs: update.terms is empty, so nothing would learn from the pairs; add a "
                                "term, e.g. update.terms: [dpo, nll]")

    def batch_pairs(self, step: int) -> list[tuple[str, str, str]]:
        """The pairs of a (1-based) step: passes over the file in seeded random orders, one after another."""
        n, k = len(self.pairs), self.cfg.pairs_per_step
        out = []
        for i in range((step - 1) * k, step * k):
            order = np.random.default_rng([self.seed, i // n]).permutation(n)
            out.append(self.pairs[int(order[i % n])])
        return out

    def __call__(self, run: Run, step: int) -> dict[str, float]:
        t_step = time.perf_counter()
        policy, u = run.policy, run.recipe.update
        episodes = []
        for g, (prompt, chosen, rejected) in enumerate(self.batch_pairs(step)):
            ids = policy.encode_observation(prompt, first=True)
            for text, side in ((chosen, "chosen"), (rejected, "rejected")):
                turn = Turn(observation=prompt, observation_ids=ids, action=text,
                            action_ids=policy.encode(text) + [policy.eos_id])
                episodes.append(Episode(group_id=g, seed=g, turns=[turn], origin="offline", preference=side))
        batch = pack(episodes, policy.pad_id, policy.bos_id).to(run.device)
        prepare(batch, policy, run.reference, u, run.params.temperature, run.need_old(), False)
        batch.advantages = torch.zeros_like(batch.token_rewards)
        metrics = learner_step(policy, run.optimizer, batch, run.pieces.terms, u, run.params.temperature,
                               run.learner_generator(step), run.norm_length)
        train_s = time.perf_counter() - t_step
        metrics.update(run.timing(0.0, 0.0, train_s, float(batch.attention_mask.sum()) * u.epochs, train_s))
        return metrics

