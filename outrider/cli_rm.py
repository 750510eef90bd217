"""`outrider rm`: train a reward model from a file of preference pairs, labelled responses or step labels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Reward models: train one from a file.")
out = Console()


@app.command("train")
def train_cmd(
    data: Annotated[Path, typer.Argument(help="JSONL: pairs {prompt, chosen, rejected} (Bradley–Terry), "
                                              "labelled responses {prompt, response, label} (cross-entropy) or "
                                              "step-labelled responses {prompt, response, step_labels} (a PRM: "
                                              "cross-entropy at each step's last token).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for the reward model (loads with "
                                                        "RewardModel.load, or score: reward_model, path).")],
    model: Annotated[str, typer.Option(help="'tiny' (built from --hidden/--layers/--heads) or a model directory "
                                            "to start from (a policy or warm start), a scalar head added.")] = "tiny",
    hidden: Annotated[int, typer.Option(help="tiny: hidden size.")] = 128,
    layers: Annotated[int, typer.Option(help="tiny: transformer layers.")] = 2,
    heads: Annotated[int, typer.Option(help="tiny: attention heads.")] = 4,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training examples.")] = 4,
    batch_size: Annotated[int, typer.Option(min=1, help="Pairs (or responses) per Adam step.")] = 32,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam learning rate.")] = 1e-3,
    heldout: Annotated[float, typer.Option(min=0.0, max=0.9, help="Share of the prompts held out (with all their "
                                                                  "examples) for the held-out accuracy.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the split, the order and a tiny model's initialisation.")] = 0,
    contrastive: Annotated[float, typer.Option(min=0.0, help="Pairs: weight λ of the goal-conditioned contrastive "
                                                             "term on the hidden states [87] (the paper: 0.5), "
                                                             "its goal state saved for Q(prefix); 0: plain "
                                                             "Bradley–Terry.")] = 0.0,
    contrastive_samples: Annotated[int, typer.Option(min=1, help="Pairs with --contrastive: positions drawn per "
                                                                 "response for the contrastive term.")] = 16,
    delimiter: Annotated[str, typer.Option(help="Step labels: the text that ends a step (stepsum's ','); "
                                                "step_labels holds one label per part of the response split at "
                                                "it.")] = ",",
    save_epochs: Annotated[bool, typer.Option(help="Also save the model after each pass K but the last in "
                                                   "OUT_epochK beside OUT (no held-out metrics in its meta): the "
                                                   "model an --epochs K run saves, an epoch sweep in one run.")
                           ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a model already in --out.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch CPU threads.")] = None,
) -> None:
    """Train a reward model (a scalar head on the last token) and save it with its held-out accuracy."""
    import torch

    from outrider.cli import check_model_out
    from outrider.errors import OutriderError
    from outrider.observe.progress import RunProgress
    from outrider.policy.model import Policy
    from outrider.score.reward_model import RewardModel, read_examples
    from outrider.score.rm_training import OBJECTIVES, TrainConfig, split_by_prompt, train

    if threads is not None:
        torch.set_num_threads(threads)
    check_model_out(out_dir, overwrite)
    epoch_dir = lambda k: out_dir.with_name(f"{out_dir.name}_epoch{k}")  # noqa: E731
    for k in range(1, epochs if save_epochs else 1):
        check_model_out(epoch_dir(k), overwrite)
    if not delimiter:
        raise OutriderError("--delimiter: must be a non-empty string")
    kind, examples = read_examples(str(data), delimiter)
    if contrastive > 0 and kind != "pairs":
        raise OutriderError("--contrastive: needs a pairs file {prompt, chosen, rejected}; the data holds "
                            "labelled responses")
    if model == "tiny":
        policy = Policy.tiny(hidden=hidden, layers=layers, heads=heads, seed=seed, value_head=True)
    else:
        policy = Policy.load(model, value_head=True, where="--model")
    rm = RewardModel(policy, {"data": str(data), "model": model})
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, heldout=heldout, seed=seed,
                      contrastive=contrastive, contrastive_samples=contrastive_samples, delimiter=delimiter)
    n_train = len(split_by_prompt(examples, heldout, seed)[0])
    total = epochs * -(-n_train // batch_size)
    objective = OBJECTIVES[kind]

    def save_epoch(k: int) -> None:
        # the meta a reader needs (StepScorer checks objective and delimiter); metrics come with the last pass only
        snapshot = RewardModel(rm.policy, {**rm.meta, "objective": objective, "delimiter": delimiter, "epochs": k,
                                           "lr": lr, "batch_size": batch_size, "seed": seed})
        snapshot.save(epoch_dir(k))

    try:
        with RunProgress(total, quiet=quiet).phase(f"rm ({kind})", total) as advance:
            summary = train(rm, kind, examples, cfg, on_step=lambda loss: advance(loss=loss),
                            on_epoch=save_epoch if save_epochs else None)
    except KeyboardInterrupt:
        raise SystemExit("interrupted; nothing was saved (rm train saves once, at the end, and with "
                         "--save-epochs after each pass)") from None
    rm.save(out_dir)
    held = summary["heldout"]
    what = {"pairs": "pair accuracy", "labels": "label accuracy", "steps": "step accuracy"}[kind]
    noun = {"pairs": "pairs", "labels": "labelled responses", "steps": "step-labelled responses"}[kind]
    extra = (f", first-wrong-step AUROC {held['first_wrong_auroc']:.3f} ({held['first_wrong_steps']:.0f} first "
             f"wrong steps, {held['right_steps_before']:.0f} right steps before them)") if kind == "steps" and held \
        else ""
    out.print(f"saved {out_dir}: {summary['train_examples']} {noun} trained on, {summary['steps']} steps in "
              f"{summary['train_s']:.1f} s; held-out {what} "
              + (f"{held['accuracy']:.3f} on {summary['heldout_examples']}{extra}" if held
                 else "(nothing held out)"))
    if quiet:
        print(json.dumps(summary))
