"""The `outrider compare` and `outrider report` commands: recipes × seeds in parallel and their report
(registered on the app in `outrider/cli.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from outrider.errors import OutriderError

out = Console()


def compare(
    recipes_: Annotated[list[Path], typer.Argument(metavar="RECIPE", help="Recipe YAML files to compare.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for runs (<recipe>/seed<k>/) and the report.")]
    = Path("runs/compare"),
    seeds: Annotated[int, typer.Option(help="Seeds per recipe (0..N-1).")] = 3,
    set_: Annotated[list[str], typer.Option("--set", help="Override applied to every recipe (repeatable).")] = [],
    jobs: Annotated[Optional[int], typer.Option(help="Runs at once (default: the core count).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch threads per run (default: cores // jobs).")] = None,
    metrics: Annotated[list[str], typer.Option("--metrics", help="Metric key to plot, e.g. eval/pass@1 "
                                               "(repeatable or comma-separated; default: pass@1, pass@16, "
                                               "policy/entropy, reward/total, eval/* diagnostics).")] = [],
    resume: Annotated[bool, typer.Option(help="Keep finished runs (summary.json) and continue partial ones.")]
    = False,
    backend: Annotated[str, typer.Option(help="local (child processes here) or ray (one Ray task per run; "
                                         "RAY_ADDRESS joins a cluster, --out must be a path all nodes see).")]
    = "local",
    gpus_per_run: Annotated[float, typer.Option("--gpus-per-run", help="GPUs each Ray task declares.")] = 0.0,
) -> None:
    """Run recipes x seeds in parallel processes (or Ray tasks), then write DIR/report.html (curves with 95%
    bootstrap bands, a final table, the recipe diff) and DIR/summary.json. Exits 1 if any run failed."""
    from outrider.compare import compare as run_compare
    from outrider.rundir import check_writable

    check_writable(out_dir)
    try:
        summary, failed = run_compare(recipes_, seeds, out_dir, set_, jobs, threads, _metric_list(metrics), resume,
                                      backend=backend, gpus=gpus_per_run)
    except KeyboardInterrupt:
        raise typer.Abort() from None
    _report_done(out_dir, summary)
    if failed:
        raise SystemExit(1)  # typer.Exit is swallowed by app(standalone_mode=False) in main()


def report(
    run_dirs: Annotated[list[Path], typer.Argument(metavar="RUN_DIR", help="Run directories, or directories "
                                                   "holding them (e.g. a compare --out).")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Directory for report.html, summary.json, PNGs "
                                                    "(default: the RUN_DIR given, when there is one).")] = None,
    metrics: Annotated[list[str], typer.Option("--metrics", help="Metric key to plot (repeatable or "
                                               "comma-separated).")] = [],
) -> None:
    """Build the compare report from existing runs. Runs named seed<k> are grouped by their parent directory;
    other runs by identical resolved recipes (seed and threads aside)."""
    from outrider.observe.report import build_report
    from outrider.rundir import check_writable

    if out_dir is None:
        if len(run_dirs) != 1:
            raise OutriderError("report: with several RUN_DIRs, say where the report goes with --out")
        out_dir = run_dirs[0]
    check_writable(out_dir)
    _report_done(out_dir, build_report(run_dirs, out_dir, _metric_list(metrics)))


def _metric_list(metrics: list[str]) -> list[str] | None:
    return [m.strip() for item in metrics for m in item.split(",") if m.strip()] or None


def _report_done(out_dir: Path, summary: dict) -> None:
    # metrics as rows, groups as columns: there are usually many more metrics than groups, and a terminal is narrow
    table = Table(title="final values: mean [95% CI] (n seeds)")
    table.add_column("metric")
    for group in summary["table"]:
        table.add_column(group, justify="right")
    for m in summary["metrics"]:
        cells = []
        for row in summary["table"].values():
            s = row.get(m)
            cells.append("-" if s is None else f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}] ({s['n']})")
        table.add_row(m, *cells)
    out.print(table)
    out.print(f"wrote {out_dir / 'report.html'} and {out_dir / 'summary.json'}")
