"""Experiment trackers, as TRL's ``report_to``: ``observe.report_to: [tensorboard, wandb, mlflow, trackio]``, each
a name or ``{name: ..., options}``. Every metric row goes through `MetricsWriter` (``metrics.jsonl`` first, then
each tracker); the packages are optional extras (``pip install 'outrider[wandb]'``), imported only when a recipe
names them. Nothing is sent over the network unless asked for: W&B runs offline by default, MLflow writes a local
database inside the run directory, trackio its local database.

Resume (`outrider train --resume`): the resumed run logs again the steps after its checkpoint. TensorBoard purges
its events after that step and takes the new ones. W&B, MLflow and trackio cannot take a step back, so they
continue the same run (its id is kept in ``trackers.json`` in the run directory) and are sent only the steps after
the last one logged before the interruption; the ones in between are identical, since resume is exact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from outrider.errors import OutriderError

IDS_FILE = "trackers.json"


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorBoardOptions(_Options):
    name: Literal["tensorboard"] = "tensorboard"
    dir: str = Field("tb", description="Event directory, relative to the run directory.")


class WandbOptions(_Options):
    name: Literal["wandb"] = "wandb"
    project: str = Field("outrider", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user); default: yours.")
    run_name: str | None = Field(None, description="Display name; default: the run directory's name.")
    mode: Literal["offline", "online", "disabled"] = Field("offline", description="offline: files under "
                                                          "<run>/wandb/, upload later with `wandb sync`.")
    tags: list[str] = Field(default_factory=list, description="W&B tags.")
    group: str | None = Field(None, description="W&B group (e.g. the seeds of one recipe).")


class MLflowOptions(_Options):
    name: Literal["mlflow"] = "mlflow"
    tracking_uri: str | None = Field(None, description="Default: a local database in the run directory, "
                                                       "sqlite:///<run>/mlflow.db (mlflow ui --backend-store-uri "
                                                       "sqlite:///<run>/mlflow.db).")
    experiment: str = Field("outrider", description="MLflow experiment name.")
    run_name: str | None = Field(None, description="Default: the run directory's name.")


class TrackioOptions(_Options):
    name: Literal["trackio"] = "trackio"
    project: str = Field("outrider", description="trackio project (stored under $TRACKIO_DIR, default "
                                                 "~/.cache/huggingface/trackio; `trackio show` to view).")
    run_name: str | None = Field(None, description="Default: the run directory's name.")


TrackerOptions = Annotated[Union[TensorBoardOptions, WandbOptions, MLflowOptions, TrackioOptions],
                           Field(discriminator="name")]
OPTIONS: dict[str, type[_Options]] = {"tensorboard": TensorBoardOptions, "wandb": WandbOptions,
                                      "mlflow": MLflowOptions, "trackio": TrackioOptions}


def tracker_sections(value: Any) -> Any:
    """``observe.report_to`` entries as ``{name, ...options}`` (a bare name is the shorthand), checked for what a
    generic validation error would say less clearly: an unknown tracker, an unknown option, a tracker named twice."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return value
    out, seen = [], set()
    for i, entry in enumerate(value):
        entry = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or entry.get("name") not in OPTIONS:
            got = entry.get("name") if isinstance(entry, dict) else entry
            raise ValueError(f"[{i}]: unknown tracker {got!r}; valid: {', '.join(OPTIONS)}")
        unknown = sorted(set(entry) - set(OPTIONS[entry["name"]].model_fields))
        if unknown:
            valid = ", ".join(k for k in OPTIONS[entry["name"]].model_fields if k != "name")
            raise ValueError(f"[{i}] ({entry['name']}): unknown option {unknown[0]!r}; valid: {valid}")
        if entry["name"] in seen:
            raise ValueError(f"[{i}]: {entry['name']} is named twice")
        seen.add(entry["name"])
        out.append(entry)
    return out


EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


