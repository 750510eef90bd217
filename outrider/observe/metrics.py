"""Per-step metrics: one JSON object per line in `metrics.jsonl`, then to every tracker of ``observe.report_to``
(TensorBoard under `tb/`, W&B, MLflow, trackio: `outrider.observe.trackers`). This is the one place rows go."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from outrider.data import Episode, group_reward_std, groups_of, has_reward_variance
from outrider.observe.trackers import start_trackers


class MetricsWriter:
    """Writes each step's metrics to ``metrics.jsonl`` and the recipe's trackers. On resume (``resume_step``: the
    checkpoint's step) the lines after the checkpoint are dropped (they will be logged again); trackers that
    cannot drop what they hold get only the steps after the last one logged before (`trackers` module)."""

    def __init__(self, run_dir: Path, report_to: Sequence[Any] = (), resume_step: int | None = None,
                 config: dict[str, Any] | None = None):
        self.path = run_dir / "metrics.jsonl"
        self._logged_through = -1  # trackers that cannot rewrite have seen every step up to this one
        if resume_step is not None:
            self._logged_through = max((_step_of(ln) for ln in self._lines() if _step_of(ln) < 1 << 62), default=-1)
            self._truncate_after(resume_step)
        self.trackers = start_trackers(list(report_to), run_dir, config or {}, resume_step)

    def _lines(self) -> list[str]:
        return [ln for ln in self.path.read_text().splitlines() if ln.strip()] if self.path.exists() else []

    def _truncate_after(self, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from (they will be logged again), atomically."""
        if not self.path.exists():
            return
        kept = [ln for ln in self._lines() if _step_of(ln) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: float(v) for k, v in sorted(metrics.items())}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        values = {k: float(v) for k, v in metrics.items()}
        for tracker in self.trackers:
            if tracker.rewrites or step > self._logged_through:
                tracker.log(step, values)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", -1))
    except (json.JSONDecodeError, ValueError, TypeError):
        return 1 << 62  # an unreadable (half-written) line is dropped


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def error_repeat_rates(episodes: list[Episode]) -> dict[str, float]:
    """After an error, does the policy recover or repeat it ([17]'s failure mode)? Over the turns that directly
    follow an invalid action: ``episode/invalid_after_error_rate``, the share that are invalid again, and
    ``episode/repeat_error_rate``, the share that repeat the same action text. Absent when no action follows an
    invalid one."""
    after = repeated = invalid = 0
    for e in episodes:
        for prev, turn in zip(e.turns, e.turns[1:]):
            if prev.info.get("invalid") and turn.action_ids:
                after += 1
                invalid += bool(turn.info.get("invalid"))
                repeated += turn.action.strip() == prev.action.strip()
    if not after:
        return {}
    return {"episode/invalid_after_error_rate": invalid / after, "episode/repeat_error_rate": repeated / after}


def agent_metrics(episodes: list[Episode]) -> dict[str, float]:
    """Multi-turn measures: invalid actions per turn, the env's own final-step metrics (``env/<name>``, e.g.
    regret), the share of episodes in which each progress event happened (``event/<name>``; absent in a batch
    where it never happened), distinct (group, env state) pairs visited across the batch (a state key is only
    comparable within one prompt/seed), episodes cut short by the model's context, and what follows an invalid
    action (`error_repeat_rates`)."""
    n = max(len(episodes), 1)
    turns = [t for e in episodes for t in e.turns if t.action_ids]
    out: dict[str, float] = defaultdict(float)
    out["episode/invalid_action_rate"] = sum(bool(t.info.get("invalid")) for t in turns) / max(len(turns), 1)
    out["episode/context_full_frac"] = sum(bool(e.metadata.get("context_full")) for e in episodes) / n
    env_sums: dict[str, list[float]] = defaultdict(list)
    for e in episodes:
        last = e.turns[-1].info if e.turns else {}
        for name, v in (last.get("metrics") or {}).items():
            env_sums[name].append(float(v))
        for name in {ev for t in e.turns for ev in t.info.get("events", ())}:
            out[f"event/{name}"] += 1 / n
    out.update({f"env/{name}": sum(v) / len(v) for name, v in env_sums.items()})
    out.update(error_repeat_rates(episodes))
    keys = {(e.group_id, t.state_key) for e in episodes for t in e.turns if t.state_key is not None}
    if keys:
        out["episode/distinct_states"] = float(len(keys))
    return dict(out)


def episode_metrics(episodes: list[Episode]) -> dict[str, float]:
    """Reward per component, accuracy, response length, truncation, invalid actions, zero-variance groups, the
    mean within-group std of the total reward (``episode/group_reward_std``), and the multi-turn measures of
    `agent_metrics`."""
    n = max(len(episodes), 1)
    out: dict[str, float] = defaultdict(float)
    for e in episodes:
        for level in ("trajectory", "step", "token"):
            for name, v in e.rewards[level].items():
                out[f"reward/{name}"] += (v if level == "trajectory" else sum(v)) / n
        out["reward/total"] += e.total_reward() / n
        out["episode/accuracy"] += float(e.success) / n
        out["episode/response_length"] += e.num_action_tokens / n
        out["episode/truncated_frac"] += float(e.truncated) / n
        out["episode/invalid_frac"] += float(any(t.info.get("invalid") for t in e.turns)) / n
        out["episode/turns"] += len(e.turns) / n
    groups = list(groups_of(episodes).values())
    out["episode/zero_variance_group_frac"] = sum(not has_reward_variance(g) for g in groups) / max(len(groups), 1)
    out["episode/group_reward_std"] = sum(group_reward_std(g) for g in groups) / max(len(groups), 1)
    out.update(agent_metrics(episodes))
    out.update(origin_metrics(episodes))
    return dict(out)


def origin_metrics(episodes: list[Episode]) -> dict[str, float]:
    """Per origin present, when some episode is not on-policy from a reset: ``origin/<origin>/share`` (of the
    batch's episodes), ``reward`` (mean total reward) and ``accuracy``. The learner adds the importance weights
    of the off-policy rows (`update.off_policy`)."""
    if all(e.origin == "on_policy" for e in episodes):
        return {}
    by_origin: dict[str, list[Episode]] = defaultdict(list)
    for e in episodes:
        by_origin[e.origin].append(e)
    out = {}
    for origin, eps in by_origin.items():
        out[f"origin/{origin}/share"] = len(eps) / len(episodes)
        out[f"origin/{origin}/reward"] = sum(e.total_reward() for e in eps) / len(eps)
        out[f"origin/{origin}/accuracy"] = sum(e.success for e in eps) / len(eps)
    return out
