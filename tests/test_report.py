"""`outrider report` and `outrider compare`: statistics, recipe diff and HTML of hand-made runs, the CLI's
errors, a compare whose runs fail, and one real compare end to end (two ~15 s train processes in parallel)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import call_main, cli_env, tiny_recipe
from outrider import compare as compare_mod
from outrider.cli import RECIPES_DIR
from outrider.errors import OutriderError
from outrider.observe.report import assign_groups, build_report, curve, flatten, load_run, stat_of

# eval/pass@1 at the end (summary.json eval_end) and reward/total at the last step, per group and seed
PASS1 = {"alpha": [0.25, 0.5, 0.75], "beta": [0.125, 0.25, 0.625]}
REWARD = {"alpha": [0.1, 0.3, 0.2], "beta": [0.6, 0.4, 0.5]}
RECIPES = {"alpha": tiny_recipe(update={"lr": 1.0e-3}),
           "beta": tiny_recipe(update={"lr": 3.0e-4}, credit={"name": "rloo"})}


def make_run(run_dir: Path, recipe: dict, seed: int, pass1_end: float, reward_end: float, steps: int = 4) -> Path:
    """A run directory as `outrider train` writes it, with known numbers."""
    run_dir.mkdir(parents=True)
    rec = {**recipe, "train": {**recipe["train"], "seed": seed, "threads": 1 + seed}}  # ignored by the diff
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(rec, sort_keys=False))
    rows = [{"step": 0, "eval/pass@1": 0.0, "eval/pass@4": 0.0, "eval/accuracy": 0.0, "eval/entropy_mean": 1.0}]
    for s in range(1, steps + 1):
        rows.append({"step": s, "reward/total": reward_end * s / steps, "policy/entropy": 2.0 - 0.1 * s})
    # the last row's eval differs from eval_end on purpose: the table must take summary.json's
    rows[-1].update({"eval/pass@1": pass1_end - 0.01, "eval/pass@4": 0.9, "eval/entropy_mean": 0.5})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"eval_start": {"pass@1": 0.0}, "eval_end": {"pass@1": pass1_end, "pass@4": 0.9}, "steps": steps}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    return [make_run(tmp_path / "runs" / g / f"seed{k}", RECIPES[g], k, PASS1[g][k], REWARD[g][k])
            for g in ("alpha", "beta") for k in range(3)]


def check_interval(stat: dict, values: list[float]) -> None:
    assert stat["mean"] == pytest.approx(float(np.mean(values)), abs=1e-12)
    assert stat["n"] == len(values) and sorted(stat["values"]) == pytest.approx(sorted(values))
    assert min(values) - 1e-12 <= stat["ci_low"] <= stat["mean"] <= stat["ci_high"] <= max(values) + 1e-12


def test_summary_table_diff_and_html(runs, tmp_path):
    out = tmp_path / "report"
    summary = build_report([tmp_path / "runs"], out)  # a directory holding runs two levels down
    assert set(summary["groups"]) == {"alpha", "beta"} and all(g["n"] == 3 for g in summary["groups"].values())
    # defaults: pass@1, the largest pass@k, entropy, reward, other eval/* diagnostics; not eval/accuracy
    assert summary["metrics"] == ["eval/pass@1", "eval/pass@4", "policy/entropy", "reward/total",
                                  "eval/entropy_mean"]
    on_disk = json.loads((out / "summary.json").read_text())
    for g in ("alpha", "beta"):
        check_interval(on_disk["table"][g]["eval/pass@1"], PASS1[g])  # eval_end, not the last row
        check_interval(on_disk["table"][g]["reward/total"], REWARD[g])
        assert on_disk["table"][g]["policy/entropy"]["mean"] == pytest.approx(1.6)
        assert on_disk["table"][g]["policy/entropy"]["ci_low"] == pytest.approx(1.6)  # identical seeds
    assert set(on_disk["recipe_diff"]) == {"update.lr", "credit.name"}
    assert on_disk["recipe_diff"]["update.lr"] == {"alpha": 1.0e-3, "beta": 3.0e-4}
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(summary["metrics"])
    assert all((out / name).is_file() for name in summary["plots"].values())
    assert not re.search(r"https?://|<script|<link", page, re.IGNORECASE)
    assert "update.lr" in page and "credit.name" in page


def test_curve_aligns_unequal_runs_and_single_seed(tmp_path):
    a = load_run(make_run(tmp_path / "g" / "seed0", RECIPES["alpha"], 0, 0.5, 0.4, steps=4))
    b = load_run(make_run(tmp_path / "g" / "seed1", RECIPES["alpha"], 1, 0.5, 0.8, steps=2))
    steps, mean, low, high, count = curve([a, b], "reward/total")
    assert steps.tolist() == [1, 2, 3, 4] and count.tolist() == [2, 2, 1, 1]
    assert mean.tolist() == pytest.approx([0.25, 0.5, 0.3, 0.4])
    assert low[2] == high[2] == mean[2]  # one seed left: no band
    assert low[1] <= mean[1] <= high[1] and 0.2 - 1e-12 <= low[1] and high[1] <= 0.8 + 1e-12
    assert stat_of([0.7]).ci_low == stat_of([0.7]).ci_high == 0.7


def test_arbitrary_run_dirs_group_by_recipe(tmp_path):
    dirs = [make_run(tmp_path / name, RECIPES[g], k, 0.5, 0.5) for name, g, k in
            [("lr1e-3_a", "alpha", 0), ("lr1e-3_b", "alpha", 1), ("rloo", "beta", 0)]]
    groups = assign_groups([load_run(d) for d in dirs])
    assert {name: len(rs) for name, rs in groups.items()} == {"lr1e-3": 2, "rloo": 1}
    assert flatten({"score": [{"name": "v", "weight": 1}], "o": {"pass_at": [1, 4]}}) == {
        "score.0.name": "v", "score.0.weight": 1, "o.pass_at": [1, 4]}


def test_report_cli(runs, tmp_path, monkeypatch, capsys):
    code, out, err = call_main(monkeypatch, capsys, "report", *map(str, runs[:3]), "--out", str(tmp_path / "r"),
                               "--metrics", "reward/total,eval/pass@1")
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["metrics"] == ["reward/total", "eval/pass@1"]
    (tmp_path / "empty").mkdir()
    code, out, err = call_main(monkeypatch, capsys, "report", str(tmp_path / "empty"), "--out", str(tmp_path / "x"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no metrics.jsonl" in err, err
    assert "Traceback" not in err


def test_compare_rejects_a_bad_recipe_before_running(tmp_path, monkeypatch, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(tiny_recipe()))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(tiny_recipe(credit={"name": "nope"})))
    code, out, err = call_main(monkeypatch, capsys, "compare", str(good), str(bad), "--out", str(tmp_path / "c"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "credit" in err, err
    assert not (tmp_path / "c").exists()


FAKE_TRAIN = """
import json, pathlib, sys
run, seed = pathlib.Path(sys.argv[1]), int(sys.argv[2])
if seed == 1:
    sys.stderr.write("loading...\\nRuntimeError: boom\\n"); sys.exit(3)
