"""The `outrider` command line: train, eval, sft, merge, recipes, compare, report, offline, rm."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from outrider import RECIPES_DIR, __version__  # RECIPES_DIR: the shipped recipes (package data)
from outrider.errors import OutriderError
from outrider.cli_compare import compare, report
from outrider.offline.cli import app as offline_app
from outrider.cli_rm import app as rm_app

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="RL post-training of language-model reasoners and agents.")
app.add_typer(offline_app, name="offline")
app.add_typer(rm_app, name="rm")
out = Console()


def _version(value: bool) -> None:
    if value:
        print(f"outrider {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                   help="Print the version and exit.")] = False) -> None:
    """RL post-training of language-model reasoners and agents."""


def _eval_table(title: str, rows: dict[str, dict[str, float]]) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    for name in rows:
        table.add_column(name, justify="right")
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))  # e.g. an event seen only at the end
    for key in keys:
        table.add_row(key, *[f"{r[key]:.3f}" if key in r else "-" for r in rows.values()])
    return table


def _first_difference(saved: dict, given: dict) -> str:
    """``key (saved X, given Y)`` for the first dotted key whose value differs, and how many others do."""
    from outrider.observe.report import flatten

    a, b = flatten(saved), flatten(given)
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
    more = f" and {len(keys) - 1} more key(s)" if len(keys) > 1 else ""
    return f"{keys[0]} (saved {a.get(keys[0])!r}, given {b.get(keys[0])!r}){more}"


def _looks_like_run(path: Path) -> bool:
    return (path / "recipe.yaml").is_file() or (path / "checkpoints").is_dir()


@app.command()
def train(
    recipe: Annotated[Optional[Path], typer.Argument(help="Recipe YAML (optional with --resume).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory to write.")] = Path("runs/run"),
    set_: Annotated[list[str], typer.Option("--set", help="Override, e.g. update.lr=1e-4 (repeatable).")] = [],
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its newest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Delete an existing run directory first.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Warm-start (if the recipe asks), then run RL; writes recipe.yaml, metrics.jsonl, summary.json, tb/,
    checkpoints/ into the run directory."""
    from outrider.recipe import load_recipe, resolve
    from outrider.rundir import ReplacedRun, check_writable, report_interrupt
    from outrider.trainer import Trainer

    saved = out_dir / "recipe.yaml"
    if resume:
        if not saved.exists():
            raise OutriderError(f"--resume: '{out_dir}' has no recipe.yaml; start the run without --resume")
        base = load_recipe(saved)
        # without a RECIPE, --set applies to the saved one (e.g. --set train.steps=N to train further)
        rec = load_recipe(recipe if recipe else saved, set_)
        ours, theirs = resolve(rec), resolve(base)
        ours["train"]["steps"] = theirs["train"]["steps"] = 0
        if ours != theirs:
            raise OutriderError(f"--resume: the recipe differs from {saved} at {_first_difference(theirs, ours)}; "
                                "only train.steps may change")
    else:
        if recipe is None:
            raise OutriderError("train: a RECIPE is needed (or --resume with an existing --out)")
        rec = load_recipe(recipe, set_)
        if out_dir.exists() and not out_dir.is_dir():
            raise OutriderError(f"--out: '{out_dir}' is a file, not a run directory")
        if out_dir.exists() and any(out_dir.iterdir()):
            if not overwrite:
                raise OutriderError(f"--out: '{out_dir}' already holds a run; use --resume to continue it or "
                                    "--overwrite to replace it")
            if not _looks_like_run(out_dir):
                raise OutriderError(f"--overwrite: '{out_dir}' is not an outrider run directory (no recipe.yaml "
                                    "or checkpoints/); refusing to delete it, choose another --out")
    check_writable(out_dir)
    trainer = Trainer(rec, out_dir, resume=resume, quiet=quiet)  # builds the task: bad options fail here
    # the run being replaced is moved aside, and deleted only once the new one has done its first step
    replaced = ReplacedRun(out_dir) if not resume and overwrite and out_dir.is_dir() and any(out_dir.iterdir()) \
        else None
    try:
        summary = trainer.run(on_started=replaced.drop if replaced else None)
    except KeyboardInterrupt:
        raise SystemExit(report_interrupt(out_dir, trainer.completed, rec.train.steps, replaced)) from None
    except BaseException as e:
        if replaced is not None:
            replaced.restore()
        if isinstance(e, OSError):  # a full disk, a file removed under the run: one line and how to go on
            raise OutriderError(f"train: {e.strerror or e}: '{e.filename or out_dir}'; fix it and resume with: "
                                f"outrider train --resume --out {out_dir}") from None
        raise
    start, end = summary["eval_start"], summary["eval_end"]
    out.print(_eval_table(f"held-out evaluation ({out_dir})", {"start": start, "end": end}))
    out.print(f"pass@1 {start['pass@1']:.3f} -> {end['pass@1']:.3f}   "
              f"({summary['steps']} steps, {summary['wall_time_s']:.0f} s)")


