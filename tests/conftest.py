"""Shared fixtures: a tiny recipe written into tmp_path, and helpers to run the CLI as a real process."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

# Small enough that a whole run (warm start, RL steps, evaluations, checkpoints) takes about a second in-process.
TINY_RECIPE: dict[str, Any] = {
    "task": {
        "name": "reasoning_gym",
        "dataset": "chain_sum",
        "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        "template": "{metadata[expression]} =",
        "eval_size": 16,
    },
    "policy": {"model": "tiny", "hidden": 32, "layers": 1, "heads": 2,
               "warm_start": {"steps": 5, "batch_size": 8, "lr": 5.0e-3}},
    "explore": {"name": "group", "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4},
    "score": [{"name": "verifier", "weight": 1.0}],
    "credit": {"name": "grpo"},
    "update": {"lr": 1.0e-3},
    "observe": {"eval_every": 0, "eval_prompts": 4, "eval_samples": 2, "pass_at": [1, 2],
                "checkpoint_every": 2, "tensorboard": False},
    "train": {"steps": 3, "seed": 0, "threads": 1},
}

# pytest-xdist workers (and shells' background jobs) ignore SIGINT, and a child process inherits an ignored signal:
# the CLI processes that tests interrupt with SIGINT would run on. Children must start with the default disposition.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

OUTRIDER = str(Path(sys.executable).with_name("outrider"))  # the installed console script of this venv
PYTHON_M = [sys.executable, "-m", "outrider.cli"]


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in: nested mappings merge, everything else (lists included) replaces."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_recipe(**overrides: Any) -> dict[str, Any]:
    """The tiny recipe as a dict, e.g. ``tiny_recipe(train={"steps": 6})``."""
    return deep_merge(TINY_RECIPE, overrides)


def write_recipe(directory: Path, name: str = "recipe.yaml", **overrides: Any) -> Path:
    """Write the tiny recipe (with section overrides merged in) to ``directory/name`` and return the path."""
    path = Path(directory) / name
    path.write_text(yaml.safe_dump(tiny_recipe(**overrides), sort_keys=False))
    return path


@pytest.fixture
def recipe_file(tmp_path: Path):
    """``recipe_file(**overrides) -> Path``: a tiny recipe YAML in this test's tmp_path."""

    def make(name: str = "recipe.yaml", **overrides: Any) -> Path:
        return write_recipe(tmp_path, name, **overrides)

    return make


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"COLUMNS": "200", "NO_COLOR": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"})
    # recipes of the tests may list test modules (e.g. lifecycle_pieces) as plugins
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent), env.get("PYTHONPATH")) if p)
    return env


def start_cli(args: list[str], cwd: Path, python_m: bool = False) -> subprocess.Popen:
    """Start ``outrider ARGS`` (or ``python -m outrider.cli ARGS``) without waiting for it."""
    cmd = (PYTHON_M if python_m else [OUTRIDER]) + [str(a) for a in args]
    return subprocess.Popen(cmd, cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_cli(args: list[str], cwd: Path, python_m: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    return finish(start_cli(args, cwd, python_m), timeout)


def run_cli_many(calls: dict[str, tuple[list[str], bool]], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run several CLI invocations concurrently (each costs seconds of imports): name -> (args, python_m)."""
    procs = {name: start_cli(args, cwd, python_m) for name, (args, python_m) in calls.items()}
    return {name: finish(p) for name, p in procs.items()}


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, exactly one line on stderr that contains every fragment, and no traceback anywhere."""
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> bytes), to check that nothing was touched."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def call_main(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    """Run `outrider.cli.main` in-process with `argv`; return (exit code, stdout, stderr)."""
    from outrider.cli import main

    monkeypatch.setattr(sys, "argv", [OUTRIDER, *argv])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def learner_terms(loss, cfg, regulator=None, reference: bool = False) -> list:
    """The learner's built-in terms for `loss` (an (entry, options) pair from `LOSSES.build`) under the update
    config `cfg`: the entropy regulator `regulator` (a built piece; default none), KL when `reference`."""
    from outrider.update import ENTROPY
    from outrider.update.terms import build_terms

    entry, loss_cfg = loss
    if regulator is None:
        regulator = ENTROPY.create({"name": "none"})
    return build_terms(cfg, entry.create(loss_cfg), regulator, values=False, reference=reference, extra=[])


def text_batch(policy, prompts: list[str], actions: list[str], advantages: list[float]):
    """A packed batch of one-turn episodes (rows 2i and 2i+1 one group) with per-row advantages on their actions."""
    import torch

    from outrider.data import Episode, Turn, pack

    eps = []
    for i, (p, a) in enumerate(zip(prompts, actions)):
        ep = Episode(group_id=i // 2, seed=i // 2)
        ep.turns.append(Turn(observation=p, observation_ids=policy.encode(p), action=a, action_ids=policy.encode(a)))
        eps.append(ep)
    batch = pack(eps, policy.pad_id, policy.bos_id)
    batch.advantages = torch.tensor(advantages)[:, None] * batch.action_mask
    return batch


def tiny_qwen2(value_head: bool = False):
    """A 2-layer Qwen2 policy on the char tokenizer: grouped-query attention (4 query heads, 2 KV heads) and q/k/v
    biases, the Llama-family variant the lean decoder and the shared-prefix forward must also get right."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from outrider.policy.model import Policy
    from outrider.policy.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return Policy(Qwen2ForCausalLM(cfg), tok, value_head=value_head)


@pytest.fixture
def pack_every_weight(monkeypatch):
    """Pack every weight of the lean decoder into oneDNN's layout, however small the model and the call: the
    tests' models are far below the sizes where packing pays (`onednn.pays`), and would otherwise never run the
    packed path."""
    from outrider.policy import onednn

    monkeypatch.setattr(onednn, "PACK_MIN_MACS", 0)
    monkeypatch.setattr(onednn, "PACK_MIN_NUMEL", 0)


@pytest.fixture(scope="module")
def scaled_tiny_policy():
    """The tiny model with its weights re-drawn at a larger scale: at its own init (std 0.02) greedy decoding
    just repeats the last character and distributions are near flat, which would hide cache, position, padding
    and truncation mistakes."""
    import torch

    from outrider.policy.model import Policy

    torch.set_num_threads(1)
    policy = Policy.tiny(hidden=32, layers=1, heads=2, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, w in policy.model.named_parameters():
            if "norm" not in name:
                w.copy_(torch.randn(w.shape, generator=g) * 0.3)
    return policy