run.mkdir(parents=True)
(run / "recipe.yaml").write_text("train: {seed: %d}\\n" % seed)
(run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/total": 0.5}) + "\\n")
(run / "summary.json").write_text("{}")
"""


def test_compare_reports_failed_runs_and_builds_from_the_rest(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe()))
    seen: list[list[str]] = []

    def fake_command(job, sets, threads):  # a stand-in for `outrider train`: seed 1 crashes
        seen.append(compare_mod_command(job, sets, threads))
        return [sys.executable, "-c", FAKE_TRAIN, str(job.run_dir), str(job.seed)]

    compare_mod_command = compare_mod._command
    monkeypatch.setattr(compare_mod, "_command", fake_command)
    out = tmp_path / "c"
    code, stdout, err = call_main(monkeypatch, capsys, "compare", str(recipe), "--seeds", "2", "--out", str(out),
                                  "--set", "train.steps=7", "--jobs", "2", "--threads", "3")
    assert code == 1, err
    assert "tiny/seed1 failed (exit 3): RuntimeError: boom" in err
    assert "boom" in (out / "tiny" / "seed1" / "stderr.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["groups"]["tiny"]["n"] == 1 and len(summary["failed"]) == 1
    assert (out / "report.html").is_file()
    cmd = " ".join(seen[0])
    assert "-m outrider.cli train" in cmd and "--set train.steps=7 --set train.seed=0 --set train.threads=3" in cmd
    # --resume keeps the finished run and retries only the failed one
    seen.clear()
    code, stdout, err = call_main(monkeypatch, capsys, "compare", str(recipe), "--seeds", "2", "--out", str(out),
                                  "--resume")
    assert code == 1 and len(seen) == 1 and "train.seed=1" in " ".join(seen[0])
    with pytest.raises(OutriderError, match="already holds a run"):
        compare_mod.plan([recipe], 2, out, [], resume=False)


def test_compare_end_to_end(tmp_path):
    import subprocess

    recipe = tmp_path / "grpo.yaml"
    recipe.write_text((RECIPES_DIR / "grpo.yaml").read_text())
    sets = ["train.steps=2", "policy.warm_start.steps=2", "explore.prompts_per_step=2", "explore.group_size=2",
            "observe.eval_prompts=4", "observe.eval_samples=4", "observe.pass_at=[1,4]", "task.eval_size=8",
            "observe.eval_every=1", "observe.tensorboard=false"]
    cmd = [sys.executable, "-m", "outrider", "compare", str(recipe), "--seeds", "2", "--out", str(tmp_path / "c")]
    for s in sets:
        cmd += ["--set", s]
    result = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["groups"]["grpo"]["n"] == 2 and summary["failed"] == []
    assert summary["metrics"][:2] == ["eval/pass@1", "eval/pass@4"]
    stat = summary["table"]["grpo"]["eval/pass@1"]
    assert stat["n"] == 2 and stat["ci_low"] <= stat["mean"] <= stat["ci_high"]
    assert "data:image/png;base64," in (tmp_path / "c" / "report.html").read_text()
    for k in (0, 1):
        assert yaml.safe_load((tmp_path / "c" / "grpo" / f"seed{k}" / "recipe.yaml").read_text())["train"]["seed"] == k
