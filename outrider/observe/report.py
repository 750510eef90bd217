"""Reports over run directories: curves with 95% bootstrap bands, a final table with intervals, a recipe diff.

`build_report(run_dirs, out_dir, metrics)` writes `out_dir/report.html` (self-contained: inline CSS, plots embedded
as base64 PNG, so it opens offline), one PNG per metric next to it, and `out_dir/summary.json` (the table, machine
readable). Both `outrider report` and `outrider compare` use it.

Grouping (which runs are seeds of the same experiment):
- a run directory named ``seed<k>`` belongs to the group named after its parent directory (the layout
  `outrider compare` writes: ``DIR/<recipe-stem>/seed<k>/``);
- any other run is grouped with the runs whose resolved ``recipe.yaml`` is identical apart from ``train.seed``,
  ``train.threads`` and ``train.device``; the group is labelled with the run directory's name (one run) or the
  longest common prefix of its runs' names, with a short recipe hash added where two labels would collide.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import json
import math
import os
import re
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from outrider.errors import OutriderError
from outrider.observe.report_html import png_name, plot_metric, render_html

CONFIDENCE = 0.95
# differ between seeds of one experiment by construction (seed/threads: an offline config's)
IGNORED_KEYS = ("train.seed", "train.threads", "seed", "threads")
_GROUPING_IGNORED = IGNORED_KEYS + ("train.device",)
_BASIC_EVAL = {"eval/accuracy", "eval/invalid_rate", "eval/response_length"}  # not plotted by default
_SEED_DIR = re.compile(r"^seed\d+$")


@dataclass
class Run:
    """One run directory as the report sees it."""

    path: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    recipe: dict[str, Any]  # flattened resolved recipe (dot keys)
    group: str = ""


@dataclass
class Stat:
    """Mean over seeds with its 95% bootstrap interval (equal to the mean when there is one value)."""

    mean: float
    ci_low: float
    ci_high: float
    n: int
    values: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- reading runs
def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dot keys (``update.loss.clip_low``); lists of mappings are indexed (``score.0.name``)
    like `--set` addresses them, lists of scalars stay one value."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    if isinstance(data, list) and any(isinstance(v, (dict, list)) for v in data):
        out = {}
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: data}


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories (those holding metrics.jsonl); a directory that is not one is searched two levels down,
    so `outrider report DIR` reads everything `outrider compare --out DIR` wrote."""
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if (p / "metrics.jsonl").is_file():
            found.append(p)
            continue
        nested = sorted({m.parent for pattern in ("*/metrics.jsonl", "*/*/metrics.jsonl") for m in p.glob(pattern)})
        if not p.is_dir() or not nested:
            raise OutriderError(f"report: '{p}' is not a run directory (no metrics.jsonl) and holds no runs")
        found.extend(nested)
    return list(dict.fromkeys(found))


