"""The multi-turn path shared by every agent env: turn masking in packing and in the loss, state keys read before
each action, the context guard, chat-template observations, the turn-cap schedule and the agent metrics."""

from __future__ import annotations

import pytest
import torch

from outrider.data import Episode, Start, Turn, pack, sequence_ids
from outrider.envs.base import Demonstration
from outrider.explore import TurnCapConfig
from outrider.explore.rollout import rollout
from outrider.observe.metrics import agent_metrics, error_repeat_rates
from outrider.policy.model import Policy
from outrider.policy.sampler import SamplingParams
from outrider.policy.sft import demo_episode
from test_restarts import assert_untrained_positions_carry_nothing


class CountdownEnv:
    """Counts down from 3; every action is one turn; an action that is not a digit is invalid (error text)."""

    def reset(self, seed: int) -> str:
        self.left, self.seed = 3, seed
        return f"start {seed % 10}:"

    def state_key(self):
        return ("left", self.left)

    def step(self, action: str):
        if not action.strip().isdigit():
            self.left -= 1
            return "bad action; use a digit:", 0.0, self.left == 0, {"invalid": True}
        self.left -= 1
        done = self.left == 0
        info = {"events": ["counted"], "success": done}
        if done:
            info["metrics"] = {"regret": float(self.seed)}
        return f"{self.left} left:", 0.5, done, info


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.tiny(hidden=32, layers=1, heads=2, seed=0)


