"""`outrider offline train|data`: the command line of outrider.offline (imports torch only when a command runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Offline preference-based policy learning (OPPO [38] and baselines) on trajectory datasets.",
                  no_args_is_help=True)


@app.command("train")
def train_cmd(config: Annotated[str | None, typer.Argument(help="YAML config (see outrider/recipes/offline/).")] = None,
              out: Annotated[Path, typer.Option("--out", help="Run directory.")] = Path("runs/offline"),
              sets: Annotated[list[str] | None, typer.Option("--set", help="KEY.PATH=VALUE override.")] = None,
              resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint.")] = False
              ) -> None:
    """Train OPPO or a baseline and evaluate it on held-out layouts; prints the summary as JSON."""
    from outrider.offline.run import load_config, run

    summary = run(load_config(config, sets or []), out, resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "data_meta"}))


@app.command("data")
def data_cmd(out: Annotated[Path, typer.Option("--out", help="Dataset directory to write.")],
             config: Annotated[str | None, typer.Argument(help="YAML config whose data section is used.")] = None,
             sets: Annotated[list[str] | None, typer.Option("--set", help="KEY.PATH=VALUE override.")] = None) -> None:
    """Generate a dataset (trajectories.jsonl, pairs.jsonl, meta.json) from the config's data section."""
    from outrider.offline.run import get_dataset, load_config
    from outrider.offline.trajectories import save_dataset

    ds = get_dataset(load_config(config, sets or []))
    save_dataset(ds, out)
    print(json.dumps(ds.meta))
