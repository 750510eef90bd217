"""Cost of Go-Explore's returns on a MiniGrid level: the env's snapshot() (taken every turn of an archiving
rollout), restore() (one per restarted episode) and reset(), against a plain step() (docs/exploration.md).

    python benchmarks/restore_cost.py [ENV_ID]
"""

from __future__ import annotations

import sys
import time

from outrider.envs.minigrid_text import MiniGridConfig, MiniGridTask


def per_call_us(fn, n: int = 2000) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    env_id = sys.argv[1] if len(sys.argv) > 1 else "MiniGrid-DoorKey-5x5-v0"
    env = MiniGridTask(MiniGridConfig(env_id=env_id, max_turns=32)).make_env("train")
    env.reset(0)
    for a in "rff":
        env.step(a)
    snap = env.snapshot()
    out = {"reset_us": per_call_us(lambda: env.reset(0)), "snapshot_us": per_call_us(env.snapshot),
           "restore_us": per_call_us(lambda: env.restore(snap)),
           "step_us": per_call_us(lambda: (env.restore(snap), env.step("l"))) - per_call_us(lambda: env.restore(snap)),
           "snapshot_bytes": len(snap)}
    print(env_id, {k: round(v, 1) for k, v in out.items()})


if __name__ == "__main__":
    main()
