"""loops/: what one step of a run is. The recipe's ``loop`` names a registered piece called once per step,
``loop(run: Run, step) -> metrics``: `rl` (sample → score → credit → update, the default) or an offline or
self-training step (`pairs`: DPO-family terms on stored pairs, no sampling). The trainer warm-starts, evaluates,
checkpoints and calls the loop; it never knows which loop runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from outrider.registry import Registry, register_package

if TYPE_CHECKING:
    from outrider.envs.base import Task
    from outrider.envs.workers import WorkerPool
    from outrider.pieces import Pieces
    from outrider.policy.model import Policy
    from outrider.policy.sampler import SamplingParams
    from outrider.recipe import Recipe


@dataclass
class Run:
    """What a step may use: the recipe, the task, the policy and its optimiser, the frozen reference (when some
    piece needs one), the run's built pieces and the training sampling parameters."""

    recipe: "Recipe"
    task: "Task"
    policy: "Policy"
    optimizer: torch.optim.Optimizer
    reference: "Policy | None"
    pieces: "Pieces"
    params: "SamplingParams"
    device: torch.device
    env_workers: "WorkerPool | None" = None  # processes or Ray actors (task.workers > 1), else None

    def env_source(self, split: str) -> Any:
        """What a rollout makes its envs with: the env workers' split, or an in-process env factory."""
        if self.env_workers is not None:
            return self.env_workers.split(split)
        return lambda: self.task.make_env(split)

    @property
    def seed(self) -> int:
        return self.recipe.train.seed

    def learner_generator(self, step: int) -> torch.Generator:
        """The generator of a step's minibatch order and of the pieces that sample tokens (seeded per step)."""
        return torch.Generator().manual_seed(self.seed * 7_919 + step)

    @property
    def norm_length(self) -> int:
        """The generation budget of an episode (seq-mean-token-sum-norm's default constant)."""
        return self.params.max_new_tokens * self.task.max_turns

    def need_old(self) -> bool:
        """Old log-probs are recomputed before the update when it takes several optimiser steps (the ratio must
        use the batch's policy) or a piece asks for them."""
        u = self.recipe.update
        return u.epochs * u.minibatches > 1 or self.pieces.needs.old_logprobs

    def timing(self, sample_s: float, sample_tokens: float, train_s: float, train_tokens: float,
               step_s: float) -> dict[str, Any]:
        return {"time/sample_s": sample_s, "time/train_s": train_s, "time/step_s": step_s,
                "throughput/sample_tok_s": sample_tokens / max(sample_s, 1e-9),
                "throughput/train_tok_s": train_tokens / max(train_s, 1e-9)}


LOOPS: Registry = Registry("loop")

register_package(__name__, __path__)  # every module of this package registers its pieces (a new method: a new file)
