"""Ctrl-C and a run that fails to start: exit 130 with where the run stopped and how to resume; `--overwrite`
replaces a finished run only once the new one has started; seeds are checked when the recipe is loaded."""

from __future__ import annotations

import json
import signal
import time

import pytest

from conftest import call_main, read_jsonl, snapshot, start_cli, finish, write_recipe
from outrider.errors import OutriderError
from outrider.recipe import load_recipe
from test_recipe_cli import assert_main_error, make_existing_run


def test_a_ctrl_c_inside_interrupts_deferred_arrives_after_the_block():
    import os

    from outrider.rundir import interrupts_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # a signal not held would raise here
            done.append("block finished")
    assert done == ["block finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own handler is back


@pytest.mark.slow  # a real process: ~10 s of imports, then SIGINT mid-run
def test_sigint_stops_train_with_130_and_the_resume_command(tmp_path, monkeypatch, capsys):
    recipe = write_recipe(tmp_path, train={"steps": 100000}, observe={"checkpoint_every": 2})
    run = tmp_path / "run"
    proc = start_cli(["train", recipe, "--out", run, "--quiet"], tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        rows = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
        if rows and rows[-1]["step"] >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    result = finish(proc, timeout=60)
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("interrupted after step ") and " of 100000; newest checkpoint: " in lines[0]
    assert lines[1] == f"resume with: outrider train --resume --out {run}"
    assert not (run / "summary.json").exists()  # not finished: compare --resume must not take it as done
    done = int(lines[0].split()[3])
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl")]  # every line whole
    assert steps == list(range(done + 1))
    # the files left are intact: the printed command resumes and finishes the run
    code, _, err = call_main(monkeypatch, capsys, "train", "--resume", "--out", str(run), "--set",
                             f"train.steps={done + 2}", "--quiet")
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text())["steps"] == done + 2


def _interrupt_at(monkeypatch, target: str, after: int) -> None:
    """Make `target` (a module attribute path) raise KeyboardInterrupt on its call number `after`."""
    import importlib

    module_name, attr = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    original, calls = getattr(module, attr), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == after:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, attr, wrapped)


def test_ctrl_c_in_sft_exits_130_and_saves_nothing(tmp_path, monkeypatch, capsys):
    from outrider.policy import sft

    recipe = write_recipe(tmp_path)
    original = sft.pack
    calls = []

    def pack(*args, **kwargs):  # the third SFT step's batch
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(sft, "pack", pack)
    code, out, err = call_main(monkeypatch, capsys, "sft", str(recipe), "--out", str(tmp_path / "model"),
                               "--steps", "5")
    assert code == 130
    assert err.strip().splitlines()[-1] == ("interrupted after SFT step 2 of 5; nothing was saved (sft saves once, "
                                            "at the end)")
    assert not (tmp_path / "model").exists()


def test_overwrite_keeps_the_previous_run_until_the_new_one_has_started(tmp_path, monkeypatch, capsys):
    run = make_existing_run(tmp_path / "run")
    before = snapshot(run)
    recipe = write_recipe(tmp_path, "new.yaml", train={"steps": 2})
    # the new run fails in its first step, after warm start, evaluation and the step-0 checkpoint
    from outrider.trainer import Trainer

    def broken(self, step):
        raise OutriderError("explore: broken at step 1")

    monkeypatch.setattr(Trainer, "step", broken)
    code, out, err = call_main(monkeypatch, capsys, "train", str(recipe), "--out", str(run), "--overwrite",
                               "--quiet")
    assert_main_error(code, out, err, "explore: broken at step 1")
    assert snapshot(run) == before
    # interrupted before its first step is done: the previous run is back too
    monkeypatch.undo()
    _interrupt_at(monkeypatch, "outrider.trainer.warm_start", 1)
    code, out, err = call_main(monkeypatch, capsys, "train", str(recipe), "--out", str(run), "--overwrite",
                               "--quiet")
    assert code == 130 and "the previous run in" in err and "is restored" in err
    assert snapshot(run) == before
    monkeypatch.undo()
    code, out, err = call_main(monkeypatch, capsys, "train", str(recipe), "--out", str(run), "--overwrite",
                               "--quiet")
    assert code == 0, err
    assert (run / "checkpoints" / "step_2" / "trainer_state.pt").read_bytes() != bytes(range(256))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing left aside


@pytest.mark.parametrize("seed", ["-5", str(2**63), str(2**32)])
def test_seed_out_of_range_is_refused_at_load(tmp_path, seed):
    with pytest.raises(OutriderError) as e:
        load_recipe(write_recipe(tmp_path), [f"train.seed={seed}"])
    assert "recipe.yaml: train.seed: Input should be " in str(e.value)
    assert f"(got {seed})" in str(e.value)
    assert load_recipe(write_recipe(tmp_path), [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1
