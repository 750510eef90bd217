"""Success from the start states of a fixed-layout run (`task.fixed_layout`), from each run's newest checkpoint.

Training episodes from the start state are few (one group of 4 a step in the Go-Explore recipes), so this plays
`--episodes` fresh episodes from the train starts (episode seeds 10**6 + i, which the runs never drew) and
reports success from the pool seeds' starts (the starts Go-Explore solved and robustified), from every train
start, and from the held-out starts (the run's own evaluation split), sampled at the recipe's eval temperature.

    python benchmarks/fixed_start_success.py runs/robust120b runs/robust120 --episodes 96 --out FILE.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from outrider.checkpoint import list_checkpoints
from outrider.data import Start
from outrider.explore.rollout import rollout
from outrider.policy.model import Policy
from outrider.recipe import load_recipe
from outrider.trainer import build_task, sampling_params


def start_of(task, split: str, seed: int) -> tuple:
    env = task.make_env(split)
    env.reset(seed)
    key = env.state_key()
    return tuple(key[:2])  # (agent cell, direction)


def run_success(run: Path, episodes: int) -> dict[str, float]:
    rec = load_recipe(run / "recipe.yaml")
    ckpt = list_checkpoints(run)[-1]
    policy = Policy.load(ckpt, chat_template=rec.policy.chat_template, where="checkpoint")
    pool = torch.load(ckpt / "trainer_state.pt", weights_only=False)["pieces"]["explore"]["pool"]
    task, params = build_task(rec), sampling_params(rec, rec.observe.eval_temperature)
    pool_starts = {start_of(task, "train", s) for s in pool}
    out: dict[str, float] = {"step": float(ckpt.name.split("_")[-1])}
    for split in ("train", "eval"):
        seeds = [10**6 + i for i in range(episodes)]
        gen = torch.Generator().manual_seed(rec.train.seed)
        eps = rollout(policy, lambda: task.make_env(split), [Start(seed=s, group_id=i) for i, s in enumerate(seeds)],
                      params, gen, task.max_turns)
        by_start: dict[tuple, list[bool]] = defaultdict(list)
        for s, e in zip(seeds, eps):
            by_start[start_of(task, split, s)].append(bool(e.success))
        every = [x for v in by_start.values() for x in v]
        out[f"{split}_success"] = sum(every) / len(every)
        if split == "train":
            pooled = [x for k, v in by_start.items() if k in pool_starts for x in v]
            out["pool_start_success"] = sum(pooled) / max(len(pooled), 1)
            out["pool_start_episodes"] = float(len(pooled))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("compares", nargs="+", type=Path, help="outrider compare output directories")
    ap.add_argument("--episodes", type=int, default=96)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(1)
    result: dict[str, dict[str, dict[str, float]]] = {}
    for compare in a.compares:
        for run in sorted(p.parent for p in compare.glob("*/seed*/recipe.yaml")):
            arm = f"{compare.name}/{run.parent.name}"
            result.setdefault(arm, {})[run.name] = r = run_success(run, a.episodes)
            print(arm, run.name, {k: round(v, 3) for k, v in r.items()}, flush=True)
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
