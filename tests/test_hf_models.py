"""Real HF architectures as `policy.model: DIR` (Llama, Qwen2, GPT-2, randomly initialised with a locally trained
BPE tokenizer and chat template, `outrider.policy.random_model`): SFT, an RL step, evaluation and a checkpoint
that `from_pretrained` loads; LoRA adapters (peft) saved, loaded and resumed; gradient checkpointing."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import read_jsonl, tiny_recipe
from outrider.errors import OutriderError
from outrider.policy import fast_decode
from outrider.policy.adapters import LoraConfig, add_lora, require_peft
from outrider.policy.model import Policy
from outrider.policy.random_model import main as random_model_main
from outrider.policy.random_model import write_model_dir
from outrider.policy.sampler import SamplingParams, sample
from outrider.recipe import load_recipe
from outrider.trainer import Trainer

ARCHS = ["llama", "qwen2", "gpt2"]
IDS = torch.tensor([[5, 9, 40, 41, 77, 120, 3, 8]])


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {a: write_model_dir(root / a, a, hidden=32, layers=2, heads=4, kv_heads=2 if a == "qwen2" else None,
                               vocab_size=320, max_positions=256) for a in ARCHS}


def _train(tmp_path: Path, name: str, steps: int = 2, **overrides) -> tuple[Trainer, Path]:
    recipe = tmp_path / f"{name}.yaml"
    overrides.setdefault("observe", {})
    overrides["observe"] = {"checkpoint_every": 2, "keep_checkpoints": 3, **overrides["observe"]}
    recipe.write_text(yaml.safe_dump(tiny_recipe(train={"steps": steps}, **overrides), sort_keys=False))
    run = tmp_path / name
    trainer = Trainer(load_recipe(recipe), run, quiet=True)
    trainer.run()
    return trainer, run


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_written_directory_loads_like_a_hub_model(model_dirs, arch):
    model = AutoModelForCausalLM.from_pretrained(model_dirs[arch])
    tok = AutoTokenizer.from_pretrained(model_dirs[arch])
    assert model.config.model_type == arch and model.config.vocab_size == len(tok)
    text = "12 + 7 = 19, reverse: olleh"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert len(tok.encode(text, add_special_tokens=False)) < len(text)  # merges were learned
    assert (tok.chat_template is None) == (arch == "gpt2")
    policy = Policy.load(model_dirs[arch])
    first = policy.encode_observation("3 + 4 =", first=True)
    later = policy.encode_observation("now 5", first=False)
    if arch == "gpt2":  # no template: plain text
        assert first == policy.encode("3 + 4 =")
    else:  # the template's user turn and generation prompt around the text
        assert policy.decode(first).count("3 + 4 =") == 1 and len(first) > len(policy.encode("3 + 4 ="))
        assert "now 5" in tok.decode(later)
    # the fast decoder covers the Llama family; GPT-2 samples through the HF path
    assert fast_decode.supports(policy.model) == (arch != "gpt2")


def test_cli_writes_a_directory(tmp_path, capsys):
    random_model_main([str(tmp_path / "m"), "--arch", "llama", "--hidden", "16", "--layers", "1", "--heads", "2",
                       "--vocab", "300"])
    assert "llama" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").config.num_hidden_layers == 1
    with pytest.raises(OutriderError, match="arch"):
        write_model_dir(tmp_path / "x", "mamba")


@pytest.mark.parametrize("arch", ARCHS)
def test_sft_rl_eval_and_checkpoint(model_dirs, tmp_path, arch):
    trainer, run = _train(tmp_path, arch, policy={"model": str(model_dirs[arch])})
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and "pass@1" in summary["eval_end"]
    assert any("loss/total" in r for r in read_jsonl(run / "metrics.jsonl"))
    loaded = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step_2")
    torch.testing.assert_close(_logits(loaded), _logits(trainer.policy.model), rtol=0, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(model_dirs[arch])
    assert not torch.allclose(_logits(base), _logits(loaded))  # SFT and RL moved the weights
    assert AutoTokenizer.from_pretrained(run / "checkpoints" / "step_2").chat_template == \
        AutoTokenizer.from_pretrained(model_dirs[arch]).chat_template


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_run_saves_a_merged_model_and_a_loadable_adapter(model_dirs, tmp_path, arch):
    peft = require_peft()
    trainer, run = _train(tmp_path, f"lora_{arch}", policy={"model": str(model_dirs[arch]),
                                                            "lora": {"r": 4, "alpha": 8}})
    policy = trainer.policy
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert 0 < trainable < policy.num_parameters() / 5
    ckpt = run / "checkpoints" / "step_2"
    assert (ckpt / "adapter" / "adapter_config.json").exists()
    want = _logits(policy.model)
    merged = AutoModelForCausalLM.from_pretrained(ckpt)  # no peft needed for the merged weights
    torch.testing.assert_close(_logits(merged), want, rtol=0, atol=1e-5)
    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dirs[arch]), ckpt / "adapter")
    torch.testing.assert_close(_logits(adapted), want, rtol=0, atol=1e-5)
    assert not torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(model_dirs[arch])), want)


def test_lora_resume_continues_like_an_uninterrupted_run(model_dirs, tmp_path):
    """Run A to step 4; B is A's directory cut back to its step-2 checkpoint and resumed in-process: the same
    metrics and the same adapter weights at step 4 (the kill -9 version is the slow test below)."""
    over = dict(policy={"model": str(model_dirs["qwen2"]), "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
                        "gradient_checkpointing": True},
                score=[{"name": "verifier", "weight": 1.0}, {"name": "format", "pattern": ".*[0-9].*", "weight": 0.5}],
                explore={"prompts_per_step": 2, "group_size": 4})
    _, a = _train(tmp_path, "A", steps=4, **over)
    b = tmp_path / "B"
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step_4")
    (b / "summary.json").unlink()
    Trainer(load_recipe(b / "recipe.yaml"), b, resume=True, quiet=True).run()
    rows_a, rows_b = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a]
    for ra, rb in zip(rows_a, rows_b):
        for k in ra:
            if not k.startswith(("time/", "throughput/")):
                assert ra[k] == pytest.approx(rb[k], abs=1e-6), (ra["step"], k)
    wa, wb = (load_file(d / "checkpoints" / "step_4" / "adapter" / "adapter_model.safetensors") for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(r.get("optim/grad_norm", 0) > 0 for r in rows_a)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fast_decoder_samples_the_adapted_model(model_dirs, arch):
    policy = Policy.load(model_dirs[arch])
    add_lora(policy, LoraConfig(r=4, alpha=8, target_modules="all-linear"), seed=0)
    with torch.no_grad():  # B = 0 at the start: move it, so the adapters change the outputs
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    assert fast_decode.supports(policy.model)
    prompts = [[5, 9, 40], [41, 77, 120, 3, 8]]
    outs = {be: sample(policy, prompts, SamplingParams(temperature=0, max_new_tokens=12, backend=be),
                       torch.Generator().manual_seed(0)) for be in ("hf", "fast")}
    for x, y in zip(outs["hf"], outs["fast"]):
        assert x.ids == y.ids
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_keeps_fewer_activations_and_the_same_gradients(model_dirs, arch):
    grads, saved = {}, {}
    ids = torch.tensor([[5, 9, 40, 41, 77], [120, 3, 8, 0, 0]])
    mask = (torch.arange(5) < torch.tensor([[5], [3]])).long()
    for checkpointing in (False, True):
        policy = Policy.load(model_dirs[arch])
        if checkpointing:
            policy.enable_gradient_checkpointing()
        policy.eval()  # the learner scores in eval mode: checkpointing must still apply
        count = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = (policy.score(ids, mask).logprobs * mask).sum()  # padding positions differ by path
        saved[checkpointing] = count[0]
        loss.backward()
        grads[checkpointing] = [p.grad.clone() for p in policy.model.parameters() if p.grad is not None]
    assert saved[True] < saved[False] / 3, saved  # the layers' activations were not kept for the backward pass
    assert len(grads[True]) == len(grads[False])
    for g0, g1 in zip(grads[False], grads[True]):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)


def test_missing_peft_is_a_one_line_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(OutriderError, match=r"outrider\[lora\]"):
        add_lora(Policy.tiny(hidden=16, layers=1, heads=2), LoraConfig(), seed=0)


def test_bad_lora_options_are_rejected(tmp_path):
    with pytest.raises(OutriderError, match="target_modules"):
        add_lora(Policy.tiny(hidden=16, layers=1, heads=2), LoraConfig(target_modules=["no_such_proj"]), seed=0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(policy={"lora": {"r": 0}})))
    with pytest.raises(OutriderError, match="lora"):
        load_recipe(recipe)


@pytest.mark.slow  # two runs of 40 small steps and a killed process, ~1 min
def test_killed_lora_run_resumes_to_identical_metrics(tmp_path):
    from conftest import write_recipe
    from test_resume import RESUME_OVERRIDES, killed_run_resumes_like

    policy = {**RESUME_OVERRIDES["policy"], "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
              "gradient_checkpointing": True}
    recipe = write_recipe(tmp_path, **dict(RESUME_OVERRIDES, policy=policy))
    reference = tmp_path / "A"
    Trainer(load_recipe(recipe), reference, quiet=True).run()
    killed_run_resumes_like(reference, recipe, tmp_path)
