"""`outrider compare --backend ray`: the same runs and report as the local backend, a Ray worker killed mid-run is
retried and its run resumes from its checkpoint, and a missing extra is one line naming it."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from conftest import call_main, write_recipe
from outrider.compare import compare
from outrider.errors import OutriderError
from test_resume import RESUME_OVERRIDES, STEP_CKPT, assert_same_run


def test_missing_ray_extra_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    recipe = write_recipe(tmp_path)
    with pytest.raises(OutriderError, match=r"outrider\[ray\]") as err:
        compare([recipe], 1, tmp_path / "c", backend="ray", console=Console(file=io.StringIO()))
    assert "\n" not in str(err.value) and not (tmp_path / "c").exists()
    code, _, stderr = call_main(monkeypatch, capsys, "compare", str(recipe), "--backend", "ray", "--out",
                                str(tmp_path / "c"))
    assert code != 0 and "pip install 'outrider[ray]'" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("kwargs, field", [({"backend": "slurm"}, "--backend"), ({"gpus": 1.0}, "--gpus-per-run"),
                                           ({"backend": "ray", "gpus": -1.0}, "--gpus-per-run")])
def test_bad_backend_options_are_refused(tmp_path, kwargs, field):
    with pytest.raises(OutriderError, match=field):
        compare([write_recipe(tmp_path)], 1, tmp_path / "c", console=Console(file=io.StringIO()), **kwargs)


def test_a_run_larger_than_the_cluster_is_refused_not_left_pending():
    from types import SimpleNamespace

    from outrider.compare_ray import check_fits

    cluster = SimpleNamespace(cluster_resources=lambda: {"CPU": 4.0})
    check_fits(cluster, 4, 0.0)
    with pytest.raises(OutriderError, match="--threads: each run asks for 5 CPUs, the Ray cluster has 4"):
        check_fits(cluster, 5, 0.0)
    with pytest.raises(OutriderError, match="--gpus-per-run: each run asks for 1 GPUs, the Ray cluster has 0"):
        check_fits(cluster, 1, 1.0)


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def kill_worker_of(run_dir: Path, killed: dict, stop: threading.Event) -> None:
    """SIGKILL the Ray worker (not the `train` child) running RUN_DIR once checkpoint step_4 exists and step 5 is
    logged; the child dies with it (PR_SET_PDEATHSIG)."""
    needle = str(run_dir).encode()
    while not stop.is_set():
        try:
            ready = any(int(m.group(1)) >= 4 for n in os.listdir(run_dir / "checkpoints")
                        if (m := STEP_CKPT.match(n)))
            ready = ready and (run_dir / "metrics.jsonl").read_bytes().count(b"\n") >= 6
        except FileNotFoundError:
            ready = False
        if ready:
            for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if needle in cmd and b"outrider.cli" in cmd and not killed:
                        worker = _ppid(pid)
                        killed.update(worker=worker, child=pid, step=(run_dir / "metrics.jsonl").read_bytes()
                                      .count(b"\n"), worker_cmd=Path(f"/proc/{worker}/cmdline").read_bytes())
                        os.kill(worker, signal.SIGKILL)
                        return
                except (FileNotFoundError, ProcessLookupError, PermissionError):
                    continue
        time.sleep(0.002)


@pytest.mark.slow  # 2 local runs, a local Ray instance, 2 Ray runs and one retried attempt: ~1 minute
def test_ray_backend_matches_local_and_survives_a_killed_worker(tmp_path):
    pytest.importorskip("ray", reason="the outrider[ray] extra (make test installs it)")
    recipe = write_recipe(tmp_path, "resumable.yaml", **RESUME_OVERRIDES)
    quiet = Console(file=io.StringIO())
    local, failed = compare([recipe], 2, tmp_path / "local", jobs=1, threads=1, console=quiet)
    assert failed == []
    killed: dict = {}
    stop = threading.Event()
    killer = threading.Thread(target=kill_worker_of, args=(tmp_path / "ray" / "resumable" / "seed0", killed, stop),
                              daemon=True)
    killer.start()
    try:
        remote, failed = compare([recipe], 2, tmp_path / "ray", jobs=1, threads=1, console=quiet, backend="ray")
    finally:
        stop.set()
        killer.join()
    assert killed, "the Ray worker was never killed (the run finished before step_4?)"
    assert b"ray" in killed["worker_cmd"].lower() and not Path(f"/proc/{killed['child']}").exists()
    assert failed == []
    for k in (0, 1):
        assert_same_run(tmp_path / "local" / "resumable" / f"seed{k}", tmp_path / "ray" / "resumable" / f"seed{k}")
    saved = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert saved["table"] == local["table"] == remote["table"] and saved["failed"] == []
    assert saved["groups"]["resumable"]["n"] == 2 and (tmp_path / "ray" / "report.html").is_file()
