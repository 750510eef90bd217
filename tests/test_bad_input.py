"""One line instead of a traceback: binary recipes, piece names that are not strings, output directories that
cannot be written (under a file, read-only, a full disk), and a model directory without weights."""

from __future__ import annotations

import errno
import os

import pytest

from conftest import call_main, read_jsonl, snapshot, write_recipe
from test_recipe_cli import assert_main_error


def test_binary_recipe_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / "model.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xa5\x00binary")
    code, out, err = call_main(monkeypatch, capsys, "train", str(path), "--out", str(tmp_path / "run"))
    assert_main_error(code, out, err, f"{path}: not a YAML text file (not UTF-8 at byte 0)")


@pytest.mark.parametrize("override", ["credit.name=[grpo]", "explore.name={a: 1}", "score.0.name=[verifier]",
                                      "loop.name=[rl]", "task.name=[jsonl]", "update.loss.name=[ppo]"])
def test_piece_name_that_is_not_a_string(tmp_path, monkeypatch, capsys, override):
    # already one line before issue 33: Registry.get checks the name's type
    key, value = override.split("=")
    where = key.rsplit(".name", 1)[0].replace("score.0", "score[0]")
    code, out, err = call_main(monkeypatch, capsys, "train", str(write_recipe(tmp_path)), "--set", override)
    assert_main_error(code, out, err, f"{where}: unknown ", "; valid: ")


def _logged_run(tmp_path):
    """The least `report` reads: a directory with metrics.jsonl."""
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 0, "eval/pass@1": 0.5}\n{"step": 1, "eval/pass@1": 0.75}\n')
    return run


@pytest.mark.parametrize("command", ["train", "sft", "compare", "report"])
def test_out_under_a_file(tmp_path, monkeypatch, capsys, command):
    recipe = write_recipe(tmp_path)
    (tmp_path / "afile").write_text("keep")
    target = tmp_path / "afile" / "sub"
    args = {"train": ["train", recipe, "--out", target], "sft": ["sft", recipe, "--out", target],
            "compare": ["compare", recipe, "--out", target],
            "report": ["report", _logged_run(tmp_path), "--out", target]}[command]
    code, out, err = call_main(monkeypatch, capsys, *map(str, args))
    assert_main_error(code, out, err, f"--out: '{target}' is under '{tmp_path / 'afile'}', which is a file")
    assert (tmp_path / "afile").read_text() == "keep"


@pytest.mark.parametrize("command", ["sft", "compare", "report"])
def test_out_at_a_file(tmp_path, monkeypatch, capsys, command):
    recipe = write_recipe(tmp_path)
    target = tmp_path / "afile"
    target.write_text("keep")
    args = {"sft": ["sft", recipe], "compare": ["compare", recipe], "report": ["report", _logged_run(tmp_path)]}[command]
    code, out, err = call_main(monkeypatch, capsys, *map(str, args), "--out", str(target))
    assert_main_error(code, out, err, f"--out: '{target}' is a file, not a directory")
    assert target.read_text() == "keep"


def test_out_on_a_read_only_disk(tmp_path, monkeypatch, capsys):
    # os.access is what a read-only file system (or a directory without write permission) answers
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "ro") else real(p, mode))
    (tmp_path / "ro").mkdir()
    code, out, err = call_main(monkeypatch, capsys, "train", str(write_recipe(tmp_path)), "--out",
                               str(tmp_path / "ro" / "run"))
    assert_main_error(code, out, err, f"--out: cannot write in '{tmp_path / 'ro'}' (read-only or no permission)")
    assert not (tmp_path / "ro" / "run").exists()


def test_full_disk_while_checkpointing(tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    from outrider.policy.model import Policy

    recipe = write_recipe(tmp_path, train={"steps": 4}, observe={"checkpoint_every": 2})
    run = tmp_path / "run"
    real, calls = Policy.save, []

    def save(self, path):
        calls.append(path)
        if len(calls) == 2:  # step_2: the model half written, then the disk is full
            (path / "model.safetensors").parent.mkdir(parents=True, exist_ok=True)
            (path / "model.safetensors").write_bytes(b"\0" * 100)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(self, path)

    monkeypatch.setattr(Policy, "save", save)
    code, out, err = call_main(monkeypatch, capsys, "train", str(recipe), "--out", str(run), "--quiet")
    assert_main_error(code, out, err, f"checkpoint: writing {run / 'checkpoints' / 'step_2'} failed (SafetensorError: "
                                      "Error while serializing: I/O error: No space left on device (os error 28); ",
                      "newest complete checkpoint: step_0. Free space and resume with: outrider train --resume "
                      f"--out {run}")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0"]  # no half-written directory
    monkeypatch.undo()
    code, out, err = call_main(monkeypatch, capsys, "train", "--resume", "--out", str(run), "--quiet")
    assert code == 0, err
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2, 3, 4]


def test_full_disk_while_logging(tmp_path, monkeypatch, capsys):
    from outrider.observe.metrics import MetricsWriter

    recipe = write_recipe(tmp_path, train={"steps": 4}, observe={"checkpoint_every": 1})
    run = tmp_path / "run"
    real = MetricsWriter.write

    def write(self, step, metrics):
        if step == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real(self, step, metrics)

    monkeypatch.setattr(MetricsWriter, "write", write)
    code, out, err = call_main(monkeypatch, capsys, "train", str(recipe), "--out", str(run), "--quiet")
    assert_main_error(code, out, err, f"train: No space left on device: '{run / 'metrics.jsonl'}'; fix it and resume "
                                      f"with: outrider train --resume --out {run}")
    before = snapshot(run / "checkpoints" / "step_2")
    assert (run / "recipe.yaml").exists() and not list(run.glob("*.tmp"))
    monkeypatch.undo()
    code, out, err = call_main(monkeypatch, capsys, "train", "--resume", "--out", str(run), "--quiet")
    assert code == 0, err
    assert snapshot(run / "checkpoints" / "step_2") == before


def test_model_directory_without_weights(tmp_path, monkeypatch, capsys):
    from outrider.policy.model import Policy

    model = tmp_path / "model"
    Policy.tiny(hidden=32, layers=1, heads=2).save(model)
    (model / "model.safetensors").unlink()
    recipe = write_recipe(tmp_path, policy={"model": str(model)})
    code, out, err = call_main(monkeypatch, capsys, "train", str(recipe), "--out", str(tmp_path / "run"))
    assert_main_error(code, out, err, f"policy.model: cannot load the model in '{model}' (OSError: Error no file named "
                                      "model.safetensors")
    assert not (tmp_path / "run").exists()
