"""`outrider compare`: run recipes × seeds as parallel `outrider train` processes, then build one report.

Each run is its own process (``python -m outrider.cli train RECIPE --out DIR/<stem>/seed<k> --set train.seed=k
--set train.threads=T --quiet``): a crash, an out-of-memory kill or a hung import stays in that run, and torch's
thread pool is sized per process. An offline config (``outrider offline train``'s YAML: a top-level ``method``, no
``task``) runs as ``outrider offline train CONFIG --out ... --set seed=k --set threads=T`` instead. The report
groups runs by their parent directory (the recipe stem).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.live import Live
from rich.table import Table

from outrider.errors import OutriderError

STDERR_TAIL_LINES = 40
BACKENDS = ("local", "ray")


def cpu_cores() -> int:
    """Cores this process may use (the affinity mask in containers, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


@dataclass
class RunJob:
    """One recipe × seed: where it runs and how far it got."""

    recipe: Path
    stem: str
    seed: int
    run_dir: Path
    total_steps: int
    state: str = "queued"  # queued, running, done, kept, failed
    resume: bool = False
    threads: int | None = None  # set for resumed runs: the saved recipe's value
    proc: subprocess.Popen | None = None
    log: Path | None = None
    started: float = 0.0
    ended: float = 0.0
    returncode: int | None = None
    error: str = ""
    kind: str = "rl"  # "rl": an `outrider train` recipe; "offline": an `outrider offline train` config

    @property
    def name(self) -> str:
        return f"{self.stem}/seed{self.seed}"


def last_step(run_dir: Path) -> int | None:
    """The step of the last complete line of metrics.jsonl, reading only the file's tail (runs can be long)."""
    path = run_dir / "metrics.jsonl"
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by the seek or still being written
    return None


def settle(job: RunJob) -> str:
    """Read JOB's run directory as an earlier attempt left it: "kept" (finished: summary.json), "resume" (started:
    recipe.yaml, continued with `train --resume` at the saved thread count) or "fresh"."""
    if (job.run_dir / "summary.json").is_file():
        return "kept"
    if job.kind == "offline" and (job.run_dir / "config.json").is_file():
        job.resume = True
        job.threads = json.loads((job.run_dir / "config.json").read_text()).get("threads")
        return "resume"
    if (job.run_dir / "recipe.yaml").is_file():
        job.resume = True
        # `train --resume` refuses a recipe that differs from the saved one, threads included
        saved = yaml.safe_load((job.run_dir / "recipe.yaml").read_text()) or {}
        job.threads = (saved.get("train") or {}).get("threads")
        return "resume"
    return "fresh"


def plan(recipes: list[Path], seeds: int, out_dir: Path, sets: list[str], resume: bool) -> list[RunJob]:
    """Validate every recipe (with the overrides) and lay out the runs, before anything is launched."""
    if seeds < 1:
        raise OutriderError(f"--seeds: must be at least 1 (got {seeds})")
    if not recipes:
        raise OutriderError("compare: give at least one RECIPE")
    stems: dict[str, Path] = {}
    jobs: list[RunJob] = []
    for path in recipes:
        kind, total_steps = validate(Path(path), list(sets))  # a bad recipe or override fails here, as one line
        stem = Path(path).stem
        if stem in stems:
            raise OutriderError(f"compare: '{path}' and '{stems[stem]}' share the name '{stem}' (runs go to "
                                f"DIR/<recipe name>/seed<k>); rename one")
        stems[stem] = Path(path)
        for k in range(seeds):
            run_dir = out_dir / stem / f"seed{k}"
            job = RunJob(Path(path), stem, k, run_dir, total_steps, kind=kind)
            if resume and settle(job) == "kept":
                job.state = "kept"
            elif not resume and run_dir.is_dir() and any(p.name != "stderr.log" for p in run_dir.iterdir()):
                raise OutriderError(f"compare: '{run_dir}' already holds a run; use --resume to keep finished "
                                    "runs and continue partial ones, or choose another --out")
            jobs.append(job)
    return jobs


def validate(path: Path, sets: list[str]) -> tuple[str, int]:
    """The file's kind ("rl" or "offline") and its step count, after validating it with the overrides."""
    from outrider.offline.config import is_offline_config, load_config
    from outrider.recipe import load_recipe

    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        raw = None  # load_recipe reports the file's problem as one line
    if is_offline_config(raw):
        cfg = load_config(str(path), sets)
        return "offline", cfg.steps + (cfg.reward_steps if cfg.method == "bt_filtered_bc" else 0)
    return "rl", load_recipe(path, sets).train.steps


def _command(job: RunJob, sets: list[str], threads: int) -> list[str]:
    offline = job.kind == "offline"
    cmd = [sys.executable, "-m", "outrider.cli", *(["offline"] if offline else []), "train", str(job.recipe),
           "--out", str(job.run_dir)]
    prefix = "" if offline else "train."
    for s in [*sets, f"{prefix}seed={job.seed}", f"{prefix}threads={job.threads or threads}"]:
        cmd += ["--set", s]
    return cmd + (["--resume"] if job.resume else []) + ([] if offline else ["--quiet"])


def child_env(job: RunJob, threads: int) -> dict[str, str]:
    """Clear what an earlier failed attempt left in JOB's run directory and return the child's environment."""
    stale = job.run_dir / "stderr.log"  # from an earlier failed attempt; `train` wants an empty --out
    if stale.is_file():
        stale.unlink()
    if job.run_dir.is_dir() and not any(job.run_dir.iterdir()):
        job.run_dir.rmdir()
    env = dict(os.environ)
    # numpy/BLAS pools would otherwise each take every core, oversubscribing the machine J times over
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"})
    return env


def _launch(job: RunJob, sets: list[str], threads: int, log_dir: Path) -> None:
    env = child_env(job, threads)
    job.log = log_dir / f"{job.stem}-seed{job.seed}.stderr"
    with job.log.open("w") as err:
        job.proc = subprocess.Popen(_command(job, sets, threads), stdout=subprocess.DEVNULL, stderr=err,
                                    stdin=subprocess.DEVNULL, env=env)
    job.state, job.started = "running", time.monotonic()


def record_exit(job: RunJob, returncode: int, lines: list[str]) -> None:
    """Record an exit; a failure keeps its stderr tail (LINES) in RUNDIR/stderr.log and one line in job.error."""
    job.returncode, job.ended = returncode, time.monotonic()
    if returncode == 0:
        job.state = "done"
        return
    job.state = "failed"
    job.run_dir.mkdir(parents=True, exist_ok=True)
    (job.run_dir / "stderr.log").write_text("\n".join(lines[-STDERR_TAIL_LINES:]) + "\n")
    last = next((ln.strip() for ln in reversed(lines) if ln.strip()), "no output")
    job.error = f"{job.name} failed (exit {returncode}): {last[:200]} (see {job.run_dir / 'stderr.log'})"


def _finish(job: RunJob) -> None:
    lines = job.log.read_text(errors="replace").splitlines() if job.log and job.log.is_file() else []
    record_exit(job, job.proc.returncode, lines)


def _elapsed(job: RunJob) -> str:
    if not job.started:
        return ""
    s = int((job.ended or time.monotonic()) - job.started)
    return f"{s // 60}:{s % 60:02d}"


def _table(jobs: list[RunJob]) -> Table:
    table = Table(title="outrider compare", title_justify="left")
    for col, justify in (("run", "left"), ("state", "left"), ("step", "right"), ("time", "right")):
        table.add_column(col, justify=justify)
    style = {"done": "green", "kept": "green", "failed": "red", "running": "yellow", "queued": "dim"}
    for job in jobs:
        step = last_step(job.run_dir) if job.state != "queued" else None
        step_txt = "warm start" if job.state == "running" and step is None else (
            "" if step is None else f"{step}/{job.total_steps}")
        table.add_row(job.name, f"[{style[job.state]}]{job.state}[/]", step_txt, _elapsed(job))
    return table


def run_all(jobs: list[RunJob], sets: list[str], parallel: int, threads: int, console: Console) -> None:
    """Run the queued jobs, at most `parallel` at a time, with a live table; Ctrl-C stops the children."""
    queue = [j for j in jobs if j.state == "queued"]
    running: list[RunJob] = []
    with tempfile.TemporaryDirectory(prefix="outrider-compare-") as tmp, \
            Live(_table(jobs), console=console, refresh_per_second=2, transient=False) as live:
        try:
            while queue or running:
                while queue and len(running) < parallel:
                    job = queue.pop(0)
                    _launch(job, sets, threads, Path(tmp))
                    running.append(job)
                for job in list(running):
                    if job.proc.poll() is not None:
                        _finish(job)
                        running.remove(job)
                live.update(_table(jobs))
                time.sleep(0.25)
            live.update(_table(jobs))
        except KeyboardInterrupt:
            for job in running:  # only the processes this command started
                job.proc.terminate()
            for job in running:
                try:
                    job.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    job.proc.kill()
            raise


def compare(recipes: list[Path], seeds: int, out_dir: Path, sets: list[str] | None = None, jobs: int | None = None,
            threads: int | None = None, metrics: list[str] | None = None, resume: bool = False,
            console: Console | None = None, backend: str = "local", gpus: float = 0.0,
            ray_address: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """Run recipes × seeds and write DIR/report.html and DIR/summary.json.

    ``jobs`` defaults to the core count (capped at the number of runs), ``threads`` per run to
    max(1, cores // jobs); with ``backend="ray"`` the cores are the cluster's, each run a Ray task declaring
    ``threads`` CPUs and ``gpus`` GPUs (see outrider/compare_ray.py). Returns the report summary and one line per
    failed run; raises OutriderError when a recipe is invalid (before anything runs) or when no run succeeded."""
    from outrider.observe.report import build_report

    sets = list(sets or [])
    console = console or Console(stderr=True)
    if backend not in BACKENDS:
        raise OutriderError(f"--backend: '{backend}' is not one of {', '.join(BACKENDS)}")
    if jobs is not None and jobs < 1:
        raise OutriderError(f"--jobs: must be at least 1 (got {jobs})")
    if threads is not None and threads < 1:
        raise OutriderError(f"--threads: must be at least 1 (got {threads})")
    if gpus < 0 or (gpus and backend != "ray"):
        raise OutriderError(f"--gpus-per-run: a number >= 0, with --backend ray only (got {gpus})")
    ray = None
    if backend == "ray":
        from outrider import compare_ray

        compare_ray.import_ray()  # a missing extra fails before anything is planned
    planned = plan(recipes, seeds, out_dir, sets, resume)
    to_run = sum(j.state == "queued" for j in planned)
    started_ray = False
    if backend == "ray" and to_run:
        ray, started_ray = compare_ray.connect(ray_address, cpu_cores())
    cores = compare_ray.cluster_cpus(ray) if ray is not None else cpu_cores()
    parallel = max(1, min(jobs or cores, to_run or 1))
    threads = threads or max(1, cores // parallel)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if ray is not None:
            compare_ray.run_all_ray(ray, planned, sets, parallel, threads, gpus, console)
        else:
            run_all(planned, sets, parallel, threads, console)
    finally:
        if started_ray:
            ray.shutdown()
    if not console.is_terminal:
        console.line()  # Live leaves the cursor after its last frame when it cannot redraw in place
    failed = [j.error for j in planned if j.state == "failed"]
    for line in failed:
        console.print(f"[red]{line}[/]", highlight=False, soft_wrap=True)
    good = [j.run_dir for j in planned if j.state in ("done", "kept")]
    if not good:
        raise OutriderError(f"compare: every run failed; see {out_dir}/<recipe>/seed<k>/stderr.log")
    title = "outrider compare: " + ", ".join(Path(p).stem for p in recipes)
    summary = build_report(good, out_dir, metrics, title=title, failed=failed, drop_unknown=True)
    return summary, failed
