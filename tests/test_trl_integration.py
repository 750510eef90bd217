"""outrider's score pieces as TRL `GRPOTrainer` reward functions (outrider.integrations.trl)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from outrider.errors import OutriderError
from outrider.integrations.trl import reward_func


def test_pieces_score_trl_batches_as_in_a_recipe():
    match = reward_func({"name": "numeric_match"})
    assert match.__name__ == "outrider_numeric_match"
    assert match(["1+1 =", "1+1 =", "2+3 ="], [" 2", "3", "5.0"], answer=["2", "2", "5"]) == [1.0, 0.0, 1.0]
    # conversational completions, a tagged answer, the recipe's weight
    tagged = reward_func({"name": "exact_match", "weight": 0.5}, answer_format="tagged")
    chat = [[{"role": "assistant", "content": "so <answer> 7 </answer>"}], [{"role": "assistant", "content": "7"}]]
    assert tagged([[{"role": "user", "content": "3+4"}]] * 2, chat, answer=["7", "7"]) == [0.5, 0.0]
    fmt = reward_func({"name": "format", "pattern": r".*\d.*"})
    assert fmt(["p", "p"], ["a1", "ab"]) == [1.0, 0.0]
    # token-level pieces read completion_ids: DAPO's overlong penalty, -(n - free) / buffer in the soft zone
    overlong = reward_func({"name": "overlong", "max_length": 4, "buffer": 2})
    assert overlong(["p"] * 3, ["a", "b", "c"], completion_ids=[[1, 2], [1, 2, 3], [1] * 5]) == [0.0, -0.5, -1.0]


def test_a_raising_piece_scores_on_error_and_raise_stops_with_one_line(tmp_path, monkeypatch):
    (tmp_path / "bad_reward.py").write_text("def reward(prompt, response, info):\n    raise ValueError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    soft = reward_func({"name": "python", "function": "bad_reward:reward", "on_error": -1.0})
    assert soft(["p", "q"], ["a", "b"]) == [-1.0, -1.0]
    hard = reward_func({"name": "python", "function": "bad_reward:reward", "on_error": "raise"})
    with pytest.raises(OutriderError, match="boom"):
        hard(["p"], ["a"])


@pytest.mark.parametrize("section, match", [({"name": "verifier"}, "env's rewards"),
                                            ({"name": "nope"}, "unknown score"),
                                            ({"name": "format", "pattern": "("}, "pattern")])
def test_bad_sections_are_one_line(section, match):
    with pytest.raises(OutriderError, match=match) as err:
        reward_func(section)
    assert "\n" not in str(err.value)


def test_missing_trl_extra_is_one_line(monkeypatch):
    from outrider.integrations.trl import trl_version

    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(OutriderError, match=r"outrider\[trl\]"):
        trl_version()


@pytest.mark.slow  # two GRPO steps of TRL on a tiny random model: ~20 s
def test_grpo_trainer_trains_two_steps_with_an_outrider_reward(tmp_path):
    pytest.importorskip("trl", reason="the outrider[trl] extra (make test installs it)")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from outrider.policy.model import Policy

    torch.manual_seed(0)
    Policy.tiny().save(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []
    piece = reward_func({"name": "format", "pattern": r".*[0-9].*"})

    def recorded(prompts, completions, **kwargs):
        calls.append(len(completions))
        return piece(prompts, completions, **kwargs)

    recorded.__name__ = piece.__name__
    data = Dataset.from_dict({"prompt": ["1+2 =", "3+4 =", "2+2 =", "5+1 ="], "answer": ["3", "7", "4", "6"]})
    config = GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, max_steps=2, seed=0,
                        per_device_train_batch_size=4, num_generations=2, max_completion_length=6, beta=0.0,
                        learning_rate=1e-2, logging_steps=1, report_to="none", save_strategy="no",
                        disable_tqdm=True, gradient_checkpointing=False, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[recorded, reward_func("numeric_match")], args=config,
                          train_dataset=data, processing_class=tokenizer)
    trainer.train()
    assert trainer.state.global_step == 2 and calls == [4, 4]
    logged = [row for row in trainer.state.log_history if "rewards/outrider_format/mean" in row]
    assert len(logged) == 2 and all("rewards/outrider_numeric_match/mean" in row for row in logged)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_an_outrider_task_as_trl_environment_steps_like_the_env():
    from conftest import TINY_RECIPE
    from outrider.integrations.trl import environment_factory
    from outrider.envs import ENVS

    factory = environment_factory(TINY_RECIPE["task"])
    assert factory.__name__ == "outrider_reasoning_gym"
    entry, cfg = ENVS.build(dict(TINY_RECIPE["task"]), "task")
    reference = entry.fn(cfg).make_env("train")
    env = factory()
    for seed in (0, 3):
        assert env.reset(prompt="ignored", seed=seed) == reference.reset(seed)
        info = reference.step("7")
        assert env.act("7") == (info[0] or "The episode is over.") and env.get_reward() == info[1]
        assert env.act("8") == "The episode is over." and env.turns == 1
    with pytest.raises(OutriderError, match="split"):
        environment_factory(TINY_RECIPE["task"], split="test")


@pytest.mark.slow  # TRL's tool-calling loop around a tiny random model: ~20 s
def test_grpo_trainer_runs_an_outrider_env_through_environment_factory(tmp_path):
    trl = pytest.importorskip("trl", reason="the outrider[trl] extra (make test installs it)")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import add_response_schema

    from conftest import TINY_RECIPE
    from outrider.integrations.trl import environment_factory
    from outrider.policy.model import Policy

    torch.manual_seed(0)
    Policy.tiny().save(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    # a chat template that renders tool calls (TRL ships Qwen2.5's); the tiny tokenizer spells any ASCII
    tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    tokenizer = add_response_schema(tokenizer)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    seen = []
    base = environment_factory(TINY_RECIPE["task"])

    class Recorded(base):
        def reset(self, **row):
            seen.append(row["seed"])
            return super().reset(**row)

    Recorded.__name__ = base.__name__
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": "Solve:"}]] * 4, "seed": [0, 1, 2, 3]})
    config = GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, max_steps=2, seed=0,
                        per_device_train_batch_size=4, num_generations=2, max_completion_length=8, beta=0.0,
                        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
                        gradient_checkpointing=False, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                          environment_factory=Recorded)
    trainer.train()
    assert trainer.state.global_step == 2 and len(seen) == 8 and set(seen) <= {0, 1, 2, 3}
    assert any(f"rewards/{base.__name__}/mean" in row for row in trainer.state.log_history)
