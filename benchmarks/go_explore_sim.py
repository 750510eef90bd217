"""Go-Explore's archive on a MiniGrid level with uniformly random actions in place of the policy (no model): how
many layouts an archive of returns-by-restore solves within a budget of episodes, to size a level and horizon
before spending model time on them (docs/exploration.md).

    python benchmarks/go_explore_sim.py --env MiniGrid-DoorKey-5x5-v0 --horizon 32 --layouts 8 --cells 16 --group 4

Each iteration returns to `cells` cells (drawn by the archive's weight, default 1/sqrt(n_seen + 1)) and plays
`group` episodes from each, the horizon counting the restored prefix as in the `go_explore` piece.
"""

from __future__ import annotations

import argparse
import random

import numpy as np

from outrider.data import Episode, Turn
from outrider.envs.minigrid_text import MiniGridConfig, MiniGridTask
from outrider.explore.archive import Archive, Cell, SelectionConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--env", default="MiniGrid-DoorKey-5x5-v0")
    ap.add_argument("--horizon", type=int, default=32)
    ap.add_argument("--layouts", type=int, default=8)
    ap.add_argument("--cells", type=int, default=16)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    task = MiniGridTask(MiniGridConfig(env_id=args.env, max_turns=args.horizon))
    env, archive = task.make_env("train"), Archive(task.cell_functions["position"])
    rng, pick = np.random.default_rng(args.seed), random.Random(args.seed)
    for seed in range(args.layouts):
        env.reset(seed)
        archive.cells[(seed, archive.cell_fn(env.state_key()))] = Cell(seed, [], None, 0.0)
    for it in range(1, args.iterations + 1):
        for key in archive.choose(args.cells, rng, SelectionConfig()):
            cell = archive.cells[key]
            for _ in range(args.group):
                env.reset(key[0])
                if cell.snapshot is not None:
                    env.restore(cell.snapshot)
                turns, done, info = [Turn("", [], t.action, info=dict(t.info)) for t in cell.turns], False, {}
                while len(turns) < args.horizon and not done:
                    turn = Turn("", [], pick.choice("lrfpdtx"), info={"state_key": env.state_key()},
                                snapshot=env.snapshot())
                    _, turn.reward, done, info = env.step(turn.action)
                    turn.info["events"] = info.get("events", [])
                    turns.append(turn)
                archive.add(Episode(0, key[0], turns, done=done, success=bool(info.get("success"))), cell.depth)
        if it % 5 == 0:
            print(f"iteration {it}: {it * args.cells * args.group} episodes, {len(archive.cells)} cells, "
                  f"{len(archive.solutions)}/{args.layouts} layouts solved", flush=True)


if __name__ == "__main__":
    main()
