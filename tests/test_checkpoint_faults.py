"""A corrupt newest checkpoint: `--resume` and `eval` fall back to the newest readable one and say so in one line;
with none readable, one line names each one's problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import call_main, read_jsonl, write_recipe
from test_recipe_cli import assert_main_error


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "truncated weights": lambda ck: _truncate(ck / "model.safetensors"),
    "truncated trainer state": lambda ck: _truncate(ck / "trainer_state.pt"),
    "broken config": lambda ck: (ck / "config.json").write_text("{broken"),
    "missing tokenizer": lambda ck: [p.unlink() for p in ck.glob("tokenizer*")],
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer

    root = tmp_path_factory.mktemp("ckpt")
    recipe = write_recipe(root, train={"steps": 4}, observe={"checkpoint_every": 2})
    Trainer(load_recipe(recipe), root / "run", quiet=True).run()
    return root / "run"


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_resume_and_eval_skip_a_corrupt_newest_checkpoint(finished_run, tmp_path, monkeypatch, capsys, corruption):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    CORRUPTIONS[corruption](run / "checkpoints" / "step_4")
    code, out, err = call_main(monkeypatch, capsys, "eval", str(run), "--samples", "2", "--prompts", "2", "--json")
    assert code == 0, err
    warnings = [ln for ln in err.strip().splitlines() if ln.startswith("warning:")]
    if corruption == "truncated trainer state":  # eval reads the model alone, which is whole
        assert json.loads(out)["checkpoint"] == "step_4" and not warnings
    else:
        assert json.loads(out)["checkpoint"] == "step_2"
        (line,) = warnings
        assert line.startswith(f"warning: skipped {run / 'checkpoints' / 'step_4'}, which is unreadable (")
        assert line.endswith("); evaluating step_2") and "Traceback" not in err
    code, out, err = call_main(monkeypatch, capsys, "train", "--resume", "--out", str(run), "--set", "train.steps=5",
                               "--quiet")
    assert code == 0, err
    (line,) = [ln for ln in err.strip().splitlines() if ln.startswith("warning:")]
    assert line.startswith(f"warning: skipped {run / 'checkpoints' / 'step_4'}, which is unreadable (")
    assert line.endswith("); resuming from step_2") and "Traceback" not in err
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2, 3, 4, 5]
    assert json.loads((run / "summary.json").read_text())["steps"] == 5


def test_no_readable_checkpoint_is_one_line(finished_run, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for step in (0, 2, 4):
        _truncate(run / "checkpoints" / f"step_{step}" / "model.safetensors")
    code, out, err = call_main(monkeypatch, capsys, "train", "--resume", "--out", str(run), "--quiet")
    assert_main_error(code, out, err, f"no readable checkpoint in {run / 'checkpoints'}: step_4: ", "; step_2: ",
                      "; step_0: ")
    code, out, err = call_main(monkeypatch, capsys, "eval", str(run), "--checkpoint", "step_2")
    assert_main_error(code, out, err, f"no readable checkpoint in {run / 'checkpoints'}: step_2: checkpoint: cannot "
                                      "load the model in", "(SafetensorError: Error while deserializing header")
