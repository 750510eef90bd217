"""Experiment trackers (`observe.report_to`): W&B offline and a local MLflow store get every step once, also across
a resume; a missing package or a tracker that fails to start is one line before any work; older recipes'
`observe.tensorboard` keeps working."""

from __future__ import annotations

import glob
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import call_main, cli_env, read_jsonl, tiny_recipe, write_recipe
from outrider.errors import OutriderError
from outrider.observe.trackers import mlflow_key
from outrider.recipe import parse_recipe


def wandb_history(path: str) -> list[tuple[int, dict]]:
    """(step, row) of every history record of an offline W&B run file (``run-<id>.wandb``: W&B's leveldb-style
    log of protobuf records, 7-byte header, 32 KiB blocks, records split FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf, out = Path(path).read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            if record.WhichOneof("record_type") == "history":
                out.append((record.history.step.num, {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                                      for i in record.history.item}))
    return out


def _train(recipe: dict, run_dir: Path, resume: bool = False) -> None:
    from outrider.trainer import Trainer

    Trainer(parse_recipe(recipe), run_dir, resume=resume, quiet=True).run()


def test_wandb_offline_and_mlflow_get_every_step_once_across_a_resume(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    report_to = ["tensorboard", {"name": "wandb", "project": "outrider-test", "tags": ["ci"]},
                 {"name": "mlflow", "experiment": "outrider-test"}]
    recipe = tiny_recipe(observe={"report_to": report_to, "tensorboard": None, "checkpoint_every": 2})
    recipe["observe"].pop("tensorboard")
    _train(recipe, run)
    ids = json.loads((run / "trackers.json").read_text())
    assert set(ids) == {"wandb", "mlflow"}
    # killed after step 3 was logged, before its checkpoint: resume from step 2 and train on to step 4
    shutil.rmtree(run / "checkpoints" / "step_3")
    recipe["train"]["steps"] = 4
    _train(recipe, run, resume=True)
    assert json.loads((run / "trackers.json").read_text()) == ids  # the same tracker runs continue
    rows = {r["step"]: r for r in read_jsonl(run / "metrics.jsonl")}
    assert sorted(rows) == [0, 1, 2, 3, 4]

    files = sorted(glob.glob(str(run / "wandb" / f"offline-run-*-{ids['wandb']['id']}" / "*.wandb")))
    assert len(files) == 2  # one offline file per process; `wandb sync` uploads both into one run
    history = [item for f in files for item in wandb_history(f)]
    assert [step for step, _ in history] == [0, 1, 2, 3, 4]  # step 3 is not sent twice
    for step, row in history[1:]:
        assert row["reward/total"] == pytest.approx(rows[step]["reward/total"])
    assert history[0][1]["eval/pass@1"] == rows[0]["eval/pass@1"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(run / 'mlflow.db').resolve()}")
    run_id = ids["mlflow"]["run_id"]
    reward = client.get_metric_history(run_id, "reward/total")
    assert sorted(m.step for m in reward) == [1, 2, 3, 4]
    assert {m.step: m.value for m in reward} == pytest.approx({s: rows[s]["reward/total"] for s in (1, 2, 3, 4)})
    assert [m.step for m in client.get_metric_history(run_id, "eval/pass_at_1")] == [0, 3, 4]
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED" and finished.data.params["update.lr"] == "0.001"
    assert client.get_experiment(finished.info.experiment_id).name == "outrider-test"


def test_mlflow_metric_names():
    assert mlflow_key("eval/pass@16") == "eval/pass_at_16"
    assert mlflow_key("score/judge_2/errors") == "score/judge_2/errors"
    assert mlflow_key("time/score/rnd_s") == "time/score/rnd_s"


def test_a_missing_tracker_package_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    recipe = write_recipe(tmp_path, observe={"report_to": ["wandb"]})
    code, _, err = call_main(monkeypatch, capsys, "train", str(recipe), "--out", str(tmp_path / "run"))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: observe.report_to: wandb needs the wandb package (pip install 'outrider[wandb]')")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_tracker_that_fails_to_start_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    (tmp_path / "a_file").write_text("")
    uri = f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}"  # a database under a file cannot be created
    recipe = write_recipe(tmp_path, observe={"report_to": [{"name": "mlflow", "tracking_uri": uri}]})
    code, _, err = call_main(monkeypatch, capsys, "train", str(recipe), "--out", str(tmp_path / "run"))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: observe.report_to: mlflow failed to start: ")


@pytest.mark.parametrize("observe,names", [
    ({}, ["tensorboard"]),
    ({"tensorboard": False}, []),
    ({"tensorboard": True, "report_to": ["wandb"]}, ["tensorboard", "wandb"]),
    ({"tensorboard": False, "report_to": ["mlflow", "tensorboard"]}, ["mlflow"]),
    ({"report_to": "trackio"}, ["trackio"]),
    ({"report_to": []}, []),
])
def test_report_to_and_the_older_tensorboard_switch(observe, names):
    recipe = tiny_recipe()
    recipe["observe"] = {k: v for k, v in recipe["observe"].items() if k != "tensorboard"} | observe
    assert [t.name for t in parse_recipe(recipe).observe.report_to] == names


@pytest.mark.parametrize("report_to,fragment", [
    (["neptune"], "observe.report_to: [0]: unknown tracker 'neptune'; valid: tensorboard, wandb, mlflow, trackio"),
    ([{"name": "wandb", "projekt": "x"}], "observe.report_to: [0] (wandb): unknown option 'projekt'; valid: project"),
    (["mlflow", "mlflow"], "observe.report_to: [1]: mlflow is named twice"),
])
def test_report_to_mistakes_are_one_line(report_to, fragment):
    with pytest.raises(OutriderError) as e:
        parse_recipe(tiny_recipe(observe={"report_to": report_to}))
    assert fragment in str(e.value)


def test_trackio_logs_every_step(tmp_path):
    pytest.importorskip("trackio")
    script = ("import sys, outrider\n"
              "sys.path.insert(0, sys.argv[1])\n"
              "from conftest import tiny_recipe\n"
              "r = tiny_recipe(observe={'report_to': [{'name': 'trackio', 'project': 'tproj'}]})\n"
              "outrider.train(r, out='run', quiet=True)\n"
              "from trackio.sqlite_storage import SQLiteStorage\n"
              "print('steps', sorted({m['step'] for m in SQLiteStorage.get_logs('tproj', 'run')}))\n")
    env = cli_env() | {"TRACKIO_DIR": str(tmp_path / "trackio")}
    done = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines() == ["steps [0, 1, 2, 3]"]  # its banner goes to stderr
    assert os.listdir(tmp_path / "trackio")