def load_run(path: Path) -> Run:
    """Read metrics.jsonl, summary.json (optional: a run still going has none) and recipe.yaml (optional; an
    offline run's config.json instead)."""
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise OutriderError(f"report: '{path}' is not a run directory (no metrics.jsonl)")
    rows = []
    for i, line in enumerate(metrics.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a half-written last line of a run that is still going
        if "step" not in rows[-1]:
            raise OutriderError(f"report: {metrics}:{i + 1} has no 'step' key")
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
    recipe = yaml.safe_load((path / "recipe.yaml").read_text()) if (path / "recipe.yaml").is_file() else \
        json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    return Run(path, rows, summary, flatten(recipe or {}))


def _common_prefix(names: list[str]) -> str:
    prefix = os.path.commonprefix(names).rstrip("-_. ")
    return prefix or names[0]


def assign_groups(runs: list[Run]) -> dict[str, list[Run]]:
    """Group label -> runs, in first-seen order (see the module docstring for the rule)."""
    by_key: dict[str, list[Run]] = {}
    for run in runs:
        if _SEED_DIR.match(run.path.name):
            key = "dir:" + run.path.parent.name
        else:
            rec = {k: v for k, v in run.recipe.items() if k not in _GROUPING_IGNORED}
            key = "recipe:" + json.dumps(rec, sort_keys=True, default=str)
        by_key.setdefault(key, []).append(run)
    labels: dict[str, str] = {}
    for key, members in by_key.items():
        labels[key] = key[4:] if key.startswith("dir:") else _common_prefix([r.path.name for r in members])
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    groups: dict[str, list[Run]] = {}
    for key, members in by_key.items():
        label = labels[key]
        if counts[label] > 1:
            label += "-" + hashlib.sha1(key.encode()).hexdigest()[:6]
        for run in members:
            run.group = label
        groups[label] = members
    return groups


# ----------------------------------------------------------------------------------------------- statistics
def _clean(values: list[Any]) -> list[float]:
    """Finite numbers only: NaN/inf (a diverged step) and non-numbers would poison a mean or a bootstrap."""
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def bootstrap_stats(samples: np.ndarray, n_resamples: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile-bootstrap interval of the mean, per column of ``samples`` (shape [n, columns]).

    Percentile (not BCa) because it always lies within [min, max] of the values and stays defined for two seeds
    or identical values, where BCa degenerates. With one value the interval is the value itself."""
    from scipy.stats import bootstrap

    means = samples.mean(axis=0)
    if samples.shape[0] < 2:
        return means.copy(), means.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate (identical) columns warn but give the right [v, v]
        res = bootstrap((samples,), np.mean, axis=0, vectorized=True, confidence_level=CONFIDENCE,
                        n_resamples=n_resamples, method="percentile", random_state=seed)
    low, high = np.asarray(res.confidence_interval.low), np.asarray(res.confidence_interval.high)
    # identical values can come back as NaN in some scipy versions: their interval is the value itself
    return np.where(np.isfinite(low), low, means), np.where(np.isfinite(high), high, means)


def stat_of(values: list[float]) -> Stat | None:
    """Mean and 95% bootstrap interval of the finite values, or None when there are none."""
    vals = _clean(values)
    if not vals:
        return None
    low, high = bootstrap_stats(np.array(vals)[:, None], n_resamples=10_000)
    return Stat(float(np.mean(vals)), float(low[0]), float(high[0]), len(vals), vals)


def curve(runs: list[Run], metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps, mean, CI low, CI high and seed count of one metric, aligned by step over the group's runs."""
    per_step: dict[int, list[float]] = {}
    for run in runs:
        for row in run.rows:
            if metric in row:
                per_step.setdefault(int(row["step"]), []).extend(_clean([row[metric]]))
    steps = np.array(sorted(s for s, v in per_step.items() if v), dtype=int)
    mean, low, high = (np.zeros(len(steps)) for _ in range(3))
    count = np.array([len(per_step[s]) for s in steps], dtype=int)
    # one vectorised bootstrap per seed count (runs of unequal length leave fewer seeds at late steps)
    for n in sorted(set(count.tolist())):
        idx = np.nonzero(count == n)[0]
        block = np.array([per_step[int(steps[i])] for i in idx]).T  # [n, len(idx)]
        mean[idx] = block.mean(axis=0)
        low[idx], high[idx] = bootstrap_stats(block, n_resamples=1000)
    return steps, mean, low, high, count


def final_value(run: Run, metric: str) -> float | None:
    """The end-of-run value: summary.json's eval_end for eval/* metrics when present, else the last step's."""
    end = run.summary.get("eval_end") or {}
    if metric.startswith("eval/") and metric[5:] in end:
        return end[metric[5:]]
    for row in reversed(run.rows):
        if metric in row and row[metric] is not None:
            return row[metric]
    return None


def logged_metrics(runs: list[Run]) -> set[str]:
    """Every metric key some run logged."""
    return {k for run in runs for row in run.rows for k in row if k != "step"}


def check_metrics(metrics: list[str], runs: list[Run], drop: bool = False) -> list[str]:
    """The asked-for metrics that some run logged. One that none logged is an OutriderError naming the closest
    logged keys, or, with `drop` (compare, whose runs are already done), left out with a warning on stderr."""
    present = logged_metrics(runs)
    unknown = [m for m in metrics if m not in present]
    if not unknown:
        return metrics
    close = difflib.get_close_matches(unknown[0], sorted(present), n=3, cutoff=0.4)
    message = (f"--metrics: no run logged {', '.join(repr(m) for m in unknown)}"
               + (f"; did you mean {', '.join(close)}?" if close else f"; logged: {', '.join(sorted(present)[:12])}"))
    if not drop:
        raise OutriderError(message)
    print(f"warning: {message} (left out)", file=sys.stderr)
    return [m for m in metrics if m in present]


def default_metrics(runs: list[Run]) -> list[str]:
    """pass@1, the largest pass@k (pass@16 in the shipped recipes), policy entropy, total reward, then every
    other eval/* diagnostic present (entropy, diversity...), keeping only what some run logged."""
    present = logged_metrics(runs)
    pass_ks = sorted((int(k.split("@")[1]) for k in present if re.fullmatch(r"eval/pass@\d+", k)))
    wanted = ["eval/pass@1", "eval/pass@16" if 16 in pass_ks else f"eval/pass@{pass_ks[-1]}" if pass_ks else "",
              "policy/entropy", "reward/total"]
    extra = sorted(k for k in present if k.startswith("eval/") and not k.startswith("eval/pass@")
                   and k not in _BASIC_EVAL)
    return [m for m in dict.fromkeys(wanted + extra) if m in present]


def recipe_diff(groups: dict[str, list[Run]]) -> dict[str, dict[str, Any]]:
    """Dot key -> {group: value} for the resolved-recipe keys whose values differ between groups (train.seed and
    train.threads ignored). A key that differs within a group shows as ``varies: a, b``; one absent as None."""
    per_group: dict[str, dict[str, Any]] = {}
    for name, runs in groups.items():
        keys = {k for r in runs for k in r.recipe}
        merged: dict[str, Any] = {}
        for k in keys:
            vals = list(dict.fromkeys(json.dumps(r.recipe.get(k), default=str) for r in runs))
            merged[k] = runs[0].recipe.get(k) if len(vals) == 1 else "varies: " + ", ".join(vals)
        per_group[name] = merged
    all_keys = sorted({k for g in per_group.values() for k in g} - set(IGNORED_KEYS))
    diff = {}
    for k in all_keys:
        values = {g: per_group[g].get(k) for g in per_group}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            diff[k] = values
    return diff


def build_report(run_dirs: list[Path], out_dir: Path, metrics: list[str] | None = None, *,
                 title: str = "outrider report", failed: list[str] | None = None,
                 drop_unknown: bool = False) -> dict[str, Any]:
    """Write report.html, one PNG per metric and summary.json into ``out_dir``; returns the summary.

    ``run_dirs`` may be run directories or directories holding them (see `find_runs`); ``metrics`` defaults to
    `default_metrics` (asked-for ones that no run logged: `check_metrics`); ``failed`` lists runs left out (one
    line each), shown in the report and the summary."""
    runs = [load_run(p) for p in find_runs([Path(p) for p in run_dirs])]
    groups = assign_groups(runs)
    metrics = check_metrics(list(metrics), runs, drop_unknown) if metrics else default_metrics(runs)
    if not metrics:
        raise OutriderError("report: the runs logged no metrics to report (metrics.jsonl has only steps)")
    out_dir.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict[str, Any]] = {}
    for name, members in groups.items():
        table[name] = {}
        for m in metrics:
            s = stat_of([v for r in members if (v := final_value(r, m)) is not None])
            table[name][m] = None if s is None else asdict(s)
    images: dict[str, str] = {}
    plots: dict[str, str] = {}
    for m in metrics:
        png = out_dir / png_name(m)
        if plot_metric(groups, m, png):
            images[m] = base64.b64encode(png.read_bytes()).decode("ascii")
            plots[m] = png.name
    diff = recipe_diff(groups)
    (out_dir / "report.html").write_text(render_html(title, groups, metrics, table, diff, images, failed or []))
    summary = {
        "confidence": CONFIDENCE, "interval": "percentile bootstrap of the mean over seeds (scipy.stats.bootstrap)",
        "metrics": metrics,
        "groups": {g: {"n": len(rs), "runs": [str(r.path) for r in rs]} for g, rs in groups.items()},
        "table": table, "recipe_diff": diff, "plots": plots, "failed": failed or [],
    }
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(out_dir / "summary.json")
    return summary
