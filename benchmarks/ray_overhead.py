"""What `outrider compare --backend ray` costs over the local backend: the same small runs (a shipped recipe, cut
short with overrides) through both backends, interleaved, one run at a time (--jobs 1 --threads 1).

    nice -n 10 python benchmarks/ray_overhead.py --rounds 3 --seeds 3 --steps 2

First, the dispatch alone: a trivial child process started directly and by a Ray task (`dispatch`). Then whole
runs. On a machine shared with other work the runs' own time varies far more than the overhead, so each backend's
cost is taken outside the runs: per run, ``(compare wall - sum of the runs' inner times) / runs``, the inner time
of a run being ``mtime(summary.json) - mtime(recipe.yaml)`` (from the run's first file to its last; the child's
interpreter start and imports stay outside, the same for both backends). Prints per round each backend's wall
and outside time per run, Ray's start + stop (a separate `ray.init`/`ray.shutdown`), and the Ray overhead per run
= ray outside - local outside, with and without the start + stop shared by the command's runs; checks that both
summaries' tables are equal.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
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


def outside_per_run(out: Path, wall: float, seeds: int) -> float:
    """(wall - the runs' inner times) / runs; see the module docstring."""
    inner = 0.0
    for run in sorted(out.glob("*/seed*")):
        inner += (run / "summary.json").stat().st_mtime - (run / "recipe.yaml").stat().st_mtime
    return (wall - inner) / seeds


def _child() -> int:
    return subprocess.run([sys.executable, "-c", "pass"], check=True).returncode


def dispatch(n: int) -> tuple[float, float]:
    """Seconds per run of a trivial child process (``python -c pass``) started here and started by a Ray task on
    a started local instance, one at a time: what Ray adds to each run's start and end, apart from training."""
    import ray

    t0 = time.perf_counter()
    for _ in range(n):
        _child()
    local = (time.perf_counter() - t0) / n
    ray.init(num_cpus=cpu_cores(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        task = ray.remote(_child).options(num_cpus=1)
        ray.get(task.remote())  # the first task starts a worker process; later ones may reuse it, as compare's do
        t0 = time.perf_counter()
        for _ in range(n):
            ray.get(task.remote())
        remote = (time.perf_counter() - t0) / n
    finally:
        ray.shutdown()
    return local, remote


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
    ap.add_argument("--dispatch", type=int, default=20, help="trivial children timed per backend")
    args = ap.parse_args()
    local, remote = dispatch(args.dispatch)
    print(f"dispatch of a trivial child, {args.dispatch} times: local {local * 1e3:.0f} ms, Ray task "
          f"{remote * 1e3:.0f} ms per run ({(remote - local) * 1e3:+.0f} ms)", flush=True)
    overheads = []
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as tmp:
        for r in range(args.rounds):
            local, s_local = timed_compare(args.recipe, Path(tmp) / f"local{r}", args.seeds, args.steps, "local")
            remote, s_ray = timed_compare(args.recipe, Path(tmp) / f"ray{r}", args.seeds, args.steps, "ray")
            start_stop = ray_start_stop()
            out_local = outside_per_run(Path(tmp) / f"local{r}", local, args.seeds)
            out_ray = outside_per_run(Path(tmp) / f"ray{r}", remote, args.seeds)
            per_run = out_ray - out_local - start_stop / args.seeds
            overheads.append(per_run)
            same = s_local["table"] == s_ray["table"]
            print(f"round {r}: wall local {local:.2f} s, ray {remote:.2f} s; outside the runs per run: local "
                  f"{out_local:.2f} s, ray {out_ray:.2f} s; ray start+stop {start_stop:.2f} s; ray overhead per run "
                  f"{per_run:+.2f} s beyond start+stop ({out_ray - out_local:+.2f} s with it, {args.seeds} runs); "
                  f"same summary table: {same}", flush=True)
    if overheads:
        print(f"median Ray overhead per run beyond start+stop: {statistics.median(overheads):+.2f} s")


if __name__ == "__main__":
    main()
