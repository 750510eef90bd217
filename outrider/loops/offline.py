"""Offline steps: learning from stored data, with no sampling. `pairs` runs the learner's terms on stored
preference pairs (DPO and its family through ``update.terms``)."""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

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
SIDE_KEYS = ("prompt", "response")
VALUE_KEYS = ("chosen_value", "rejected_value")


class Pair(NamedTuple):
    """One preference pair: two responses to one prompt, both continuing `prefix` (given, never trained: the shared
    earlier steps of a step-level pair), with optional values of each side (read by `step_apo`)."""

    prompt: str
    chosen: str
    rejected: str
    prefix: str = ""
    chosen_value: float = 0.0
    rejected_value: float = 0.0


class PairsConfig(PieceConfig):
    """Options of the `pairs` loop."""

    path: str | None = Field(None, description="JSONL file of pairs, one object a line: {\"prompt\", \"chosen\", "
                                                "\"rejected\"} (texts), each side optionally {\"prompt\", "
                                                "\"response\"} instead of a text (then both sides' prompts must "
                                                "agree); optional \"prefix\" (a response prefix both sides continue, "
                                                "never trained: step-level pairs) and \"chosen_value\" / "
                                                "\"rejected_value\" (numbers, for step_apo). null: pairs made from "
                                                "the task's demonstrations of single-turn train problems (chosen: a "
                                                "problem's demonstration; rejected: the next problem's answer).")
    task_pairs: int = Field(512, ge=1, description="How many pairs to make from the task when path is null.")
    pairs_per_step: int = Field(16, ge=1, description="Pairs per step (each a group of two rows).")


TASK_PAIR_SEED = 10**7  # train problems from here on (RL draws random ones; the warm start uses 1e8 on)


def task_pairs(task: Any, n: int, where: str) -> list[Pair]:
    """Pairs from `n + 1` consecutive train problems' demonstrations: problem i's answer over problem i+1's."""
    demos = task.demonstrations(list(range(TASK_PAIR_SEED, TASK_PAIR_SEED + n + 1)))
    if any(len(d.turns) != 1 for d in demos):
        raise OutriderError(f"{where}.path: pairs from the task need single-turn demonstrations; give a pairs file")
    pairs = [Pair(a.turns[0][0], a.turns[0][1], b.turns[0][1]) for a, b in zip(demos, demos[1:])]
    return [p for p in pairs if p.chosen != p.rejected]


def _side(row: dict[str, Any], key: str, where: str) -> tuple[str | None, str]:
    """A side of a pair: ``(its own prompt or None, its response)``."""
    if key not in row:
        raise OutriderError(f"{where}: missing field '{key}' (a pair is {{\"prompt\", \"chosen\", \"rejected\"}})")
    value = row[key]
    if isinstance(value, str):
        return None, value
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(SIDE_KEYS))
        if unknown:
            raise OutriderError(f"{where}: field '{key}' has unknown key '{unknown[0]}'; valid: prompt, response")
        for k in SIDE_KEYS:
            if not isinstance(value.get(k), str):
                problem = "missing" if k not in value else f"a {type(value[k]).__name__}, not a string"
                raise OutriderError(f"{where}: field '{key}.{k}' is {problem}")
        return value["prompt"], value["response"]
    raise OutriderError(f"{where}: field '{key}' must be a string or {{\"prompt\", \"response\"}}, got "
                        f"{type(value).__name__}")


