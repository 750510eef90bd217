"""Self-training steps: the policy's own samples, filtered, as supervised data. `rft` is rejection-sampling
fine-tuning (STaR, Zelikman et al. 2022; ReST-EM, Singh et al. 2023; RAFT, Dong et al. 2023)."""

from __future__ import annotations

import time

import torch
from pydantic import Field

from outrider.data import Episode, pack
from outrider.errors import OutriderError
from outrider.loops import LOOPS, Run
from outrider.loops.rl import collect
from outrider.observe.metrics import episode_metrics
from outrider.registry import BuildContext, Piece, PieceConfig
from outrider.update.learner import learner_step, prepare


def require_terms(build: BuildContext | None, loop: str) -> None:
    """A self-training loop learns only through ``update.terms``: refuse a recipe without any (one line)."""
    recipe = build.recipe if build else None
    if recipe is not None and not recipe.update.terms:
        raise OutriderError(f"loop {loop}: update.terms is empty, so nothing would learn from the kept samples; "
                            "add a term, e.g. update.terms: [{name: nll, rows: all}]")


def fine_tune(run: Run, kept: list[Episode], step: int, temperature: float) -> tuple[dict[str, float], float]:
    """One learner step of the run's terms on `kept` (no advantages); returns its metrics and trained tokens."""
    policy, u = run.policy, run.recipe.update
    batch = pack(kept, policy.pad_id, policy.bos_id).to(run.device)
    prepare(batch, policy, run.reference, u, temperature, run.need_old(), False)
    batch.advantages = torch.zeros_like(batch.token_rewards)
    metrics = learner_step(policy, run.optimizer, batch, run.pieces.terms, u, temperature,
                           run.learner_generator(step), run.norm_length)
    return metrics, float(batch.attention_mask.sum()) * u.epochs


class RFTConfig(PieceConfig):
    """Options of the `rft` loop."""

    min_reward: float | None = Field(None, description="Keep episodes whose total reward is at least this; null: "
                                                       "keep the successful ones (the env's verdict).")


@LOOPS.register("rft", config=RFTConfig)
class RejectionSampling(Piece):
    """Rejection-sampling fine-tuning: sample and score as in RL, then train on the kept episodes. The explore piece
    samples and scores episodes as in an RL step; the kept ones (successes, or total reward ≥ ``min_reward``) are packed and trained on by the learner's terms, e.g.
    ``update: {loss: none, terms: [{name: nll, rows: all}]}`` (supervised likelihood on the kept episodes). A step
    that keeps nothing does not update. Metric: ``rft/kept_frac``."""

    cfg: RFTConfig

    def __init__(self, cfg: RFTConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        require_terms(build, "rft")

    def __call__(self, run: Run, step: int) -> dict[str, float]:
        t_step = time.perf_counter()
        timers = {"sample_s": 0.0, "sample_tokens": 0.0}
        episodes, metrics = collect(run, step, timers)
        metrics.update(episode_metrics(episodes))
        threshold = self.cfg.min_reward
        kept = [e for e in episodes if (e.success if threshold is None else e.total_reward() >= threshold)]
        metrics["rft/kept_frac"] = len(kept) / max(len(episodes), 1)
        t_train, train_tokens = time.perf_counter(), 0.0
        if kept:
            learned, train_tokens = fine_tune(run, kept, step, run.params.temperature)
            metrics.update(learned)
        metrics.update(run.timing(timers["sample_s"], timers["sample_tokens"], time.perf_counter() - t_train,
                                  train_tokens, time.perf_counter() - t_step))
        return metrics
