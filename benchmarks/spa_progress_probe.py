"""SPA-RL [59]'s progress estimator on MiniGrid DoorKey-5x5 rollouts of a warm start, offline: does Σ_t c_t fit
the return on held-out episodes, and does c_t single out the turns with a progress event (key picked up, door
opened, goal reached)? The estimator is the `spa` score piece's own (`score/spa.py`); it trains on the rollouts of
`--train` episodes and is measured on `--test` other episodes of the same policy (train layouts, other seeds).

    python benchmarks/spa_progress_probe.py --model runs/warm_dk5 --train 128 --test 64 --updates 50 \
        --configs logits:3e-4,hidden:1e-3     # docs/rewards/spa_probe.txt
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from outrider.data import Start
from outrider.envs.minigrid_text import MiniGridConfig, MiniGridTask
from outrider.explore.rollout import rollout
from outrider.policy.model import Policy
from outrider.policy.sampler import SamplingParams
from outrider.registry import BuildContext
from outrider.score import SCORE
from outrider.score.spa import episode_tokens, progress_turns
from outrider.score.step_rm import auroc


def play(policy: Policy, task: MiniGridTask, seeds: list[int], seed: int) -> list:
    params = SamplingParams(temperature=1.0, max_new_tokens=2)
    gen = torch.Generator().manual_seed(seed)
    starts = [Start(seed=s, group_id=i) for i, s in enumerate(seeds)]
    return rollout(policy, lambda: task.make_env("train"), starts, params, gen, task.max_turns)


def measure(piece, episodes) -> dict[str, float]:
    enc = [episode_tokens(e, piece.policy.bos_id) for e in episodes]
    piece.model.eval()
    with torch.no_grad():
        cs = [c.tolist() for c in piece.contributions([x[0] for x in enc], [x[1] for x in enc])]
    y = np.array([sum(t.reward for t in e.turns) for e in episodes])
    s = np.array([sum(c) for c in cs])
    flat, flags, by_event = [], [], {}
    for e, c in zip(episodes, cs):
        turns = [t for t in e.turns if t.action_ids]
        for value, flag, turn in zip(c, progress_turns(e, piece.cfg.events), turns):
            flat.append(value)
            flags.append(flag)
            for ev in turn.info.get("events", ()):
                by_event.setdefault(ev, []).append(value)
    flat, flags = np.array(flat), np.array(flags)
    return {"mse": float(((s - y) ** 2).mean()), "var_return": float(y.var()),
            "sum_corr": float(np.corrcoef(s, y)[0, 1]), "event_auroc": auroc(flat[flags], flat[~flags]),
            "event_corr": float(np.corrcoef(flat, flags.astype(float))[0, 1]),
            "c_other": float(flat[~flags].mean()), **{f"c_{k}": float(np.mean(v)) for k, v in by_event.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--test", type=int, default=128)
    ap.add_argument("--updates", type=int, default=200)
    ap.add_argument("--configs", default="logits:1e-4,logits:3e-4,hidden:3e-4,hidden:1e-3")
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(1)
    task = MiniGridTask(MiniGridConfig(env_id="MiniGrid-DoorKey-5x5-v0", format="compact", max_turns=16))
    policy = Policy.load(a.model)
    rng = np.random.default_rng(0)
    seeds = [int(s) for s in rng.integers(0, 2**31 - 1, a.train + a.test)]
    t0 = time.perf_counter()
    train, test = play(policy, task, seeds[: a.train], 1), play(policy, task, seeds[a.train:], 2)
    print(f"rollouts {time.perf_counter() - t0:.0f}s; success train {np.mean([e.success for e in train]):.3f}")
    results = {}
    for spec in a.configs.split(","):
        head, lr = spec.split(":")
        entry, cfg = SCORE.build({"name": "spa", "head": head, "lr": float(lr), "updates": 0})
        piece = entry.create(cfg, BuildContext(None, policy, torch.device("cpu"), 0))
        piece(train)  # builds φ, fills the buffer (updates 0: no training yet)
        curve = {0: measure(piece, test)}
        t1 = time.perf_counter()
        for k in range(a.updates // 25):
            piece._update(25)
            curve[(k + 1) * 25] = measure(piece, test)
        results[spec] = {"curve": curve, "update_s": (time.perf_counter() - t1) / a.updates}
        last = curve[max(curve)]
        print(spec, {k: round(v, 3) for k, v in last.items()}, f"{results[spec]['update_s']:.3f}s/update")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