def parse_pair(row: dict[str, Any], where: str) -> Pair:
    """One line of a pairs file as a `Pair`; a missing or mistyped field, or sides that answer different prompts,
    is one error naming the line (`where`)."""
    (p_chosen, chosen), (p_rejected, rejected) = _side(row, "chosen", where), _side(row, "rejected", where)
    prompts = {k: p for k, p in (("prompt", row.get("prompt")), ("chosen.prompt", p_chosen),
                                 ("rejected.prompt", p_rejected)) if p is not None}
    if "prompt" in row and not isinstance(row["prompt"], str):
        raise OutriderError(f"{where}: field 'prompt' must be a string, got {type(row['prompt']).__name__}")
    if not prompts:
        raise OutriderError(f"{where}: missing field 'prompt' (a pair is {{\"prompt\", \"chosen\", \"rejected\"}})")
    (k0, p0), *others = prompts.items()
    for k, p in others:
        if p != p0:
            raise OutriderError(f"{where}: the prompt differs between {k0} ({_clip(p0)}) and {k} ({_clip(p)}); a "
                                "pair compares two responses to one prompt")
    prefix = row.get("prefix", "")
    if not isinstance(prefix, str):
        raise OutriderError(f"{where}: field 'prefix' must be a string, got {type(prefix).__name__}")
    values = []
    for k in VALUE_KEYS:
        v = row.get(k, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise OutriderError(f"{where}: field '{k}' must be a finite number, got {v!r}")
        values.append(float(v))
    unknown = sorted(set(row) - set(PAIR_KEYS) - set(VALUE_KEYS) - {"prefix"})
    if unknown:
        raise OutriderError(f"{where}: unknown field '{unknown[0]}'; valid: {', '.join(PAIR_KEYS)}, prefix, "
                            f"{', '.join(VALUE_KEYS)}")
    return Pair(p0, chosen, rejected, prefix, *values)


def _clip(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def read_pairs(path: str, where: str) -> list[Pair]:
    """The file's pairs; a missing file or a line that is not a pair is one error naming the line."""
    pairs = [parse_pair(row, f"{path}:{n}") for n, row in json_objects(path, f"{where}.path")]
    if not pairs:
        raise OutriderError(f"{where}.path: '{path}' holds no pairs")
    return pairs


def pair_episodes(policy: Any, pairs: list[Pair]) -> list[Episode]:
    """Each pair as a group of two offline episodes (``preference`` chosen / rejected). Responses are trained like
    demonstrations, every token and an EOS after it; a prefix is in the sequence and untrained (``prefix_tokens``);
    each side's value is its trajectory reward ``value``."""
    episodes = []
    for g, pair in enumerate(pairs):
        ids = policy.encode_observation(pair.prompt, first=True)
        given = policy.encode(pair.prefix) if pair.prefix else []
        for text, value, side in ((pair.chosen, pair.chosen_value, "chosen"),
                                  (pair.rejected, pair.rejected_value, "rejected")):
            turn = Turn(observation=pair.prompt, observation_ids=ids, action=pair.prefix + text,
                        action_ids=given + policy.encode(text) + [policy.eos_id])
            e = Episode(group_id=g, seed=g, turns=[turn], origin="offline", preference=side, prefix_tokens=len(given))
            if value:
                e.rewards["trajectory"]["value"] = value
            episodes.append(e)
    return episodes


@LOOPS.register("pairs", config=PairsConfig)
class PairsStep(Piece):
    """Offline preference optimisation on stored pairs, no rollout. The pairs come from a file or are made from the
    task's demonstrations; each step takes ``pairs_per_step`` pairs (in a
    seeded order reshuffled every pass over the file), packs each pair's chosen and rejected responses as a group of
    two rows (``origin: offline``, ``preference`` chosen/rejected), computes the reference log-probs, and runs the
    learner, whose pairwise terms (e.g. ``update.terms: [dpo]``, with ``update.loss: none``) do the learning.
    Responses are trained like demonstrations: every token and an EOS after it; a pair's ``prefix`` (step-level
    pairs: the shared earlier steps) is in both sequences and never trained. The file format is
    `PairsConfig.path`'s (docs/preference.md); a bad line is one error naming it."""

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

    def batch_pairs(self, step: int) -> list[Pair]:
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
        episodes = pair_episodes(policy, self.batch_pairs(step))
        batch = pack(episodes, policy.pad_id, policy.bos_id).to(run.device)
        prepare(batch, policy, run.reference, u, run.params.temperature, run.need_old(), False)
        batch.advantages = torch.zeros_like(batch.token_rewards)
        metrics = learner_step(policy, run.optimizer, batch, run.pieces.terms, u, run.params.temperature,
                               run.learner_generator(step), run.norm_length)
        train_s = time.perf_counter() - t_step
        metrics.update(run.timing(0.0, 0.0, train_s, float(batch.attention_mask.sum()) * u.epochs, train_s))
        return metrics

