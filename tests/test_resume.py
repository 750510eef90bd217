"""Resuming: a run killed with SIGKILL and resumed gives exactly the metrics of an uninterrupted run.

The reference run A trains in-process; run B is a real `outrider train` process that is killed (kill -9) once
checkpoint step_4 exists and step 5 has been logged, then continued with `outrider train --resume --out B`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import finish, read_jsonl, run_cli, start_cli, tiny_recipe, write_recipe
from outrider.checkpoint import STATE_FILE, list_checkpoints, save_checkpoint
from outrider.policy.model import Policy
from outrider.recipe import load_recipe
from outrider.trainer import Trainer

STEPS = 40  # RL steps are ~25 ms each: enough of them that the kill lands mid-run
RESUME_OVERRIDES = dict(
    # a longer warm start so that held-out accuracy and response lengths are not all zero / all max
    policy={"warm_start": {"steps": 60, "batch_size": 16, "lr": 5.0e-3}},
    explore={"prompts_per_step": 4, "group_size": 2},
    # the format reward varies inside groups, so advantages are non-zero and every step moves the weights
    score=[{"name": "verifier", "weight": 1.0}, {"name": "format", "pattern": ".*[0-9].*", "weight": 0.5}],
    update={"lr": 3.0e-3},
    observe={"eval_every": 10, "eval_prompts": 8, "eval_samples": 4, "pass_at": [1, 2, 4], "checkpoint_every": 2,
             "keep_checkpoints": 3, "tensorboard": True},
    train={"steps": STEPS},
)
UNTIMED = re.compile(r"^(time|throughput)/|.*_time_s$")  # a piece's own wall time (credit/prm_time_s) too
STEP_CKPT = re.compile(r"^step_([1-9][0-9]*)$")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Run A, uninterrupted, in-process."""
    root = tmp_path_factory.mktemp("reference")
    recipe = write_recipe(root, **RESUME_OVERRIDES)
    run = root / "A"
    Trainer(load_recipe(recipe), run, quiet=True).run()
    return run


def assert_same_run(a: Path, b: Path) -> None:
    """Every non-time metric of every step is equal, each step is logged once, and so are the evaluations."""
    rows_a, rows_b = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    steps_b = [r["step"] for r in rows_b]
    assert steps_b == list(range(STEPS + 1)), steps_b  # every step exactly once, in order
    assert [r["step"] for r in rows_a] == steps_b
    for ra, rb in zip(rows_a, rows_b):
        ka = {k for k in ra if not UNTIMED.match(k)}
        kb = {k for k in rb if not UNTIMED.match(k)}
        assert ka == kb, (ra["step"], ka ^ kb)
        for k in ka:
            assert math.isclose(ra[k], rb[k], rel_tol=1e-6, abs_tol=1e-6), (ra["step"], k, ra[k], rb[k])
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in ("eval_start", "eval_end"):
        assert sa[key].keys() == sb[key].keys()
        for k in sa[key]:
            assert math.isclose(sa[key][k], sb[key][k], rel_tol=1e-6, abs_tol=1e-6), (key, k)
    assert sb["steps"] == STEPS
    # and the final weights are the same
    wa = load_file(a / "checkpoints" / f"step_{STEPS}" / "model.safetensors")
    wb = load_file(b / "checkpoints" / f"step_{STEPS}" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6)


def test_reference_run_learns_something(reference):
    """Guards the comparison below against being vacuous (all-zero advantages, untouched weights)."""
    rows = read_jsonl(reference / "metrics.jsonl")
    assert sum(r.get("optim/grad_norm", 0.0) > 0 for r in rows) >= 5
    assert len({round(r["reward/total"], 6) for r in rows if "reward/total" in r}) > 1
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["eval_end"]["response_length"] < tiny_recipe()["explore"]["max_new_tokens"]
    start = Policy.load(reference / "checkpoints" / f"step_{STEPS - 4}")
    end = Policy.load(reference / "checkpoints" / f"step_{STEPS}")
    assert any(not torch.equal(p, q) for p, q in zip(start.parameters(), end.parameters()))


def kill_mid_run(proc, run: Path, timeout: float = 240.0) -> bool:
    """SIGKILL `proc` once checkpoint step_4 exists and step 5 is logged (so the resumed run has a metrics row
    to drop and redo); True if it was still running then."""
    checkpoints, metrics = run / "checkpoints", run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            ready = any(int(m.group(1)) >= 4 for n in os.listdir(checkpoints) if (m := STEP_CKPT.match(n)))
            ready = ready and metrics.read_bytes().count(b"\n") >= 6
        except FileNotFoundError:
            ready = False
        if ready:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    return False