def play(policy: Policy, n: int = 6, max_turns: int = 5, max_new: int = 3) -> list[Episode]:
    g = torch.Generator().manual_seed(0)
    return rollout(policy, CountdownEnv, [Start(seed=i, group_id=i // 2) for i in range(n)],
                   SamplingParams(max_new_tokens=max_new), g, max_turns)


def test_rollout_records_state_keys_before_each_action_and_stops_when_done(policy):
    episodes = play(policy)
    for e in episodes:
        assert len(e.turns) == 3 and e.done
        assert [t.state_key for t in e.turns] == [("left", 3), ("left", 2), ("left", 1)]
        assert e.turns[1].observation in ("2 left:", "bad action; use a digit:")
        assert e.success == (not e.turns[-1].info.get("invalid", False))


@pytest.mark.parametrize("given", [False, True])
def test_untrained_tokens_never_carry_advantage_or_loss_gradient(policy, given):
    """Observation tokens, and (``given``) the prefix of replayed action tokens an episode started from, get
    advantage 0 from every credit piece and gradient 0 from every loss."""
    episodes = play(policy)
    for i, e in enumerate(episodes):
        e.rewards["trajectory"]["r"] = float(e.seed % 2)
        e.rewards["step"]["s"] = [0.1 * k for k in range(len(e.turns))]
        if given:  # from none to a whole first turn and part of the second
            e.prefix_tokens = min(i, len(e.turns[0].action_ids) + 1)
    batch = pack(episodes, policy.pad_id, policy.bos_id)
    ids = [i for e in episodes for t in e.turns for i in t.observation_ids]
    prefix = sum(e.prefix_tokens for e in episodes)
    assert given == (prefix > 0)
    assert batch.action_mask.sum() == sum(e.num_action_tokens for e in episodes) - prefix
    assert batch.attention_mask.sum() - batch.action_mask.sum() == len(ids) + len(episodes) + prefix  # + BOS
    flags = torch.zeros_like(batch.action_mask)
    for row, e in enumerate(episodes):
        _, is_action, _ = sequence_ids(e, policy.bos_id)
        flags[row, : len(is_action)] = torch.tensor(is_action, dtype=flags.dtype)
    assert batch.token_rewards[flags == 0].abs().sum() == 0  # observation tokens never carry reward
    assert_untrained_positions_carry_nothing(batch, policy)


def test_pack_gives_batch_local_turn_state_and_action_ids(policy):
    def ep(keys, actions):
        e = Episode(group_id=0, seed=0)
        for k, a in zip(keys, actions):
            e.turns.append(Turn("o", policy.encode("o"), a, policy.encode(a), info={"state_key": k}))
        return e

    batch = pack([ep([("a",), ("b",)], ["x", "y"]), ep([("b",), None, ("a",)], ["y", "y", "z"])],
                 policy.pad_id, policy.bos_id)
    assert batch.turn_state_ids.tolist() == [[0, 1, -1], [1, -1, 0]]
    assert batch.turn_action_ids.tolist() == [[0, 1, -1], [1, 1, 2]]
    assert batch.select(torch.tensor([1])).turn_state_ids.tolist() == [[1, -1, 0]]


def test_episodes_end_when_the_context_is_full():
    small = Policy.tiny(hidden=32, layers=1, heads=2, max_positions=24, seed=0)
    episodes = play(small, max_new=6)
    for e in episodes:
        length = 1 + sum(len(t.observation_ids) + len(t.action_ids) for t in e.turns)
        assert length <= 24
        assert e.metadata.get("context_full") and not e.done
    assert agent_metrics(episodes)["episode/context_full_frac"] == 1.0


def test_agent_metrics_on_hand_made_episodes(policy):
    def ep(invalid, events, metrics, keys):
        e = Episode(group_id=0, seed=0)
        for k, (bad, evs) in enumerate(zip(invalid, events)):
            info = {"invalid": bad, "events": evs, "state_key": keys[k]}
            e.turns.append(Turn("o", [1], "a", [2], info=info))
        e.turns[-1].info["metrics"] = metrics
        return e

    eps = [ep([True, False], [[], ["key"]], {"regret": 2.0}, ["s0", "s1"]),
           ep([False, False], [["key", "door"], ["key"]], {"regret": 4.0}, ["s0", "s2"])]
    m = agent_metrics(eps)
    assert m["episode/invalid_action_rate"] == 0.25
    assert m["env/regret"] == 3.0
    assert m["event/key"] == 1.0 and m["event/door"] == 0.5
    assert m["episode/distinct_states"] == 3.0


def test_error_repeat_rates_on_hand_made_episodes():
    """Over the turns right after an invalid action: the share invalid again, and the share repeating its text."""
    def ep(*turns):
        return Episode(group_id=0, seed=0, turns=[Turn("o", [1], a, [2], info={"invalid": bad}) for a, bad in turns])

    eps = [ep(("x", True), ("x", True), ("y", True), ("ok", False)),  # after errors: x (same, bad), y (bad), ok
           ep(("z", True), ("calc", False)),                          # recovers at once
           ep(("fine", False), ("z", True))]                          # nothing follows its error
    m = error_repeat_rates(eps)
    assert m == {"episode/invalid_after_error_rate": 2 / 4, "episode/repeat_error_rate": 1 / 4}
    assert agent_metrics(eps)["episode/repeat_error_rate"] == 0.25
    assert error_repeat_rates([ep(("a", False), ("b", True))]) == {}  # no action follows an error: absent


def test_turn_cap_schedule():
    cap = TurnCapConfig(start=5, increment=5, every=10)
    assert [cap.at(s, 20) for s in (1, 10, 11, 20, 21, 31, 500)] == [5, 5, 10, 10, 15, 20, 20]
    assert TurnCapConfig(start=30, increment=0, every=1).at(3, 12) == 12


def test_chat_template_observations_follow_the_template(policy):
    chat = Policy.tiny(hidden=32, layers=1, heads=2, seed=0)
    chat.tokenizer.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                                    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                                    "{% if add_generation_prompt %}[assistant]{% endif %}")
    first = chat.encode_observation("hi", first=True)
    assert chat.tokenizer.decode(first) == "[user]hi[assistant]"
    later = chat.encode_observation("ok", first=False)
    assert chat.tokenizer.decode(later) == "[user]ok[assistant]"
    assert policy.encode_observation("hi", first=True) == policy.encode("hi")  # no template: plain text
    chat.use_chat_template = False
    assert chat.encode_observation("hi", first=True) == chat.encode("hi")
    chat.use_chat_template = True
    demo = demo_episode(chat, Demonstration([("hi", "a"), ("ok", "b")]), 0)
    ids, _, _ = sequence_ids(demo)
    text = chat.tokenizer.decode(ids, skip_special_tokens=False)
    assert text == "[user]hi[assistant]a<eos>[user]ok[assistant]b<eos>"


def test_demonstrations_are_cut_to_the_context():
    small = Policy.tiny(hidden=32, layers=1, heads=2, max_positions=20, seed=0)
    demo = Demonstration([("abcde", "12"), ("fghij", "34"), ("klmno", "56")])
    ep = demo_episode(small, demo, 0)
    assert len(ep.turns) == 2  # 1 + 2·(5 + 3) = 17 fits, a third turn (25) would not


def test_chat_templates_with_bos_or_a_special_last_assistant_turn():
    chat = Policy.tiny(hidden=32, layers=1, heads=2, seed=0)
    # BOS written by the template (Llama-3, Gemma): the rollout adds BOS itself, so it must not appear twice
    chat.tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                                    "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    assert chat.tokenizer.decode(chat.encode_observation("hi", first=True), skip_special_tokens=False) == \
        "[user]hi[assistant]"
    # the last assistant turn rendered differently (Qwen3's think block): the user-ended delta is used
    chat.tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{% if m['role'] == 'assistant' and loop.last %}<t></t>{% endif %}"
        "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    assert chat.tokenizer.decode(chat.encode_observation("ok", first=False)) == "[user]ok[assistant]"


def test_verifier_steps_keeps_each_turns_reward_on_its_turn(policy):
    from outrider.score import SCORE, Component, compose

    episodes = play(policy, n=2)
    comps = [Component(n, SCORE.create({"name": n}), 1.0) for n in ("verifier", "verifier_steps")]
    compose(episodes, comps)
    for e in episodes:
        assert e.rewards["step"]["verifier_steps"] == [t.reward for t in e.turns]
        assert sum(e.rewards["step"]["verifier_steps"]) == e.rewards["trajectory"]["verifier"]
    batch = pack(episodes, policy.pad_id, policy.bos_id)
    last_of_turn = [max(t for t in range(batch.input_ids.shape[1])
                        if batch.action_mask[0, t] > 0 and batch.step_index[0, t] == k) for k in range(3)]
    expected = [t.reward for t in episodes[0].turns]
    expected[-1] += episodes[0].rewards["trajectory"]["verifier"]
    assert batch.token_rewards[0, last_of_turn].tolist() == pytest.approx(expected)


def test_eval_table_shows_metrics_present_in_only_one_evaluation():
    from rich.console import Console

    from outrider.cli import _eval_table

    console = Console(width=120, record=True)
    console.print(_eval_table("t", {"start": {"pass@1": 0.1}, "end": {"pass@1": 0.5, "event_opened_door": 0.25}}))
    text = console.export_text()
    assert "event_opened_door" in text and "0.250" in text and "-" in text