class Tracker:
    """One destination of the metric rows. ``rewrites``: it can drop what it holds after a step (TensorBoard), so
    a resumed run sends it every step again; the others get only steps they have not seen."""

    rewrites = False

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoard(Tracker):
    rewrites = True

    def __init__(self, o: TensorBoardOptions, run_dir: Path, ids: dict[str, Any], resume_step: int | None,
                 config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        # on resume, TensorBoard discards the events logged after the checkpoint (they are logged again)
        self.writer = SummaryWriter(str(run_dir / o.dir), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, float(v), step)

    def close(self) -> None:
        self.writer.close()


class Wandb(Tracker):
    def __init__(self, o: WandbOptions, run_dir: Path, ids: dict[str, Any], resume_step: int | None,
                 config: dict[str, Any]):
        import wandb

        ids.setdefault("id", uuid.uuid4().hex[:8])  # W&B run ids: lowercase letters and digits
        self.run = wandb.init(project=o.project, entity=o.entity, name=o.run_name or run_dir.resolve().name,
                              id=ids["id"], resume="allow", dir=str(run_dir), mode=o.mode, config=config,
                              tags=o.tags or None, group=o.group, reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def mlflow_key(key: str) -> str:
    """A metric name MLflow accepts (letters, digits, ``_ - . space : /``): ``eval/pass@1`` → ``eval/pass_at_1``."""
    return re.sub(r"[^\w\-. :/]", "_", key.replace("@", "_at_"))


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if not isinstance(v, str) else v
    return out


class MLflow(Tracker):
    def __init__(self, o: MLflowOptions, run_dir: Path, ids: dict[str, Any], resume_step: int | None,
                 config: dict[str, Any]):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        for noisy in ("mlflow", "alembic"):  # their INFO lines (creating tables, migrations) would cut the bars
            logging.getLogger(noisy).setLevel(logging.WARNING)
        uri = o.tracking_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        if "run_id" not in ids:
            experiment = self.client.get_experiment_by_name(o.experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                o.experiment, artifact_location=(run_dir / "mlartifacts").resolve().as_uri())
            ids["run_id"] = self.client.create_run(experiment_id, run_name=o.run_name or run_dir.resolve().name
                                                   ).info.run_id
            params = [Param(mlflow_key(k), v[:6000]) for k, v in _flat(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
                self.client.log_batch(ids["run_id"], params=params[i:i + 100])
        else:
            self.client.update_run(ids["run_id"], status="RUNNING")
        self.run_id = ids["run_id"]

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(mlflow_key(k), float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(rows), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=rows[i:i + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackio(Tracker):
    def __init__(self, o: TrackioOptions, run_dir: Path, ids: dict[str, Any], resume_step: int | None,
                 config: dict[str, Any]):
        import trackio

        ids.setdefault("run_name", o.run_name or run_dir.resolve().name)
        with contextlib.redirect_stdout(sys.stderr):  # its banner would mix into the command's own output
            self.run = trackio.init(project=o.project, name=ids["run_name"], config=config, resume="allow",
                                    embed=False)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        import trackio

        with contextlib.redirect_stdout(sys.stderr):
            if trackio.context_vars.current_run.get() is self.run:
                trackio.finish()  # also clears trackio's current run, which it would finish again at exit
            else:
                self.run.finish()


TRACKERS: dict[str, type[Tracker]] = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": MLflow,
                                      "trackio": Trackio}


def start_trackers(report_to: list[Any], run_dir: Path, config: dict[str, Any],
                   resume_step: int | None) -> list[Tracker]:
    """Start every tracker the recipe names (run ids kept in ``trackers.json`` for resume). A missing package or a
    tracker that fails to start is one line naming it; trackers already started are closed first."""
    ids_path = run_dir / IDS_FILE
    ids: dict[str, dict[str, Any]] = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
    started: list[Tracker] = []
    for options in report_to:
        name = options.name
        try:
            started.append(TRACKERS[name](options, run_dir, ids.setdefault(name, {}), resume_step, config))
        except ImportError as e:
            _close_all(started)
            raise OutriderError(f"observe.report_to: {name} needs the {EXTRAS[name]} package "
                                f"(pip install 'outrider[{name}]'): {e}") from None
        except Exception as e:  # noqa: BLE001  (a tracker's own failure: one line naming it)
            _close_all(started)
            raise OutriderError(f"observe.report_to: {name} failed to start: {type(e).__name__}: "
                                f"{' '.join(str(e).split())[:300]}") from None
    ids = {k: v for k, v in ids.items() if v}
    if ids:
        tmp = ids_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(ids, indent=2))
        os.replace(tmp, ids_path)
    return started


def _close_all(trackers: list[Tracker]) -> None:
    for tracker in trackers:
        try:
            tracker.close()
        except Exception:  # noqa: BLE001,S110  (closing on the way to reporting another error)
            pass