def kill_then_resume(recipe: Path, run: Path, cwd: Path, check_first=None):
    """`outrider train RECIPE --out RUN`, killed mid-run (see `kill_mid_run`), then `--resume`d to its end; returns
    whether the kill landed, the first process's result and the resumed one's. `check_first(caught, first)` runs
    between the two (the run directory as the kill left it)."""
    proc = start_cli(["train", recipe, "--out", run, "--quiet"], cwd)
    caught = kill_mid_run(proc, run)
    first = finish(proc)
    if check_first is not None:
        check_first(caught, first)
    # the recipe is read back from RUN/recipe.yaml
    return caught, first, run_cli(["train", "--resume", "--out", run, "--quiet"], cwd)


def killed_run_resumes_like(reference: Path, recipe: Path, tmp_path: Path) -> None:
    """RECIPE trained again in a process killed with SIGKILL mid-run (before it finished) and `--resume`d ends
    bit-identical to REFERENCE, the same recipe run without a kill."""
    run = tmp_path / "B"

    def check_first(caught, first):
        assert caught and first.returncode == -signal.SIGKILL, first.stderr
        assert not (run / "summary.json").exists()

    _, _, second = kill_then_resume(recipe, run, tmp_path, check_first)
    assert second.returncode == 0, second.stderr
    assert_same_run(reference, run)


@pytest.mark.slow  # two real processes, ~18 s
def test_killed_run_resumes_to_identical_metrics(reference, tmp_path):
    run = tmp_path / "B"
    state = {}

    def check_first(caught, first):
        state["logged"] = len(read_jsonl(run / "metrics.jsonl")) if caught else STEPS + 1
        state["resumed_from"] = list_checkpoints(run)[-1].name if list_checkpoints(run) else None
        if caught:
            assert first.returncode == -signal.SIGKILL
            assert not (run / "summary.json").exists(), "killed mid-run, but the run had finished"
        else:  # the whole run finished before a checkpoint was seen: still a valid (weaker) comparison
            assert first.returncode == 0, first.stderr
            warnings.warn("the child run finished before it could be killed; resume compared on a finished run")
        assert state["resumed_from"], "no complete checkpoint to resume from"

    caught, _, second = kill_then_resume(write_recipe(tmp_path, **RESUME_OVERRIDES), run, tmp_path, check_first)
    assert second.returncode == 0, second.stderr
    assert "Traceback" not in second.stderr
    assert_same_run(reference, run)
    # TensorBoard too has every step once (events after the resumed checkpoint are purged)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward/total")] == list(range(1, STEPS + 1))
    print(f"killed={caught} after {state['logged']} metric rows, resumed from {state['resumed_from']}")


def test_half_written_checkpoint_is_ignored_on_resume(reference, tmp_path, monkeypatch, capsys):
    """A kill during a save leaves `.tmp_step_K` (or a step dir without its state file): resume skips both."""
    from outrider.cli import main

    run = tmp_path / "C"
    shutil.copytree(reference, run)
    last = STEPS - 4
    for step in (STEPS - 2, STEPS):
        shutil.rmtree(run / "checkpoints" / f"step_{step}")
    (run / "summary.json").unlink()
    # a save of step 38 interrupted before its rename: garbage everywhere
    tmp = run / "checkpoints" / f".tmp_step_{STEPS - 2}"
    tmp.mkdir()
    (tmp / "config.json").write_text("{ half")
    (tmp / "model.safetensors").write_bytes(b"\x00" * 10)
    (tmp / STATE_FILE).write_bytes(b"not a torch file")
    # a step directory whose state file was never written
    partial = run / "checkpoints" / f"step_{STEPS - 1}"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    assert [p.name for p in list_checkpoints(run)] == [f"step_{last}"]  # keep_checkpoints=3: 36, 38, 40 were kept

    monkeypatch.setattr("sys.argv", ["outrider", "train", "--resume", "--out", str(run), "--quiet"])
    main()
    assert "Traceback" not in capsys.readouterr().err
    assert_same_run(reference, run)
    assert not tmp.exists()  # the next real save of that step replaced it
    assert [p.name for p in list_checkpoints(run)] == [f"step_{last}", f"step_{STEPS - 2}", f"step_{STEPS}"]


def test_list_checkpoints_orders_numerically_and_save_prunes(tmp_path):
    policy = Policy.tiny(hidden=16, layers=1, heads=2)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    for step in (2, 9, 10, 100):
        save_checkpoint(tmp_path, step, policy, optimizer, {"summary": {"step": step}}, keep=3)
    (tmp_path / "checkpoints" / "reference").mkdir()  # a KL reference model lives here: not a step checkpoint
    (tmp_path / "checkpoints" / ".tmp_step_200").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_9", "step_10", "step_100"]
    state = torch.load(tmp_path / "checkpoints" / "step_100" / STATE_FILE, weights_only=False)
    assert state["step"] == 100 and state["summary"] == {"step": 100}
    assert list_checkpoints(tmp_path / "nowhere") == []