@app.command("eval")
def eval_(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    samples: Annotated[int, typer.Option(help="Samples per held-out prompt.")] = 16,
    prompts: Annotated[Optional[int], typer.Option(help="Held-out prompts (default: the recipe's).")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="e.g. step_100 (default: newest).")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Default: the recipe's eval temperature.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Unbiased pass@k on held-out prompts of the run's task, from a checkpoint of the run."""
    from outrider.checkpoint import list_checkpoints, newest_intact
    from outrider.observe.evaluate import eval_episodes, evaluate
    from outrider.observe.progress import RunProgress
    from outrider.policy.model import Policy
    from outrider.recipe import load_recipe
    from outrider.trainer import build_task, sampling_params

    if samples < 1:
        raise OutriderError(f"--samples: must be at least 1 (got {samples})")
    if prompts is not None and prompts < 1:
        raise OutriderError(f"--prompts: must be at least 1 (got {prompts})")
    if temperature is not None and not 0 <= temperature < float("inf"):
        raise OutriderError(f"--temperature: must be >= 0 (0: greedy; got {temperature})")
    if not (run / "recipe.yaml").exists():
        raise OutriderError(f"eval: '{run}' is not a run directory (no recipe.yaml)")
    rec = load_recipe(run / "recipe.yaml")
    found = list_checkpoints(run)
    if checkpoint:
        found = [p for p in found if p.name == checkpoint]
    if not found:
        raise OutriderError(f"eval: no checkpoint {checkpoint or ''} in '{run}/checkpoints'".replace("  ", " "))
    # the newest readable one (an asked-for checkpoint that is unreadable is an error, not replaced)
    chosen, policy = newest_intact(found, partial(Policy.load, chat_template=rec.policy.chat_template,
                                                  where="checkpoint"), "evaluating")
    policy = policy.to(rec.train.device)
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= samples]
    params = sampling_params(rec, rec.observe.eval_temperature if temperature is None else temperature)
    task, n = build_task(rec), prompts or rec.observe.eval_prompts
    with RunProgress(0, quiet=quiet).phase("eval", eval_episodes(task, n, samples)) as advance:  # on stderr
        result = evaluate(policy, task, n, samples, ks, params, seed=rec.train.seed, diagnostics=True,
                          on_episodes=advance)
    if as_json:
        print(json.dumps({"checkpoint": chosen.name, **result}))
    else:
        out.print(_eval_table(f"{run} {chosen.name}", {"value": result}))


def check_model_out(out_dir: Path, overwrite: bool) -> None:
    """A model's --out: writable, and empty unless --overwrite replaces a model (config.json) already there."""
    from outrider.rundir import check_writable

    check_writable(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise OutriderError(f"--out: '{out_dir}' is not empty; choose another directory or use --overwrite to "
                                "replace the model in it")
        if not (out_dir / "config.json").exists():
            raise OutriderError(f"--overwrite: '{out_dir}' holds no model (no config.json); refusing to replace it, "
                                "choose another --out")


@app.command()
def sft(
    recipe: Annotated[Path, typer.Argument(help="Recipe whose task and policy.warm_start to use.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for the fine-tuned model.")],
    steps: Annotated[Optional[int], typer.Option(help="Override policy.warm_start.steps.")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Recipe override (repeatable).")] = [],
    overwrite: Annotated[bool, typer.Option(help="Replace a model already in --out.")] = False,
) -> None:
    """Supervised warm start on the task's demonstrations; saves a from_pretrained-loadable model."""
    import torch

    from outrider.observe.progress import RunProgress
    from outrider.policy.sft import warm_start
    from outrider.recipe import load_recipe
    from outrider.rundir import save_model_dir
    from outrider.trainer import build_policy, build_task

    rec = load_recipe(recipe, set_ + ([f"policy.warm_start.steps={steps}"] if steps is not None else []))
    check_model_out(out_dir, overwrite)
    if rec.train.threads:  # as `train` does: the recipe's thread count holds for its warm start too
        torch.set_num_threads(rec.train.threads)
    policy, task = build_policy(rec, value_head=False), build_task(rec)
    losses: list[float] = []
    try:
        with RunProgress(0).phase("sft", rec.policy.warm_start.steps) as advance:
            warm_start(policy, task, rec.policy.warm_start,
                       on_step=lambda s, loss: (losses.append(loss), advance(loss=loss)))
    except KeyboardInterrupt:
        print(f"interrupted after SFT step {len(losses)} of {rec.policy.warm_start.steps}; nothing was saved "
              f"(sft saves once, at the end)", file=sys.stderr)
        raise SystemExit(130) from None
    save_model_dir(policy, out_dir)
    out.print(f"saved {out_dir} ({len(losses)} steps, final loss {losses[-1] if losses else float('nan'):.3f})")


@app.command()
def merge(
    a: Annotated[Path, typer.Argument(metavar="A", help="A model directory, or a run directory (its newest checkpoint).")],
    b: Annotated[Path, typer.Argument(metavar="B", help="The other model (same architecture and tokenizer).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for the merged model (from_pretrained-loadable).")],
    weight: Annotated[float, typer.Option(help="B's share w, between 0 and 1: (1 - w) A + w B.")] = 0.5,
    base: Annotated[Optional[Path], typer.Option(help="Task arithmetic: the model A and B were tuned from; "
                                                 "base + scale ((1 - w)(A - base) + w (B - base)).")] = None,
    scale: Annotated[float, typer.Option(help="λ of task arithmetic (needs --base; 1 equals interpolation, 2 with "
                                         "weight 0.5 adds both task vectors).")] = 1.0,
    method: Annotated[str, typer.Option(help="linear (interpolation / task arithmetic), ties (trim by magnitude, "
                                        "elect signs, disjoint mean) or dare_ties (random drop and rescale, then "
                                        "TIES' signs); the last two need --base.")] = "linear",
    density: Annotated[float, typer.Option(help="ties / dare_ties: the share of each task vector's entries kept, "
                                           "in (0, 1].")] = 1.0,
    seed: Annotated[int, typer.Option(help="dare_ties: seed of the random drops.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a model already in --out.")] = False,
) -> None:
    """Merge two fine-tunes of one model: linear interpolation, or with --base task arithmetic, TIES or
    DARE-TIES."""
    from outrider.merge import merge as merge_models

    check_model_out(out_dir, overwrite)
    done = merge_models(a, b, out_dir, weight, base, scale, method, density, seed)  # type: ignore[arg-type]
    how = (f"{1 - weight:g} A + {weight:g} B" if base is None else
           f"base + {scale:g} ({1 - weight:g} (A - base) + {weight:g} (B - base))" if method == "linear" else
           f"{method} (density {density:g}, weights {1 - weight:g} / {weight:g}, scale {scale:g}) on base")
    out.print(f"merged {done['A']} and {done['B']} as {how} into {out_dir}")


@app.command()
def recipes(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
            markdown: Annotated[bool, typer.Option("--markdown", help="Print the recipe field reference "
                                                   "(docs/recipe-reference.md).")] = False) -> None:
    """List shipped recipes and every registered piece (by family) with its options."""
    from outrider.credit import CREDIT
    from outrider.envs import ENVS
    from outrider.explore import EXPLORE
    from outrider.loops import LOOPS
    from outrider.score import SCORE
    from outrider.update import ENTROPY, LOSSES, TERMS

    families = {r.family: r for r in (ENVS, EXPLORE, SCORE, CREDIT, LOSSES, ENTROPY, TERMS, LOOPS)}
    pieces = {fam: {e.name: {"doc": e.doc, "options": {
        n: {"default": None if f.is_required() else f.get_default(call_default_factory=True),
            "description": f.description or ""} for n, f in e.config.model_fields.items()}}
        for e in reg.entries()} for fam, reg in families.items()}
    files = sorted(RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    if markdown:
        from outrider.observe.reference import recipe_reference

        print(recipe_reference(pieces))
        return
    if as_json:
        print(json.dumps({"recipes": [str(p) for p in files], "pieces": pieces}, default=str, indent=2))
        return
    out.print("[bold]recipes[/]: " + ", ".join(p.stem for p in files))
    for fam, entries in pieces.items():
        table = Table(title=fam, show_lines=False)
        for col in ("name", "options", "what"):
            table.add_column(col)
        for name, info in entries.items():
            opts = ", ".join(f"{k}={v['default']}" for k, v in info["options"].items())
            table.add_row(name, opts, info["doc"])
        out.print(table)


app.command()(compare)
app.command()(report)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:  # typer returns the exit code (130 on Ctrl-C) instead of raising
            sys.exit(code)
    except OutriderError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the disk or the file system (full, read-only, a path under a file): one line
        where = f": '{e.filename}'" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        usage_errors, aborts = _click_exception_types()
        if isinstance(e, usage_errors):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, aborts):
            sys.exit(130)
        raise


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Usage-error and abort classes of click and of the click copy that newer typer vendors (typer._click)."""
    import click

    usage_errors: list[type] = [click.exceptions.ClickException]
    aborts: list[type] = [click.exceptions.Abort, typer.Abort]
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        pass
    else:
        usage_errors.append(vendored.ClickException)
        aborts.extend(c for c in (getattr(vendored, "Abort", None),) if c is not None)
    return tuple(usage_errors), tuple(aborts)


if __name__ == "__main__":
    main()
