"""The report's output: one PNG per metric (mean over seeds and its 95% bootstrap band) and the self-contained HTML
page (inline CSS, plots embedded as base64 PNG, so it opens offline)."""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from outrider.observe.report import Run

def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def png_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric.replace("@", "_at_")) + ".png"


def plot_metric(groups: dict[str, list[Run]], metric: str, path: Path) -> bool:
    """One PNG: per group the mean over seeds and, with two or more seeds, its 95% bootstrap band."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; also safe inside worker processes and CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from outrider.observe.report import curve  # the statistics side (it imports this module)

    fig, ax = plt.subplots(figsize=(7.5, 4.0), dpi=110)
    drawn = False
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, runs) in enumerate(groups.items()):
        steps, mean, low, high, count = curve(runs, metric)
        if len(steps) == 0:
            continue
        color = colors[i % len(colors)]
        n = int(count.max())
        band = "" if n < 2 else ", 95% CI" + ("; 2 seeds: coarse" if n == 2 else "")
        ax.plot(steps, mean, color=color, marker="o" if len(steps) <= 30 else None, markersize=3,
                label=f"{name} (n={n}{band})")
        if n >= 2:
            ax.fill_between(steps, low, high, where=count >= 2, color=color, alpha=0.2, linewidth=0)
        drawn = True
    if drawn:
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    plt.close(fig)
    return drawn


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:
1100px;color:#222;line-height:1.4;padding:0 1em}h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:
1px solid #ddd}table{border-collapse:collapse;margin:.5em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:
.3em .6em;text-align:left;vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:
tabular-nums;white-space:nowrap}.ci{color:#666}.note{color:#555;font-size:.9em}.fail{color:#a00}figure{margin:
1em 0}img{max-width:100%}code{background:#f4f4f4;padding:0 .2em}"""


def render_html(title: str, groups: dict[str, list[Run]], metrics: list[str], table: dict[str, dict[str, Any]],
          diff: dict[str, dict[str, Any]], images: dict[str, str], failed: list[str]) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>", "<h2>Runs</h2><table><tr><th>group</th>"
             "<th>seeds</th><th>run directories</th></tr>"]
    for name, runs in groups.items():
        dirs = "<br>".join(f"<code>{e(str(r.path))}</code>" for r in runs)
        parts.append(f"<tr><td>{e(name)}</td><td class='num'>{len(runs)}</td><td>{dirs}</td></tr>")
    parts.append("</table>")
    if failed:
        parts.append("<h2 class='fail'>Failed runs (left out)</h2><ul>")
        parts += [f"<li class='fail'><code>{e(f)}</code></li>" for f in failed]
        parts.append("</ul>")
    parts.append("<h2>Final values</h2><p class='note'>Mean over seeds [95% percentile-bootstrap interval of the "
                 "mean] (n seeds). Eval metrics come from summary.json's <code>eval_end</code> where present, "
                 "others from the last step that logged them. One seed: no interval; two seeds: the interval "
                 "spans at most the two values.</p><table><tr><th>group</th>")
    parts += [f"<th>{e(m)}</th>" for m in metrics] + ["</tr>"]
    for name in groups:
        parts.append(f"<tr><td>{e(name)}</td>")
        for m in metrics:
            s = table[name].get(m)
            cell = "–" if s is None else (f"{_fmt(s['mean'])} <span class='ci'>[{_fmt(s['ci_low'])}, "
                                          f"{_fmt(s['ci_high'])}] ({s['n']})</span>")
            parts.append(f"<td class='num'>{cell}</td>")
        parts.append("</tr>")
    parts.append("</table><h2>Curves</h2><p class='note'>Runs aligned by step; line: mean over the seeds that "
                 "logged the step; band: its 95% percentile-bootstrap interval (shown with two or more seeds).</p>")
    for m in metrics:
        if m in images:
            parts.append(f"<figure><img alt='{e(m)}' src='data:image/png;base64,{images[m]}'></figure>")
        else:
            parts.append(f"<p class='note'>{e(m)}: no run logged it.</p>")
    parts.append("<h2>Recipe differences</h2>")
    if len(groups) < 2:
        parts.append("<p class='note'>One group: nothing to compare.</p>")
    elif not diff:
        parts.append("<p class='note'>The resolved recipes are identical (train.seed and train.threads "
                     "ignored).</p>")
    else:
        parts.append("<p class='note'>Keys of the resolved recipe.yaml whose values differ between groups "
                     "(train.seed and train.threads ignored).</p><table><tr><th>key</th>")
        parts += [f"<th>{e(g)}</th>" for g in groups] + ["</tr>"]
        for key, values in diff.items():
            cells = "".join(f"<td><code>{e(json.dumps(values[g], default=str))}</code></td>" for g in groups)
            parts.append(f"<tr><td><code>{e(key)}</code></td>{cells}</tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
