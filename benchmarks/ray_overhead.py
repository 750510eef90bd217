"""What `outrider compare --backend ray` costs over the local backend: the same small runs (a shipped recipe, cut
short with overrides) through both backends, interleaved, one run at a time (--jobs 1 --threads 1).

    nice -n 10 python benchmarks/ray_overhead.py --rounds 2 --seeds 3

Prints per round each backend's wall time, Ray's start + stop (a separate `ray.init`/`ray.shutdown`, measured the
same round) and the per-run overhead = (ray wall - start/stop - local wall) / runs; checks that both summaries'
tables are equal.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console

from outrider import RECIPES_DIR
from outrider.compare import compare, cpu_cores

SETS = ["policy.warm_start.steps=2", "explore.prompts_per_step=2", "explore.group_size=2", "observe.eval_prompts=4",
        "observe.eval_samples=4", "observe.pass_at=[1,4]", "task.eval_size=8", "observe.eval_every=0",
        "observe.tensorboard=false"]


def timed_compare(recipe: Path, out: Path, seeds: int, steps: int, backend: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    summary, failed = compare([recipe], seeds, out, [*SETS, f"train.steps={steps}"], jobs=1, threads=1,
                              console=Console(file=io.StringIO()), backend=backend)
    assert not failed, failed
    return time.perf_counter() - t0, summary


def ray_start_stop() -> float:
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=cpu_cores(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.shutdown()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=RECIPES_DIR / "grpo.yaml")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    overheads = []
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as tmp:
        for r in range(args.rounds):
            local, s_local = timed_compare(args.recipe, Path(tmp) / f"local{r}", args.seeds, args.steps, "local")
            remote, s_ray = timed_compare(args.recipe, Path(tmp) / f"ray{r}", args.seeds, args.steps, "ray")
            start_stop = ray_start_stop()
            per_run = (remote - start_stop - local) / args.seeds
            overheads.append(per_run)
            same = s_local["table"] == s_ray["table"]
            print(f"round {r}: local {local:.2f} s, ray {remote:.2f} s, ray start+stop {start_stop:.2f} s, "
                  f"overhead per run {per_run:+.2f} s ({args.seeds} runs), same summary table: {same}", flush=True)
    print(f"median overhead per run: {statistics.median(overheads):+.2f} s")


if __name__ == "__main__":
    main()
